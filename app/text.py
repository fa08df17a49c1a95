"""The text of each generated token, for colouring tokens one by one."""
from __future__ import annotations

CONTEXT = 6  # tokens decoded before the new one, so tokenizers that strip a leading space still give it back
REPLACEMENT = "\ufffd"  # what a decode gives for a token that ends in the middle of a UTF-8 character
END_MARK = "⟨end⟩"  # how views that show single tokens (step view, hovers) name the model's end-of-answer token


class Detokenizer:
    """Incremental per-token text: ``update(tokens)`` returns one piece per token, their join is the answer.

    A token that ends inside a multi-byte character gets an empty piece and the character goes to the
    token that completes it, so no piece shows a broken character. Special tokens (EOS) get their name, and a
    True in ``special``: they are not text, and the views leave them out.
    """

    def __init__(self, tokenizer, end_ids=()):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.end_ids = set(end_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.special: list[bool] = []
        self._done = 0  # tokens before this index have been written out in full

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def update(self, tokens: list[int]) -> tuple[list[str], list[bool]]:
        """Pieces and special flags for ``tokens``, reusing the work done for an earlier prefix."""
        if tokens[: len(self.tokens)] != self.tokens:
            self._reset()  # the answer was trimmed (EOS, budget): start over
        self.tokens = list(tokens)
        for i in range(len(self.pieces), len(tokens)):
            tok = tokens[i]
            if tok in self.special_ids:
                self.pieces.append(self._decode([tok]))
                self.special.append(True)
                self._done = i + 1
                continue
            start = max(0, self._done - CONTEXT)
            before = self._decode([t for t in tokens[start : self._done] if t not in self.special_ids])
            upto = self._decode([t for t in tokens[start : i + 1] if t not in self.special_ids])
            if upto.endswith(REPLACEMENT) and not before.endswith(REPLACEMENT) and i - self._done < 3:
                self.pieces.append("")  # part of a character: shown with the token that completes it
                self.special.append(False)
                continue
            self.pieces.append(upto[len(before) :] if upto.startswith(before) else upto)
            self.special.append(False)
            self._done = i + 1
        return list(self.pieces), list(self.special)

    def names(self, ids) -> dict[int, str]:
        """Each token id's own text, for views that show tokens one at a time; a special token is not text and gets
        a marker: END_MARK for the end of the answer, ⟨name⟩ for any other."""
        out = {}
        for tok in ids:
            if tok in self.end_ids:
                out[tok] = END_MARK
            elif tok in self.special_ids:
                out[tok] = "⟨" + self._decode([tok]).strip("<|>") + "⟩"
            else:
                out[tok] = self._decode([tok])
        return out

    def text(self, tokens: list[int]) -> str:
        """The answer as a person reads it: special tokens left out."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

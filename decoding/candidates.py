"""Candidate n-grams for Jacobi decoding: continuations of the last accepted token that ride beside the window.

A Jacobi pass checks one guess per position. The fast engine can check a few more continuations in the same
forward (``FastEngine.step``'s ``candidates``): each is verified like the window's guesses, and when one of them is
right for longer than the window, its tokens are accepted instead. The output stays the greedy text, token for token;
only the number of tokens a forward gains changes.

Where candidates come from (``NgramPool``), best first:
1. the text: what followed earlier occurrences of the last two accepted tokens, then of the last one (prompt and
   answer; a CLLM's answers repeat their own phrases and the prompt's);
2. earlier passes: the runs of outputs the window produced past its accepted prefix, keyed by their first token
   (the n-gram recycling of Lookahead decoding and Jacobi Forcing). A pass's rejected outputs are often right a few
   tokens later, after the window has already moved on to other guesses.
"""
from __future__ import annotations

from collections import OrderedDict

RECYCLED_PER_TOKEN = 4  # recycled continuations kept per first token (the latest)
TEXT_LOOKS = 16  # earlier occurrences of a key looked at per pass (the latest)


class TextIndex:
    """The prompt and the accepted answer, and for every run of 1..``key_len`` tokens with a token after it, the
    positions right after it (oldest first). ``sync`` adds the answer's new tokens: constant time a token, however
    long the text. Shared by the lookup init (``decoders.ContextLookup``) and the candidate n-grams."""

    def __init__(self, prompt_ids: list[int], key_len: int = 2):
        self.key_len, self.text, self.after, self.answered = key_len, [], {}, 0
        self._extend(prompt_ids)

    def _extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.text)  # the new token follows the runs that end just before it
            self.text.append(token)
            for size in range(1, min(self.key_len, end) + 1):
                self.after.setdefault(tuple(self.text[end - size:end]), []).append(end)

    def sync(self, answer: list[int]) -> None:
        """Add the tokens of ``answer`` (the accepted tokens so far, which only grow) not yet in the text."""
        self._extend(answer[self.answered:])
        self.answered = len(answer)


class NgramPool:
    """Continuations of up to ``length`` tokens for the token last accepted, from the text and from earlier passes.

    The text grows as tokens are accepted (``candidates`` adds them); passes add their outputs with ``recycle``.
    Work per pass is bounded (TEXT_LOOKS occurrences a key, RECYCLED_PER_TOKEN continuations a token), however long
    the text."""

    def __init__(self, prompt_ids: list[int], length: int):
        if length < 1:
            raise ValueError(f"candidate length must be at least 1, got {length}")
        self.length = length
        self.index = TextIndex(prompt_ids, key_len=2)
        self.recycled: dict[int, OrderedDict] = {}  # first token -> continuations (tuples), latest last

    def recycle(self, outputs: list[int]) -> None:
        """Keep, for each of ``outputs`` but the last, the outputs after it as a continuation of it."""
        for j in range(len(outputs) - 1):
            tail = tuple(outputs[j + 1:j + 1 + self.length])
            kept = self.recycled.setdefault(outputs[j], OrderedDict())
            kept.pop(tail, None)
            kept[tail] = True
            if len(kept) > RECYCLED_PER_TOKEN:
                kept.popitem(last=False)

    def candidates(self, answer: list[int], count: int, window_guesses: list[int], max_len: int) -> list[list[int]]:
        """Up to ``count`` distinct continuations of ``answer`` (the accepted tokens so far, which only grow), each
        at most ``max_len`` tokens, none a prefix of the window's own ``window_guesses`` (the window checks those)."""
        self.index.sync(answer)
        text = self.index.text
        size = min(self.length, max_len)
        if count <= 0 or size <= 0:
            return []
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()

        def offer(cont) -> bool:
            cont = tuple(cont[:size])
            if cont and cont not in seen and list(cont) != window_guesses[:len(cont)]:
                seen.add(cont)
                found.append(list(cont))
            return len(found) >= count

        for key in (tuple(text[-2:]), tuple(text[-1:])):
            # the latest occurrences first; the text's own end has nothing after it yet
            for start in reversed(self.index.after.get(key, [])[-TEXT_LOOKS:]):
                if offer(text[start:start + size]):
                    return found
        for cont in reversed(self.recycled.get(text[-1], {})):
            if offer(cont):
                return found
        return found

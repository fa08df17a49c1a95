"""The record every decoder produces: what was fed in, what came out, what was kept, and when.

The UI, the benchmark and the tests all read this one type.
"""
from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, field


def repeat_flags(context: list[int], tokens: list[int], k: int = 4) -> list[bool]:
    """For each of ``tokens`` (following ``context``): does the k-gram it ends already occur earlier in
    context + tokens? (A token that repeats text; a small CLLM fast-forwards mostly these.)"""
    text = list(context)
    seen = {tuple(text[i - k + 1:i + 1]) for i in range(k - 1, len(text))}
    flags = []
    for tok in tokens:
        text.append(tok)
        gram = tuple(text[-k:])
        flags.append(len(text) >= k and gram in seen)
        seen.add(gram)
    return flags


def loop_onset(tokens: list[int], limit: int, max_period: int = 1) -> int | None:
    """Where the first loop in ``tokens`` begins: the index of the first token of the earliest-completed run of a
    pattern of 1..max_period tokens occurring ``limit`` times in a row; None if there is none. (The trajectory
    filter of ``training.collect`` drops answers that hold one; the app points such answers out.)"""
    first = None  # (index where a run completes, where it began)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run >= (limit - 1) * p:
                if first is None or i < first[0]:
                    first = (i, i - limit * p + 1)
                break
    return None if first is None else first[1]


LOOP_LIMIT, LOOP_PERIOD = 10, 4  # a loop: a pattern of 1 to 4 tokens, ten times in a row (the collection's filter)


@dataclass
class FastForwardSplit:
    """Where a Jacobi decode's extra tokens come from: answer tokens split by whether they repeat text (end a
    4-gram already in the prompt or earlier in the answer), and how many of each were fast-forwarded (accepted
    after the first token of their pass)."""

    fast_forwarded: int
    fast_forwarded_repeating: int
    tokens: int
    repeating: int

    def __add__(self, other: "FastForwardSplit") -> "FastForwardSplit":
        """Counts pooled over decodes."""
        return FastForwardSplit(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def new_rate(self) -> float | None:
        """Share of the tokens of new text that were fast-forwarded (None without new text)."""
        new = self.tokens - self.repeating
        return (self.fast_forwarded - self.fast_forwarded_repeating) / new if new else None

    @property
    def repeating_rate(self) -> float | None:
        """Share of the repeating tokens that were fast-forwarded (None without any)."""
        return self.fast_forwarded_repeating / self.repeating if self.repeating else None


@dataclass
class Iteration:
    """One forward pass over a window after the prefill."""

    index: int  # 1-based iteration number (the prefill is iteration 0)
    start: int  # answer position of outputs[0]: tokens generated before this pass
    window: list[int]  # tokens fed in: [last accepted] + guesses
    outputs: list[int]  # argmax at every window position; outputs[j] predicts answer position start + j
    accepted: int  # outputs[:accepted] became final in this pass (>= 1)
    t: float  # seconds since the decode started, when this pass's tokens were known
    # 0: the window's own guesses were kept. g >= 1: candidate n-gram g (decoding/candidates.py), checked in the same
    # pass, was right for longer; window and outputs are then [last accepted] + that candidate and its outputs.
    candidate: int = 0
    branch: bool = False  # the kept candidate was a branch: another likely token for the window's first guess
    output_correct: list[bool] = field(default_factory=list)  # outputs[j] equals the final token (set at the end)

    @property
    def stationary(self) -> list[int]:
        """Window positions whose output is already final but not yet accepted (a wrong token precedes it)."""
        return [j for j in range(self.accepted, len(self.outputs)) if j < len(self.output_correct) and self.output_correct[j]]


@dataclass
class DecodeTrace:
    """A whole decode: the streamed state while running, complete once ``done`` is True."""

    method: str  # "ar", "jacobi" or "lookup"
    n: int  # window size (1 for AR; for lookup the widest window: the last token and up to n-1 copied ones)
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included when it was produced
    iterations: list[Iteration] = field(default_factory=list)
    prefill_s: float = 0.0  # time of the prefill forward (also the time to first token)
    wall_s: float = 0.0  # total decode time, prefill included
    stop_reason: str = ""  # "eos", "length" or "" while running / when cancelled
    done: bool = False

    @property
    def forwards(self) -> int:
        """Forward passes, the prefill included."""
        return len(self.iterations) + (1 if self.tokens else 0)

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def mean_accepted(self) -> float:
        """Tokens gained per forward after the prefill (AR: 1.0)."""
        if not self.iterations:
            return 0.0
        return sum(it.accepted for it in self.iterations) / len(self.iterations)

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0

    def token_arrivals(self) -> list[tuple[int, int]]:
        """For every generated token: (iteration that produced it, tokens accepted in that iteration).

        The prefill's token is iteration 0 with a group of 1.
        """
        arrivals = [(0, 1)] if self.tokens else []
        for it in self.iterations:
            arrivals.extend([(it.index, it.accepted)] * it.accepted)
        return arrivals[: len(self.tokens)]

    def token_times(self) -> list[float]:
        """Seconds since start at which each generated token became known."""
        times = [self.prefill_s] if self.tokens else []
        for it in self.iterations:
            times.extend([it.t] * it.accepted)
        return times[: len(self.tokens)]

    def fast_forward_split(self) -> FastForwardSplit:
        """The answer's tokens by kind (repeating text or new) and how many of each came in fast-forwards."""
        repeat = repeat_flags(self.prompt_ids, self.tokens)
        ff = [it.start + j for it in self.iterations for j in range(1, it.accepted) if it.start + j < len(self.tokens)]
        return FastForwardSplit(len(ff), sum(repeat[p] for p in ff), len(self.tokens), sum(repeat))

    def summary(self) -> dict:
        """The numbers a benchmark row or a UI caption needs."""
        return {
            "method": self.method,
            "n": self.n,
            "tokens": len(self.tokens),
            "forwards": self.forwards,
            "wall_s": self.wall_s,
            "ttft_s": self.ttft_s,
            "tok_s": self.tok_s,
            "mean_accepted": self.mean_accepted,
            "stop_reason": self.stop_reason,
        }

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}

    def finalize(self) -> None:
        """Mark every output of every pass as final-or-not, now that the answer is known."""
        for it in self.iterations:
            it.output_correct = [
                it.start + j < len(self.tokens) and tok == self.tokens[it.start + j] for j, tok in enumerate(it.outputs)
            ]
        self.done = True

"""Greedy AR and greedy Jacobi decoding over transformers' public model API and a DynamicCache.

Both decoders are generators: they yield the same growing ``DecodeTrace`` after the prefill
and after every forward pass, and the last one they yield is complete (``trace.done``).
A caller may stop iterating at any time (that is how a run is cancelled).
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from .candidates import NgramPool, TextIndex
from .trace import DecodeTrace, Iteration

MAX_WINDOW = 128  # largest Jacobi window we accept (candidate n-grams included)
MAX_CANDIDATES = 16  # most candidate n-grams checked in one pass
MAX_NEW_TOKENS = 4096  # hard cap on one request
ENGINES = ("auto", "eager", "fast")  # how decoders run a model: transformers (eager), our static-cache engine (fast), or
# auto: fast on CUDA and the CPU for the Llama models it supports (fast.default_engine), else eager
INIT_CHOICES = ("random", "repeat", "lookup")  # initial guesses: random prompt tokens (the paper), the last token repeated, or copied from the context


def default_candidate_len(n: int) -> int:
    """Tokens of a candidate n-gram when none is given: n-1, as many as the window guesses (at least 1)."""
    return max(n - 1, 1)


@dataclass
class DecodeConfig:
    """Settings of one decode; saved with every benchmark result."""

    max_new_tokens: int = 128  # stop after this many generated tokens
    n: int = 16  # Jacobi window size: the last accepted token + n-1 guesses (n = 1 is AR)
    init: str = "random"  # how guesses are initialised: one of INIT_CHOICES
    seed: int = 0  # seed of the random initial guesses (the output does not depend on it)
    candidates: int = 0  # candidate n-grams checked beside the window in each pass (fast engine only; 0: plain Jacobi)
    candidate_len: int | None = None  # tokens per candidate n-gram; None: n-1, as many as the window guesses
    branches: int = 0  # next likeliest tokens for the window's first guess, each checked beside it (fast engine; 0: none)
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # generation stops after any of these

    @property
    def candidate_tokens(self) -> int:
        """The length of a candidate n-gram: ``candidate_len``, or ``default_candidate_len(n)`` when it is None."""
        return self.candidate_len if self.candidate_len is not None else default_candidate_len(self.n)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for: the engine's own caps by default; a shared server (the app) lowers some."""

    max_new_tokens: int = MAX_NEW_TOKENS  # tokens generated at most
    candidates: int = MAX_CANDIDATES  # candidate n-grams checked beside the window in a pass
    branches: int = MAX_CANDIDATES  # branches for the window's first guess in a pass


def validate(model, prompt_ids, cfg: DecodeConfig, limits: Limits = Limits(), engine: str | None = None) -> list[int]:
    """Check a request before any work; returns the prompt as a list of ints or raises ValueError with a message for
    people. With ``engine`` ("eager" or "fast"), also that it can run the decoding extras asked for."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.flatten().tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
        raise ValueError("prompt_ids must be a list of token ids (ints)")
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_int("window size n", cfg.n, 1, MAX_WINDOW)
    check_int("max new tokens", cfg.max_new_tokens, 1, limits.max_new_tokens)
    check_int("candidate n-grams", cfg.candidates, 0, limits.candidates)
    check_int("candidate length", cfg.candidate_tokens, 1, MAX_WINDOW)  # n is an int by then
    check_int("branches", cfg.branches, 0, limits.branches)
    width = cfg.n + cfg.candidates * cfg.candidate_tokens + cfg.branches
    if width > MAX_WINDOW:
        raise ValueError(f"a window of {cfg.n} with {cfg.candidates} candidate n-grams of {cfg.candidate_tokens} tokens "
                         f"and {cfg.branches} branches is {width} tokens, over {MAX_WINDOW} tokens a pass: use fewer of "
                         "them or a smaller window")
    if cfg.init not in INIT_CHOICES:
        raise ValueError(f"initial guesses must be one of {', '.join(INIT_CHOICES)}, got {cfg.init!r}")
    if engine is not None and engine != "fast" and (cfg.candidates or cfg.branches):
        raise ValueError("candidate n-grams and branches need the fast engine (a Llama model on the CPU or CUDA): set "
                         "them to 0 or use engine='fast'")
    vocab = model.config.get_text_config().vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    context = context_length(model)
    if len(prompt_ids) + cfg.max_new_tokens > context:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) plus max new tokens ({cfg.max_new_tokens}) exceeds "
            f"the model's context of {context} tokens: shorten the prompt or ask for fewer tokens"
        )
    return list(prompt_ids)


def check_int(name: str, value, lo: int, hi: int) -> None:
    """ValueError unless ``value`` is a whole number (an int, not a bool) from ``lo`` to ``hi``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


def context_length(model) -> int:
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048))


def sync_device(device: torch.device) -> None:
    """Wait for the GPU, so that a timer read next measures finished work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EagerSession:
    """One sequence's forward passes through transformers' public API over a DynamicCache.

    The decoders talk to a session only through ``prefill``, ``forward`` and ``keep``, so a faster
    engine (a static cache with CUDA graphs) can stand in for this one without touching them.
    """

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> int:
        """Run the prompt through the model and return the first generated token."""
        ids = torch.tensor([prompt_ids], device=self.device)
        # logits_to_keep=1: the LM head only at the last position, as generate() does.
        logits = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())  # note: CPU-GPU sync point

    @torch.inference_mode()
    def forward(self, window: list[int]) -> list[int]:
        """Feed a window after the cached tokens; return the argmax at every window position."""
        ids = torch.tensor([window], device=self.device)
        logits = self.model(input_ids=ids, cache=self.cache, use_cache=True).logits
        if len(window) == 1:
            return [int(logits[0, -1].argmax())]  # note: CPU-GPU sync point
        return logits[0].argmax(-1).tolist()  # note: CPU-GPU sync point

    def keep(self, accepted: int, width: int) -> None:
        """Of the last window of ``width`` inputs, keep the KV of the first ``accepted`` only."""
        if accepted < width:
            self.cache.crop(accepted - width)


def make_session(model, engine: str = "eager"):
    """A decoding session for one sequence: ``eager`` (any model, any device) or ``fast`` (CUDA graphs)."""
    if engine == "eager":
        return EagerSession(model)
    if engine == "fast":
        from .fast import FastSession  # CUDA only; imported lazily so CPU users never load it

        return FastSession.for_model(model)
    raise ValueError(f"unknown engine {engine!r}: choose eager or fast")


def _start(session, trace: DecodeTrace) -> float:
    """Prefill and take the first token; returns the start time."""
    sync_device(session.device)
    t0 = time.perf_counter()
    trace.tokens.append(session.prefill(trace.prompt_ids))
    trace.prefill_s = time.perf_counter() - t0
    return t0


def _stop(trace: DecodeTrace, cfg: DecodeConfig, checked: int = 0) -> bool:
    """Trim at EOS or the budget; True when decoding is over. ``checked``: how many tokens an earlier call already
    found free of EOS (each step then looks at its new tokens only, not the whole answer again)."""
    for i in range(checked, len(trace.tokens)):
        if trace.tokens[i] in cfg.eos_token_ids:
            del trace.tokens[i + 1 :]
            trace.stop_reason = "eos"
            return True
    if len(trace.tokens) >= cfg.max_new_tokens:
        del trace.tokens[cfg.max_new_tokens :]
        trace.stop_reason = "length"
        return True
    return False


def _finish(trace: DecodeTrace, t0: float) -> DecodeTrace:
    trace.wall_s = time.perf_counter() - t0
    trace.finalize()
    return trace


def ar_decode(model, prompt_ids, cfg: DecodeConfig, engine: str = "eager", checked: bool = False) -> Iterator[DecodeTrace]:
    """Greedy autoregressive decoding with a KV cache: one token per forward. ``checked``: the caller has already
    validated these inputs for this model (a race validates once for all its lanes). AR ignores the Jacobi extras."""
    prompt_ids = list(prompt_ids) if checked else validate(model, prompt_ids, cfg)
    session = make_session(model, engine)
    trace = DecodeTrace(method="ar", n=1, prompt_ids=prompt_ids)
    t0 = _start(session, trace)
    yield trace
    checked = 0
    while not _stop(trace, cfg, checked):
        checked = len(trace.tokens)
        last = trace.tokens[-1]
        tok = session.forward([last])[0]
        trace.iterations.append(
            Iteration(len(trace.iterations) + 1, len(trace.tokens), [last], [tok], 1, time.perf_counter() - t0)
        )
        trace.tokens.append(tok)
        yield trace
    yield _finish(trace, t0)


def initial_guesses(prompt_ids: list[int], last: int, count: int, init: str, rng: random.Random) -> list[int]:
    """Guesses for fresh window slots: random prompt tokens (the paper) or the last token repeated."""
    if init == "repeat":
        return [last] * count
    return [rng.choice(prompt_ids) for _ in range(count)]


class ContextLookup:
    """Guesses that continue the prompt and answer by copying: the tokens that followed the latest earlier
    occurrence of the text's last ``key_len`` tokens (else of its last token). Text that repeats what the prompt or
    the answer already holds then starts out right.

    Its ``TextIndex`` keeps, for every run of 1..``key_len`` tokens with a token after it, where it was followed, and
    adds the answer's tokens as they are accepted: constant time a step, however long the text."""

    def __init__(self, prompt_ids: list[int], key_len: int = 2):
        self.index = TextIndex(prompt_ids, key_len)

    def guesses(self, answer: list[int], carried: list[int], count: int) -> list[int]:
        """Up to ``count`` guesses for the slots after ``answer`` (the accepted tokens so far, which only grow) and
        the ``carried`` guesses. May return fewer (or none)."""
        index = self.index
        index.sync(answer)
        tail = (index.text[-index.key_len:] + carried)[-index.key_len:]
        for size in range(min(index.key_len, len(tail)), 0, -1):
            after = index.after.get(tuple(tail[-size:]))
            if after:
                return index.text[after[-1]: after[-1] + count]  # the latest occurrence
        return []


def fresh_guesses(cfg: DecodeConfig, prompt_ids: list[int], tokens: list[int], carried: list[int], count: int,
                  rng: random.Random, lookup: ContextLookup | None = None) -> list[int]:
    """``count`` guesses for the window slots after the accepted ``tokens`` and the ``carried`` guesses
    (``lookup``: the decode's ContextLookup when ``cfg.init`` is "lookup")."""
    if count <= 0:
        return []
    found = lookup.guesses(tokens, carried, count) if lookup is not None else []
    rest = "random" if cfg.init == "lookup" else cfg.init
    return found + initial_guesses(prompt_ids, tokens[-1], count - len(found), rest, rng)


def accept_length(window: list[int], outputs: list[int]) -> int:
    """How many outputs are final: outputs[0] always, then outputs[j] while guess window[j] equalled outputs[j-1]."""
    k = 1
    while k < len(window) and window[k] == outputs[k - 1]:
        k += 1
    return k


def verify_candidates(outputs: list[int], candidates: list[list[int]], cand_outputs: list[list[int]]) -> tuple[int, int]:
    """The candidate right for the longest and how many of its tokens are right: (index from 1, matched), or (0, 0).

    Candidate g guesses the tokens after the window's first input; token j is right when it equals the token the model
    puts there, ``outputs[0]`` for j = 0 and the candidate's own output at token j-1 after that."""
    best, best_matched = 0, 0
    for g, (cand, outs) in enumerate(zip(candidates, cand_outputs), start=1):
        matched, expected = 0, outputs[0]
        while matched < len(cand) and cand[matched] == expected:
            expected = outs[matched]
            matched += 1
        if matched > best_matched:
            best, best_matched = g, matched
    return best, best_matched


def branch_candidates(alternatives: list[int], window: list[int], cands: list[list[int]], count: int) -> list[list[int]]:
    """One-token candidates for the window's first guess: up to ``count`` of ``alternatives`` (the next likeliest
    tokens of the output that guess came from) that neither the window nor a candidate n-gram already starts with.
    When one is right, its own output is right too: the pass gains two tokens where the window's guess gains one."""
    taken = set(window[1:2]) | {c[0] for c in cands}
    return [[z] for z in alternatives if z not in taken][:count]


def guess_source(k: int, width: int, kept: int, matched: int, cands: list[list[int]]) -> int | None:
    """Which output of a pass (the window's, then each candidate's) became the next window's first guess: the one
    after the accepted prefix, in the window (``kept`` = 0) or in candidate ``kept``, matched for ``matched`` tokens;
    None when that guess is a fresh one."""
    if kept == 0:
        return k if k < width else None
    cand = cands[kept - 1]
    if matched < len(cand):
        return width + sum(len(c) for c in cands[:kept - 1]) + matched
    return len(cand) + 1 if len(cand) + 1 < width else None


def jacobi_decode(model, prompt_ids, cfg: DecodeConfig, engine: str = "eager", checked: bool = False) -> Iterator[DecodeTrace]:
    """Greedy Jacobi decoding with a KV cache (lossless: the fixed point is the greedy AR text).

    Each pass feeds ``[last accepted] + n-1 guesses``; the matching prefix of guesses is accepted
    together with the output after it, the cache keeps only the accepted inputs, and the outputs
    not accepted become the next guesses. With ``cfg.candidates``, the same pass also checks that many
    candidate n-grams (decoding/candidates.py) and keeps one instead when it is right for longer. With
    ``cfg.branches``, it also checks that many other likely tokens for the window's first guess (``branch_candidates``).
    ``checked`` as in ``ar_decode``.
    """
    prompt_ids = list(prompt_ids) if checked else validate(model, prompt_ids, cfg, engine=engine)
    session = make_session(model, engine)
    top = cfg.branches + 1 if cfg.branches else 0  # each row's likeliest tokens a pass returns: the guess and its branches
    if top:  # on a GPU, the graphs that also return them: captured once, untimed
        session.prepare_top(top)
    rng = random.Random(cfg.seed)
    trace = DecodeTrace(method="jacobi", n=cfg.n, prompt_ids=prompt_ids)
    t0 = _start(session, trace)
    yield trace
    lookup = ContextLookup(prompt_ids) if cfg.init == "lookup" else None
    pool = NgramPool(prompt_ids, cfg.candidate_tokens) if cfg.candidates else None
    guesses = fresh_guesses(cfg, prompt_ids, trace.tokens, [], cfg.n - 1, rng, lookup)
    alternatives: list[int] = []  # the likeliest tokens where guesses[0] came from (guesses[0] first), when cfg.branches
    start = 0
    while not _stop(trace, cfg, start):
        # Guesses past the token budget are wasted work: shrink the window (and the candidates) near the end.
        start = len(trace.tokens)
        budget = cfg.max_new_tokens - start
        width = min(cfg.n, budget + 1)
        window = [trace.tokens[-1]] + guesses[: width - 1]
        cands = pool.candidates(trace.tokens, cfg.candidates, window[1:], budget) if pool else []
        ngrams = len(cands)  # the candidate n-grams come first, then the branches
        cands += branch_candidates(alternatives, window, cands, cfg.branches)
        if cands or cfg.branches:
            outputs, cand_outputs = session.verify(window, cands, top=top)
            g, matched = verify_candidates(outputs, cands, cand_outputs)
        else:
            outputs, g, matched = session.forward(window), 0, 0
        k = accept_length(window, outputs)
        if pool:
            pool.recycle(outputs[k - 1:])
        if matched + 1 > k:  # candidate g is right for longer than the window's guesses: keep it instead
            session.keep_candidate(g - 1, matched)
            cand, outs = cands[g - 1], cand_outputs[g - 1]
            guesses = outs[matched:] + outputs[len(cand) + 1:]
            window, outputs, k = [window[0]] + cand, [outputs[0]] + outs, matched + 1
        else:
            session.keep(k, len(window))
            guesses, g = outputs[k:], 0
        if cfg.branches:  # k counts only when the window's guesses were kept (g = 0), and then it is the window's
            source = guess_source(k, width, g, matched, cands)
            alternatives = session.alternatives(source) if source is not None else []  # guesses[0] among them
        trace.iterations.append(
            Iteration(len(trace.iterations) + 1, start, window, outputs, k, time.perf_counter() - t0, candidate=g,
                      branch=g > ngrams)
        )
        trace.tokens.extend(outputs[:k])
        guesses += fresh_guesses(cfg, prompt_ids, trace.tokens, guesses, cfg.n - 1 - len(guesses), rng, lookup)
        yield trace
    yield _finish(trace, t0)


def lookup_decode(model, prompt_ids, cfg: DecodeConfig, engine: str = "eager", checked: bool = False) -> Iterator[DecodeTrace]:
    """Greedy prompt-lookup decoding (lossless: the greedy AR text).

    Each pass feeds the last accepted token and up to ``cfg.n`` - 1 tokens copied from the text: what followed the
    latest earlier occurrence of its last two tokens in the prompt and the answer so far, else of its last token
    (``ContextLookup``). They are verified like a Jacobi window's guesses, in one forward; with nothing to copy the
    pass is an AR step. This is transformers' prompt lookup decoding (generate(prompt_lookup_num_tokens=n - 1)),
    which copies after the earliest occurrence instead of the latest; on the fast engine it is what Jacobi decoding
    with n = 1 and one candidate n-gram of n - 1 tokens from the text does, in a single window. ``checked`` as in
    ``ar_decode``.
    """
    prompt_ids = list(prompt_ids) if checked else validate(model, prompt_ids, cfg)
    session = make_session(model, engine)
    trace = DecodeTrace(method="lookup", n=cfg.n, prompt_ids=prompt_ids)
    t0 = _start(session, trace)
    yield trace
    lookup = ContextLookup(prompt_ids)
    start = 0
    while not _stop(trace, cfg, start):
        start = len(trace.tokens)
        copied = lookup.guesses(trace.tokens, [], min(cfg.n - 1, cfg.max_new_tokens - start))
        window = [trace.tokens[-1]] + copied
        outputs = session.forward(window)
        k = accept_length(window, outputs)
        session.keep(k, len(window))
        trace.iterations.append(Iteration(len(trace.iterations) + 1, start, window, outputs, k, time.perf_counter() - t0))
        trace.tokens.extend(outputs[:k])
        yield trace
    yield _finish(trace, t0)


DECODERS = {"ar": ar_decode, "jacobi": jacobi_decode, "lookup": lookup_decode}


def run(decoder, model, prompt_ids, cfg: DecodeConfig, engine: str = "eager", checked: bool = False) -> DecodeTrace:
    """Run a streaming decoder to the end and return its complete trace."""
    trace = None
    for trace in decoder(model, prompt_ids, cfg, engine=engine, checked=checked):
        pass
    return trace

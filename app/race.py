"""A race: the same prompt through several lanes (AR / Jacobi on the base model or the CLLM), one after another.

No Gradio here: the UI, the ``/race`` API and the tests all drive ``run_race`` and read its ``Race``.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from decoding import DecodeConfig, DecodeTrace, encode, validate
from decoding.decoders import DECODERS, Limits, context_length, default_candidate_len

from .text import Detokenizer

MAX_NEW_TOKENS = 1024  # default cap of one request in the app (the engine allows more; --max-new-tokens-limit)
MAX_CANDIDATES = 4  # candidate n-grams a pass may check in the app (each as long as the window's guesses)
MAX_BRANCHES = 3  # other likely tokens for the window's first guess a pass may check in the app
STREAM_EVERY_S = 0.1  # the UI gets a fresh frame at most this often while a lane runs


@dataclass(frozen=True)
class Lane:
    key: str  # name in the API and the benchmark JSON
    label: str  # what the page shows
    model: str  # "base" or "cllm"
    method: str  # "ar" or "jacobi"


# The order is the running order: AR first, so every later lane has its speedup at once.
LANES = {
    "base_ar": Lane("base_ar", "AR · base model", "base", "ar"),
    "base_jacobi": Lane("base_jacobi", "Jacobi · base model", "base", "jacobi"),
    "cllm_ar": Lane("cllm_ar", "AR · CLLM", "cllm", "ar"),
    "cllm_jacobi": Lane("cllm_jacobi", "Jacobi · CLLM", "cllm", "jacobi"),
}
DEFAULT_LANES = ("base_ar", "base_jacobi", "cllm_jacobi")  # what a race runs when not told otherwise


@dataclass
class LaneRun:
    """One lane of a race: its streamed trace, the text of each token, and where it stands."""

    lane: Lane
    status: str = "waiting"  # waiting, running, done, stopped
    trace: DecodeTrace | None = None
    pieces: list[str] = field(default_factory=list)  # text of each generated token
    special: list[bool] = field(default_factory=list)  # token is a special one (EOS, ...)
    text: str = ""  # the answer, special tokens left out


@dataclass
class Race:
    """Everything one race produced; kept in the page's state for the charts, the replay and the step view."""

    prompt: str
    settings: DecodeConfig
    model_name: str
    device: str
    runs: list[LaneRun]
    prompt_ids: list[int] = field(default_factory=list)  # the prompt through the chat template, encoded once

    def run(self, key: str) -> LaneRun | None:
        return next((r for r in self.runs if r.lane.key == key), None)

    def reference(self, run: LaneRun) -> LaneRun | None:
        """The AR lane a lane is compared with: same model's AR if it ran, else the base AR."""
        if run.lane.method == "ar" and run.lane.model == "base":
            return None
        own = self.run(f"{run.lane.model}_ar")
        if own is not None and own is not run:
            return own
        return self.run("base_ar") if run.lane.key != "base_ar" else None

    @property
    def finished(self) -> list[LaneRun]:
        return [r for r in self.runs if r.status == "done"]


def whole(value):
    """A slider or an API client may send a whole number as a float (8.0): that float as an int, anything else as it
    came (``validate`` then says what is wrong with it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def new_race(host, prompt: str, n, max_new_tokens, init: str = "random", lanes=DEFAULT_LANES, limit: int = MAX_NEW_TOKENS,
             candidates=0, branches=0) -> Race:
    """Check a request against the loaded models and set up its lanes; raises ValueError with a message for people.
    The prompt is encoded and the settings validated here, once for every lane."""
    if host.error:
        raise ValueError(f"no model is loaded: {host.error}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type one or pick an example")
    unknown = [k for k in lanes if k not in LANES]
    if unknown:
        raise ValueError(f"unknown lane {unknown[0]!r}: choose from {', '.join(LANES)}")
    chosen = [LANES[k] for k in LANES if k in lanes and (LANES[k].model == "base" or host.cllm is not None)]
    if not chosen:
        raise ValueError("no lane to run: tick at least one lane (the CLLM lanes need a CLLM adapter)")
    n = whole(n)
    cfg = DecodeConfig(max_new_tokens=whole(max_new_tokens), n=n, init=init, eos_token_ids=host.base.eos_token_ids,
                       candidates=whole(candidates), candidate_len=default_candidate_len(n) if isinstance(n, int) else None,
                       branches=whole(branches))
    prompt_ids = encode(host.base.tokenizer, prompt)  # raises on an oversized prompt
    limits = Limits(max_new_tokens=limit, candidates=MAX_CANDIDATES, branches=MAX_BRANCHES)
    shapes = set()  # a full CLLM checkpoint may have another vocabulary or context than the base model
    for loaded in filter(None, (host.base, host.cllm)):
        shape = (loaded.model.config.get_text_config().vocab_size, context_length(loaded.model))
        if shape not in shapes:
            validate(loaded.model, prompt_ids, cfg, limits, engine=host.engine)
            shapes.add(shape)
    return Race(prompt, cfg, host.base.name, str(host.base.device), [LaneRun(lane) for lane in chosen], prompt_ids)


def clean_timing(steps: Iterator[DecodeTrace]) -> Iterator[DecodeTrace]:
    """Pass a decoder's stream through, taking out of its clock the time the consumer kept it paused.

    A decoder is a generator: while the UI renders a frame, its clock runs on. This keeps each lane's
    timestamps those of the decoding alone, so the numbers do not depend on how often the page is updated.
    """
    paused = 0.0
    shifts: list[float] = []  # per iteration: pause time already counted into its timestamp
    for trace in steps:
        shifts.extend([paused] * (len(trace.iterations) - len(shifts)))
        if trace.done:
            for it, shift in zip(trace.iterations, shifts):
                it.t -= shift
            trace.wall_s -= paused
            yield trace
            return
        t = time.perf_counter()
        yield trace
        paused += time.perf_counter() - t


def never() -> bool:
    return False


def run_race(host, race: Race, stream_every: float = STREAM_EVERY_S, engine: str = "eager",
             stopped: Callable[[], bool] = never, deadline: float | None = None) -> Iterator[Race]:
    """Run the lanes one after another (never at once, so each timing is clean), yielding the race as it goes.

    Yields at most every ``stream_every`` seconds while a lane runs, and once when each lane ends.
    Closing the generator stops the race (the running lane is left as it was). So does ``stopped()`` turning
    true (the Stop button, see ``StopRequests``), or ``stop_race`` on the same race, or ``time.perf_counter()``
    passing ``deadline`` (the server's time budget): the race ends at its next step, marks the running lane stopped
    and starts no later lane.
    """
    asked = stopped
    if deadline is not None:
        def stopped() -> bool:
            return asked() or time.perf_counter() > deadline
    for run in race.runs:
        if stopped() or any(r.status == "stopped" for r in race.runs):
            return
        loaded = host.base if run.lane.model == "base" else host.cllm
        detok = Detokenizer(loaded.tokenizer)
        run.status = "running"
        yield race
        last = time.perf_counter()
        for trace in clean_timing(DECODERS[run.lane.method](loaded.model, race.prompt_ids, race.settings, engine=engine,
                                                            checked=True)):
            if stopped() or run.status == "stopped":
                run.status = "stopped"
                return
            run.trace = trace
            if trace.done or time.perf_counter() - last >= stream_every:
                run.pieces, run.special = detok.update(trace.tokens)
                yield race
                last = time.perf_counter()
        run.text = detok.text(run.trace.tokens)
        run.status = "done"
        yield race


class StopRequests:
    """What the Stop button asked for, per browser session.

    The page numbers its races 1, 2, ... as they are clicked, and Stop sends the number of its latest one: a
    race of that session whose number is at or below it ends at its next step, or at once when it leaves the
    queue. The race thus ends by itself and the page sees it end like any race. (Gradio's own cancel, when it
    met a race that ended by itself at the same moment, could leave the page waiting for an end that never
    came, and a page that waits ignores the next click on Race.)
    """

    def __init__(self):
        self._marks: dict[str, int] = {}
        self._lock = threading.Lock()

    def stop(self, session: str, number) -> None:
        """Stop the session's races numbered up to ``number``."""
        with self._lock:
            self._marks[session] = max(self._marks.get(session, 0), int(number or 0))

    def checker(self, session: str, number) -> Callable[[], bool]:
        """For race ``number`` of the session: a function that says whether Stop has reached it (a race
        without a number, as from the API, never is)."""
        number = int(number or 0)
        return lambda: number >= 1 and self._marks.get(session, 0) >= number

    def forget(self, session: str) -> None:
        with self._lock:
            self._marks.pop(session, None)


def stop_race(race: Race | None) -> None:
    """Mark what was running as stopped (what the page shows at once when Stop is clicked)."""
    for run in race.runs if race else []:
        if run.status == "running":
            run.status = "stopped"


def lane_numbers(race: Race, run: LaneRun) -> dict:
    """The numbers under a lane and in the API: the trace's summary plus speedup and agreement with AR."""
    out = run.trace.summary() if run.trace else {}
    out.pop("method", None)
    base = race.run("base_ar")
    ar_tok_s = base.trace.tok_s if base and base.status == "done" else 0.0
    out["speedup"] = out["tok_s"] / ar_tok_s if ar_tok_s and out.get("tok_s") else None
    ref = race.reference(run)
    if ref is not None and ref.status == "done" and run.status == "done":
        out["compared_with"] = ref.lane.key
        out["matches_ar"] = ref.trace.tokens == run.trace.tokens
        out["first_difference"] = first_difference(ref.trace.tokens, run.trace.tokens)
    else:
        out["compared_with"] = None
        out["matches_ar"] = None
        out["first_difference"] = None
    return out


def pass_cost(race: Race) -> float | None:
    """How many AR passes one Jacobi pass cost in this race: the mean time of a pass after the prefill, Jacobi
    lanes pooled, over that of the AR lanes. Jacobi outruns AR only above this many tokens per forward."""
    def per_pass(runs: list[LaneRun]) -> float:
        passes = sum(len(r.trace.iterations) for r in runs)
        return sum(r.trace.wall_s - r.trace.prefill_s for r in runs) / passes if passes else 0.0

    ar = [r for r in race.finished if r.lane.method == "ar"]
    jacobi = [r for r in race.finished if r.lane.method == "jacobi"]
    ar_pass, jacobi_pass = per_pass(ar), per_pass(jacobi)
    return jacobi_pass / ar_pass if ar_pass > 0 and jacobi_pass > 0 else None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two answers differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def race_json(race: Race) -> dict:
    """The ``/race`` API's answer: lanes named as in the benchmark, each with its text and numbers."""
    return {
        "prompt": race.prompt,
        "model": race.model_name,
        "device": race.device,
        "settings": {k: v for k, v in race.settings.to_dict().items() if k != "eos_token_ids"},
        "lanes": {
            run.lane.key: {"label": run.lane.label, "text": run.text, "status": run.status} | lane_numbers(race, run)
            for run in race.runs
        },
    }

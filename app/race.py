"""A race: the same prompt through several lanes (AR / Jacobi on the base model or the CLLM), one after another.

Each Jacobi lane is measured against the AR lane of its own model (same text, token for token): its tokens per pass
are exact; its clock ratio comes from timed rounds that alternate the lanes, with their spread.
No Gradio here: the UI, the ``/race`` API and the tests all drive ``run_race`` and read its ``Race``.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from decoding import DecodeConfig, DecodeTrace, encode, validate
from decoding.decoders import DECODERS, Limits, check_int, context_length, default_candidate_len
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD, loop_onset

from .text import Detokenizer

MAX_NEW_TOKENS = 1024  # default cap of one request in the app (the engine allows more; --max-new-tokens-limit)
MAX_CANDIDATES = 4  # candidate n-grams a pass may check in the app (each as long as the window's guesses)
MAX_BRANCHES = 3  # other likely tokens for the window's first guess a pass may check in the app
STREAM_EVERY_S = 0.1  # the UI gets a fresh frame at most this often while a lane runs
ROUNDS, MAX_ROUNDS = 3, 5  # timed runs of every lane (the one you watch, then unseen ones), for the clock ratio's spread
GAIN_MIN = 1.1  # below this many tokens per pass Jacobi saved too few passes for a clock ratio to be its gain
# A Jacobi pass costs at least an AR pass, so a clock ratio above the ratio of passes (AR's over Jacobi's) by more than
# this factor is more than the saved passes explain: timing noise, or a slower AR path on the machine
CLOCK_SLACK = 1.15


@dataclass(frozen=True)
class Lane:
    key: str  # name in the API and the benchmark JSON
    label: str  # what the page shows
    model: str  # "base" or "cllm"
    method: str  # "ar" or "jacobi"


# The order is the running order: each model's AR before its Jacobi, so a Jacobi lane has its reference at once.
LANES = {
    "base_ar": Lane("base_ar", "AR · base model", "base", "ar"),
    "base_jacobi": Lane("base_jacobi", "Jacobi · base model", "base", "jacobi"),
    "cllm_ar": Lane("cllm_ar", "AR · CLLM", "cllm", "ar"),
    "cllm_jacobi": Lane("cllm_jacobi", "Jacobi · CLLM", "cllm", "jacobi"),
}
# What a race runs when not told otherwise: both pairs, so each Jacobi lane is measured against its own model's AR.
DEFAULT_LANES = ("base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi")


@dataclass
class LaneRun:
    """One lane of a race: its streamed trace, the text of each token, and where it stands."""

    lane: Lane
    status: str = "waiting"  # waiting, running, done, stopped
    trace: DecodeTrace | None = None
    pieces: list[str] = field(default_factory=list)  # text of each generated token
    special: list[bool] = field(default_factory=list)  # token is a special one (EOS, ...)
    text: str = ""  # the answer, special tokens left out
    walls: list[float] = field(default_factory=list)  # seconds of each timed run: the streamed one, then the rounds
    vocab: dict[int, str] = field(default_factory=dict)  # text of every token id in its passes (special: a marker)


@dataclass
class Race:
    """Everything one race produced; kept in the page's state for the charts, the replay and the step view."""

    prompt: str
    settings: DecodeConfig
    model_name: str
    device: str
    runs: list[LaneRun]
    prompt_ids: list[int] = field(default_factory=list)  # the prompt through the chat template, encoded once
    rounds: int = ROUNDS  # timed runs of every lane (1: only the streamed one)
    stopped: bool = False  # Stop reached this race
    recorded: dict | None = None  # a race read from a file: its meta (device, command, commit), shown as recorded
    timing: tuple[int, str] | None = None  # while timed rounds run: (round, lane key) being timed

    def run(self, key: str) -> LaneRun | None:
        return next((r for r in self.runs if r.lane.key == key), None)

    def reference(self, run: LaneRun) -> LaneRun | None:
        """The AR lane a Jacobi lane is measured against: its own model's AR when that lane is in the race (same
        text), else the other model's AR (a different text); None for an AR lane."""
        if run.lane.method == "ar":
            return None
        other = "cllm" if run.lane.model == "base" else "base"
        return self.run(f"{run.lane.model}_ar") or self.run(f"{other}_ar")

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
             candidates=0, branches=0, rounds=ROUNDS) -> Race:
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
    check_int("timed runs", whole(rounds), 1, MAX_ROUNDS)
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
    return Race(prompt, cfg, host.base.name, str(host.base.device), [LaneRun(lane) for lane in chosen], prompt_ids,
                whole(rounds))


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


def lane_model(host, run: LaneRun):
    return host.base if run.lane.model == "base" else host.cllm


def warm_up(host, race: Race, engine: str) -> None:
    """A few untimed passes of each model the race uses, so the first lane is not timed on cold threads and caches."""
    cfg = replace(race.settings, max_new_tokens=4)
    for loaded in {id(lane_model(host, r)): lane_model(host, r) for r in race.runs}.values():
        for method in ("ar", "jacobi"):
            for _ in DECODERS[method](loaded.model, race.prompt_ids[-16:], cfg, engine=engine, checked=True):
                pass


def stream_lane(host, race: Race, run: LaneRun, stream_every: float, engine: str,
                halted: Callable[[], bool]) -> Iterator[Race]:
    """Run one lane, yielding the race at most every ``stream_every`` seconds and when the lane ends."""
    loaded = lane_model(host, run)
    detok = Detokenizer(loaded.tokenizer, loaded.eos_token_ids)
    run.status = "running"
    yield race
    last = time.perf_counter()
    for trace in clean_timing(DECODERS[run.lane.method](loaded.model, race.prompt_ids, race.settings, engine=engine,
                                                        checked=True)):
        if halted() or run.status == "stopped":
            run.status = "stopped"
            return
        run.trace = trace
        if trace.done or time.perf_counter() - last >= stream_every:
            run.pieces, run.special = detok.update(trace.tokens)
            yield race
            last = time.perf_counter()
    run.text = detok.text(run.trace.tokens)
    run.vocab = detok.names({t for it in run.trace.iterations for t in it.window + it.outputs} | set(run.trace.tokens))
    run.walls = [run.trace.wall_s]
    run.status = "done"
    yield race


def time_lane(host, race: Race, run: LaneRun, stream_every: float, engine: str,
              halted: Callable[[], bool]) -> Iterator[Race]:
    """One more unseen run of a finished lane, yielding the race unchanged at most every ``stream_every`` seconds (so
    a caller that closes the race is heard); returns its seconds, or None when Stop came first."""
    loaded = lane_model(host, run)
    trace, last = None, time.perf_counter()
    for trace in clean_timing(DECODERS[run.lane.method](loaded.model, race.prompt_ids, race.settings, engine=engine,
                                                        checked=True)):
        if halted():
            return None
        if not trace.done and time.perf_counter() - last >= stream_every:
            yield race
            last = time.perf_counter()
    return trace.wall_s


def round_order(race: Race, number: int) -> list[LaneRun]:
    """The lanes of timed round ``number`` (2, 3, ...): reversed in even rounds, so that no lane always runs first
    and each Jacobi lane sits next to its AR lane (AR, Jacobi | Jacobi, AR | ...)."""
    done = [r for r in race.runs if r.status == "done"]
    return done[::-1] if number % 2 == 0 else done


def run_race(host, race: Race, stream_every: float = STREAM_EVERY_S, engine: str = "eager",
             stopped: Callable[[], bool] = never, deadline: float | None = None) -> Iterator[Race]:
    """Run the lanes one after another (never at once, so each timing is clean), yielding the race as it goes; then
    ``race.rounds - 1`` unseen timed rounds of every lane, alternating their order (see ``round_order``).

    Yields at most every ``stream_every`` seconds while a lane runs (a timed one too, unseen), once when each lane
    ends, and before each timed run (``race.timing`` then names it). Closing the generator stops the race (the
    running lane is left as it was). So does ``stopped()`` turning true (the Stop button, see ``StopRequests``), or
    ``stop_race`` on the same race, or ``time.perf_counter()`` passing ``deadline`` (the server's time budget): the
    race ends at its next step, marks the running lane stopped and starts no later lane or round.
    """
    def halted() -> bool:
        return race.stopped or stopped() or (deadline is not None and time.perf_counter() > deadline)

    if halted():
        return
    warm_up(host, race, engine)
    for run in race.runs:
        if halted():
            return
        yield from stream_lane(host, race, run, stream_every, engine, halted)
        if run.status != "done":
            return
    for number in range(2, race.rounds + 1):
        for run in round_order(race, number):
            race.timing = (number, run.lane.key)
            yield race
            wall = yield from time_lane(host, race, run, stream_every, engine, halted)
            if wall is None:
                race.timing = None
                return
            run.walls.append(wall)
    race.timing = None
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
    """Mark the race and what was running as stopped (what the page shows at once when Stop is clicked)."""
    if race is not None:
        race.stopped = True
    for run in race.runs if race else []:
        if run.status == "running":
            run.status = "stopped"


def lane_numbers(race: Race, run: LaneRun) -> dict:
    """The numbers under a lane and in the API (``Callbacks.race_api`` documents each): the trace's summary with the
    median of the timed runs, the comparison with the lane's reference, and the loop flag."""
    trace = run.trace
    out = trace.summary() if trace else {}
    out.pop("method", None)
    out["walls"] = list(run.walls)
    if run.walls:
        out["wall_s"] = statistics.median(run.walls)
        out["tok_s"] = len(trace.tokens) / out["wall_s"] if out["wall_s"] > 0 else 0.0
    out |= comparison(race, run)
    out["loop_from"] = loop_onset(trace.tokens, LOOP_LIMIT, LOOP_PERIOD) if trace else None
    out["repeated_per_forward"] = repeated_per_forward(trace) if trace and run.lane.method == "jacobi" else None
    return out


def comparison(race: Race, run: LaneRun) -> dict:
    """A Jacobi lane against its reference AR lane: whether the texts are equal (and where they first differ), and
    the tokens-per-second ratio of each timed round both made (their median, min and max)."""
    ref = race.reference(run)
    out = {"reference": ref.lane.key if ref else None, "same_text": None, "first_difference": None, "speedup": None,
           "speedup_runs": [], "speedup_min": None, "speedup_max": None}
    if ref is None or ref.status != "done" or run.status != "done":
        return out
    out["same_text"] = ref.trace.tokens == run.trace.tokens
    out["first_difference"] = first_difference(ref.trace.tokens, run.trace.tokens)
    ratios = [(len(run.trace.tokens) / mine) / (len(ref.trace.tokens) / theirs)
              for mine, theirs in zip(run.walls, ref.walls) if mine > 0 and theirs > 0]
    if ratios:
        out.update(speedup=statistics.median(ratios), speedup_runs=ratios, speedup_min=min(ratios),
                   speedup_max=max(ratios))
    return out


def repeated_per_forward(trace: DecodeTrace) -> float | None:
    """How much of a Jacobi lane's tokens per forward came from fast-forwarding repeated text (tokens that end a
    4-gram already in the prompt or the answer, accepted after the first token of their pass)."""
    if not trace.iterations:
        return None
    return trace.fast_forward_split().fast_forwarded_repeating / len(trace.iterations)


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
        "rounds": race.rounds,
        "lanes": {
            run.lane.key: {"label": run.lane.label, "text": run.text, "status": run.status} | lane_numbers(race, run)
            for run in race.runs
        },
    }

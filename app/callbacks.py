"""The app's callbacks: small methods over one ModelHost that take the page's inputs and return its outputs.
ui.py lays out the page and wires them to it; the work is in race, render, explain, charts and record."""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Iterator
from html import escape
from pathlib import Path
from urllib.parse import urlencode

import gradio as gr
import torch

from decoding import ModelLoadError

from . import charts, render
from .explain import running_status, verdict
from .host import ModelHost, custom_adapter, custom_spec, hide_paths
from .race import (DEFAULT_LANES, LANES, MAX_BRANCHES, MAX_CANDIDATES, MAX_NEW_TOKENS, MAX_ROUNDS, ROUNDS, Race,
                   StopRequests, new_race, race_json, run_race, stop_race)
from .record import race_record

READY = "The app is ready for the next race."
MAX_PROMPT_TOKENS = 1024  # default cap of a request's prompt, chat template included (--max-prompt-tokens)
RACE_BUDGET_S = 120.0  # default wall-clock budget of one race, all lanes (--race-budget-s; 0: none)
# On ZeroGPU a race runs as a GPU task of ZEROGPU_TASK_S (the platform's default duration; a shorter one queues
# sooner); the first task also moves the models and builds the engine, so a race there gets at most this budget.
ZEROGPU_TASK_S, ZEROGPU_BUDGET_S = 60, 30.0
MAX_NUMBER = 2**31  # larger request numbers are refused before any other check (their message would print them whole)
API_STREAM_EVERY_S = 0.1  # /race yields its progress this often, so a cancelled job ends within about this long
INITS = ("random", "repeat", "lookup")  # the "Initial guesses" choices, in the page's order
# Every view drawn from a race, in the order ``Callbacks.views`` returns them (ui.py lists the components so).
VIEWS = ("time_plot", "accept_plot", "speed_plot", "lane_pick", "conv_plot", "step_slider", "step_view", "replay_view",
         "race_file", "charts_file", "share")
# The settings a shared link restores: query parameter -> (lowest, highest) for numbers, None for the others.
LINK_PARAMS = {"prompt": None, "n": (1, 128), "max_new_tokens": (1, None), "init": None, "candidates": (0, MAX_CANDIDATES),
               "branches": (0, MAX_BRANCHES), "lanes": None, "rounds": (1, MAX_ROUNDS)}


def lane_choices(host: ModelHost) -> list[tuple[str, str]]:
    return [(lane.label, key) for key, lane in LANES.items() if lane.model == "base" or host.cllm is not None]


def header_html(host: ModelHost) -> str:
    cls = "jl-error" if host.error else "jl-model"
    return f'<div class="{cls}">{escape(hide_paths(host.describe()))}</div>'


def check_request(prompt, **numbers) -> None:
    """ValueError with a message for people when a request's values are not what a form would send: a prompt that
    is not text or not valid Unicode (a lone surrogate), a number that is not a finite number (NaN, Infinity)."""
    if not isinstance(prompt, str):
        raise ValueError("the prompt is missing (null)" if prompt is None else
                         f"the prompt must be text, not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the prompt is not valid text: character {exc.start + 1} is a lone surrogate "
                         f"({prompt[exc.start]!r})") from None
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name.replace('_', ' ')} must be a whole number, not {value!r}")
        if abs(value) > MAX_NUMBER:
            raise ValueError(f"{name.replace('_', ' ')} is out of range: {value:.3g}")


def share_link(race: Race | None) -> str:
    """A link that opens the page with this race's prompt and settings (query parameters; ``Callbacks.restore``)."""
    if race is None:
        return ""
    cfg = race.settings
    query = urlencode({"prompt": race.prompt, "n": cfg.n, "max_new_tokens": cfg.max_new_tokens, "init": cfg.init,
                       "candidates": cfg.candidates, "branches": cfg.branches,
                       "lanes": ",".join(r.lane.key for r in race.runs), "rounds": race.rounds})
    return (f'<a class="jl-share" href="?{escape(query)}" target="_blank" rel="noopener">Link to this prompt and '
            "these settings</a>: copy it to share; it opens the page ready to race.")


class Downloads:
    """The files the Download buttons give, written once per race into gradio's upload folder (so it serves them
    without a copy); the oldest races' files are removed beyond KEEP."""

    KEEP = 32

    def __init__(self):
        from gradio.utils import get_upload_folder

        self.folder = Path(get_upload_folder()) / "jacobi-lens"

    def write(self, race: Race) -> tuple[str, str]:
        """(race JSON, charts HTML) of a race, as paths."""
        folder = self.folder / ("example" if race.recorded else uuid.uuid4().hex[:12])
        folder.mkdir(parents=True, exist_ok=True)
        data, page = folder / "jacobi-lens-race.json", folder / "jacobi-lens-charts.html"
        data.write_text(json.dumps(race_record(race), ensure_ascii=False), encoding="utf-8")
        page.write_text(charts.charts_html(race), encoding="utf-8")
        self.prune()
        return str(data), str(page)

    def prune(self) -> None:
        races = sorted((p for p in self.folder.iterdir() if p.is_dir() and p.name != "example"), key=lambda p: p.stat().st_mtime)
        for old in races[: max(0, len(races) - self.KEEP)]:
            shutil.rmtree(old, ignore_errors=True)


class Callbacks:
    """What the page's events call. Models are loaded by the caller (once, at start-up), or by ``load_models`` when
    custom models are allowed."""

    def __init__(self, host: ModelHost, allow_custom_models: bool = False, max_new_tokens_limit: int = MAX_NEW_TOKENS,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS, race_budget_s: float = RACE_BUDGET_S,
                 model_root: str | None = None):
        self.host, self.allow_custom_models, self.limit = host, allow_custom_models, max_new_tokens_limit
        if getattr(host, "zero_gpu", False):
            race_budget_s = min(race_budget_s or ZEROGPU_BUDGET_S, ZEROGPU_BUDGET_S)
        self.max_prompt_tokens, self.race_budget_s, self.model_root = max_prompt_tokens, race_budget_s, model_root
        self.stops = StopRequests()
        self.downloads = Downloads()

    def start_race(self, prompt, n, max_new_tokens, init, lanes, candidates, branches, rounds=ROUNDS):
        """A checked race within this server's bounds; ValueError with a message for people otherwise."""
        check_request(prompt, n=n, max_new_tokens=max_new_tokens, candidates=candidates, branches=branches, rounds=rounds)
        race = new_race(self.host, prompt, n, max_new_tokens, init, lanes, limit=self.limit, candidates=candidates,
                        branches=branches, rounds=rounds)
        if len(race.prompt_ids) > self.max_prompt_tokens:
            raise ValueError(f"the prompt is too long for this server: {len(race.prompt_ids)} tokens with the chat "
                             f"template, at most {self.max_prompt_tokens} (--max-prompt-tokens)")
        return race

    def deadline(self) -> float | None:
        """When a race starting now must end (time.perf_counter()), or None without a budget."""
        return time.perf_counter() + self.race_budget_s if self.race_budget_s > 0 else None

    def out_of_time(self, deadline: float | None) -> str:
        """The note for a race its time budget ended, else ""."""
        if deadline is None or time.perf_counter() <= deadline:
            return ""
        return (f"Stopped at this server's time budget of {self.race_budget_s:g} s a race (--race-budget-s): "
                "ask for fewer tokens, or run the app yourself.")

    def race_stream(self, prompt, n, max_new_tokens, init, candidates, branches, lanes, rounds, number,
                    request: gr.Request):
        """Run a race, yielding board, status, state and the other views (VIEWS): cleared at the start, drawn once
        the lanes have run (while the timed runs go on), left to ``after_race`` at the end."""
        try:
            race = self.start_race(prompt, n, max_new_tokens, init, lanes or [], candidates, branches, rounds)
        except ValueError as exc:
            yield (render.board_html(None, f"No race: {escape(str(exc))}."), f'<span class="jl-bad">Cannot start the race: '
                   f"{escape(str(exc))}.</span>", None, *self.views(None))
            raise gr.Error(str(exc), title="Cannot start the race", print_exception=False) from None
        stopped = self.stops.checker(request.session_hash, number)
        deadline = self.deadline()
        views, drawn, shown = self.views(race), False, None
        try:
            for race in self.host.stream(run_race(self.host, race, engine=self.host.engine, stopped=stopped,
                                                  deadline=deadline)):
                if race.timing and not drawn:  # every lane has run once: draw them while the timed runs go on
                    views, drawn = self.views(race), True
                if race.timing and race.timing == shown:
                    # a timed run goes on and nothing on the page changed: send nothing, so that rendering and
                    # sending frames do not take the CPU from the run being timed
                    yield (gr.skip(),) * (3 + len(VIEWS))
                    continue
                shown = race.timing
                yield render.board_html(race), running_status(race), race, *views
                views = (gr.skip(),) * len(VIEWS)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error("Out of GPU memory: ask for fewer tokens or a smaller window, and try again.", title="Out of memory") from None
        race.stopped = race.stopped or stopped() or bool(self.out_of_time(deadline))
        note = self.out_of_time(deadline) or (READY if race.stopped else "")
        yield render.board_html(race), verdict(race) + (f'<div class="jl-next">{note}</div>' if note else ""), race, *views

    def views(self, race: Race | None, axis: str = "window") -> tuple:
        """Every view drawn from a race, in VIEWS order; for no race (or one without a finished lane) each says it
        is empty. Called after every race, Stop and error, so no view ever shows an older race."""
        jacobi = [(r.lane.label, r.lane.key) for r in (race.finished if race else []) if r.lane.method == "jacobi"]
        pick = jacobi[-1][1] if jacobi else None
        conv, slider = self.inspect(race, pick, axis)
        files = self.downloads.write(race) if race and race.finished else (None, None)
        return (charts.tokens_over_time(race), charts.accepted_per_iteration(race), charts.speed_summary(race),
                gr.update(choices=jacobi, value=pick), conv, slider, self.step(race, pick, 1),
                render.replay_placeholder(race), *(gr.update(value=f, interactive=f is not None) for f in files),
                share_link(race))

    def after_race(self, race, axis):
        return self.views(race, axis)

    def inspect(self, race, key, axis):
        run = race.run(key) if race and key else None
        total = len(run.trace.iterations) if run and run.trace else 0
        return self.convergence(race, key, axis), gr.update(maximum=max(total, 2), value=1, interactive=total > 1)

    def convergence(self, race, key, axis):
        return charts.convergence_map(race.run(key) if race and key else None, axis)

    def step(self, race, key, index):
        run = race.run(key) if race and key else None
        its = run.trace.iterations if run and run.trace else []
        if not its:
            return render.step_html(None, 0, str)
        it = its[min(max(int(index), 1), len(its)) - 1]
        context = "".join(p for p, special in zip(run.pieces[: it.start], run.special) if not special)
        return render.step_html(it, len(its), charts.answer_token_text(run), context)

    def replay(self, race, speed, nonce):
        return render.replay_html(race, render.SPEEDS.get(speed, 1.0), nonce + 1), nonce + 1

    def restore(self, request: gr.Request):
        """Page load: the settings a shared link carries (query parameters, LINK_PARAMS), each one checked; a
        missing or unusable one leaves its control as it is."""
        query = dict(request.query_params) if request is not None else {}
        out = []
        for name, bounds in LINK_PARAMS.items():
            value = query.get(name)
            out.append(gr.skip() if value is None else self.link_value(name, value, bounds))
        return tuple(out)

    def link_value(self, name: str, value: str, bounds):
        if name == "prompt":
            return value[:20_000] if value.strip() else gr.skip()
        if name == "init":
            return value if value in INITS else gr.skip()
        if name == "lanes":
            keys = [k for k in value.split(",") if k in {key for _, key in lane_choices(self.host)}]
            return keys if keys else gr.skip()
        lo, hi = bounds
        hi = self.limit if hi is None else hi
        return int(value) if value.strip().isdigit() and lo <= int(value) <= hi else gr.skip()

    def forget_stops(self, request: gr.Request):
        self.stops.forget(request.session_hash)

    def on_stop(self, race, number, request: gr.Request):
        self.stops.stop(request.session_hash, number)
        stop_race(race)
        return render.board_html(race), f"Stopped. {READY}"

    def race_api(self, prompt: str, n: int = 16, max_new_tokens: int = 128, candidates: int = 0, branches: int = 0,
                 rounds: int = ROUNDS) -> Iterator[dict]:
        """Race AR and Jacobi decoding on one prompt, lanes one after another.

        Args:
            prompt: the user message (sent through the model's chat template).
            n: Jacobi window size, 1 to 128.
            max_new_tokens: tokens to generate at most.
            candidates: candidate n-grams (each n-1 tokens) checked beside the Jacobi window in every pass, 0 to 4.
            branches: other likely tokens for the window's first guess, each checked beside it in every pass, 0 to 3.
            rounds: timed runs of every lane, 1 to 5; after the first, the lanes run again in alternating order.
        Returns:
            JSON with "prompt", "model", "device", "settings", "rounds", "stopped" and "lanes": "base_ar",
            "base_jacobi" and, when a CLLM is loaded, "cllm_ar" and "cllm_jacobi". Each lane has "label", "text",
            "status", "n", "tokens", "forwards" (the prefill included), "mean_accepted" (tokens per pass after the
            prefill: exact, the same every run), "ttft_s", "stop_reason", "walls" (seconds of each timed run),
            "wall_s" (their median), "tok_s" (tokens / wall_s), "loop_from" (index of the token where the answer
            starts to loop, or null) and, for Jacobi lanes, "repeated_per_forward" (the part of mean_accepted that came
            from fast-forwarding repeated text). A Jacobi lane is measured against "reference", the AR lane of its own
            model (else the other model's, when its own did not run); "same_text": its tokens equal the reference's;
            "first_difference": index of the first token where they differ (null when equal); "speedup": the median
            over the timed runs of its tokens per second over the reference's in the same run, "speedup_runs" each
            run's, "speedup_min" and "speedup_max" their range. AR lanes have null in these. The race streams: every
            tenth of a second the JSON so far (lanes "running" or "waiting"), the last one final. Cancelling the job
            stops the decoding at its next step. "stopped" says why a race ended early (the server's time budget).
        """
        try:
            race = self.start_race(prompt, n, max_new_tokens, "random", DEFAULT_LANES, candidates, branches, rounds)
            deadline = self.deadline()
            for race in self.host.stream(run_race(self.host, race, stream_every=API_STREAM_EVERY_S,
                                                  engine=self.host.engine, deadline=deadline)):
                yield race_json(race)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error("Out of GPU memory: ask for fewer tokens or a smaller window.") from None
        yield race_json(race) | {"stopped": self.out_of_time(deadline) or None}

    def load_models(self, spec, adapter):
        """Load a visitor's choice of models; the models that were serving stay when it fails."""
        if not self.allow_custom_models:  # the page hides the controls; refuse here too
            raise gr.Error("Loading other models is off: start the app with --allow-custom-models.")
        if getattr(self.host, "zero_gpu", False):  # a GPU worker keeps the models it was forked with
            raise gr.Error("Loading other models is not available on ZeroGPU: restart the Space with other flags.")
        if not isinstance(spec, str) or not spec.strip():
            raise gr.Error("Give a model: a preset name, a hub id, or a folder under the model root.")
        try:
            source = custom_spec(spec, self.model_root)
            folder = custom_adapter(adapter if isinstance(adapter, str) else None, source, self.model_root)
        except ModelLoadError as exc:
            raise gr.Error(str(exc), title="Cannot load that model", print_exception=False) from None
        if not self.host.load(source, folder or "none"):
            kept = " The models that were serving are still loaded." if self.host.base else ""
            raise gr.Error(hide_paths(self.host.load_error or "") + kept, title="Could not load the model")
        choices = lane_choices(self.host)
        return header_html(self.host), gr.update(choices=choices, value=[k for _, k in choices if k in DEFAULT_LANES])

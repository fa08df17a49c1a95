"""The app's callbacks: small methods over one ModelHost that take the page's inputs and return its outputs.
ui.py lays out the page and wires them to it; the work is in race, render, charts and about."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from html import escape

import gradio as gr
import torch

from decoding import ModelLoadError

from . import charts, render
from .host import ModelHost, custom_adapter, custom_spec, hide_paths
from .race import DEFAULT_LANES, LANES, MAX_NEW_TOKENS, StopRequests, new_race, race_json, run_race, stop_race

STOPPED = "Stopped. The app is ready for the next race."
MAX_PROMPT_TOKENS = 1024  # default cap of a request's prompt, chat template included (--max-prompt-tokens)
RACE_BUDGET_S = 120.0  # default wall-clock budget of one race, all lanes (--race-budget-s; 0: none)
# On ZeroGPU a race runs as a GPU task of ZEROGPU_TASK_S (the platform's default duration; a shorter one queues
# sooner); the first task also moves the models and builds the engine, so a race there gets at most this budget.
ZEROGPU_TASK_S, ZEROGPU_BUDGET_S = 60, 30.0
MAX_NUMBER = 2**31  # larger request numbers are refused before any other check (their message would print them whole)
API_STREAM_EVERY_S = 0.1  # /race yields its progress this often, so a cancelled job ends within about this long


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

    def start_race(self, prompt, n, max_new_tokens, init, lanes, candidates, branches):
        """A checked race within this server's bounds; ValueError with a message for people otherwise."""
        check_request(prompt, n=n, max_new_tokens=max_new_tokens, candidates=candidates, branches=branches)
        race = new_race(self.host, prompt, n, max_new_tokens, init, lanes, limit=self.limit, candidates=candidates,
                        branches=branches)
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

    def token_text(self, tok: int) -> str:
        return self.host.base.tokenizer.decode([tok]) if self.host.base else f"#{tok}"

    def race_stream(self, prompt, n, max_new_tokens, init, candidates, branches, lanes, number, request: gr.Request):
        try:
            race = self.start_race(prompt, n, max_new_tokens, init, lanes or [], candidates, branches)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Cannot start the race", print_exception=False) from None
        total = len(race.runs)
        stopped = self.stops.checker(request.session_hash, number)
        deadline = self.deadline()
        try:
            for race in self.host.stream(run_race(self.host, race, engine=self.host.engine, stopped=stopped,
                                                  deadline=deadline)):
                running = next((i for i, r in enumerate(race.runs) if r.status == "running"), None)
                status = f"Running lane {running + 1} of {total}: **{race.runs[running].lane.label}** …" if running is not None else ""
                yield render.board_html(race), status, race
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error("Out of GPU memory: ask for fewer tokens or a smaller window, and try again.", title="Out of memory") from None
        yield render.board_html(race), STOPPED if stopped() else self.out_of_time(deadline) or render.verdict(race), race

    def after_race(self, race):
        jacobi = [(r.lane.label, r.lane.key) for r in (race.finished if race else []) if r.lane.method == "jacobi"]
        pick = jacobi[-1][1] if jacobi else None
        return (charts.tokens_over_time(race), charts.accepted_per_iteration(race), charts.speed_summary(race),
                gr.update(choices=jacobi, value=pick))

    def inspect(self, race, key, axis):
        run = race.run(key) if race and key else None
        total = len(run.trace.iterations) if run and run.trace else 0
        return self.convergence(race, key, axis), gr.update(maximum=max(total, 2), value=1, interactive=total > 1)

    def convergence(self, race, key, axis):
        return charts.convergence_map(race.run(key) if race and key else None, axis, self.token_text)

    def step(self, race, key, index):
        run = race.run(key) if race and key else None
        its = run.trace.iterations if run and run.trace else []
        if not its:
            return render.step_html(None, 0, self.token_text)
        it = its[min(max(int(index), 1), len(its)) - 1]
        return render.step_html(it, len(its), self.token_text, "".join(run.pieces[: it.start]))

    def replay(self, race, speed, nonce):
        return render.replay_html(race, render.SPEEDS.get(speed, 1.0), nonce + 1), nonce + 1

    def forget_stops(self, request: gr.Request):
        self.stops.forget(request.session_hash)

    def on_stop(self, race, number, request: gr.Request):
        self.stops.stop(request.session_hash, number)
        stop_race(race)
        return render.board_html(race), STOPPED

    def race_api(self, prompt: str, n: int = 16, max_new_tokens: int = 128, candidates: int = 0,
                 branches: int = 0) -> Iterator[dict]:
        """Race AR and Jacobi decoding on one prompt, lanes one after another.

        Args:
            prompt: the user message (sent through the model's chat template).
            n: Jacobi window size, 1 to 128.
            max_new_tokens: tokens to generate at most.
            candidates: candidate n-grams (each n-1 tokens) checked beside the Jacobi window in every pass, 0 to 4.
            branches: other likely tokens for the window's first guess, each checked beside it in every pass, 0 to 3.
        Returns:
            JSON whose "lanes" are "base_ar", "base_jacobi" and, when a CLLM is loaded, "cllm_jacobi";
            each has "text", "tokens", "forwards", "wall_s", "tok_s", "mean_accepted", "speedup" (over base_ar)
            and "matches_ar" (its tokens equal those of the AR lane it is compared with). The race streams: every
            tenth of a second the JSON so far (lanes "running" or "waiting"), the last one final. Cancelling the job
            stops the decoding at its next step. "stopped" says why a race ended early (the server's time budget).
        """
        try:
            race = self.start_race(prompt, n, max_new_tokens, "random", DEFAULT_LANES, candidates, branches)
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

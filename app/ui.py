"""Layout and wiring of the Gradio app. The callbacks are in callbacks.py; the work is in race, render, explain, charts,
record and about."""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from . import about, render
from .callbacks import VIEWS, ZEROGPU_TASK_S, Callbacks, header_html, lane_choices
from .explain import verdict
from .host import ModelHost, on_zero_gpu
from .race import DEFAULT_LANES, MAX_BRANCHES, MAX_CANDIDATES, MAX_NEW_TOKENS, MAX_ROUNDS, ROUNDS
from .record import EXAMPLE, read_example

def gpu_task(host: ModelHost, fn):
    """A race callback (a generator) as a ZeroGPU task: on ZeroGPU Spaces ``spaces.GPU`` runs it in a GPU worker
    process, where the models move to the GPU and get their engine at the first task (``ModelHost.attach_gpu``).
    Elsewhere it is the callback itself, and attach_gpu does nothing."""
    @functools.wraps(fn)
    def task(*args, **kwargs):
        try:
            host.attach_gpu()
        except Exception as exc:  # a failed move or capture: say so in the page, keep the worker serving
            raise gr.Error(f"could not prepare the GPU: {type(exc).__name__}: {exc}") from None
        yield from fn(*args, **kwargs)

    if not on_zero_gpu():
        return fn
    import spaces  # app.py imported it before torch

    return spaces.GPU(task, duration=ZEROGPU_TASK_S)


CSS = (Path(__file__).resolve().parent / "style.css").read_text(encoding="utf-8")
MODEL_GROUP = "model"  # concurrency group: one generation (or model load) at a time
# The page numbers its races; Stop sends the latest number (see race.StopRequests). The last input is the number.
NUMBER_RACE_JS = "(...a) => { window.jlRaceNo = (window.jlRaceNo || 0) + 1; a[a.length - 1] = window.jlRaceNo; return a; }"
LATEST_RACE_JS = "(race, no) => [race, window.jlRaceNo || 0]"
INIT_LABELS = [("random prompt tokens (the paper)", "random"), ("the last token repeated", "repeat"),
               ("copied from the context (what followed the last two tokens before)", "lookup")]
AXIS_LABELS = [("position in the window", "window"), ("position in the answer", "answer")]
EXAMPLES = [  # (label, prompt): chat, code, maths, writing
    ("Chat · working from home", "What are three tips for staying focused while working from home?"),
    ("Chat · weather vs climate", "Explain the difference between weather and climate to a ten-year-old."),
    ("Code · reverse a string", "Write a Python function that reverses a string, with a docstring."),
    ("Code · FizzBuzz", "Write FizzBuzz in JavaScript."),
    ("Maths · train speed", "A train travels 120 km in 1.5 hours. What is its average speed in km/h? Show your steps."),
    ("Maths · count to ten", "Count from 1 to 10, separated by commas."),
    ("Writing · haiku", "Write a haiku about the sea."),
    ("Writing · short story", "Write the opening two sentences of a mystery story set in a lighthouse."),
]


def about_tab() -> None:
    """The About tab: what AR, Jacobi and CLLMs are, and the headline results (read from their files when the page is
    built)."""
    with gr.Tab("About"):
        gr.Markdown(about.INTRO)
        gr.HTML(about.example_figure())
        gr.Markdown(about.RESULTS_HEAD)
        gr.HTML(about.headline_html(about.headline_rows()), elem_id="jl-headline")
        gr.Markdown(about.results_footer())


def props(update: dict) -> dict:
    """A gr.update(...) as a component's constructor arguments (to build a control already showing a view)."""
    return {k: v for k, v in update.items() if k != "__type__"}


INTRO = ("# Jacobi Lens\nEach model answers the same prompt twice: once **autoregressively** (AR: one token per "
         "pass through the network) and once with **Jacobi decoding** (a window of guesses checked in one pass). Both "
         "write exactly the same text; Jacobi may need fewer passes. The **base model** was trained only for AR; the "
         "**CLLM** was fine-tuned so that its Jacobi passes gain more tokens. Watch which tokens arrive together, how "
         "many passes each lane needs, and how the guesses converge.")


def race_controls(host: ModelHost, max_new_tokens_limit: int) -> dict:
    """The Race tab's settings column (the prompt is beside it); returns its components by name."""
    c = {}
    c["n"] = gr.Slider(1, 128, value=host.default_window(), step=1, label="Window size n", elem_id="jl-n",
                       info="Jacobi guesses n-1 tokens ahead; n = 1 is AR. On a CPU a wide window costs several "
                            "passes' time, so the page starts at 4 there (16 on a GPU)")
    c["max_new"] = gr.Slider(1, max_new_tokens_limit, value=min(128, max_new_tokens_limit), step=1, label="Max new tokens",
                             elem_id="jl-max-new")
    c["init"] = gr.Radio(INIT_LABELS, value="random", label="Initial guesses")
    with gr.Accordion("Decoding extras: more guesses checked in the same pass (same text)", open=False, elem_id="jl-extras"):
        c["cands"] = gr.Slider(0, MAX_CANDIDATES, value=0, step=1, label="Candidate n-grams per pass", elem_id="jl-cands",
                               info="Continuations of the last accepted token, found in the text or in earlier passes, "
                                    "checked beside the window in the same pass (n-1 tokens each); the longest right one "
                                    "is kept. Same text, fewer passes. 0: plain Jacobi")
        c["branches"] = gr.Slider(0, MAX_BRANCHES, value=0, step=1, label="Branches for the first guess", elem_id="jl-branches",
                                  info="The model's next likeliest tokens for the window's first guess, each checked "
                                       "beside the window in the same pass; a right one gains a second token. Same text. "
                                       "0: none")
    choices = lane_choices(host)
    c["lanes"] = gr.CheckboxGroup(choices, value=[k for _, k in choices if k in DEFAULT_LANES], elem_id="jl-lanes",
                                  label="Lanes (run one after another; each Jacobi lane is measured against the AR lane "
                                        "of its own model, which writes the same text)")
    c["rounds"] = gr.Slider(1, MAX_ROUNDS, value=ROUNDS, step=1, label="Timed runs per lane", elem_id="jl-rounds",
                            info="After the run you watch, every lane runs again unseen, AR and Jacobi taking turns to "
                                 "go first, so the clock ratio comes with its range. Tokens per pass are the same in "
                                 "every run")
    return c


def race_views(first: dict) -> dict:
    """The Race tab's views under the board, each built showing ``first`` (``Callbacks.views``' values by name);
    returns them by name, with the replay's controls and the map's axis."""
    v = {}
    with gr.Row(elem_id="jl-downloads"):
        v["race_file"] = gr.DownloadButton("Download the race (JSON)", elem_id="jl-download-json", size="sm",
                                           **props(first["race_file"]))
        v["charts_file"] = gr.DownloadButton("Download the charts (HTML)", elem_id="jl-download-html", size="sm",
                                             **props(first["charts_file"]))
    v["share"] = gr.HTML(first["share"], elem_id="jl-share")
    with gr.Row():
        v["replay_btn"] = gr.Button("▶ Replay side by side", elem_id="jl-replay-btn", scale=1, min_width=160)
        v["speed"] = gr.Radio(list(render.SPEEDS), value=render.DEFAULT_SPEED, label="Replay speed", scale=3, min_width=240)
    v["replay_view"] = gr.HTML(first["replay_view"], elem_id="jl-replay")
    with gr.Row():
        v["time_plot"] = gr.Plot(first["time_plot"], label="Tokens over time", show_label=False, elem_id="jl-time", min_width=300)
        v["speed_plot"] = gr.Plot(first["speed_plot"], label="Speed", show_label=False, elem_id="jl-speed", min_width=300)
    v["accept_plot"] = gr.Plot(first["accept_plot"], label="Accepted per pass", show_label=False, elem_id="jl-accept")
    gr.Markdown("### Inspect a Jacobi lane\nEach row of the map is one pass; each cell one output: red where the "
                "guess was wrong, yellow where it was already right but stuck behind a wrong one, green when accepted. "
                "Hover a cell for its tokens. Below, step through the passes one by one.")
    with gr.Row():
        v["lane_pick"] = gr.Dropdown(label="Jacobi lane", scale=1, min_width=200, elem_id="jl-lane-pick", **props(first["lane_pick"]))
        v["axis"] = gr.Radio(AXIS_LABELS, value="window", label="Columns", scale=2, min_width=240)
    v["conv_plot"] = gr.Plot(first["conv_plot"], label="Convergence map", show_label=False, elem_id="jl-conv")
    v["step_slider"] = gr.Slider(1, step=1, label="Pass", elem_id="jl-step-slider", **props(first["step_slider"]))
    v["step_view"] = gr.HTML(first["step_view"], elem_id="jl-step")
    return v


def build_demo(host: ModelHost, allow_custom_models: bool = False, max_new_tokens_limit: int = MAX_NEW_TOKENS,
               example: str | Path | None = EXAMPLE, **bounds) -> gr.Blocks:
    """The whole app. Models are loaded by the caller (once, at start-up), never here. The page opens showing the
    recorded race in ``example`` (no model runs for it), or empty when there is none. ``bounds``: the other
    per-request limits of ``Callbacks`` (max_prompt_tokens, race_budget_s, model_root)."""
    cb = Callbacks(host, allow_custom_models, max_new_tokens_limit, **bounds)
    shown = read_example(example) if example else None

    with gr.Blocks(title="Jacobi Lens: AR vs Jacobi decoding, live") as demo:
        race_state = gr.State(shown)
        race_number = gr.Number(0, visible=False)  # filled in by the page's script: see NUMBER_RACE_JS
        gr.Markdown(INTRO)
        header = gr.HTML(header_html(host), elem_id="jl-header")
        with gr.Tab("Race"):
            with gr.Row():
                with gr.Column(scale=3, min_width=280):
                    prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, placeholder="Ask anything…", elem_id="jl-prompt")
                    gr.Examples([[p] for _, p in EXAMPLES], inputs=prompt, example_labels=[label for label, _ in EXAMPLES], label="Examples")
                with gr.Column(scale=2, min_width=280):
                    c = race_controls(host, max_new_tokens_limit)
                    with gr.Row():
                        go_btn = gr.Button("Race", variant="primary", elem_id="jl-race")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="jl-stop")
            status = gr.HTML(verdict(shown) if shown else "", elem_id="jl-status")
            board = gr.HTML(render.board_html(shown), elem_id="jl-board")
            v = race_views(dict(zip(VIEWS, cb.views(shown))))
            if allow_custom_models:
                with gr.Accordion("Model (custom models are enabled)", open=False):
                    spec = gr.Textbox(label="Model", value=Path(host.spec).name, info="smollm2-135m, a preset, org/name (online), or a folder under --model-root")
                    adapter = gr.Textbox(label="CLLM adapter", value="auto" if host.adapter else "none",
                                         info="auto (the shipped adapter of smollm2-135m), none, or a folder under --model-root")
                    load_btn = gr.Button("Load")
                load_btn.click(cb.load_models, [spec, adapter], [header, c["lanes"]], concurrency_id=MODEL_GROUP, api_visibility="private")
        about_tab()
        settings = [prompt, c["n"], c["max_new"], c["init"], c["cands"], c["branches"], c["lanes"], c["rounds"]]
        wire(demo, cb, settings, (go_btn, stop_btn), (race_state, race_number, board, status), v)
    return demo


def wire(demo: gr.Blocks, cb: Callbacks, settings: list, buttons: tuple, race: tuple, v: dict) -> None:
    """Connect the page's events to the callbacks: ``settings`` are a race's inputs, ``buttons`` Race and Stop,
    ``race`` the state, race number, board and status, ``v`` the views (``race_views``)."""
    go_btn, stop_btn = buttons
    race_state, race_number, board, status = race
    views = [v[name] for name in VIEWS]
    race_event = go_btn.click(
        gpu_task(cb.host, cb.race_stream), [*settings, race_number], [board, status, race_state, *views], js=NUMBER_RACE_JS,
        concurrency_id=MODEL_GROUP, concurrency_limit=1, api_visibility="private", show_progress_on=[status],
        # A click while this tab's race is still running (or ending after Stop) starts the next race when it
        # has ended, instead of being ignored.
        trigger_mode="always_last",
    )
    # after a race, a Stop or an error alike (then runs either way): every view shows this race, or says it is empty
    race_event.then(cb.after_race, [race_state, v["axis"]], views, api_visibility="private")
    # No gradio cancel: the race ends by itself at its next step (race.StopRequests says why). Except on ZeroGPU
    # Spaces, where a race runs in a forked process that does not see the stop requests.
    stop_btn.click(cb.on_stop, [race_state, race_number], [board, status], js=LATEST_RACE_JS, queue=False,
                   cancels=[race_event] if on_zero_gpu() else None, api_visibility="private")
    demo.unload(cb.forget_stops)
    demo.load(cb.restore, None, settings, api_visibility="private", queue=False)
    # .input, not .change: the views set these controls after every race and draw what they show themselves
    pick, axis, step = v["lane_pick"], v["axis"], v["step_slider"]
    pick.input(cb.inspect, [race_state, pick, axis], [v["conv_plot"], step], api_visibility="private").then(
        cb.step, [race_state, pick, step], v["step_view"], api_visibility="private")
    axis.change(cb.convergence, [race_state, pick, axis], v["conv_plot"], api_visibility="private")
    step.input(cb.step, [race_state, pick, step], v["step_view"], api_visibility="private", show_progress="hidden")
    nonce = gr.State(0)
    v["replay_btn"].click(cb.replay, [race_state, v["speed"], nonce], [v["replay_view"], nonce], api_visibility="private",
                          queue=False)
    gr.api(gpu_task(cb.host, cb.race_api), api_name="race", concurrency_id=MODEL_GROUP, concurrency_limit=1)

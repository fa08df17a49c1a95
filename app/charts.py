"""Plotly figures from a race's traces: ``Race -> go.Figure``, no Gradio, testable on their own."""
from __future__ import annotations

from html import escape

import plotly.graph_objects as go

from .race import Race, LaneRun, lane_numbers
from .render import cell_state, kept_phrase, show_token

COLORS = {"base_ar": "#64748b", "base_jacobi": "#f59e0b", "cllm_ar": "#8b5cf6", "cllm_jacobi": "#10b981"}
CELL_COLORS = {"wrong": "#fca5a5", "stationary": "#fde047", "accepted": "#22c55e"}
CELL_CODES = {"wrong": 0, "stationary": 1, "accepted": 2}
AXES = ("window", "answer")  # convergence map: position in the window, or in the whole answer


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 340) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=15)), template="plotly_white", height=height,
        margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"),
        xaxis_title=x, yaxis_title=y,
    )
    return fig


def _empty(title: str, note: str) -> go.Figure:
    fig = _layout(go.Figure(), title, "", "")
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14, color="#64748b"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def tokens_over_time(race: Race | None) -> go.Figure:
    """Tokens generated against wall-clock time, one line per lane: steeper is faster."""
    title = "Tokens generated over time"
    runs = race.finished if race else []
    if not runs:
        return _empty(title, "Run a race to see this chart.")
    fig = go.Figure()
    for run in runs:
        times = run.trace.token_times()
        fig.add_trace(go.Scatter(
            x=[0.0] + times, y=list(range(len(times) + 1)), mode="lines", line_shape="hv", name=run.lane.label,
            line=dict(color=COLORS[run.lane.key], width=3), hovertemplate="%{y} tokens at %{x:.2f} s<extra>" + escape(run.lane.label) + "</extra>",
        ))
    return _layout(fig, title, "seconds since the lane started", "tokens")


def accepted_per_iteration(race: Race | None) -> go.Figure:
    """Tokens accepted by each forward of each Jacobi lane; AR is always 1. A diamond marks a forward whose tokens came
    from a candidate n-gram or a branch checked beside the window."""
    title = "Tokens accepted per forward (Jacobi lanes)"
    runs = [r for r in (race.finished if race else []) if r.lane.method == "jacobi"]
    if not runs:
        return _empty(title, "Run a race with a Jacobi lane to see this chart.")
    fig = go.Figure()
    for run in runs:
        its = run.trace.iterations
        fig.add_trace(go.Scatter(
            x=[it.index for it in its], y=[it.accepted for it in its], mode="lines+markers", name=run.lane.label,
            line=dict(color=COLORS[run.lane.key], width=2),
            marker=dict(size=[8 if it.candidate else 5 for it in its], symbol=["diamond" if it.candidate else "circle" for it in its]),
            customdata=[f" (kept {kept_phrase(it)})" if it.candidate else "" for it in its],
            hovertemplate="iteration %{x}: %{y} accepted%{customdata}<extra>" + escape(run.lane.label) + "</extra>",
        ))
    fig.add_hline(y=1, line_dash="dot", line_color=COLORS["base_ar"], annotation_text="AR: 1 per forward", annotation_position="top left")
    fig = _layout(fig, title, "iteration (forward pass after the prefill)", "tokens accepted")
    fig.update_yaxes(rangemode="tozero", dtick=1 if max(it.accepted for r in runs for it in r.trace.iterations) <= 8 else None)
    return fig


def speed_summary(race: Race | None) -> go.Figure:
    """Tokens per second per lane, labelled with the speedup over base AR and tokens per forward."""
    title = "Speed per lane"
    runs = race.finished if race else []
    if not runs:
        return _empty(title, "Run a race to see this chart.")
    nums = [lane_numbers(race, r) for r in runs]
    labels = [
        (f"{num['speedup']:.2f}× AR" if num["speedup"] else "—") + f" · {num['mean_accepted']:.2f} tok/fwd" for num in nums
    ]
    fig = go.Figure(go.Bar(
        x=[r.lane.label for r in runs], y=[num["tok_s"] for num in nums], text=labels, textposition="outside",
        marker_color=[COLORS[r.lane.key] for r in runs], hovertemplate="%{x}: %{y:.1f} tok/s<extra></extra>",
    ))
    fig = _layout(fig, title, "", "tokens per second")
    fig.update_yaxes(range=[0, max(num["tok_s"] for num in nums) * 1.25 or 1])
    return fig


def answer_token_text(run: LaneRun):
    """A token id's text from the lane's own answer (ids that never made it into the answer show as #id)."""
    known = dict(zip(run.trace.tokens, run.pieces))
    return lambda tok: known.get(tok, f"#{tok}")


def convergence_cells(run: LaneRun, axis: str = "window", token_text=None) -> tuple[list[list[int | None]], list[list[str]], int]:
    """The convergence map as a grid: rows are iterations, columns positions; cells coded by CELL_CODES.

    ``token_text(id) -> str`` names tokens in the hover text. Returns (codes, hover texts, number of
    columns); cells outside a window are None.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}")
    token_text = token_text or answer_token_text(run)
    its = run.trace.iterations
    width = max((len(it.window) for it in its), default=0) if axis == "window" else len(run.trace.tokens)
    codes = [[None] * width for _ in its]
    hover = [[""] * width for _ in its]
    for r, it in enumerate(its):
        for j, (inp, out) in enumerate(zip(it.window, it.outputs)):
            col = j if axis == "window" else it.start + j
            if col >= width:
                continue
            state = cell_state(it, j)
            codes[r][col] = CELL_CODES[state]
            final = run.pieces[it.start + j] if it.start + j < len(run.pieces) else ""
            hover[r][col] = (
                f"iteration {it.index}, window slot {j}, answer token {it.start + j + 1}<br>"
                + (f"this row is {kept_phrase(it)}, kept over the window<br>" if it.candidate else "") +
                f"fed in {show_token(token_text(inp))} → out {show_token(token_text(out))}<br>"
                f"{state}" + (f" (final token {show_token(final)})" if state == "wrong" and final else "")
            )
    return codes, hover, width


def convergence_map(run: LaneRun | None, axis: str = "window", token_text=None) -> go.Figure:
    """The paper's trajectory figure, interactive: each row a forward pass, each cell one output."""
    title = "Convergence map"
    if run is None or run.trace is None or not run.trace.iterations:
        return _empty(title, "Run a race with a Jacobi lane to see its convergence map.")
    codes, hover, width = convergence_cells(run, axis, token_text)
    scale = [[0.0, CELL_COLORS["wrong"]], [0.333, CELL_COLORS["wrong"]], [0.333, CELL_COLORS["stationary"]],
             [0.667, CELL_COLORS["stationary"]], [0.667, CELL_COLORS["accepted"]], [1.0, CELL_COLORS["accepted"]]]
    fig = go.Figure(go.Heatmap(
        z=codes, text=hover, hovertemplate="%{text}<extra></extra>", zmin=-0.5, zmax=2.5, colorscale=scale, xgap=1, ygap=1,
        x=list(range(width)), y=[it.index for it in run.trace.iterations],
        colorbar=dict(tickvals=[0, 1, 2], ticktext=["wrong guess", "right, waiting (stationary)", "accepted"], len=0.8, thickness=14),
    ))
    kept = [it for it in run.trace.iterations if it.candidate]
    if kept:  # a diamond left of a row: that pass kept a candidate n-gram or a branch, and the row shows it
        fig.add_trace(go.Scatter(
            x=[-1] * len(kept), y=[it.index for it in kept], mode="markers",
            name="kept a candidate" if any(it.branch for it in kept) else "kept a candidate n-gram",
            marker=dict(symbol="diamond", size=9, color=CELL_COLORS["accepted"], line=dict(width=1, color="#333")),
            customdata=[kept_phrase(it) for it in kept],
            hovertemplate="iteration %{y}: %{customdata} was right for longer than the window, "
                          "so this row shows it<extra></extra>",
        ))
        fig.update_layout(showlegend=True)
        step = next((s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if width / s <= 16), max(1, width // 16))
        fig.update_xaxes(tickvals=list(range(0, width, step)))  # no tick at the diamonds' -1
    x = "position in the window (0 = last accepted token)" if axis == "window" else "position in the answer"
    rows = len(run.trace.iterations)
    fig = _layout(fig, f"{title} · {escape(run.lane.label)}", x, "iteration", height=min(900, max(320, 60 + 14 * rows)))
    fig.update_yaxes(autorange="reversed")
    return fig

"""Plotly figures from a race's traces: ``Race -> go.Figure``, no Gradio, testable on their own."""
from __future__ import annotations

from html import escape

import plotly.graph_objects as go

from .explain import beyond_passes, no_gain
from .race import Race, LaneRun, lane_numbers
from .render import cell_state, kept_phrase

COLORS = {"base_ar": "#64748b", "base_jacobi": "#f59e0b", "cllm_ar": "#8b5cf6", "cllm_jacobi": "#10b981"}
CELL_COLORS = {"wrong": "#fca5a5", "stationary": "#fde047", "accepted": "#22c55e"}
CELL_CODES = {"wrong": 0, "stationary": 1, "accepted": 2}
AXES = ("window", "answer")  # convergence map: position in the window, or in the whole answer


def plot_text(text: str) -> str:
    """Text from a model or a user, for a plotly hover or label. Plotly draws these as its own small HTML: ``<`` and
    ``&`` must be escaped, but it turns named entities it does not know (``&quot;``) into literal text, so quotes are
    left as they are (they are safe there: plotly never puts this text in an attribute)."""
    return escape(text, quote=False)


def show_piece(piece: str) -> str:
    """A token's text for a hover: spaces and newlines made visible, escaped for plotly."""
    return plot_text(piece.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")) or "∅"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 340) -> go.Figure:
    """The common look; the legend sits under the plot, where a narrow screen has room for it to wrap without
    covering the title."""
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)), template="plotly_white", height=height,
        margin=dict(l=10, r=10, t=45, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, xanchor="left"),
        xaxis=dict(title=dict(text=x), automargin=True), yaxis=dict(title=dict(text=y), automargin=True),
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
    title = "Tokens over time (the runs you watched)"
    runs = race.finished if race else []
    if not runs:
        return _empty(title, "Run a race to see this chart.")
    fig = go.Figure()
    for run in runs:
        times = run.trace.token_times()
        fig.add_trace(go.Scatter(
            x=[0.0] + times, y=list(range(len(times) + 1)), mode="lines", line_shape="hv", name=run.lane.label,
            line=dict(color=COLORS[run.lane.key], width=3),
            hovertemplate="%{y} tokens at %{x:.2f} s<extra>" + plot_text(run.lane.label) + "</extra>",
        ))
    return _layout(fig, title, "seconds since the lane started", "tokens", height=380)


def accepted_per_iteration(race: Race | None) -> go.Figure:
    """Tokens accepted by each forward of each Jacobi lane; AR is always 1. A diamond marks a forward whose tokens came
    from a candidate n-gram or a branch checked beside the window."""
    title = "Tokens accepted per pass (Jacobi lanes)"
    runs = [r for r in (race.finished if race else []) if r.lane.method == "jacobi"]
    if not runs:
        return _empty(title, "Run a race with a Jacobi lane to see this chart.")
    fig = go.Figure()
    # AR's one token a pass: a faint band drawn under the lanes, so a lane that mostly gains 1 stays visible on it
    fig.add_hrect(y0=0.9, y1=1.1, fillcolor="rgba(100, 116, 139, 0.15)", line_width=0, layer="below",
                  annotation_text="AR: 1 per pass", annotation_position="top right", annotation_font_color="#64748b")
    for run in runs:
        its = run.trace.iterations
        ring = "-open" if run.lane.model == "base" else ""  # base: rings around the CLLM's dots, so both show where equal
        fig.add_trace(go.Scatter(
            x=[it.index for it in its], y=[it.accepted for it in its], mode="lines+markers", name=run.lane.label,
            line=dict(color=COLORS[run.lane.key], width=2),
            marker=dict(size=[(10 if it.candidate else 9) if ring else (8 if it.candidate else 5) for it in its],
                        symbol=[("diamond" if it.candidate else "circle") + ring for it in its], line=dict(width=2)),
            customdata=[f" (kept {kept_phrase(it)})" if it.candidate else "" for it in its],
            hovertemplate="pass %{x}: %{y} accepted%{customdata}<extra>" + plot_text(run.lane.label) + "</extra>",
        ))
    fig = _layout(fig, title, "pass (after the one over the prompt)", "tokens accepted", height=380)
    fig.update_yaxes(rangemode="tozero", dtick=1 if max(it.accepted for r in runs for it in r.trace.iterations) <= 8 else None)
    return fig


def speed_label(race: Race, run: LaneRun, num: dict) -> str:
    """A bar's words: the lane, its tokens per pass, and its clock ratio against its reference (or why it has none,
    or why it is no gain)."""
    head = f"<b>{plot_text(run.lane.label)}</b> · {num['mean_accepted']:.2f} tokens/pass"
    if run.lane.method == "ar":
        return head + ("<br>the reference" if any(race.reference(r) is run for r in race.runs) else "")
    if num["speedup"] is None:
        return head + "<br>no AR lane to compare with"
    ratio = f"{num['speedup']:.2f}× {plot_text(race.reference(run).lane.label)}"
    if num["speedup"] < 1:
        return head + f"<br>{ratio}: slower" + ("" if num["same_text"] else " (another text)")
    if no_gain(num):
        return head + f"<br>{ratio}: not a Jacobi gain"
    if not num["same_text"]:
        return head + f"<br>{ratio} (another text)"
    return head + f"<br>{ratio}" + (": beyond its saved passes" if beyond_passes(race, run, num) else "")


def speed_summary(race: Race | None) -> go.Figure:
    """Tokens per second per lane (the median of its timed runs, the whisker their range), one bar a lane, each
    headed by its tokens per pass and its clock ratio against its reference AR lane."""
    title = "Speed per lane (whisker: range of the runs)"
    runs = race.finished if race else []
    if not runs:
        return _empty(title, "Run a race to see this chart.")
    nums = [lane_numbers(race, r) for r in runs]
    rates = [[len(r.trace.tokens) / w for w in num["walls"] if w > 0] or [num["tok_s"]] for r, num in zip(runs, nums)]
    keys = [r.lane.key for r in runs]
    fig = go.Figure(go.Bar(
        y=keys, x=[num["tok_s"] for num in nums], orientation="h", width=0.32,
        error_x=dict(type="data", symmetric=False, array=[max(rs) - num["tok_s"] for rs, num in zip(rates, nums)],
                     arrayminus=[num["tok_s"] - min(rs) for rs, num in zip(rates, nums)], color="#334155"),
        marker_color=[COLORS[k] for k in keys], customdata=[plot_text(r.lane.label) for r in runs],
        hovertemplate="%{customdata}: %{x:.1f} tokens/s<extra></extra>",
    ))
    for key, run, num in zip(keys, runs, nums):  # the words above each bar, as wide as the chart (phones too)
        fig.add_annotation(x=0, xref="paper", y=key, text=speed_label(race, run, num), showarrow=False, xanchor="left",
                           yanchor="bottom", yshift=16, align="left", font=dict(size=12, color="#334155"))
    fig = _layout(fig, title, "tokens per second (median of the runs)", "", height=80 + 100 * len(runs))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(range=[0, max(max(rs) for rs in rates) * 1.05 or 1])
    return fig


def answer_token_text(run: LaneRun):
    """A token id's text, from the lane's own record of the tokens its passes saw (else from its answer; ids
    found in neither show as #id)."""
    known = dict(zip(run.trace.tokens, run.pieces)) | run.vocab
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
                f"fed in {show_piece(token_text(inp))} → out {show_piece(token_text(out))}<br>"
                f"{state}" + (f" (final token {show_piece(final)})" if state == "wrong" and final else "")
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
        colorbar=dict(tickvals=[0, 1, 2], ticktext=["wrong", "right, waiting", "accepted"], orientation="h", thickness=12,
                      len=1, x=0, xanchor="left", y=1.0, yanchor="bottom"),
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
    x = "window position (0: last accepted)" if axis == "window" else "position in the answer"
    rows = len(run.trace.iterations)
    fig = _layout(fig, f"{title} · {plot_text(run.lane.label)}", x, "pass", height=min(900, max(340, 100 + 14 * rows)))
    fig.update_layout(margin_t=85)  # room for the colour key between the title and the map
    fig.update_yaxes(autorange="reversed")
    return fig


def race_figures(race: Race) -> list[go.Figure]:
    """Every chart of a race: tokens over time, accepted per pass, speed, and each Jacobi lane's convergence map."""
    jacobi = [r for r in race.finished if r.lane.method == "jacobi"]
    return [tokens_over_time(race), accepted_per_iteration(race), speed_summary(race)] + [convergence_map(r) for r in jacobi]


def charts_html(race: Race) -> str:
    """The race's charts as one HTML page that needs no network (plotly.js is inside it, once), headed by the
    prompt and the settings."""
    cfg = race.settings
    where = "recorded example, " if race.recorded else ""
    head = (f"<h1>Jacobi Lens: one race</h1><p><b>Prompt:</b> {escape(race.prompt)}</p>"
            f"<p>{where}{escape(race.model_name)} on {escape(race.device)}; window {cfg.n}, up to {cfg.max_new_tokens} "
            f"tokens, {race.rounds} timed run(s) per lane.</p>")
    plots = [fig.to_html(full_html=False, include_plotlyjs=i == 0, config={"responsive": True})
             for i, fig in enumerate(race_figures(race))]
    return ('<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, '
            'initial-scale=1"><title>Jacobi Lens race</title></head><body style="font-family:sans-serif;max-width:1100px;'
            f'margin:auto;padding:8px">{head}{"".join(plots)}</body></html>')

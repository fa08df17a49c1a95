"""HTML for the lanes, the replay and the step-through view. Every text from a user or a model is escaped here."""
from __future__ import annotations

from html import escape

from decoding import Iteration

from .explain import lane_details, lane_sentence, recorded_banner
from .race import LaneRun, Race

SPEEDS = {"¼× slow motion": 0.25, "½×": 0.5, "1× real time": 1.0, "2×": 2.0}  # replay speed choices
DEFAULT_SPEED = "1× real time"
STATUS_TEXT = {"waiting": "waiting", "running": "running…", "done": "done", "stopped": "stopped"}


def show_token(piece: str) -> str:
    """A token's text for a narrow cell: spaces and newlines made visible, escaped."""
    return escape(piece.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")) or "∅"


def group_class(size: int) -> str:
    """How a token arrived: alone in its forward, or with others (a fast-forward), by size."""
    return "jl-g1" if size <= 1 else ("jl-g2" if size <= 3 else "jl-g4")


def token_spans(run: LaneRun, delay_scale: float | None = None) -> str:
    """The lane's answer as one span per token, coloured by arrival, with the iteration on hover. Special tokens
    (the end of the answer) are not text: they get no span.

    With ``delay_scale`` each span appears at its true time (divided by the scale): the replay.
    """
    trace = run.trace
    if trace is None:
        return ""
    arrivals = trace.token_arrivals()
    times = trace.token_times() if delay_scale else []
    out = []
    for i, piece in enumerate(run.pieces[: len(arrivals)]):
        if run.special[i]:
            continue
        it, size = arrivals[i]
        how = "the prefill (first token)" if it == 0 else f"iteration {it}"
        group = "alone" if size == 1 else f"one of {size} tokens accepted together"
        title = f"token {i + 1} · {how} · {group}"
        cls = ["jl-tok", group_class(size), "jl-odd" if it % 2 else "jl-even"]
        style = f' style="animation-delay:{times[i] / delay_scale:.3f}s"' if delay_scale else ""
        if delay_scale:
            cls.append("jl-rp")
        out.append(f'<span class="{" ".join(cls)}" data-it="{it}" title="{escape(title)}"{style}>{escape(piece)}</span>')
    return "".join(out)


def kept_phrase(it: Iteration) -> str:
    """What a pass kept in place of the window's guesses: a candidate n-gram, or a branch."""
    return "a branch (another likely token for the window's first guess)" if it.branch else f"candidate n-gram {it.candidate}"


def lane_html(race: Race, run: LaneRun) -> str:
    """One lane of the board: its title and state, its answer token by token, and its sentence with the numbers
    folded away beneath."""
    status = STATUS_TEXT.get(run.status, run.status)
    if race.timing and race.timing[1] == run.lane.key:
        status = f"timing run {race.timing[0]} of {race.rounds}…"
    body = token_spans(run) or '<span class="jl-placeholder">waiting for its turn…</span>'
    sentence = lane_sentence(race, run)
    foot = f'<div class="jl-stats">{sentence}{lane_details(race, run)}</div>' if sentence else ""
    return (
        f'<div class="jl-lane jl-{run.lane.model}-{run.lane.method}" data-lane="{run.lane.key}" data-status="{run.status}">'
        f'<div class="jl-lane-head"><span class="jl-lane-title">{escape(run.lane.label)}</span>'
        f'<span class="jl-status jl-status-{run.status}">{status}</span></div>'
        f'<div class="jl-text">{body}</div>{foot}</div>'
    )


LEGEND = (
    '<div class="jl-legend">'
    '<span class="jl-tok jl-g1">one token per pass</span>'
    '<span class="jl-tok jl-g2">2–3 tokens in one pass</span>'
    '<span class="jl-tok jl-g4">4+ tokens in one pass (fast-forward)</span>'
    "<span>hover a token to see the pass that produced it</span></div>"
)
EMPTY_BOARD = "Type a prompt or pick an example, then press <b>Race</b>."


def board_html(race: Race | None, message: str = EMPTY_BOARD) -> str:
    """All lanes side by side (a recorded race says so above them); without a race, ``message`` (HTML)."""
    if race is None:
        return f'<div class="jl-empty">{message}</div>'
    lanes = "".join(lane_html(race, run) for run in race.runs)
    banner = recorded_banner(race) if race.recorded else ""
    prompt = f'<div class="jl-prompt-echo"><b>Prompt:</b> {escape(race.prompt)}</div>'
    return f'{banner}{prompt}{LEGEND}<div class="jl-board" data-lanes="{len(race.runs)}" style="--lanes:{len(race.runs)}">{lanes}</div>'


def replay_html(race: Race | None, speed: float = 1.0, nonce: int = 0) -> str:
    """The finished lanes played back side by side at their true relative speed (CSS animations, no script)."""
    runs = race.finished if race else []
    if not runs:
        return replay_placeholder(race)
    lanes = []
    for run in runs:
        wall = run.trace.wall_s / speed
        lanes.append(
            f'<div class="jl-lane jl-{run.lane.model}-{run.lane.method}" data-lane="{run.lane.key}">'
            f'<div class="jl-lane-head"><span class="jl-lane-title">{escape(run.lane.label)}</span>'
            f'<span class="jl-finish" style="animation-delay:{wall:.3f}s">finished in {run.trace.wall_s:.2f} s</span></div>'
            f'<div class="jl-track"><div class="jl-bar" style="animation-duration:{wall:.3f}s"></div></div>'
            f'<div class="jl-text">{token_spans(run, delay_scale=speed)}</div></div>'
        )
    note = (f"Replay at {speed:g}× speed of the runs you watched: each token appears when its lane produced it"
            + (" (recorded example)." if race.recorded else "."))
    return f'<div class="jl-replay" data-nonce="{nonce}"><div class="jl-note">{note}</div><div class="jl-board" data-lanes="{len(runs)}" style="--lanes:{len(runs)}">{"".join(lanes)}</div></div>'


def replay_placeholder(race: Race | None) -> str:
    """What the replay area says until Replay is pressed for the current race (never an older race's lanes)."""
    if race is None or not race.finished:
        return '<div class="jl-empty">Finish a race first; the replay then shows its lanes as if they had run at once.</div>'
    return (f'<div class="jl-empty">Press <b>▶ Replay side by side</b> to play the lanes of this race '
            f"({escape(race.prompt[:60])}{'…' if len(race.prompt) > 60 else ''}) as if they had run at once.</div>")


def cell_state(it: Iteration, j: int) -> str:
    """accepted, stationary (right but waiting behind a wrong token) or wrong."""
    if j < it.accepted:
        return "accepted"
    right = j < len(it.output_correct) and it.output_correct[j]
    return "stationary" if right else "wrong"


def explain_step(it: Iteration, piece) -> list[str]:
    """Why this iteration accepted what it did, in plain words."""
    w = it.window
    lines = []
    if it.branch:
        lines.append(f"A branch, {piece(w[1])}, one of the model's runners-up for the window's first guess, was checked "
                     "beside the window in this same forward and was right where that guess was not: it is shown here in "
                     "place of the window, and its tokens are kept.")
    elif it.candidate:
        lines.append(f"Candidate n-gram {it.candidate}, checked beside the window in this same forward (a continuation "
                     "found in the text or in an earlier pass), was right for longer than the window's own guesses: it is "
                     "shown here in their place, and its tokens are kept.")
    lines.append(f"Output 0 {piece(it.outputs[0])} follows the last accepted token, so it is exactly what AR would produce: accepted.")
    for j in range(1, len(w)):
        if w[j] == it.outputs[j - 1]:
            lines.append(f"Guess {j} {piece(w[j])} equals output {j - 1}, so the model saw the right context there: output {j} {piece(it.outputs[j])} is accepted too.")
        else:
            lines.append(f"Guess {j} {piece(w[j])} differs from output {j - 1} {piece(it.outputs[j - 1])}: everything from output {j} on was computed on a wrong context, so acceptance stops.")
            break
    rest = len(w) - it.accepted
    n_stat = sum(cell_state(it, j) == "stationary" for j in range(len(w)))
    lines.append(f"{it.accepted} token{'s' if it.accepted > 1 else ''} gained in this forward." + (
        f" The other {rest} output{'s' if rest > 1 else ''} become{'' if rest > 1 else 's'} the next guesses; {n_stat} of them {'are' if n_stat != 1 else 'is'} already right (stationary)." if rest else ""))
    return lines


def step_html(it: Iteration | None, total: int, token_text, context: str = "") -> str:
    """One Jacobi iteration: the window fed in, the outputs, and what was accepted and why.

    ``token_text(id) -> str`` gives a token's raw text; ``context`` is the raw answer text before the window.
    """
    if it is None:
        return '<div class="jl-empty">Run a race with a Jacobi lane, then step through its iterations here.</div>'

    def piece(tok: int) -> str:
        return f"<code>{show_token(token_text(tok))}</code>"

    head = "".join(f"<th>{j}</th>" for j in range(len(it.window)))
    ins = "".join(f'<td class="jl-in">{show_token(token_text(t))}</td>' for t in it.window)
    outs = "".join(f'<td class="jl-c-{cell_state(it, j)}">{show_token(token_text(t))}</td>' for j, t in enumerate(it.outputs))
    marks = "".join(f'<td class="jl-c-{cell_state(it, j)}">{cell_state(it, j)}</td>' for j in range(len(it.outputs)))
    why = "".join(f"<li>{line}</li>" for line in explain_step(it, piece))
    return (
        f'<div class="jl-step"><div class="jl-step-head">Pass {it.index} of {total} · the window starts at answer token {it.start + 1}</div>'
        '<div class="jl-note">Fed in: the last accepted token, then the guesses. Model output: its likeliest next token at '
        'each position.</div>'
        f'<div class="jl-context">…{escape(context[-160:])}</div>'
        f'<table class="jl-window"><tr><th>position</th>{head}</tr>'
        f'<tr><th>fed in</th>{ins}</tr>'
        f'<tr><th>model output</th>{outs}</tr>'
        f'<tr><th>verdict</th>{marks}</tr></table>'
        f'<ul class="jl-why">{why}</ul></div>'
    )

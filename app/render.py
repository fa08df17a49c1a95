"""HTML for the lanes, the replay and the step-through view. Every text from a user or a model is escaped here."""
from __future__ import annotations

from html import escape

from decoding import Iteration
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD, loop_onset

from .race import Race, LaneRun, lane_numbers, pass_cost

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
    """The lane's answer as one span per token, coloured by arrival, with the iteration on hover.

    With ``delay_scale`` each span appears at its true time (divided by the scale): the replay.
    """
    trace = run.trace
    if trace is None:
        return ""
    arrivals = trace.token_arrivals()
    times = trace.token_times() if delay_scale else []
    out = []
    for i, piece in enumerate(run.pieces[: len(arrivals)]):
        it, size = arrivals[i]
        how = "the prefill (first token)" if it == 0 else f"iteration {it}"
        group = "alone" if size == 1 else f"one of {size} tokens accepted together"
        title = f"token {i + 1} · {how} · {group}"
        cls = ["jl-tok", group_class(size), "jl-odd" if it % 2 else "jl-even"]
        if run.special[i]:
            cls.append("jl-special")
        style = f' style="animation-delay:{times[i] / delay_scale:.3f}s"' if delay_scale else ""
        if delay_scale:
            cls.append("jl-rp")
        out.append(f'<span class="{" ".join(cls)}" data-it="{it}" title="{escape(title)}"{style}>{escape(piece)}</span>')
    return "".join(out)


def stats_html(race: Race, run: LaneRun) -> str:
    """The numbers under a lane: tok/s, forwards, tokens per forward, speedup, agreement with AR."""
    if run.trace is None:
        return '<div class="jl-stats"><span>—</span></div>'
    num = lane_numbers(race, run)
    cells = [
        f"<b>{num['tok_s']:.1f}</b> tok/s" if run.status == "done" else f"<b>{num['tokens']}</b> tokens so far",
        f"<b>{num['forwards']}</b> forwards",
        f"<b>{num['mean_accepted']:.2f}</b> tokens/forward",
    ]
    if run.status == "done":
        cells.append(f"<b>{num['speedup']:.2f}×</b> vs AR" if num["speedup"] else "speedup: needs the AR lane")
        if num["matches_ar"] is True:
            cells.append(f'<span class="jl-ok">✓ same text as {escape(num["compared_with"])}</span>')
        elif num["matches_ar"] is False:
            cells.append(f'<span class="jl-bad">✗ differs from {escape(num["compared_with"])} at token {num["first_difference"] + 1}</span>')
    return '<div class="jl-stats">' + "".join(f"<span>{c}</span>" for c in cells) + "</div>"


def candidates_phrase(count: int, length: int) -> str:
    """"2 candidate n-grams of 15" (tokens each): how the page names the candidates a pass checks."""
    return f"{count} candidate n-gram{'s' if count > 1 else ''} of {length}"


def branches_phrase(count: int) -> str:
    """"3 branches for the first guess": how the page names the other likely first guesses a pass checks."""
    return f"{count} branch{'es' if count > 1 else ''} for the first guess"


def kept_phrase(it: Iteration) -> str:
    """What a pass kept in place of the window's guesses: a candidate n-gram, or a branch."""
    return "a branch (another likely token for the window's first guess)" if it.branch else f"candidate n-gram {it.candidate}"


def verdict(race: Race) -> str:
    """One line of Markdown after a race: what each Jacobi lane gained, and why plain Jacobi barely helps."""
    parts = []
    for run in race.finished:
        if run.lane.method == "jacobi":
            num = lane_numbers(race, run)
            speed = f", {num['speedup']:.2f}× the AR lane's speed" if num["speedup"] else ""
            parts.append(f"{escape(run.lane.label)}: {num['mean_accepted']:.2f} tokens per forward{speed}")
    line = "Done. " + ("; ".join(parts) + ". " if parts else "")
    line += fast_forward_note(race) + loop_note(race)
    cost = pass_cost(race)
    if cost is not None:
        cfg = race.settings
        extras = ([candidates_phrase(cfg.candidates, cfg.candidate_tokens)] if cfg.candidates else []) + (
            [branches_phrase(cfg.branches)] if cfg.branches else [])
        rows = f"a window of {cfg.n}" + "".join(f" and {x}" for x in extras)
        line += (f"Here one Jacobi pass ({rows}) took {cost:.1f}× the time of an AR pass, "
                 f"so Jacobi outruns AR only above {cost:.1f} tokens per forward. ")
    base = race.run("base_jacobi")
    if base and base.status == "done" and base.trace.mean_accepted < 1.5:
        line += "A model trained only for AR rarely guesses right after a wrong token, so plain Jacobi gains little (see About). "
    return line + "Press **Replay** to watch the lanes side by side."


def fast_forward_note(race: Race) -> str:
    """Where the fastest Jacobi lane's extra tokens came from: repeated text or new text (a teaching point:
    a small CLLM fast-forwards mostly text that repeats what is already there)."""
    runs = [r for r in race.finished if r.lane.method == "jacobi"]
    if not runs:
        return ""
    run = max(runs, key=lambda r: r.trace.mean_accepted)
    split = run.trace.fast_forward_split()
    if not split.fast_forwarded or split.new_rate is None or split.repeating_rate is None:
        return ""
    return (f"{escape(run.lane.label)} fast-forwarded (got after the first token of a pass) "
            f"{split.repeating_rate:.0%} of the answer's tokens that repeat a 4-gram already in the prompt or answer, "
            f"and {split.new_rate:.0%} of its new text. ")


def loop_note(race: Race) -> str:
    """Which answers fall into a loop (a pattern of 1 to LOOP_PERIOD tokens, LOOP_LIMIT times in a row), and why that matters here:
    Jacobi decoding copies a loop several tokens a forward, so a loop raises tokens per forward without adding text
    worth reading."""
    looping = []
    for run in race.finished:
        onset = loop_onset(run.trace.tokens, LOOP_LIMIT, LOOP_PERIOD)
        if onset is not None:
            looping.append(f"{escape(run.lane.label)} from token {onset + 1}")
    if not looping:
        return ""
    return (f"Loop: a pattern of 1 to {LOOP_PERIOD} tokens repeats {LOOP_LIMIT} times or more in a row in "
            f"{'; '.join(looping)}. Jacobi decoding "
            "copies such loops several tokens a forward, so they raise tokens per forward without adding text worth "
            "reading (a small CLLM falls into them more often than its base model: see About). ")


def lane_html(race: Race, run: LaneRun) -> str:
    status = STATUS_TEXT.get(run.status, run.status)
    body = token_spans(run) or '<span class="jl-placeholder">waiting for its turn…</span>'
    return (
        f'<div class="jl-lane jl-{run.lane.model}-{run.lane.method}" data-lane="{run.lane.key}" data-status="{run.status}">'
        f'<div class="jl-lane-head"><span class="jl-lane-title">{escape(run.lane.label)}</span>'
        f'<span class="jl-status jl-status-{run.status}">{status}</span></div>'
        f'<div class="jl-text">{body}</div>{stats_html(race, run)}</div>'
    )


LEGEND = (
    '<div class="jl-legend">'
    '<span class="jl-tok jl-g1">one token per forward</span>'
    '<span class="jl-tok jl-g2">2–3 tokens in one forward</span>'
    '<span class="jl-tok jl-g4">4+ tokens in one forward (fast-forward)</span>'
    "<span>hover a token to see the iteration that produced it</span></div>"
)


def board_html(race: Race | None) -> str:
    """All lanes side by side."""
    if race is None:
        return '<div class="jl-empty">Type a prompt or pick an example, then press <b>Race</b>.</div>'
    lanes = "".join(lane_html(race, run) for run in race.runs)
    prompt = f'<div class="jl-prompt-echo"><b>Prompt:</b> {escape(race.prompt)}</div>'
    return f'{prompt}{LEGEND}<div class="jl-board" style="--lanes:{len(race.runs)}">{lanes}</div>'


def replay_html(race: Race | None, speed: float = 1.0, nonce: int = 0) -> str:
    """The finished lanes played back side by side at their true relative speed (CSS animations, no script)."""
    runs = race.finished if race else []
    if not runs:
        return '<div class="jl-empty">Finish a race first; the replay then shows the lanes as if they had run at once.</div>'
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
    note = f"Replay at {speed:g}× speed: each token appears when its lane produced it."
    return f'<div class="jl-replay" data-nonce="{nonce}"><div class="jl-note">{note}</div><div class="jl-board" style="--lanes:{len(runs)}">{"".join(lanes)}</div></div>'


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
        f'<div class="jl-step"><div class="jl-step-head">Iteration {it.index} of {total} · the window starts at answer token {it.start + 1}</div>'
        f'<div class="jl-context">…{escape(context[-160:])}</div>'
        f'<table class="jl-window"><tr><th>window position</th>{head}</tr>'
        f'<tr><th>fed in (last accepted + guesses)</th>{ins}</tr>'
        f'<tr><th>model output (argmax)</th>{outs}</tr>'
        f'<tr><th>verdict</th>{marks}</tr></table>'
        f'<ul class="jl-why">{why}</ul></div>'
    )

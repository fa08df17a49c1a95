"""A race's numbers in plain sentences: one per lane under its text, one per Jacobi lane in the status line, and the
details (how the clock was read, what a pass costs, where the extra tokens came from) folded away until asked for.

Rules the sentences keep: tokens per pass lead (they are exact, the same every run); a clock ratio is shown with its
spread; a Jacobi lane that saved almost no passes gets no credit for its clock ratio; a comparison with another
model's AR says that the texts differ. Every text from a user or a model is escaped here.
"""
from __future__ import annotations

from html import escape

from decoding.trace import LOOP_LIMIT, LOOP_PERIOD

from .race import CLOCK_SLACK, GAIN_MIN, LaneRun, Race, lane_numbers, pass_cost

STOP_REASONS = {"eos": "the model ended its answer", "length": "it reached the token limit"}


def plural(count: int, word: str) -> str:
    """"1 token", "2 tokens", "3 passes"."""
    return f"{count} {word}" if count == 1 else f"{count} {word}{'es' if word.endswith('s') else 's'}"


def ratio_phrase(num: dict) -> str:
    """"1.52× (1.47–1.58 over 3 runs)": the median clock ratio of the timed runs with its range."""
    runs = len(num["speedup_runs"])
    spread = f" ({num['speedup_min']:.2f}–{num['speedup_max']:.2f} over {runs} runs)" if runs > 1 else " (1 run)"
    return f"{num['speedup']:.2f}×{spread}"


def no_gain(num: dict) -> bool:
    """Jacobi saved too few passes for its clock ratio to be a Jacobi gain."""
    return num["mean_accepted"] < GAIN_MIN


def passes_ratio(race: Race, run: LaneRun) -> float:
    """How many times fewer passes a Jacobi lane made than its reference AR lane (the most its clock ratio can be
    when a Jacobi pass costs as much as an AR pass)."""
    return race.reference(run).trace.forwards / run.trace.forwards


def beyond_passes(race: Race, run: LaneRun, num: dict) -> str:
    """A caveat when the clock ratio is more than the saved passes explain, else ""."""
    fewer = passes_ratio(race, run)
    if num["speedup"] is None or num["speedup"] <= CLOCK_SLACK * fewer:
        return ""
    return (f" That is more than its {fewer:.2f}× fewer passes explain: the rest is timing noise, or a slower AR path "
            "on this machine.")


def comparison_sentence(race: Race, run: LaneRun, num: dict) -> str:
    """How a finished Jacobi lane compares with its reference AR lane, in words."""
    ref = race.reference(run)
    if ref is None:
        return "No AR lane ran, so there is nothing to compare its speed with."
    if num["same_text"] is None:
        return f"{escape(ref.lane.label)} did not finish, so there is nothing to compare its speed with."
    name = escape(ref.lane.label)
    if ref.lane.model != run.lane.model:
        texts = ("it wrote the same text" if num["same_text"] else
                 f"the texts differ from token {num['first_difference'] + 1} on")
        ratio = f" The {ratio_phrase(num)} clock ratio" if num["speedup"] else " A clock ratio"
        return (f"Compared with {name}, another model: {texts}.{ratio} compares two models' answers, "
                "not the same work done two ways.")
    if not num["same_text"]:
        return (f'<span class="jl-bad">Its text differs from {name}\'s from token {num["first_difference"] + 1}</span> '
                "(rounding on this device), so the clock ratio compares two different answers.")
    if num["speedup"] is None:
        return f'<span class="jl-ok">✓ Same text as {name}.</span>'
    if no_gain(num) and num["speedup"] < 1:
        return (f'<span class="jl-ok">✓ Same text as {name}.</span> It saved almost no passes, and its passes cost '
                f"more than AR's, so it ran slower: {ratio_phrase(num)} its speed.")
    if no_gain(num):
        return (f'<span class="jl-ok">✓ Same text as {name}.</span> It saved almost no passes, so its clock ratio, '
                f"{ratio_phrase(num)}, is not a Jacobi gain: it is timing noise, or how this machine runs the two "
                "kinds of pass.")
    if num["speedup"] < 1:
        cost = pass_cost(race)
        why = f": a Jacobi pass cost {cost:.1f} AR passes here, more than the passes it saved" if cost else ""
        return f'<span class="jl-ok">✓ Same text as {name},</span> but slower on the clock: {ratio_phrase(num)} its speed{why}.'
    return f'<span class="jl-ok">✓ Same text as {name},</span> {ratio_phrase(num)} its speed.' + beyond_passes(race, run, num)


def loop_sentence(run: LaneRun, num: dict) -> str:
    """A warning when the answer ends in a loop, with the share of tokens per pass that repeated text gave."""
    if num["loop_from"] is None:
        return ""
    line = f"⚠ From token {num['loop_from'] + 1} the answer goes round in a loop."
    if num["repeated_per_forward"] is not None:
        line += (f" {num['repeated_per_forward']:.2f} of its {num['mean_accepted']:.2f} tokens per pass came from "
                 "repeated text, which Jacobi copies cheaply.")
    return f'<span class="jl-loop">{line}</span>'


def lane_sentence(race: Race, run: LaneRun) -> str:
    """The plain sentence under a lane: tokens, passes, tokens per pass, time; for a Jacobi lane also whether its
    text is its reference's and its clock ratio; a loop warning."""
    if run.trace is None:
        return ""
    num = lane_numbers(race, run)
    if run.status != "done":
        return f"{plural(num['tokens'], 'token')} so far, in {plural(num['forwards'], 'pass')}."
    per = "1 token per pass" if run.lane.method == "ar" else f"{num['mean_accepted']:.2f} tokens per pass"
    line = f"{plural(num['tokens'], 'token')} in {plural(num['forwards'], 'pass')} ({per}), {num['wall_s']:.2f} s."
    if run.lane.method == "jacobi":
        line += " " + comparison_sentence(race, run, num)
    elif any(race.reference(r) is run for r in race.runs):
        line += " The reference for " + ", ".join(escape(r.lane.label) for r in race.runs if race.reference(r) is run) + "."
    loop = loop_sentence(run, num)
    return line + (" " + loop if loop else "")


def lane_details(race: Race, run: LaneRun) -> str:
    """The numbers behind a finished lane's sentence, folded away (a <details>)."""
    if run.trace is None or run.status != "done":
        return ""
    num = lane_numbers(race, run)
    rows = [("tokens per second", f"{num['tok_s']:.1f} (median of the timed runs)"),
            ("seconds of each timed run", ", ".join(f"{w:.2f}" for w in num["walls"])),
            ("first token after", f"{num['ttft_s']:.2f} s (the pass over the prompt)"),
            ("stopped because", STOP_REASONS.get(num["stop_reason"], num["stop_reason"] or "—"))]
    if num["speedup_runs"]:
        rows.append(("clock ratio of each run", ", ".join(f"{r:.2f}×" for r in num["speedup_runs"])))
    if num["repeated_per_forward"] is not None:
        rows.append(("tokens per pass from repeated text", f"{num['repeated_per_forward']:.2f} of {num['mean_accepted']:.2f}"))
    cells = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<details class="jl-details"><summary>Numbers</summary><table>{cells}</table></details>'


def verdict_line(race: Race, run: LaneRun) -> str:
    """One sentence for the status: what a finished Jacobi lane gained over its reference."""
    num = lane_numbers(race, run)
    ref = race.reference(run)
    name = f"<b>{escape(run.lane.label)}</b>"
    passes = f"{num['mean_accepted']:.2f} tokens per pass"
    if ref is None or num["same_text"] is None:
        return f"{name}: {passes}."
    if ref.lane.model != run.lane.model:
        return f"{name}: {passes}, against {escape(ref.lane.label)}, another model with another answer (not the same work)."
    if not num["same_text"]:
        return f"{name}: {passes}; its text differs from {escape(ref.lane.label)}'s."
    if no_gain(num):
        return f"{name} wrote the same text as {escape(ref.lane.label)} but saved almost no passes ({passes}): no real gain."
    clock = f", {ratio_phrase(num)} as fast on the clock" if num["speedup"] else ""
    if num["speedup"] and num["speedup"] < 1:
        clock = f", but slower on the clock: {ratio_phrase(num)} as fast (see what a pass costs, below)"
    return (f"{name} wrote the same {plural(num['tokens'], 'token')} as {escape(ref.lane.label)} in "
            f"{plural(num['forwards'], 'pass')} instead of {ref.trace.forwards}: {passes}{clock}."
            + beyond_passes(race, run, num))


def verdict(race: Race) -> str:
    """The status after a race: one sentence per Jacobi lane, then the details folded away, then what to do next."""
    head = "Recorded example race." if race.recorded else ("Stopped." if race.stopped else "Done.")
    lines = [verdict_line(race, run) for run in race.finished if run.lane.method == "jacobi"]
    body = "".join(f"<li>{line}</li>" for line in lines)
    details = details_html(race)
    tail = "Press <b>Replay</b> to watch the lanes side by side." if race.finished else ""
    return (f'<div class="jl-verdict"><b>{head}</b>' + (f"<ul>{body}</ul>" if body else " ") + details
            + f'<div class="jl-next">{tail}</div></div>')


def details_html(race: Race) -> str:
    """How to read the numbers: how the clock was measured, what a Jacobi pass costs here, where the extra tokens
    came from, and any loops."""
    items = [measure_note(race), cost_note(race), fast_forward_note(race), loop_note(race)]
    items = [i for i in items if i]
    if not items:
        return ""
    return ('<details class="jl-details"><summary>How to read these numbers</summary><ul>'
            + "".join(f"<li>{i}</li>" for i in items) + "</ul></details>")


def measure_note(race: Race) -> str:
    runs = max((len(r.walls) for r in race.finished), default=0)
    if not runs:
        return ""
    how = (f"each lane ran {runs} times: once as you watched, then unseen, in alternating order (AR and Jacobi "
           "take turns going first), and the clock ratio is the median with its range" if runs > 1 else
           "each lane ran once, so the clock ratio has no spread: a difference of some percent may be noise")
    return ("Tokens per pass are exact: they are the same every run and on every machine. Time is not: "
            f"{how}. A Jacobi lane is measured against the AR lane of its own model, which writes the same text.")


def cost_note(race: Race) -> str:
    cost = pass_cost(race)
    if cost is None:
        return ""
    cfg = race.settings
    extras = ([candidates_phrase(cfg.candidates, cfg.candidate_tokens)] if cfg.candidates else []) + (
        [branches_phrase(cfg.branches)] if cfg.branches else [])
    rows = f"a window of {cfg.n}" + "".join(f" and {x}" for x in extras)
    line = (f"Here one Jacobi pass ({rows}) took {cost:.1f}× the time of an AR pass, so Jacobi outruns AR only "
            f"above {cost:.1f} tokens per pass.")
    base = race.run("base_jacobi")
    if base and base.status == "done" and base.trace.mean_accepted < 1.5:
        line += " A model trained only for AR rarely guesses right after a wrong token, so plain Jacobi gains little."
    return line


def fast_forward_note(race: Race) -> str:
    """Where the fastest Jacobi lane's extra tokens came from: repeated text or new text (a small CLLM fast-forwards
    mostly text that repeats what is already there)."""
    runs = [r for r in race.finished if r.lane.method == "jacobi"]
    if not runs:
        return ""
    run = max(runs, key=lambda r: r.trace.mean_accepted)
    split = run.trace.fast_forward_split()
    if not split.fast_forwarded or split.new_rate is None or split.repeating_rate is None:
        return ""
    return (f"{escape(run.lane.label)} got a token for free (after the first of its pass) for {split.repeating_rate:.0%} "
            f"of the tokens that repeat earlier text (a run of 4 tokens already in the prompt or the answer), and for "
            f"{split.new_rate:.0%} of the new ones.")


def loop_note(race: Race) -> str:
    """Which answers fall into a loop (a pattern of 1 to LOOP_PERIOD tokens, LOOP_LIMIT times in a row), and why that
    matters here: Jacobi copies a loop several tokens a pass, so it raises tokens per pass without adding text."""
    looping = []
    for run in race.finished:
        onset = lane_numbers(race, run)["loop_from"]
        if onset is not None:
            looping.append(f"{escape(run.lane.label)} from token {onset + 1}")
    if not looping:
        return ""
    return (f"Loop: a pattern of 1 to {LOOP_PERIOD} tokens repeats {LOOP_LIMIT} times or more in a row in "
            f"{'; '.join(looping)}. Jacobi copies such loops several tokens a pass, so they raise tokens per pass "
            "without adding text worth reading (a small CLLM falls into them more often than its base model).")


def candidates_phrase(count: int, length: int) -> str:
    """"2 candidate n-grams of 15" (tokens each): how the page names the candidates a pass checks."""
    return f"{count} candidate n-gram{'s' if count > 1 else ''} of {length}"


def branches_phrase(count: int) -> str:
    """"3 branches for the first guess": how the page names the other likely first guesses a pass checks."""
    return f"{count} branch{'es' if count > 1 else ''} for the first guess"


def running_status(race: Race) -> str:
    """The status while a race runs: which lane, or which timed run."""
    if race.timing:
        number, key = race.timing
        label = escape(race.run(key).lane.label)
        return (f"Timing run {number} of {race.rounds}: <b>{label}</b> again, not drawn (the clock ratio needs a few "
                "runs) …")
    running = next((i for i, r in enumerate(race.runs) if r.status == "running"), None)
    if running is None:
        return ""
    return f"Running lane {running + 1} of {len(race.runs)}: <b>{escape(race.runs[running].lane.label)}</b> …"


def recorded_banner(race: Race) -> str:
    """What the page says above a recorded race: that it was not run now, and where and how it ran."""
    meta = race.recorded or {}
    where = escape(str(meta.get("device_name") or race.device))
    cores = f", {meta['cores']} cores" if meta.get("cores") else ""
    how = ", ".join(escape(str(meta[k])) + suffix for k, suffix in (("dtype", ""), ("engine", " engine")) if meta.get(k))
    cfg = race.settings
    return (f'<div class="jl-recorded"><b>Recorded example, not run now:</b> {escape(race.model_name)} and its CLLM on '
            f"{where}{cores}{', ' + how if how else ''}; a window of {cfg.n}, up to {cfg.max_new_tokens} tokens, "
            f"{plural(race.rounds, 'timed run')} per lane. Type a prompt (or pick an example) and press <b>Race</b> "
            "to run your own.</div>")

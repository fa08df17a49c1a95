"""One table from several evaluation JSONs (training.evaluate --out), best recipe first.

    python -m training.compare runs/*/eval.json
    python -m training.compare --paired A.json B.json   # two evaluations (or per-prompt counts of experiments.forced) prompt by prompt
    python -m training.compare --best 2 runs/*/eval.json   # the adapter folders of the first 2 rows, one a line
    python -m training.compare --loops runs/*/eval.json    # the loop tail of each, answer by answer

A run meets the quality targets when its reference perplexity is at most 1.10x the base model's
and its greedy answers are no more repetitive (seq-rep-4) than the base model's. Rows are sorted:
runs that meet them first, then by the CLLM's Jacobi tokens per forward. Under the table, with three runs or
more: how tokens per forward and repetition move together across the runs (Pearson r and a straight line),
and where that line reaches the base model's repetition.

Two more columns split the speed by the kind of text (evaluations that record the fast-forward analysis):
``new ff`` is the share of answer tokens that do not repeat a 4-gram which Jacobi fast-forwarded (got in a pass
after the first token of that pass), ``rep ff`` the same share of the tokens that do. The pooled tokens per
forward is 1 / (1 - the share of all answer tokens fast-forwarded). ``stuck`` is the share of the CLLM's greedy
answers caught by the collection's 10x filter (a pattern of 1 to 4 tokens ten times in a row), with the base
model's after the slash: the tail of the repetition that seq-rep-4 averages away. ``shared`` (evaluations that
record it) is the mean number of leading tokens the CLLM's greedy answers share with the base model's: the
training targets are the base's fixed points, so beyond that point the CLLM decodes text it was not trained on.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from decoding.trace import FastForwardSplit

PPL_LIMIT = 1.10


def fast_forward_split(jacobi: dict) -> tuple[float | None, float | None]:
    """(share of new-text answer tokens fast-forwarded, share of repeating ones), or Nones if not recorded."""
    if "fast_forward_counts" in jacobi:
        split = FastForwardSplit(**jacobi["fast_forward_counts"])
    else:  # files written before the counts were: rebuilt from the shares
        try:
            ff, tokens = jacobi["fast_forwarded_tokens"], jacobi["answer_tokens"]
            split = FastForwardSplit(ff, round(jacobi["fast_forwarded_repeating"] * ff), tokens,
                                     round(jacobi["answer_tokens_repeating"] * tokens))
        except KeyError:
            return None, None
    return split.new_rate, split.repeating_rate


def row(path: Path) -> dict:
    r = json.loads(path.read_text())
    c = r["cllm"]
    rep, base_rep = c["repetition"]["seq_rep_4"], r["base"]["repetition"]["seq_rep_4"]
    new_ff, rep_ff = fast_forward_split(c["jacobi"])
    return {"name": path.stem, "adapter": r.get("settings", {}).get("adapter", ""), "new_ff": new_ff, "rep_ff": rep_ff,
            "tokens_per_forward": c["jacobi"]["tokens_per_forward"],
            "pooled": c["jacobi"]["tokens_per_forward_pooled"], "ppl_ratio": r["ppl_ratio"],
            "seq_rep_4": rep, "base_seq_rep_4": base_rep, "exact": c["exactness"]["teacher_forced_greedy"],
            "stuck": c["repetition"].get("filter_rate"), "base_stuck": r["base"]["repetition"].get("filter_rate"),
            "shared": c.get("agreement_with_base", {}).get("shared_prefix_mean"),
            "meets_quality": r["ppl_ratio"] <= PPL_LIMIT and rep <= base_rep}


def ranked(paths: list[Path]) -> list[dict]:
    return sorted(map(row, paths), key=lambda x: (not x["meets_quality"], -x["tokens_per_forward"]))


def format_rows(rows: list[dict]) -> str:
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'run':<{width}} {'tok/fwd':>8} {'pooled':>7} {'ppl x':>6} {'rep-4':>6} {'base':>6} {'exact':>6} "
             f"{'new ff':>6} {'rep ff':>6} {'stuck':>11} {'shared':>6}  quality"]
    share = lambda x: f"{x:>6.3f}" if x is not None else f"{'-':>6}"  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}" if x is not None else "-"  # noqa: E731
    tokens = lambda x: f"{x:>6.0f}" if x is not None else f"{'-':>6}"  # noqa: E731
    for r in rows:
        stuck = f"{pct(r['stuck'])}/{pct(r['base_stuck'])}" if r["stuck"] is not None else "-"
        lines.append(f"{r['name']:<{width}} {r['tokens_per_forward']:>8.3f} {r['pooled']:>7.3f} {r['ppl_ratio']:>6.3f} "
                     f"{r['seq_rep_4']:>6.3f} {r['base_seq_rep_4']:>6.3f} {r['exact']:>6.2f} "
                     f"{share(r['new_ff'])} {share(r['rep_ff'])} {stuck:>11} {tokens(r['shared'])}"
                     f"  {'ok' if r['meets_quality'] else '-'}")
    return "\n".join(lines)


def tradeoff(rows: list[dict]) -> str:
    """One line: the correlation of tokens per forward with repetition above the base model's (seq-rep-4) over
    the runs, and where a straight line through them reaches the base model's repetition (an extrapolation:
    how far the recipes so far are from meeting both targets)."""
    excess = [r["seq_rep_4"] - r["base_seq_rep_4"] for r in rows]
    tpf = [r["tokens_per_forward"] for r in rows]
    if len(rows) < 3 or len(set(excess)) < 2 or len(set(tpf)) < 2:
        return ""
    fit = statistics.linear_regression(excess, tpf)
    return (f"tokens/forward vs seq-rep-4 above the base model's, over {len(rows)} runs: "
            f"r = {statistics.correlation(excess, tpf):.2f}; a straight line reaches the base model's repetition "
            f"at {fit.intercept:.2f} tokens/forward")


def loop_report(r: dict) -> dict:
    """The loop tail of one evaluation, answer by answer: how many of the CLLM's and of the base model's greedy
    answers the 10x filter catches, to the same prompts or not; where those loops begin (token index); and for the
    loops only the CLLM falls into, how far past the text it shares with the base's answer they begin (below 0: on
    that shared text). Needs the per-answer fields of an evaluation (older ones lack them)."""
    base, cllm = r["base"]["repetition"].get("per_answer"), r.get("cllm", {}).get("repetition", {}).get("per_answer")
    if base is None or cllm is None:
        raise ValueError("no per-answer repetition (older evaluations do not record it: evaluate the adapter again)")
    b_on, c_on = base["loop_onset"], cllm["loop_onset"]
    shared = r["cllm"]["agreement_with_base"]["shared_prefix"]
    pairs = list(zip(b_on, c_on, shared))
    new = [c - s for b, c, s in pairs if c is not None and b is None]
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"answers": len(pairs), "both": sum(b is not None and c is not None for b, c, _ in pairs),
            "cllm_only": len(new), "base_only": sum(b is not None and c is None for b, c, _ in pairs),
            "cllm_onset_median": median([c for c in c_on if c is not None]),
            "base_onset_median": median([b for b in b_on if b is not None]),
            "cllm_only_onset_past_shared_median": median(new), "cllm_only_on_shared_text": sum(x < 0 for x in new)}


def format_loops(name: str, x: dict) -> str:
    return (f"{name}: of {x['answers']} answers, {x['both']} loop in both, {x['cllm_only']} in the CLLM's only, "
            f"{x['base_only']} in the base's only; loops begin at token {x['cllm_onset_median']} (CLLM, median) and "
            f"{x['base_onset_median']} (base); the CLLM's own loops begin {x['cllm_only_onset_past_shared_median']} "
            f"tokens past the text it shares with the base's answer (median), {x['cllm_only_on_shared_text']} of them "
            "on that shared text")


def per_prompt(r: dict, path: Path) -> list[list[int]]:
    """[tokens, forwards] per prompt of an evaluation (its CLLM's Jacobi) or of a ``experiments.forced`` result."""
    rows = r.get("cllm", {}).get("jacobi", {}).get("per_prompt", r.get("per_prompt"))
    if rows is None:
        raise ValueError(f"{path} has no per-prompt counts (older evaluations do not record them: evaluate again)")
    return rows


def paired_rates(ra: list[float], rb: list[float]) -> dict:
    """Two lists of per-prompt rates on the same prompts: their means, the mean of the differences a - b with its
    standard error, and on how many prompts each side is higher."""
    if len(ra) != len(rb) or not ra:
        raise ValueError(f"need the same, non-zero number of prompts on both sides, got {len(ra)} and {len(rb)}")
    diff = [x - y for x, y in zip(ra, rb)]
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    return {"prompts": len(diff), "mean_a": statistics.mean(ra), "mean_b": statistics.mean(rb),
            "mean_diff": statistics.mean(diff), "se_diff": se,
            "a_more": sum(d > 0 for d in diff), "b_more": sum(d < 0 for d in diff)}


def print_paired(c: dict, a: str, b: str, what: str) -> None:
    """The lines ``main`` prints for a paired comparison ``c`` of files a and b."""
    print(f"{what}, {c['prompts']} prompts, tokens per forward (mean over prompts)")
    print(f"  a: {c['mean_a']:.3f}   {a}")
    print(f"  b: {c['mean_b']:.3f}   {b}")
    print(f"  a - b: {c['mean_diff']:+.3f} (standard error {c['se_diff']:.3f}); "
          f"a more on {c['a_more']} prompts, b more on {c['b_more']}")


def paired(a: Path, b: Path) -> dict:
    """Tokens per forward of two evaluations (their CLLM's Jacobi) or ``experiments.forced`` results, compared prompt by
    prompt (``paired_rates``); both must hold per-prompt counts for the same prompts."""
    ra, rb = (json.loads(p.read_text()) for p in (a, b))
    rows = [per_prompt(ra, a), per_prompt(rb, b)]
    if Path(ra["settings"].get("heldout", "")).name != Path(rb["settings"].get("heldout", "")).name:  # paths differ between machines
        raise ValueError("the two results used different held-out files")
    rates = [[t / f for t, f in r] for r in rows]
    k = min(map(len, rates))  # the first k prompts of both (one may have measured more)
    return paired_rates(rates[0][:k], rates[1][:k])


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if args[:1] == ["--paired"]:
        if len(args) != 3:
            print("usage: python -m training.compare --paired A.json B.json", file=sys.stderr)
            return 2
        try:
            c = paired(Path(args[1]), Path(args[2]))
        except (OSError, ValueError, KeyError) as exc:
            print(f"cannot compare {args[1]} and {args[2]}: {exc}", file=sys.stderr)
            return 2
        print_paired(c, args[1], args[2], "Jacobi")
        return 0
    if args[:1] == ["--loops"]:
        if len(args) < 2:
            print("usage: python -m training.compare --loops EVAL.json [EVAL.json ...]", file=sys.stderr)
            return 2
        for path in map(Path, args[1:]):
            try:
                print(format_loops(path.stem, loop_report(json.loads(path.read_text()))))
            except (OSError, ValueError, KeyError) as exc:
                print(f"cannot read the loops of {path}: {exc}", file=sys.stderr)
                return 2
        return 0
    best = None
    if args[:1] == ["--best"]:
        if len(args) < 2 or not args[1].isdigit():
            print("usage: python -m training.compare --best K EVAL.json [EVAL.json ...]", file=sys.stderr)
            return 2
        best, args = int(args[1]), args[2:]
    paths = [Path(p) for p in args]
    if not paths:
        print("usage: python -m training.compare EVAL.json [EVAL.json ...]", file=sys.stderr)
        return 2
    try:
        rows = ranked(paths)
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read the evaluations: {exc}", file=sys.stderr)
        return 2
    if best is not None:  # what a GPU sweep brings back in the call that evaluated it (the machine may go back before another)
        print("\n".join(r["adapter"] for r in rows[:best] if r["adapter"]))
        return 0
    print(format_rows(rows))
    line = tradeoff(rows)
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

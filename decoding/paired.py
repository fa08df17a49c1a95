"""Two benchmark results compared prompt by prompt: which adapter gains more tokens per forward, and by how much.

    python -m decoding.paired A.json B.json [--lane cllm_jacobi]

Both files come from ``python -m decoding.bench`` on the same prompts (``.json`` or gzipped ``.json.gz``). Tokens per
forward vary a lot from prompt to prompt (1.2 to 8 for our CLLMs), so two adapters are compared on the same prompts:
the mean of the per-prompt differences, its standard error, and on how many prompts each side gains more. Also the
lane's wall time per forward against base AR's in each file, which is what turns tokens per forward into a speedup.
"""
from __future__ import annotations

import argparse
import statistics
from .bench import read_bench


def ms_per_forward(result: dict, lane: str) -> float | None:
    """The lane's wall time per forward over all prompts, in ms, from the bench's summary totals (None when the lane
    is absent)."""
    totals = result["summary"]["lanes"].get(lane)
    return 1000 * totals["wall_s"] / totals["forwards"] if totals and totals["forwards"] else None


def compare(a: dict, b: dict, lane: str = "cllm_jacobi") -> dict:
    """Per-prompt tokens per forward (the trace's ``mean_accepted``) of ``lane`` in a and b, paired by prompt."""
    pa, pb = a["prompts"], b["prompts"]
    if len(pa) != len(pb) or any(x.get("id") != y.get("id") for x, y in zip(pa, pb)):
        raise ValueError("the two results do not cover the same prompts in the same order")
    ra = [p["lanes"][lane]["mean_accepted"] for p in pa]
    rb = [p["lanes"][lane]["mean_accepted"] for p in pb]
    return {"lane": lane, **paired_rates(ra, rb),
            "ms_per_forward": {name: {"lane": ms_per_forward(r, lane), "base_ar": ms_per_forward(r, "base_ar")}
                               for name, r in (("a", a), ("b", b))}}


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="benchmark JSON (or .json.gz) of the first adapter")
    ap.add_argument("b", help="benchmark JSON (or .json.gz) of the second, on the same prompts")
    ap.add_argument("--lane", default="cllm_jacobi")
    args = ap.parse_args(argv)
    try:
        c = compare(read_bench(args.a), read_bench(args.b), args.lane)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot compare {args.a} and {args.b}: {exc}")
    print_paired(c, args.a, args.b, c["lane"])
    for name in ("a", "b"):
        ms = c["ms_per_forward"][name]
        if ms["lane"] and ms["base_ar"]:
            print(f"  {name}: {ms['lane']:.3f} ms a forward against base AR's {ms['base_ar']:.3f} "
                  f"({ms['lane'] / ms['base_ar']:.2f} AR steps)")
    return c


if __name__ == "__main__":
    main()

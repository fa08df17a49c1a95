"""Two benchmark results compared prompt by prompt: which adapter gains more tokens per forward, and by how much.

    python -m experiments.paired A.json B.json [--lane cllm_jacobi]

Both files come from ``python -m decoding.bench`` on the same prompts (``.json`` or gzipped ``.json.gz``). Tokens per
forward vary a lot from prompt to prompt (1.2 to 8 for our CLLMs), so two adapters are compared on the same prompts:
the mean of the per-prompt differences, its standard error, and on how many prompts each side gains more. Also the
lane's wall time per forward against base AR's in each file, which is what turns tokens per forward into a speedup.
"""
from __future__ import annotations

import argparse

from decoding.bench import read_bench
from training.compare import paired_rates, print_paired


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

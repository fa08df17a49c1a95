"""The fused step's launch settings against its speed on a GPU: how finely the projections split their input columns
(``fused_step.SPLIT_K_PROGRAMS``), the pipeline stages of their loads, their warps, programmatic dependent launch
(``fused_step.PDL``) and the unrolled slices (``fused_step.UNROLL``), by the AR step's and a window's graph time.

    python -m experiments.fused_sweep --out fused_sweep.json
    python -m experiments.fused_sweep --split 0,2,4,8 --stages 1,2 --warps 4 --pdl off,start,wait --unroll 0,8 \
        --widths 1,16

A random model of SmolLM2-135M's shape in bfloat16 (nothing to load). Each setting is a fresh engine: its kernels
compiled and its CUDA graphs captured for the listed widths, then ``decoding.latency.width_report`` (200 replays a
width, all widths attending to the same 512-odd keys). The unfused step runs first as the baseline. It prints one table,
the fastest setting last; the settings the product uses are the constants of decoding/fused_step.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from decoding import fused_step
from decoding.bench import source_commit
from decoding.fast import FastEngine
from decoding.latency import random_model, width_report


def timed(model, widths: tuple[int, ...], fused: bool) -> dict:
    """Graph and whole-step ms by width of a fresh engine on ``model``, and the seconds it took to build."""
    t0 = time.perf_counter()
    engine = FastEngine(model, max_len=1024, widths=widths, fused_step=fused)
    engine.capture(progress=None)
    built = time.perf_counter() - t0
    rows = width_report(engine, widths=widths)
    ran_fused = engine.model.fused_step  # False should the fused step have failed to compile
    del engine
    torch.cuda.empty_cache()
    return {"fused": ran_fused, "build_s": built,
            "widths": {r["width"]: {"graph_ms": r["graph_ms"], "step_ms": r["step_ms"]} for r in rows}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.fused_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="0,2,4,8",
                    help="programs per multiprocessor the projections aim for (0: no split), comma-separated")
    ap.add_argument("--stages", default="1,2", help="pipeline stages of the projections' loads, comma-separated")
    ap.add_argument("--warps", default="4", help="warps a projection program runs, comma-separated")
    ap.add_argument("--pdl", default="off", help="programmatic dependent launch (fused_step.PDL_MODES: off, start, "
                                                 "wait), comma-separated")
    ap.add_argument("--unroll", default="0", help="slices of at most this many blocks unrolled (0: none), "
                                                 "comma-separated")
    ap.add_argument("--widths", default="1,16", help="window widths to time (at most 32, the fused step's widest)")
    ap.add_argument("--out", default=None, help="JSON result path")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the fused step's speed needs a CUDA GPU", file=sys.stderr)
        return 2
    widths = tuple(int(w) for w in a.widths.split(","))
    model = random_model("cuda", torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = [{"setting": "unfused", **timed(model, widths, False)}]
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    for per_sm, stages, warps, pdl, unroll in itertools.product(ints(a.split), ints(a.stages), ints(a.warps),
                                                                a.pdl.split(","), ints(a.unroll)):
        fused_step.SPLIT_K_PROGRAMS = per_sm * sms
        fused_step.LAUNCH = {"num_warps": warps, "num_stages": stages}
        fused_step.PDL, fused_step.UNROLL = pdl, unroll
        rows.append({"setting": f"split {per_sm}/SM, {stages} st, {warps} w, PDL {pdl}, unroll {unroll}",
                     "split_per_sm": per_sm, "stages": stages, "warps": warps, "pdl": pdl, "unroll": unroll,
                     **timed(model, widths, True)})
    result = {"meta": {"device": torch.cuda.get_device_name(0), "dtype": "bfloat16", "model": "random smollm2-135m",
                       "torch": torch.__version__, "commit": source_commit(),
                       "command": " ".join(["python -m experiments.fused_sweep", *(argv or sys.argv[1:])])},
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    first = widths[0]
    rows = [rows[0]] + sorted(rows[1:], key=lambda r: -r["widths"][first]["graph_ms"])
    print(f"{result['meta']['device']}, bf16, random SmolLM2-135M shape: graph ms (whole step ms) by width")
    print(f"{'setting':48}" + "".join(f"{'width ' + str(w):>20}" for w in widths))
    for r in rows:
        cells = "".join(f"{c['graph_ms']:>11.3f} ({c['step_ms']:.3f})" for c in r["widths"].values())
        print(f"{r['setting'] + ('' if r['fused'] or r['setting'] == 'unfused' else ' (fell back)'):48}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

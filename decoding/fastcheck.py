"""GPU check of the fast engine: fp32 exactness against the eager path, then the bf16 benchmark.

    OUT=results python -m decoding.fastcheck          # on a CUDA machine; a few minutes
    python -m decoding.fastcheck --device cpu --limit 1 --tokens 8 --bench-limit 1   # smoke test of this script

1. float32, TF32 off: for each prompt, eager AR (transformers) is the reference; fast AR and fast
   Jacobi at n = 1, 4, 16, 64, with candidate n-grams (2 x 15 at n = 16, 3 x 8 at n = 4), with branches for the
   first guess (3 at n = 16; 2 beside 2 x 3 candidates at n = 4; their own graphs), and prompt lookup (n = 11), must
   give the same tokens. --fused-step on checks the fused step (Triton kernels); the result says which step ran.
2. bfloat16: ``decoding.bench`` with the fast engine (hf_generate baseline, base and CLLM lanes,
   n = 16, 256 new tokens, the default prompt file) and its per-width latency report (--skip-bench: not run).
Writes ``$OUT/fastcheck.json`` and ``$OUT/bench_fast_bf16.json`` when OUT is set; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import bench, fast
from .decoders import DecodeConfig, ar_decode, jacobi_decode, lookup_decode, run
from .latency import describe
from .models import default_adapter, load_model
from .prompts import encode, read_prompts

WINDOWS = (1, 4, 16, 64)  # Jacobi window sizes checked for exactness
CANDIDATES = ((16, 2, 15, 0), (4, 3, 8, 0), (16, 0, None, 3), (4, 2, 3, 2))  # (n, candidate n-grams, their length,
# branches) checked for exactness too


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_exactness(device: str, limit: int, tokens: int, fused_step: bool | None = None) -> dict:
    """fp32: fast AR, fast Jacobi (every n in WINDOWS, and with the CANDIDATES) and fast prompt lookup against eager
    AR, token for token."""
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness needs true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    lm = load_model(device=device, dtype="float32")
    t0 = time.perf_counter()
    engine = fast.prepare(lm.model, fused_step=fused_step)
    build_s = time.perf_counter() - t0
    rows = []
    for p in read_prompts(limit=limit):
        ids = encode(lm.tokenizer, p["prompt"])
        cfg = DecodeConfig(max_new_tokens=tokens, eos_token_ids=lm.eos_token_ids)
        ref = run(ar_decode, lm.model, ids, cfg).tokens
        got = {"fast_ar": run(ar_decode, lm.model, ids, cfg, engine="fast").tokens}
        for n in WINDOWS:
            jcfg = DecodeConfig(max_new_tokens=tokens, n=n, eos_token_ids=lm.eos_token_ids)
            got[f"fast_jacobi_n{n}"] = run(jacobi_decode, lm.model, ids, jcfg, engine="fast").tokens
        for n, count, length, branches in CANDIDATES:  # candidate rows in the graphs, kept candidates' K/V moved
            jcfg = DecodeConfig(max_new_tokens=tokens, n=n, eos_token_ids=lm.eos_token_ids, candidates=count,
                                candidate_len=length, branches=branches)
            name = f"fast_jacobi_n{n}" + (f"_c{count}x{length}" if count else "") + (f"_b{branches}" if branches else "")
            got[name] = run(jacobi_decode, lm.model, ids, jcfg, engine="fast").tokens
        lcfg = DecodeConfig(max_new_tokens=tokens, n=11, eos_token_ids=lm.eos_token_ids)
        got["fast_lookup_n11"] = run(lookup_decode, lm.model, ids, lcfg, engine="fast").tokens
        rows.append({"id": p["id"], "prompt_tokens": len(ids), "tokens": len(ref),
                     "first_difference": {k: first_difference(v, ref) for k, v in got.items()}})
    fast.release(lm.model)
    del lm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    checks = [d for r in rows for d in r["first_difference"].values()]
    return {"engine_build_s": build_s, "fused_step": engine.model.fused_step, "prompts": rows,
            "equal": sum(d is None for d in checks), "checks": len(checks)}


def verdicts(result: dict) -> list[str]:
    """The issue's numbers, read off the benchmark result."""
    lanes = result["summary"]["lanes"]
    lines = []
    ar = lanes["base_ar"]["tok_s"]
    for peer, target in (("hf_generate", 15), ("hf_static", 10), ("hf_lookup", None)):
        if peer in lanes and lanes[peer]["tok_s"]:
            aim = f"; target >= {target}x" if target else ""
            lines.append(f"fast AR {ar:.0f} tok/s = {1 / lanes[peer]['speedup']:.1f}x {peer} "
                         f"({lanes[peer]['tok_s']:.0f} tok/s, same prompts){aim}")
    if "cllm_jacobi" in lanes:
        cj = lanes["cllm_jacobi"]
        own = f", {cj['speedup']:.2f}x its own AR" if cj["reference"] == "cllm_ar" else ""
        lines.append(f"CLLM Jacobi {cj['tok_s']:.0f} tok/s = {cj['speedup_vs_base_ar']:.2f}x fast base AR{own} "
                     f"({cj['mean_accepted']:.2f} tokens/forward); target >= 1.97x base AR")
    if result.get("latency"):
        lines += describe(result["latency"], result["meta"]["decode"]["n"])
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m decoding.fastcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=5, help="prompts of the fp32 exactness check")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per fp32 exactness check")
    ap.add_argument("--bench-limit", type=int, default=None, help="prompts of the bf16 benchmark (default: all)")
    ap.add_argument("--bench-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--adapter", default=default_adapter())
    ap.add_argument("--fused-step", choices=tuple(bench.FUSED_STEPS), default="auto",
                    help="windows of up to 32 tokens as Triton kernels (auto: where Triton runs them and they are "
                         "the faster step)")
    ap.add_argument("--skip-bench", action="store_true", help="the fp32 exactness check only")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    exact = check_exactness(a.device, a.limit, a.tokens, bench.FUSED_STEPS[a.fused_step])
    report = {"exactness_fp32": exact, "meta": {"command": bench.command_line(), "commit": bench.source_commit(),
                                                "env": bench.environment(torch.device(a.device), torch.float32)}}
    if not a.skip_bench:
        dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
        bc = bench.BenchConfig(adapter=a.adapter, limit=a.bench_limit, n=a.n, max_new_tokens=a.bench_tokens,
                               device=a.device, dtype=dtype, engine="fast", fused_step=a.fused_step,
                               out=str(out / "bench_fast_bf16.json") if out else None)
        result = bench.bench(bc)
        report |= {"verdicts": verdicts(result), "bench_summary": result["summary"], "latency": result.get("latency")}
    if out:
        (out / "fastcheck.json").write_text(json.dumps(report, indent=1))
    step = "fused" if exact["fused_step"] else "unfused"
    print(f"\nfp32 exactness ({step} step): {exact['equal']}/{exact['checks']} decodes equal eager AR "
          f"(prompts x [{', '.join(exact['prompts'][0]['first_difference']) if exact['prompts'] else ''}]); "
          f"fp32 engine built in {exact['engine_build_s']:.1f} s")
    for row in exact["prompts"]:
        bad = {k: d for k, d in row["first_difference"].items() if d is not None}
        if bad:
            print(f"  {row['id']}: differs at token {bad}")
    if not a.skip_bench:
        print(bench.format_table(result))
        print("\n".join(report["verdicts"]))
    return 0 if exact["equal"] == exact["checks"] else 1


if __name__ == "__main__":
    sys.exit(main())

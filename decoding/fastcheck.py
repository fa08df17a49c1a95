"""GPU check of the fast engine: fp32 exactness against the eager path, then the bf16 benchmark.

    OUT=results python -m decoding.fastcheck          # on a CUDA machine; a few minutes
    python -m decoding.fastcheck --device cpu --limit 1 --tokens 8 --bench-limit 1   # smoke test of this script

1. float32, TF32 off: for each prompt, eager AR (transformers) is the reference; fast AR and fast
   Jacobi at n = 1, 4, 16, 64, with candidate n-grams (2 x 15 at n = 16, 3 x 8 at n = 4), and with branches for the
   first guess (3 at n = 16; 2 beside 2 x 3 candidates at n = 4; their own graphs), must give the same tokens.
2. bfloat16: ``decoding.bench`` with the fast engine (hf_generate baseline, base and CLLM lanes,
   n = 16, 256 new tokens, the default prompt file) and its per-width latency report.
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
from .decoders import DecodeConfig, ar_decode, jacobi_decode, run
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


def check_exactness(device: str, limit: int, tokens: int) -> dict:
    """fp32: fast AR and fast Jacobi (every n in WINDOWS, and with the CANDIDATES) against eager AR, token for token."""
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness needs true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    lm = load_model(device=device, dtype="float32")
    t0 = time.perf_counter()
    fast.prepare(lm.model)
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
        rows.append({"id": p["id"], "prompt_tokens": len(ids), "tokens": len(ref),
                     "first_difference": {k: first_difference(v, ref) for k, v in got.items()}})
    fast.release(lm.model)
    del lm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    checks = [d for r in rows for d in r["first_difference"].values()]
    return {"engine_build_s": build_s, "prompts": rows, "equal": sum(d is None for d in checks), "checks": len(checks)}


def verdicts(result: dict) -> list[str]:
    """The issue's numbers, read off the benchmark result."""
    lanes = result["summary"]["lanes"]
    lines = []
    gen, ar = lanes["hf_generate"]["tok_s"], lanes["base_ar"]["tok_s"]
    lines.append(f"fast AR {ar:.0f} tok/s = {ar / gen:.1f}x model.generate ({gen:.0f} tok/s); target >= 10x")
    if "cllm_jacobi" in lanes:
        cj = lanes["cllm_jacobi"]
        lines.append(f"CLLM Jacobi {cj['tok_s']:.0f} tok/s = {cj['tok_s'] / ar:.2f}x fast AR "
                     f"({cj['mean_accepted']:.2f} tokens/forward); target >= 3x")
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
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    exact = check_exactness(a.device, a.limit, a.tokens)
    dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    bc = bench.BenchConfig(adapter=a.adapter, limit=a.bench_limit, n=a.n, max_new_tokens=a.bench_tokens,
                           device=a.device, dtype=dtype, engine="fast",
                           out=str(out / "bench_fast_bf16.json") if out else None)
    result = bench.bench(bc)
    lines = verdicts(result)
    if out:
        report = {"exactness_fp32": exact, "verdicts": lines, "bench_summary": result["summary"],
                  "latency": result.get("latency"), "env": result["meta"]["env"]}
        (out / "fastcheck.json").write_text(json.dumps(report, indent=1))
    print(f"\nfp32 exactness: {exact['equal']}/{exact['checks']} decodes equal eager AR "
          f"(prompts x [{', '.join(exact['prompts'][0]['first_difference']) if exact['prompts'] else ''}]); "
          f"fp32 engine built in {exact['engine_build_s']:.1f} s")
    for row in exact["prompts"]:
        bad = {k: d for k, d in row["first_difference"].items() if d is not None}
        if bad:
            print(f"  {row['id']}: differs at token {bad}")
    print(bench.format_table(result))
    print("\n".join(lines))
    return 0 if exact["equal"] == exact["checks"] else 1


if __name__ == "__main__":
    sys.exit(main())

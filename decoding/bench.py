"""Benchmark: AR vs Jacobi, on the base model and on its CLLM, in one process on one device.

    python -m decoding.bench                      # embedded model, default prompts, n=16, 128 tokens
    python -m decoding.bench --adapter none --out result.json   # base lanes only

Lanes per prompt: hf_generate (transformers' model.generate, greedy), base_ar, base_jacobi, and with
an adapter also cllm_ar and cllm_jacobi (by default our shipped CLLM adapter of the embedded model).
A warm-up run precedes the timed ones; the device is
synchronised around every timed run (the decoders synchronise at every step anyway).
"""
from __future__ import annotations

import gzip
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import fast
from .cli import parse
from .decoders import ENGINES, INIT_CHOICES, DecodeConfig, ar_decode, jacobi_decode, run, sync_device
from .models import DEFAULT_SPEC, DTYPES, LoadedModel, adapter_arg, adapter_sha256, load_model
from .prompts import encode, read_prompts

LANES = ("hf_generate", "base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi")
CPU_PROJECTIONS = ("auto", "linear", "wx")  # --cpu-projection (llama_static.project)


@dataclass
class BenchConfig:
    """Benchmark: AR vs Jacobi, on the base model and on its CLLM, in one process on one device. Saved under "meta"."""

    model: str = DEFAULT_SPEC  # model spec: smollm2-135m, a preset, a local folder or .gguf, or a hub id
    adapter: str | None = "auto"  # CLLM LoRA adapter folder (adds the cllm_* lanes); "auto": ours for the embedded model; "none": base lanes only
    prompts: str | None = None  # JSON-lines prompt file, a "prompt" or "turns" per line (default: assets/prompts.jsonl)
    raw: bool = False  # feed prompts without the chat template
    limit: int | None = None  # use only the first K prompts
    n: int = 16  # Jacobi window size (1-128)
    max_new_tokens: int = 128  # tokens per answer at most
    init: str = field(default="random", metadata={"choices": INIT_CHOICES})  # initial guesses of the Jacobi window
    device: str = "auto"  # auto, cuda, cuda:N, mps or cpu
    dtype: str = field(default="auto", metadata={"choices": tuple(DTYPES)})  # auto: float32 on CPU, bfloat16 on GPU
    engine: str = field(default="auto", metadata={"choices": ENGINES})  # eager (transformers), fast (static cache; CUDA graphs on a GPU), auto: fast on CUDA and CPU for Llama models
    seed: int = 0  # seed of the initial guesses (the text does not depend on it)
    out: str | None = None  # write the JSON result here (gzipped if it ends in .gz)
    lanes: tuple[str, ...] = ()  # comma-separated lanes to run (default: every lane the models allow); base_ar always runs, the speed reference. Leaving out hf_generate saves most of the time on a GPU
    in_thread: bool = False  # time the lanes in a second thread after this one loaded the models, as a web server does (on a CPU, torch's threads serve the first thread that used them fastest)
    candidates: int = 0  # candidate n-grams checked beside the Jacobi window in each pass (fast engine; 0: plain Jacobi)
    candidate_len: int | None = None  # tokens per candidate n-gram (default: n-1, as many as the window guesses)
    branches: int = 0  # next likeliest tokens for the window's first guess, each checked beside it in the same pass (fast engine; 0: none)
    cpu_projection: str = field(default="auto", metadata={"choices": CPU_PROJECTIONS})  # fast engine on the CPU: auto (each width's faster projection form, timed at load), linear (F.linear at every width) or wx (w @ x.T at every width)

    def __post_init__(self):
        """Resolve the adapter and the lanes, and refuse what cannot run (a ValueError with a message)."""
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        unknown = sorted(set(self.lanes) - set(LANES))
        if unknown:
            raise ValueError(f"unknown lane(s) {', '.join(unknown)}; choose from {', '.join(LANES)}")
        self.adapter = adapter_arg(self.adapter, self.model)
        cllm_lanes = {"cllm_ar", "cllm_jacobi"}
        if self.adapter is None and cllm_lanes & set(self.lanes):
            raise ValueError("the cllm lanes need an adapter (--adapter auto or a folder)")
        asked = set(self.lanes or [x for x in LANES if self.adapter or x not in cllm_lanes]) | {"base_ar"}
        self.lanes = tuple(x for x in LANES if x in asked)


def read_bench(path: str | Path) -> dict:
    """A benchmark result (``--out``), plain JSON or gzipped (``.json.gz``, as the big committed ones are kept)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def hf_generate(lm: LoadedModel, ids: list[int], cfg: DecodeConfig) -> dict:
    """transformers' own greedy generate(), timed the same way as our decoders."""
    x = torch.tensor([ids], device=lm.device)
    sync_device(lm.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=list(cfg.eos_token_ids) or None, pad_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        )
    sync_device(lm.device)
    wall = time.perf_counter() - t0
    tokens = out[0, len(ids):].tolist()
    return {"tokens": tokens, "forwards": len(tokens), "wall_s": wall, "mean_accepted": 1.0}


def decode_lane(lm: LoadedModel, decoder, ids: list[int], cfg: DecodeConfig, engine: str) -> dict:
    trace = run(decoder, lm.model, ids, cfg, engine=engine)
    sync_device(lm.device)
    return {
        "tokens": trace.tokens, "forwards": trace.forwards, "wall_s": trace.wall_s,
        "mean_accepted": trace.mean_accepted, "ttft_s": trace.ttft_s,
    }


def lane_runners(base: LoadedModel, cllm: LoadedModel | None, bc: BenchConfig) -> dict:
    """Lane name -> (model, function(ids, cfg) -> result)."""
    lanes = {
        "hf_generate": (base, lambda ids, cfg: hf_generate(base, ids, cfg)),
        "base_ar": (base, lambda ids, cfg: decode_lane(base, ar_decode, ids, cfg, bc.engine)),
        "base_jacobi": (base, lambda ids, cfg: decode_lane(base, jacobi_decode, ids, cfg, bc.engine)),
    }
    if cllm is not None:
        lanes["cllm_ar"] = (cllm, lambda ids, cfg: decode_lane(cllm, ar_decode, ids, cfg, bc.engine))
        lanes["cllm_jacobi"] = (cllm, lambda ids, cfg: decode_lane(cllm, jacobi_decode, ids, cfg, bc.engine))
    return {name: lane for name, lane in lanes.items() if name in bc.lanes}


def summarise(per_prompt: list[dict], lanes: list[str]) -> dict:
    """Totals per lane, speedup over base_ar, and exact match of Jacobi against AR on the same model."""
    summary = {}
    for lane in lanes:
        rows = [p["lanes"][lane] for p in per_prompt]
        tokens = sum(r["tokens"] for r in rows)
        forwards = sum(r["forwards"] for r in rows)
        wall = sum(r["wall_s"] for r in rows)
        # Tokens per forward after the prefill (the prefill always gives exactly one token).
        after = [(r["tokens"] - 1, r["forwards"] - 1) for r in rows if r["forwards"] > 1]
        summary[lane] = {
            "tokens": tokens, "forwards": forwards, "wall_s": wall, "tok_s": tokens / wall if wall else 0.0,
            "mean_accepted": sum(a for a, _ in after) / max(1, sum(f for _, f in after)),
            "median_tok_s": statistics.median(r["tokens"] / r["wall_s"] for r in rows if r["wall_s"] > 0),
        }
    ref = summary.get("base_ar", {}).get("tok_s", 0.0)
    for lane in lanes:
        summary[lane]["speedup"] = summary[lane]["tok_s"] / ref if ref else 0.0
    exact = {}
    for jac, ar in (("base_jacobi", "base_ar"), ("cllm_jacobi", "cllm_ar"), ("base_ar", "hf_generate")):
        if jac in lanes and ar in lanes:
            same = [p["lanes"][jac]["ids"] == p["lanes"][ar]["ids"] for p in per_prompt]
            exact[f"{jac}_vs_{ar}"] = sum(same) / len(same)
    return {"lanes": summary, "exact_match": exact}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else fast.cpu_name()
    return {
        "device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pick_engine(bc: BenchConfig, models: list) -> str:
    """Resolve ``auto`` and build the fast engines (graph capture) now, before anything is timed."""
    engine = bc.engine
    if engine == "auto":
        engine = "fast" if all(fast.default_engine(m) == "fast" for m in models) else "eager"
    if engine == "fast":
        for m in models:
            e = fast.prepare(m)
            if e.device.type == "cpu" and bc.cpu_projection != "auto":
                e.model.cpu_wx = dict.fromkeys(e.widths, bc.cpu_projection == "wx")
    return engine


def latency_report(lm: LoadedModel, n: int) -> dict:
    """Per-forward latency by window width and bandwidth achieved; on CUDA also where the AR step goes."""
    from . import latency

    return latency.report(fast.prepare(lm.model), n)


def command_line() -> str:
    """The command that is running, as a user would type it (``python -m decoding.bench ...`` or ``...fastcheck``)."""
    script = Path(sys.argv[0])
    if script.parent.name == "decoding" and script.suffix == ".py":
        return " ".join(["python -m decoding." + script.stem, *sys.argv[1:]])
    return " ".join(sys.argv)


def run_timed(fn, in_thread: bool) -> None:
    """fn() here, or in a second thread (re-raising its exception here)."""
    if not in_thread:
        fn()
        return
    errors = []

    def target():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target, name="bench-lanes")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def bench(bc: BenchConfig) -> dict:
    """Run every lane on every prompt; return the result dict (also written to bc.out)."""
    base = load_model(bc.model, device=bc.device, dtype=bc.dtype)
    cllm = load_model(bc.model, adapter=bc.adapter, device=bc.device, dtype=bc.dtype) if bc.adapter else None
    bc = replace(bc, engine=pick_engine(bc, [lm.model for lm in (base, cllm) if lm is not None]))
    prompts = read_prompts(bc.prompts, bc.limit)
    cfg = DecodeConfig(max_new_tokens=bc.max_new_tokens, n=bc.n, init=bc.init, seed=bc.seed, eos_token_ids=base.eos_token_ids,
                       candidates=bc.candidates, candidate_len=bc.candidate_len, branches=bc.branches)
    lanes = lane_runners(base, cllm, bc)
    warm_ids = encode(base.tokenizer, prompts[0]["prompt"], chat=not bc.raw)
    for _, fn in tqdm(lanes.values(), desc="warm-up", leave=False):
        fn(warm_ids, DecodeConfig(**{**asdict(cfg), "max_new_tokens": min(16, cfg.max_new_tokens)}))
    per_prompt = []

    def timed_lanes():
        for p in tqdm(prompts, desc="prompts"):
            ids = encode(base.tokenizer, p["prompt"], chat=not bc.raw)
            row = {"id": p["id"], "category": p["category"], "prompt_tokens": len(ids), "lanes": {}}
            for lane, (lm, fn) in lanes.items():
                r = fn(ids, cfg)
                row["lanes"][lane] = {
                    "tokens": len(r["tokens"]), "forwards": r["forwards"], "wall_s": r["wall_s"],
                    "tok_s": len(r["tokens"]) / r["wall_s"] if r["wall_s"] else 0.0, "mean_accepted": r["mean_accepted"],
                    "ids": r["tokens"], "text": lm.tokenizer.decode(r["tokens"], skip_special_tokens=True),
                }
            per_prompt.append(row)

    run_timed(timed_lanes, bc.in_thread)
    result = {
        "meta": {"config": asdict(bc), "decode": cfg.to_dict(), "env": environment(base.device, base.dtype),
                 "command": command_line(), "adapter_sha256": adapter_sha256(bc.adapter)},
        "prompts": per_prompt,
        "summary": summarise(per_prompt, list(lanes)),
    }
    if bc.engine == "fast":
        result["latency"] = latency_report(base, bc.n)
    if bc.out:
        write_bench(bc.out, result)
    return result


def write_bench(path: str | Path, result: dict) -> None:
    """Write a result as JSON, gzipped when ``path`` ends in .gz (``read_bench`` reads both)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)


def format_table(result: dict) -> str:
    s = result["summary"]
    env = result["meta"]["env"]
    lines = [f"{env['device_name']} ({env['device']}, {env['dtype']}), n={result['meta']['decode']['n']}, "
             f"max_new_tokens={result['meta']['decode']['max_new_tokens']}, {len(result['prompts'])} prompts",
             f"{'lane':<12} {'tokens':>7} {'fwd':>6} {'tok/fwd':>8} {'tok/s':>8} {'speedup':>8}"]
    for lane, r in s["lanes"].items():
        lines.append(f"{lane:<12} {r['tokens']:>7} {r['forwards']:>6} {r['mean_accepted']:>8.3f} {r['tok_s']:>8.1f} {r['speedup']:>7.2f}x")
    lines += [f"exact match {k}: {v:.3f}" for k, v in s["exact_match"].items()]
    if "latency" in result:
        from .latency import format_widths

        lines += ["", "fast engine, one forward by window width:", format_widths(result["latency"]["widths"])]
    return "\n".join(lines)


def parse_args(argv=None) -> BenchConfig:
    return parse(BenchConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m decoding.bench")


def main(argv=None) -> int:
    bc = parse_args(argv)
    try:
        result = bench(bc)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

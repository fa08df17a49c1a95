"""Benchmark: our AR, Jacobi and prompt-lookup decoding on the base model and its CLLM, beside transformers' own
generate paths, in one process on one device.

    python -m decoding.bench                      # embedded model, default prompts, n=16, 128 tokens
    python -m decoding.bench --adapter none --out result.json   # base lanes only
    python -m decoding.bench --prompts assets/prompts_unseen80.jsonl --max-new-tokens 256 --lanes all --repeats 3

Lanes (LANES): transformers' hf_generate, hf_static and hf_lookup (decoding.peers); base_ar, base_jacobi and
base_lookup on the base model; with an adapter (by default our shipped CLLM of the embedded model) cllm_ar, cllm_jacobi
and cllm_lookup on the CLLM. Each lane is measured against the AR lane of its own model (``bench_summary.reference``):
its speedup, and whether its text is that lane's. A warm-up run of every lane precedes the timed ones (it pays for
compiles; its seconds are saved); the lanes of a prompt run back to back, and with --repeats K each prompt's lanes run
K times, their order rotated each time, for medians and their spread. The device is synchronised around every run.
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import fast
from .bench_summary import reference, summarise
from .cli import parse
from .decoders import ENGINES, INIT_CHOICES, DecodeConfig, ar_decode, jacobi_decode, lookup_decode, run, sync_device
from .models import DEFAULT_SPEC, DTYPES, LoadedModel, adapter_arg, adapter_sha256, load_model
from .peers import PEERS, peer_runners
from .prompts import DEFAULT_PROMPTS, encode, read_prompts

OURS = ("base_ar", "base_jacobi", "base_lookup", "cllm_ar", "cllm_jacobi", "cllm_lookup")
LANES = PEERS + OURS
DEFAULT_LANES = ("hf_generate", "base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi")  # without --lanes
CPU_PROJECTIONS = ("auto", "linear", "wx")  # --cpu-projection (llama_static.project)
FUSED_STEPS = {"auto": None, "on": True, "off": False}  # --fused-step (llama_static.StaticLlama's fused_step)
PARTIAL_EVERY = 10  # prompts between the partial results a long run writes to --out (marked "partial" in meta)


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
    out: str | None = None  # write the JSON result here (gzipped if it ends in .gz; a long run writes its partial result there every 10 prompts)
    lanes: tuple[str, ...] = ()  # comma-separated lanes, or "all" (default: hf_generate, base_ar, base_jacobi, and cllm_ar, cllm_jacobi with an adapter); the AR lane each is measured against runs too
    in_thread: bool = False  # build the engines (their CPU tuning), warm up and time the lanes in a second thread after this one loaded the models, as a web server does (on a CPU, torch's threads serve the first thread that used them fastest)
    candidates: int = 0  # candidate n-grams checked beside the Jacobi window in each pass (fast engine; 0: plain Jacobi)
    candidate_len: int | None = None  # tokens per candidate n-gram (default: n-1, as many as the window guesses)
    branches: int = 0  # next likeliest tokens for the window's first guess, each checked beside it in the same pass (fast engine; 0: none)
    cpu_projection: str = field(default="auto", metadata={"choices": CPU_PROJECTIONS})  # fast engine on the CPU: auto (each width's faster projection form, timed at load), linear (F.linear at every width) or wx (w @ x.T at every width)
    lookup_tokens: int = 10  # tokens the lookup lanes copy a pass: hf_lookup's prompt_lookup_num_tokens, n - 1 of base_lookup and cllm_lookup
    repeats: int = 1  # timed runs of each prompt's lanes, their order rotated each run, for medians and the spread (transformers' lanes run once)
    hf_limit: int | None = None  # run transformers' lanes (slow) on the first K prompts only (default: all)
    fused_step: str = field(default="auto", metadata={"choices": tuple(FUSED_STEPS)})  # fast engine on a GPU: windows of up to 32 tokens as Triton kernels (on: or fail; off: the unfused step; auto: where Triton runs them and they are the faster step, timed at load; CLLM_FUSED_STEP=on|off decides instead)

    def __post_init__(self):
        """Resolve the adapter and the lanes (each with the AR lane it is measured against), and refuse what cannot
        run (a ValueError with a message)."""
        for name in ("limit", "hf_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.repeats < 1 or self.lookup_tokens < 1:
            raise ValueError("--repeats and --lookup-tokens must be at least 1")
        asked = set(LANES if tuple(self.lanes) == ("all",) else self.lanes)
        unknown = sorted(asked - set(LANES))
        if unknown:
            raise ValueError(f"unknown lane(s) {', '.join(unknown)}; choose from {', '.join(LANES)}")
        self.adapter = adapter_arg(self.adapter, self.model)
        if self.adapter is None and tuple(self.lanes) != ("all",) and any(x.startswith("cllm_") for x in asked):
            raise ValueError("the cllm lanes need an adapter (--adapter auto or a folder)")
        asked = asked or set(DEFAULT_LANES)
        asked = {x for x in asked if self.adapter or not x.startswith("cllm_")}
        asked |= {reference(x, asked | {"cllm_ar"}) for x in asked}  # each lane's AR reference runs too
        self.lanes = tuple(x for x in LANES if x in asked)


def read_bench(path: str | Path) -> dict:
    """A benchmark result (``--out``), plain JSON or gzipped (``.json.gz``, as the big committed ones are kept)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def decode_lane(lm: LoadedModel, decoder, ids: list[int], cfg: DecodeConfig, engine: str) -> dict:
    trace = run(decoder, lm.model, ids, cfg, engine=engine)
    sync_device(lm.device)
    return {
        "tokens": trace.tokens, "forwards": trace.forwards, "wall_s": trace.wall_s,
        "mean_accepted": trace.mean_accepted, "ttft_s": trace.ttft_s,
    }


def lane_runners(base: LoadedModel, cllm: LoadedModel | None, bc: BenchConfig, cache_len: int) -> dict:
    """Lane name -> (model, function(ids, cfg) -> result), for the lanes of ``bc.lanes`` (``cache_len``: the static
    cache's length for hf_static)."""
    def ours(lm, decoder, lookup=False):
        def lane(ids, cfg):
            if lookup:  # the last token and up to lookup_tokens copied ones a pass
                cfg = replace(cfg, n=bc.lookup_tokens + 1, candidates=0, branches=0)
            return decode_lane(lm, decoder, ids, cfg, bc.engine)
        return lm, lane

    lanes = {name: (base, fn) for name, fn in peer_runners(base, bc.lookup_tokens, cache_len).items()}
    for prefix, lm in (("base", base), ("cllm", cllm)):
        if lm is not None:
            lanes |= {f"{prefix}_ar": ours(lm, ar_decode), f"{prefix}_jacobi": ours(lm, jacobi_decode),
                      f"{prefix}_lookup": ours(lm, lookup_decode, lookup=True)}
    return {name: lanes[name] for name in LANES if name in bc.lanes and name in lanes}


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
            e = fast.prepare(m, fused_step=FUSED_STEPS[bc.fused_step])
            if e.device.type == "cpu" and bc.cpu_projection != "auto":
                e.model.cpu_wx = dict.fromkeys(e.widths, bc.cpu_projection == "wx")
    return engine


def source_commit() -> str | None:
    """The git commit of the code that runs: $CLLM_COMMIT where set (a copy of the code without its .git), else git's
    answer for this checkout."""
    if os.environ.get("CLLM_COMMIT"):
        return os.environ["CLLM_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def latency_report(lm: LoadedModel, n: int) -> dict:
    """Per-forward latency by window width and bandwidth achieved; on CUDA also where the AR step goes."""
    from . import latency

    return latency.report(fast.prepare(lm.model), n)


def command_line() -> str:
    """The command that is running, as a user would type it: ``python -m decoding.bench ...`` for a module of one of
    this repository's packages (run with -m, where sys.argv[0] is the module's file path), else the arguments as
    given."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and (script.parent / "__init__.py").is_file():
        return " ".join([f"python -m {script.parent.name}.{script.stem}", *sys.argv[1:]])
    return " ".join(sys.argv)


def run_timed(fn, in_thread: bool):
    """fn() here, or in a second thread (re-raising its exception here); returns its result."""
    if not in_thread:
        return fn()
    box = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="bench-lanes")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def encoded_prompts(bc: BenchConfig, tokenizer) -> list[dict]:
    """The run's prompts with their token ids; ValueError when the file holds none."""
    prompts = read_prompts(bc.prompts, bc.limit)
    if not prompts:
        raise ValueError(f"{bc.prompts or DEFAULT_PROMPTS} holds no prompts: give a file with one JSON object a line")
    return [p | {"ids": encode(tokenizer, p["prompt"], chat=not bc.raw)} for p in prompts]


def warm_up(lanes: dict, ids: list[int], cfg: DecodeConfig) -> dict[str, float]:
    """Run every lane once, untimed (16 tokens; hf_static all of them: its compile); the seconds each took."""
    seconds = {}
    for lane, (_, fn) in tqdm(lanes.items(), desc="warm-up", leave=False):
        t0 = time.perf_counter()
        fn(ids, cfg if lane == "hf_static" else replace(cfg, max_new_tokens=min(16, cfg.max_new_tokens)))
        seconds[lane] = time.perf_counter() - t0
    return seconds


def time_prompt(lanes: dict, ids: list[int], cfg: DecodeConfig, repeats: int, peers: bool) -> dict[str, dict]:
    """Every lane on one prompt, back to back, ``repeats`` times in an order rotated each time (transformers' lanes
    once, in the first round, and only with ``peers``): each lane's result with the wall seconds of every run."""
    order = [lane for lane in lanes if peers or lane not in PEERS]
    runs: dict[str, list[dict]] = {lane: [] for lane in order}
    for k in range(repeats):
        for lane in order[k % len(order):] + order[:k % len(order)]:
            if lane not in PEERS or k == 0:
                runs[lane].append(lanes[lane][1](ids, cfg))
    rows = {}
    for lane, results in runs.items():
        r, lm = results[0], lanes[lane][0]
        walls = [x["wall_s"] for x in results]
        rows[lane] = {
            "tokens": len(r["tokens"]), "forwards": r["forwards"], "wall_s": statistics.median(walls), "walls": walls,
            "tok_s": len(r["tokens"]) / statistics.median(walls), "mean_accepted": r["mean_accepted"],
            "same_text_every_run": all(x["tokens"] == r["tokens"] for x in results),
            "ids": r["tokens"], "text": lm.tokenizer.decode(r["tokens"], skip_special_tokens=True),
        }
    return rows


def bench(bc: BenchConfig) -> dict:
    """Run every lane on every prompt; return the result dict (also written to bc.out)."""
    base = load_model(bc.model, device=bc.device, dtype=bc.dtype)
    prompts = encoded_prompts(bc, base.tokenizer)
    cllm = load_model(bc.model, adapter=bc.adapter, device=bc.device, dtype=bc.dtype) if bc.adapter else None
    # The engine (its CPU tuning), the warm-up and the timed runs all on the thread that times the lanes: on a CPU the
    # faster projection form can differ between the thread that loaded the models and a later one.
    return run_timed(lambda: tune_and_time(bc, base, cllm, prompts), bc.in_thread)


def tune_and_time(bc: BenchConfig, base: LoadedModel, cllm: LoadedModel | None, prompts: list[dict]) -> dict:
    """Build the engines, warm every lane up and time them on every prompt; the result dict (also written to bc.out)."""
    bc = replace(bc, engine=pick_engine(bc, [lm.model for lm in (base, cllm) if lm is not None]))
    cfg = DecodeConfig(max_new_tokens=bc.max_new_tokens, n=bc.n, init=bc.init, seed=bc.seed, eos_token_ids=base.eos_token_ids,
                       candidates=bc.candidates, candidate_len=bc.candidate_len, branches=bc.branches)
    lanes = lane_runners(base, cllm, bc, cache_len=max(len(p["ids"]) for p in prompts) + bc.max_new_tokens + 1)
    warmup_s = warm_up(lanes, prompts[0]["ids"], cfg)
    engines = {name: fast.prepare(lm.model).model.fused_step for name, lm in (("base", base), ("cllm", cllm))
               if lm is not None and bc.engine == "fast"}
    meta = {"config": asdict(bc), "decode": cfg.to_dict(), "env": environment(base.device, base.dtype),
            "command": command_line(), "commit": source_commit(), "adapter_sha256": adapter_sha256(bc.adapter),
            "warmup_s": warmup_s, "fused_step": engines, "references": {lane: reference(lane, lanes) for lane in lanes},
            "loadavg": os.getloadavg()}  # the 1, 5 and 15 minute load averages: other work on the CPU
    per_prompt = []
    for i, p in enumerate(tqdm(prompts, desc="prompts")):
        peers = bc.hf_limit is None or i < bc.hf_limit
        per_prompt.append({"id": p["id"], "category": p["category"], "prompt_tokens": len(p["ids"]),
                           "lanes": time_prompt(lanes, p["ids"], cfg, bc.repeats, peers)})
        if bc.out and (i + 1) % PARTIAL_EVERY == 0 and i + 1 < len(prompts):  # kept should the run be cut off
            write_bench(bc.out, {"meta": meta | {"partial": True}, "prompts": per_prompt,
                                 "summary": summarise(per_prompt, list(lanes))})
    meta["loadavg_after"] = os.getloadavg()
    result = {"meta": meta, "prompts": per_prompt, "summary": summarise(per_prompt, list(lanes))}
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
    """The summary as a text table: a lane a line, its speedup over its reference with the spread over runs."""
    s = result["summary"]
    env = result["meta"]["env"]
    lines = [f"{env['device_name']} ({env['device']}, {env['dtype']}), n={result['meta']['decode']['n']}, "
             f"max_new_tokens={result['meta']['decode']['max_new_tokens']}, {len(result['prompts'])} prompts",
             f"{'lane':<12} {'prompts':>7} {'tokens':>7} {'fwd':>6} {'tok/fwd':>8} {'tok/s':>8} {'speedup':>8} "
             f"{'[min-max]':>13}  vs"]
    for lane, r in s["lanes"].items():
        spread = f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]" if "speedup_min" in r else ""
        lines.append(f"{lane:<12} {r['prompts']:>7} {r['tokens']:>7} {r['forwards']:>6} {r['mean_accepted']:>8.3f} "
                     f"{r['tok_s']:>8.1f} {r['speedup']:>7.2f}x {spread:>13}  {r['reference']}")
    lines += [f"same text {k}: {v:.3f}" for k, v in s["exact_match"].items()]
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

"""Per-forward latency of the fast engine by window width, and the memory bandwidth it achieves.

On CUDA also the graph replay alone and a kernel breakdown (kernels per step, time by kind); on the CPU the whole
step only.

    python -m decoding.latency --out gpu_latency.json     # a random model of SmolLM2-135M's shape: nothing to load
    python -m decoding.latency --compare                  # the unfused step, then the fused one, in one process
    python -m decoding.latency --shape llama2-7b --compare   # Llama-2-7B's shape, and the projected CLLM speedups
    python -m decoding.latency --model smollm2-135m       # any model load_model reads (its weights do not matter)

A forward must read every weight once (and the K/V it attends to), so bytes read / time is the
bandwidth achieved; bytes / the card's peak is the floor no kernel can beat. For a small model the
gap is launches and small kernels, which ``kernel_breakdown`` splits by kind.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import FUSED_STEPS, source_commit
from .fast import FastEngine, events_ms
from .llama_static import UnsupportedModel

WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128)
# SmolLM2-135M-Instruct's shape (the embedded model), as LlamaConfig fields: what --model random builds, and
# experiments.stepprobe's default shape
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3)
SHAPES = {  # --shape: LlamaConfig fields of a random model (the published CLLMs are Llama-2-7B-shaped)
    "smollm2-135m": dict(SMOLLM2_135M, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
# Tokens gained a forward by 7B models (PAPER.md): plain Jacobi decoding, the published CLLMs (lowest and highest of
# their benchmarks) and Jacobi Forcing, the same lab's later recipe. The projection turns them into wall-clock speedups.
PAPER_TOKENS_PER_FORWARD = {"jacobi": 1.05, "cllm_low": 2.3, "cllm_high": 2.7, "jacobi_forcing": 4.0}
PEAK_BANDWIDTH = {  # bytes/s of HBM, by a substring of torch.cuda.get_device_name()
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM
    "A100": 2.0e12,
}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def _step_ms(engine: FastEngine, width: int, pos: int, iters: int) -> float:
    """Mean wall milliseconds of a whole engine step: host copy, replay, argmax back to the CPU."""
    window = [0] * width
    for _ in range(3):
        engine.step(window, pos)
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.step(window, pos)
    return (time.perf_counter() - t0) * 1000 / iters


def width_report(engine: FastEngine, widths=WIDTHS, context: int = 256, iters: int = 200) -> list[dict]:
    """One row per width: graph replay time, whole step time, bytes read and bandwidth achieved.

    All widths attend to the same key bucket (the one holding ``context`` + the widest window), so
    the rows differ only by width. The engine's cache contents are clobbered: run between decodes.
    """
    peak = peak_bandwidth(engine.device)
    widths = [w for w in widths if w in engine.widths]
    L = next(b for b in engine.buckets if b >= context + max(widths))
    rows = []
    for W in widths:
        step_ms = _step_ms(engine, W, L - W, iters)
        # With graphs, the replay alone on the GPU's clock; without (CPU), the whole step is the forward.
        graph_ms = events_ms(engine.graphs[(W, L)][0].replay, iters, engine.device) if engine.use_graphs else None
        weights, kv = engine.model.weight_bytes(), engine.model.kv_bytes(L)
        bandwidth = (weights + kv) / ((graph_ms or step_ms) / 1000)
        rows.append({
            "width": W, "keys": L, "graph_ms": graph_ms,
            "step_ms": step_ms,
            "weight_bytes": weights, "kv_bytes": kv, "bandwidth_Bps": bandwidth,
            "bandwidth_frac": bandwidth / peak if peak else None,
            "floor_ms": (weights + kv) / peak * 1000 if peak else None,
        })
    return rows


def _kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("fmha", "attention", "flash", "attn")):
        return "attention"
    if any(k in low for k in ("gemm", "gemv", "sm90_", "sm80_", "cublas", "cutlass", "splitk", "nvjet",
                              "_norm_qkv_rope", "_linear_residual", "_norm_gate_up")):  # the last three: fused_step.py
        return "matmul"
    if "memcpy" in low or "memset" in low:
        return "copy"
    return "elementwise"  # norms, rope, mask, silu, index_copy, argmax


def kernel_breakdown(engine: FastEngine, width: int = 1, attend_len: int | None = None, reps: int = 5) -> dict:
    """GPU kernel time by kind for one uncaptured forward of ``width`` tokens (same kernels as its graph).

    The profiler depends on CUPTI; if it fails the row says why instead of losing the whole report.
    """
    attend_len = attend_len or next(b for b in engine.buckets if b >= min(512, engine.max_len))
    try:
        return _kernel_breakdown(engine, width, attend_len, reps)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not sink the benchmark that carries it
        return {"width": width, "keys": attend_len, "error": f"{type(exc).__name__}: {exc}"}


@torch.no_grad()
def _kernel_breakdown(engine: FastEngine, width: int, attend_len: int, reps: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.zeros(width, dtype=torch.long, device=engine.device)
    positions = torch.arange(width, device=engine.device)
    forward = lambda: engine.model(tokens, positions, attend_len).argmax(-1)  # noqa: E731
    forward()
    torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            forward()
        torch.cuda.synchronize(engine.device)
    kernels = [(e.name, e.time_range.end - e.time_range.start) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {"width": width, "keys": attend_len, **summarise_kernels(kernels, reps)}


def summarise_kernels(kernels: list[tuple[str, float]], reps: int, top: int = 60) -> dict:
    """(name, microseconds) of every kernel of ``reps`` forwards -> per forward: the kernel count, busy time, time
    by kind, and the ``top`` kernel names by time with their launches (``by_kernel``: what ``kernel_changes``
    compares between widths)."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + us / 1000 / reps
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us / 1000
    rows = [{"name": name, "kind": _kind(name), "launches": count / reps, "ms": ms / reps}
            for name, (count, ms) in by_name.items()]
    rows.sort(key=lambda r: -r["ms"])
    return {"kernels": len(kernels) // reps, "busy_ms": sum(by_kind.values()), "by_kind_ms": by_kind,
            "by_kernel": rows[:top]}


def kernel_changes(narrow: dict, wide: dict, top: int = 3) -> list[dict]:
    """The kernels whose time per forward changes most from breakdown ``narrow`` to ``wide`` (say width 1 to 16):
    where a wider window's extra cost goes. Kernels outside a breakdown's top list count as absent there."""
    a = {r["name"]: r for r in narrow.get("by_kernel", [])}
    b = {r["name"]: r for r in wide.get("by_kernel", [])}
    none = {"launches": 0.0, "ms": 0.0}
    rows = [{"name": name, "launches": (a.get(name, none)["launches"], b.get(name, none)["launches"]),
             "ms": (a.get(name, none)["ms"], b.get(name, none)["ms"])} for name in a.keys() | b.keys()]
    rows.sort(key=lambda r: -abs(r["ms"][1] - r["ms"][0]))
    return rows[:top]


@torch.no_grad()
def head_ms(engine: FastEngine, iters: int = 200) -> float:
    """GPU time of the final norm + LM head + argmax for one token, captured alone."""
    m = engine.model
    x = torch.zeros(1, m.args.dim, device=engine.device, dtype=m.lm_head.dtype)
    head = lambda: F.linear(F.rms_norm(x, (m.args.dim,), m.final_norm, m.args.eps), m.lm_head).argmax(-1)  # noqa: E731
    stream = torch.cuda.Stream(engine.device)
    stream.wait_stream(torch.cuda.current_stream(engine.device))
    with torch.cuda.stream(stream):
        head()
    torch.cuda.current_stream(engine.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        head()
    return events_ms(graph.replay, iters, engine.device)


def format_widths(rows: list[dict]) -> str:
    lines = ["width  keys  graph ms  step ms  MB read  GB/s    % peak  floor ms"]
    for r in rows:
        frac = f"{100 * r['bandwidth_frac']:6.1f}" if r["bandwidth_frac"] is not None else "     -"
        floor = f"{r['floor_ms']:.3f}" if r["floor_ms"] is not None else "-"
        graph = f"{r['graph_ms']:9.3f}" if r["graph_ms"] is not None else f"{'-':>9}"
        lines.append(
            f"{r['width']:5d} {r['keys']:5d} {graph} {r['step_ms']:8.3f} "
            f"{(r['weight_bytes'] + r['kv_bytes']) / 1e6:8.1f} {r['bandwidth_Bps'] / 1e9:6.0f} {frac}  {floor}"
        )
    return "\n".join(lines)


def report(engine: FastEngine, n: int) -> dict:
    """Per-forward latency by window width and bandwidth achieved; on CUDA also where the AR step and the
    width-``n`` step go (kernel breakdowns) and the LM head alone."""
    if engine.device.type != "cuda":  # with the projection form the CPU's tuning chose for each width
        return {"widths": width_report(engine, iters=10), "cpu_wx": {str(w): v for w, v in engine.model.cpu_wx.items()}}
    return {
        "fused_step": engine.model.fused_step,
        "widths": width_report(engine),
        "breakdown": [kernel_breakdown(engine, w) for w in sorted({1, n})],
        "head_ms": head_ms(engine),
        "peak_bandwidth_Bps": peak_bandwidth(engine.device),
    }


def projection(rows: list[dict], windows=(16, 32)) -> list[dict]:
    """For each window n: a forward's cost against an AR step's (graph replay and whole step), and the wall-clock
    speedup over AR of a decode gaining the paper's tokens a forward: tokens per forward / cost ratio."""
    by_width = {r["width"]: r for r in rows}
    out = []
    for n in (w for w in windows if w in by_width):
        step = by_width[n]["step_ms"] / by_width[1]["step_ms"]
        graph = by_width[n]["graph_ms"] / by_width[1]["graph_ms"] if by_width[1]["graph_ms"] else None
        out.append({"n": n, "cost_step": step, "cost_graph": graph,
                    "speedup": {name: tpf / step for name, tpf in PAPER_TOKENS_PER_FORWARD.items()}})
    return out


def describe(lat: dict, n: int) -> list[str]:
    """A report's lines: the width-n step against the AR step, the AR step against the read floor, the kernel
    breakdowns and the kernels whose time changes most from width 1 to n."""
    lines = []
    widths = {r["width"]: r for r in lat["widths"]}
    one, win = widths[1], widths.get(n)
    if win:
        graph = f"{win['graph_ms'] / one['graph_ms']:.2f}x graph, " if one["graph_ms"] else ""  # None: no graphs (CPU)
        lines.append(f"window {n} / AR step: {graph}{win['step_ms'] / one['step_ms']:.2f}x whole step; target <= 1.2x")
    if one["floor_ms"]:
        lines.append(f"AR step {one['graph_ms']:.3f} ms (graph) / {one['step_ms']:.3f} ms (step) vs "
                     f"read floor {one['floor_ms']:.3f} ms: {one['graph_ms'] / one['floor_ms']:.1f}x the floor")
    breakdowns = []  # those that worked
    for b in lat.get("breakdown", []):  # GPU only (a profiler trace of the graphs)
        if "error" in b:
            lines.append(f"width {b['width']}: no kernel breakdown ({b['error']})")
            continue
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["by_kind_ms"].items()))
        lines.append(f"width {b['width']}: {b['kernels']} kernels, busy {b['busy_ms']:.3f} ms ({kinds} ms)")
        breakdowns.append(b)
    if len(breakdowns) >= 2:  # where the widest window's extra time goes
        narrow, wide = breakdowns[0], breakdowns[-1]
        for c in kernel_changes(narrow, wide):
            lines.append(f"width {narrow['width']} -> {wide['width']}: {c['ms'][1] - c['ms'][0]:+.3f} ms, launches "
                         f"{c['launches'][0]:g} -> {c['launches'][1]:g}: {c['name'][:100]}")
    if lat.get("cpu_wx"):  # CPU only: FastEngine.tune's choice
        wx = [w for w, v in lat["cpu_wx"].items() if v]
        lines.append(f"CPU projections as w @ x.T at widths {', '.join(wx) or 'none'}, F.linear at the others")
    if "head_ms" in lat:  # GPU only
        lines.append(f"LM head + argmax alone: {lat['head_ms']:.3f} ms")
    return lines


def random_config(shape: str = "smollm2-135m"):
    """The LlamaConfig of a shape of SHAPES (by default SmolLM2-135M-Instruct's: context, norm epsilon, tied head and
    RoPE as the embedded model's)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def random_model(device: str, dtype: torch.dtype, seed: int = 0, shape: str = "smollm2-135m"):
    """A random Llama of a shape of SHAPES, built on ``device`` in ``dtype``: the same kernels and timings as a real
    model of that shape, no file (a 7B one is initialised on the GPU in seconds)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(random_config(shape), dtype=dtype)
    return model.eval().requires_grad_(False)


def measure(model, n: int, fused_step: bool | None, max_len: int) -> dict:
    """``report`` of a fresh engine on ``model`` (not the one ``fast.prepare`` keeps), released afterwards; where that
    step cannot run, why not."""
    t0 = time.perf_counter()
    try:
        engine = FastEngine(model, max_len=max_len, fused_step=fused_step)
    except UnsupportedModel as exc:
        return {"error": str(exc)}
    engine.capture()  # says so on stderr should the fused step fail and the unfused one stand in
    engine.tune(progress=None)
    built = time.perf_counter() - t0
    lat = report(engine, n) | {"engine_build_s": built}
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m decoding.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random", help="random (random weights, --shape) or a load_model name/path")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="smollm2-135m", help="the random model's shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on the CPU by default")
    ap.add_argument("--n", type=int, default=16, help="the Jacobi window whose step is broken down beside the AR step")
    ap.add_argument("--max-len", type=int, default=1024, help="the engine's cache length (the widths attend to 512 keys)")
    ap.add_argument("--fused-step", choices=tuple(FUSED_STEPS), default="auto",
                    help="windows of up to 32 tokens as Triton kernels (auto: where Triton runs them and they are "
                         "the faster step)")
    ap.add_argument("--compare", action="store_true", help="the unfused step, then the fused one, in this process")
    ap.add_argument("--out", default=None, help="JSON result path")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (use --device cpu)", file=sys.stderr)
        return 2
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.model == "random":
        model = random_model(a.device, getattr(torch, dtype), shape=a.shape)
    else:
        from .models import load_model

        model = load_model(a.model, device=a.device, dtype=dtype).model
    steps = {"unfused": False, "fused": True} if a.compare else {a.fused_step: FUSED_STEPS[a.fused_step]}
    variants = {name: measure(model, a.n, flag, a.max_len) for name, flag in steps.items()}
    ran = {name: lat for name, lat in variants.items() if "error" not in lat}
    if not ran:
        print(f"error: {' / '.join(lat['error'] for lat in variants.values())}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    result = {"meta": {"model": a.model if a.model != "random" else f"random {a.shape}", "device": device,
                       "dtype": dtype, "n": a.n, "torch": torch.__version__, "commit": source_commit(),
                       "command": " ".join(["python -m decoding.latency", *(argv if argv is not None else sys.argv[1:])])},
              "variants": variants, "latency": list(ran.values())[-1]}
    if a.shape == "llama2-7b" or a.compare:
        result["projection"] = {name: projection(lat["widths"]) for name, lat in ran.items()}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    for name, lat in variants.items():
        if "error" in lat:
            print(f"\n{name} step: {lat['error']}")
            continue
        print(f"\n{result['meta']['model']} on {device} ({dtype}), fast engine ({name} step), one forward by window width:")
        print(format_widths(lat["widths"]))
        print("\n".join(describe(lat, a.n)))
    for name, rows in result.get("projection", {}).items():
        for p in rows:
            gains = ", ".join(f"{k} {PAPER_TOKENS_PER_FORWARD[k]} -> {v:.2f}x" for k, v in p["speedup"].items())
            print(f"{name} step, n = {p['n']}: a forward costs {p['cost_step']:.2f}x an AR step; tokens per forward "
                  f"-> speedup: {gains}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

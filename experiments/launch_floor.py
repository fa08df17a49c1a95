"""What a step made of many kernels can cost at best on this GPU: the floor under the fused step's AR time.

    python -m experiments.launch_floor --out launch_floor.json

Three CUDA graphs, each replayed 200 times (median replay, after a warm-up):
- ``empty``: as many dependent one-program kernels as the fused step launches per step (170 by default), each
  reading and writing one number. Their time is the cost of a launch inside a graph, with no work to hide it.
- ``stream``: one kernel for each matrix the step reads (4 projections a layer and the LM head, at SmolLM2-135M's shape
  in bfloat16). Each kernel only reads its matrix, with about as many programs as the fused step's projections (4 per
  multiprocessor; fewer for a small matrix, as a program reads at least 1024 numbers), and writes one sum a program. This is the least a kernel per matrix can cost; the fused step
  also multiplies, splits along the input and sums the parts.
- ``cublas``: the same matrices as matrix-vector products through torch (cuBLAS), one kernel each.

It prints one table, with each graph's ms and µs per kernel, and the bandwidth the stream graph reaches.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from decoding.bench import source_commit
from decoding.latency import SMOLLM2_135M, peak_bandwidth


@triton.jit
def _bump(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


@triton.jit
def _stream(w_ptr, out_ptr, n, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * per_prog
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, per_prog, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def step_matrices(cfg: dict) -> list[tuple[int, int]]:
    """(rows, columns) of every matrix one step reads, in the order it reads them."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = [(h + 2 * kv, h), (h, h), (2 * inter, h), (h, inter)]
    return layer * cfg["num_hidden_layers"] + [(cfg["vocab_size"], h)]


def graph_ms(fn, iters: int = 200) -> float:
    """Median ms of one replay of a CUDA graph holding ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.launch_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=int, default=170, help="kernels of the empty graph (the fused step's per step)")
    ap.add_argument("--per-sm", type=int, default=4, help="programs per multiprocessor of a stream kernel")
    ap.add_argument("--out", default=None, help="JSON result path")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the launch floor needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    shapes = step_matrices(SMOLLM2_135M)
    mats = [torch.randn(r, c, device=dev, dtype=torch.bfloat16) for r, c in shapes]
    programs = a.per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    block = 1024
    parts = torch.empty(programs, device=dev, dtype=torch.float32)
    cell = torch.zeros(1, device=dev, dtype=torch.float32)
    x = torch.randn(SMOLLM2_135M["intermediate_size"], device=dev, dtype=torch.bfloat16)

    def empty():
        for _ in range(a.kernels):
            _bump[(1,)](cell)

    def stream():
        for w in mats:
            n = w.numel()
            per_prog = triton.cdiv(triton.cdiv(n, programs), block) * block
            _stream[(triton.cdiv(n, per_prog),)](w, parts, n, per_prog, BLOCK=block)

    def cublas():
        for w in mats:
            torch.mv(w, x[: w.shape[1]])

    nbytes = sum(w.numel() * w.element_size() for w in mats)
    peak = peak_bandwidth(dev)
    rows = []
    for name, fn, kernels in (("empty", empty, a.kernels), ("stream", stream, len(mats)), ("cublas", cublas, len(mats))):
        ms = graph_ms(fn)
        row = {"graph": name, "kernels": kernels, "graph_ms": ms, "us_per_kernel": 1000 * ms / kernels}
        if name != "empty":
            row["bandwidth_fraction"] = nbytes / (ms / 1000) / peak if peak else None
        rows.append(row)
    result = {"meta": {"device": torch.cuda.get_device_name(0), "dtype": "bfloat16",
                       "shape": "smollm2-135m", "weight_bytes": nbytes, "stream_programs": programs,
                       "torch": torch.__version__, "triton": triton.__version__, "commit": source_commit(),
                       "command": " ".join(["python -m experiments.launch_floor", *(argv or sys.argv[1:])])},
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{result['meta']['device']}, bf16, SmolLM2-135M's matrices ({nbytes / 1e6:.0f} MB), CUDA graphs")
    print(f"{'graph':8}{'kernels':>9}{'ms':>9}{'us/kernel':>11}{'bandwidth':>11}")
    for r in rows:
        bw = f"{r['bandwidth_fraction']:.1%}" if r.get("bandwidth_fraction") else ""
        print(f"{r['graph']:8}{r['kernels']:>9}{r['graph_ms']:>9.3f}{r['us_per_kernel']:>11.2f}{bw:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

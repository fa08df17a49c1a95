"""The fast engine: a static KV cache, a position pointer, and CUDA graphs of the fixed-shape steps.

A step feeds a window of width w at cache position ``pos``. It is padded to the smallest captured width W >= w (powers
of two up to 128 by default: W = 1 is the AR step, W = n the Jacobi step) and attends to the smallest key bucket L >=
pos + W, so that attention reads only the keys in use. Each (W, L) pair is captured once at load as a CUDA graph with
argmax inside, so one step is one graph replay and only W int64s cross to the CPU. On a GPU with Triton, windows of up
to 32 tokens run the fused step by default (five Triton kernels a block, llama_static.py and fused_step.py;
CLLM_FUSED_STEP=off or fused_step=False for the unfused one); wider ones and the prefill run the unfused one. A decode
with branches (``DecodeConfig.branches``) also needs each row's K likeliest tokens: the first such decode captures,
once per K, a second set of graphs that return them beside the argmax (``capture_top``), before its clock starts.
Padding outputs are ignored; their KV lands beyond the kept tokens, where the causal mask hides it until it is
overwritten. Prefill, and any step no graph fits, runs the same module uncaptured. On CPU every step runs uncaptured,
so CI tests the same padding, buckets and position pointer as the GPU.

The engine is built once per model (``prepare``) and shared by its sessions: one decode at a time.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from .embedded import cache_dir
from .llama_static import FUSED_STEP_MAX, StaticArgs, StaticLlama, UnsupportedModel

WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128)  # captured window widths (1 = AR); others pad to the next one
STEP_TIMING_WIDTHS = (1, 16)  # the widths FastEngine.choose_step times each step at: AR and the default Jacobi window
MIN_BUCKET = 64  # smallest attended key length; buckets double up to the cache length

TUNE_ROUNDS = 3  # CPU projection forms: timed rounds (after an untimed one) of each width's forward in each form
TUNE_SPREAD = 0.25  # a tuning is kept in tune_file() only if every median is within this share of its best time
TUNE_VERSION = 2  # in the tune file's keys: choices made by an earlier way of timing (a form's best of two single
# forwards, kept however busy the CPU was) are not read, but timed again
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # HF model -> FastEngine
_CPU_WX: dict[tuple, dict[int, bool]] = {}  # (model shape, dtype, threads) -> StaticLlama.cpu_wx, tuned once a process
TUNE_ENV = "CLLM_CPU_TUNE_FILE"  # where the tuned forms are kept across starts ("off": retime at every start)
_ENGINES_LOCK = threading.Lock()  # two first requests must not build two engines


def supports(model) -> str | None:
    """None when the fast engine can run ``model``, else the reason it cannot."""
    try:
        StaticArgs.from_config(model.config)
    except UnsupportedModel as exc:
        return str(exc)
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not a LlamaForCausalLM"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return "the model is spread over several devices"
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        return "the weights are quantised"
    return None


def default_engine(model) -> str:
    """``fast`` on CUDA and on the CPU for the supported architectures, ``eager`` elsewhere (MPS, other models).

    On the CPUs it was benchmarked on, the fast engine ran AR and Jacobi faster than eager, with the same tokens (the
    CPU results of the results index). On the CPU it holds a cache of the model's whole context."""
    device = next(model.parameters()).device.type
    return "fast" if device in ("cuda", "cpu") and supports(model) is None else "eager"


def kv_buckets(max_len: int) -> list[int]:
    """Attended key lengths: MIN_BUCKET, doubling, capped by and ending at max_len."""
    buckets, L = [], MIN_BUCKET
    while L < max_len:
        buckets.append(L)
        L *= 2
    return buckets + [max_len]


def events_ms(fn, iters: int, device) -> float:
    """Mean GPU milliseconds of ``fn`` over ``iters`` back-to-back calls (warm-up excluded)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)  # note: CPU-GPU sync point
    return start.elapsed_time(end) / iters


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class FastEngine:
    """The static model, its cache and its captured steps, for one HF model."""

    def __init__(self, model, max_len: int | None = None, widths=WIDTHS, graphs: bool | None = None,
                 fused_step: bool | None = None):
        """``fused_step``: narrow windows as Triton kernels (StaticLlama's; by default where the GPU runs them, then
        kept only if faster: ``choose_step``)."""
        reason = supports(model)
        if reason:
            raise UnsupportedModel(f"the fast engine cannot run this model: {reason}; use engine='eager'")
        args = StaticArgs.from_config(model.config)
        self.max_len = min(max_len or args.context, args.context)
        with torch.no_grad():
            self.model = StaticLlama(model, self.max_len, fused_step=fused_step)
        self.device = self.model.k_cache.device
        self.widths = tuple(sorted(w for w in set(widths) if 1 <= w <= self.max_len))
        self.buckets = kv_buckets(self.max_len)
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.graphs: dict[tuple, tuple] = {}  # (W, L) or (W, L, K) -> (graph, static [5, W] in, static out, host)
        self.top_sizes: set[int] = set()  # K of the graphs captured with each row's K likeliest tokens (capture_top)
        self.pool = None  # the graphs' memory pool
        self.lock = threading.Lock()  # one forward at a time
        self.owner = None  # the session whose sequence the cache holds
        self.last_top: list[list[int]] | None = None  # the last step's likeliest tokens per row, when it asked (top)

    def plan(self, pos: int, width: int) -> tuple[int, int]:
        """(W, L) for a window of ``width`` at ``pos``: padded width and key bucket, never past the cache."""
        if pos + width > self.max_len:
            raise ValueError(
                f"the fast engine's cache holds {self.max_len} tokens; position {pos} + window {width} "
                "exceeds it: ask for fewer tokens or use engine='eager'"
            )
        W = next((w for w in self.widths if w >= width and pos + w <= self.max_len), width)
        L = next(b for b in self.buckets if b >= pos + W)
        return W, L

    @torch.no_grad()
    def capture(self, progress: Callable[[str], None] | None = _stderr) -> float:
        """Capture every (width, bucket) step as a CUDA graph; returns the seconds it took. Should the fused step fail
        to compile or run, the unfused step is captured instead (and said so). A fused step chosen by default is
        first timed against the unfused one (``choose_step``)."""
        if not self.use_graphs:
            return 0.0
        try:
            if self.model.fused_step and self.model.fused_step_by_default:
                self.choose_step(progress)
            return self._capture_all(self.widths, 0, progress)
        except Exception as exc:  # noqa: BLE001 - Triton's compile errors have no common type; the fallback serves
            if not self.model.fused_step:
                raise
            if progress:
                progress(f"fast engine: the fused step failed ({type(exc).__name__}: {exc}); using the unfused step")
            self.model.fused_step = False
            self.graphs.clear()
            return self._capture_all(self.widths, 0, progress)

    @torch.no_grad()
    def choose_step(self, progress: Callable[[str], None] | None = _stderr) -> dict[bool, float]:
        """Keep the fused step only if its graphs replay faster than the unfused step's on this card and model: an AR
        step plus a window of 16 (STEP_TIMING_WIDTHS), attending to 512 keys. The fused step pays where launches bound
        the step: on an H100 it is 1.8x as fast on SmolLM2-135M, but 2.7x as slow as cuBLAS on Llama-2-7B's shape,
        whose step reads 13.5 GB (docs/engine.md). Returns the milliseconds of each (True: fused)."""
        widths = [W for W in STEP_TIMING_WIDTHS if W in self.widths and W <= FUSED_STEP_MAX]
        L = next((b for b in self.buckets if b >= 512), self.buckets[-1])
        times = {}
        for fused in (True, False):
            self.model.fused_step = fused
            times[fused] = sum(events_ms(self._capture(W, L, None)[0].replay, 20, self.device)
                               for W in widths if W <= L)
        self.model.fused_step = times[True] < times[False]
        if progress:
            progress(f"fast engine: the {'fused' if self.model.fused_step else 'unfused'} step, faster here "
                     f"(widths {', '.join(map(str, widths))}: fused {times[True]:.3f} ms, "
                     f"unfused {times[False]:.3f} ms)")
        return times

    @torch.no_grad()
    def capture_top(self, top: int, progress: Callable[[str], None] | None = _stderr) -> float:
        """Capture, once for each ``top``, the steps of width 2 and more as graphs that also return every row's ``top``
        likeliest tokens (a pass with branches; AR steps never need them). Returns the seconds it took (0 when they
        exist already, or without graphs)."""
        if not self.use_graphs or top in self.top_sizes:
            return 0.0
        seconds = self._capture_all([W for W in self.widths if W >= 2], top, progress)
        self.top_sizes.add(top)
        return seconds

    def _capture_all(self, widths, top: int, progress) -> float:
        t0 = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool: steps never run concurrently
        pairs = [(W, L) for W in widths for L in self.buckets if W <= L]
        what = f" with each row's {top} likeliest tokens" if top else ""
        for k, (W, L) in enumerate(pairs):
            if progress and (k % 8 == 0 or k == len(pairs) - 1):
                progress(f"fast engine: capturing CUDA graphs{what} {k + 1}/{len(pairs)} (width {W}, keys {L})")
            self.graphs[(W, L, top) if top else (W, L)] = self._capture(W, L, self.pool, top)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if progress:
            progress(f"fast engine: {len(pairs)} graphs{what} captured in {seconds:.1f} s")
        return seconds

    @torch.no_grad()
    def tune(self, progress: Callable[[str], None] | None = _stderr) -> dict[int, bool]:
        """On the CPU, choose each captured width's projection form (F.linear or w @ x.T, ``llama_static.project``):
        the one whose forward of that width was faster (``time_forms``, ``choose_forms``). The best form differs
        between CPUs by about 2x either way. Once a process for each model shape, dtype and thread count, and kept
        in ``tune_file()`` for later starts on the same CPU and torch (several seconds saved a start), unless other
        work on the CPU disturbed the timings (they are then used by this process only). Nothing on a GPU."""
        if self.device.type != "cpu":
            return {}
        a, m = self.model.args, self.model
        key = (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab, m.lm_head.shape, m.layers[0]["w2"].shape,
               m.embed.dtype, torch.get_num_threads(), self.widths)
        if key not in _CPU_WX and (stored := _stored_forms(key)) is not None:
            _CPU_WX[key] = stored
            if progress:
                progress(f"fast engine: the CPU's projection forms from {tune_file()} (delete it to time them again)")
        if key not in _CPU_WX:
            if progress:
                progress(f"fast engine: timing the CPU's projection forms at widths {', '.join(map(str, self.widths))}")
            _CPU_WX[key], steady = choose_forms(self.time_forms())
            if steady:
                _store_forms(key, _CPU_WX[key])
            elif progress:
                progress("fast engine: the projection forms' timings were unsteady (other work on the CPU, or a "
                         "noisy CPU); this process uses them, later starts time them again")
        self.model.cpu_wx = dict(_CPU_WX[key])
        return self.model.cpu_wx

    @torch.no_grad()
    def time_forms(self) -> dict[int, tuple[list[float], list[float]]]:
        """Seconds of a forward of each captured width in each CPU projection form: width -> (F.linear's,
        w @ x.T's), ``TUNE_ROUNDS`` each, after an untimed round (first calls pay for allocations), the forms' order
        swapped from round to round. Writes junk K/V at slots 0..W-1, as the capture's warm-up does: call it before
        any sequence is cached."""
        times: dict[int, tuple[list[float], list[float]]] = {W: ([], []) for W in self.widths}
        for r in range(TUNE_ROUNDS + 1):
            for W in self.widths:
                tokens, rows = torch.zeros(W, dtype=torch.long), torch.arange(W)
                for form in ((1, 0) if r % 2 else (0, 1)):
                    t0 = time.perf_counter()
                    self.model(tokens, rows, self.plan(0, W)[1], wx=bool(form))
                    if r:
                        times[W][form].append(time.perf_counter() - t0)
        return times

    def _capture(self, W: int, L: int, pool, top: int = 0) -> tuple:
        # The warm-up writes junk KV at positions 0..W-1: harmless, no sequence is cached yet.
        rows = torch.arange(W)
        static_in = torch.stack([torch.zeros(W, dtype=torch.long), rows, rows, rows, torch.zeros(W, dtype=torch.long)])
        static_in = static_in.to(self.device)  # [5, W]: tokens, RoPE positions, slots, anchors, groups
        host = torch.empty(5, W, dtype=torch.long, pin_memory=True)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
            for _ in range(2):
                self._forward(static_in, L, top)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            static_out = self._forward(static_in, L, top)  # [W] or [W, 1 + top]: argmax (and top tokens) in the graph
        return graph, static_in, static_out, host

    def _logits(self, rows: torch.Tensor, L: int) -> torch.Tensor:
        """The logits [W, V] at every row of ``rows`` [5, W] (tokens, RoPE positions, slots, anchors, groups)."""
        return self.model(rows[0], rows[1], L, slots=rows[2], anchors=rows[3], groups=rows[4])

    def _forward(self, rows: torch.Tensor, L: int, top: int = 0) -> torch.Tensor:
        """The argmax at every row of ``rows`` [5, W]; with ``top`` > 0, [W, 1 + top]: the argmax, then the row's
        ``top`` likeliest tokens, the likeliest first (kept apart from the argmax, which alone decides the text)."""
        logits = self._logits(rows, L)
        if not top:
            return logits.argmax(-1)
        return torch.cat([logits.argmax(-1, keepdim=True), logits.topk(top, dim=-1).indices], dim=-1)

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int]) -> int:
        """Write the prompt's KV at positions 0..P-1 (uncaptured) and return the first token."""
        P = len(prompt_ids)
        _, L = self.plan(0, P)
        tokens = torch.tensor(prompt_ids, device=self.device)
        logits = self.model(tokens, torch.arange(P, device=self.device), L, last_only=True)
        return int(logits[0].argmax())  # note: CPU-GPU sync point

    def step(self, window: list[int], pos: int, candidates: list[list[int]] = (), top: int = 0) -> list[int]:
        """Feed ``window`` at positions pos.. and return the argmax at each of its positions.

        Each of ``candidates`` (guesses for the positions after ``window[0]``, as ``window[1:]`` is) rides in the same
        forward: its tokens take RoPE positions pos+1.., cache slots after the window's, and see the kept tokens,
        ``window[0]`` and their own earlier tokens. Their argmaxes follow the window's in the returned list.
        ``top`` > 0 also keeps the ``top`` likeliest tokens of every row in ``last_top`` (the likeliest first); such a
        step replays the graphs ``capture_top`` made for that ``top``, and runs uncaptured where there are none."""
        w = len(window)
        tokens, rope, anchors, groups = list(window), list(range(pos, pos + w)), list(range(pos, pos + w)), [0] * w
        for g, cand in enumerate(candidates, start=1):
            tokens += cand
            rope += range(pos + 1, pos + 1 + len(cand))
            anchors += [pos] * len(cand)
            groups += [g] * len(cand)
        rows = len(tokens)
        W, L = self.plan(pos, rows)
        slots = list(range(pos, pos + W))
        pad = W - rows  # padding rows: the last token again, causal at the slots after every real row
        table = [tokens + [tokens[-1]] * pad, rope + slots[rows:], slots, anchors + slots[rows:], groups + [0] * pad]
        entry = self.graphs.get((W, L, top) if top else (W, L))
        with torch.no_grad():
            if entry is None:
                out = self._forward(torch.tensor(table, device=self.device), L, top)
            else:
                graph, static_in, out, host = entry
                host.copy_(torch.tensor(table))
                # pinned + non_blocking: no sync here; safe to refill next step since tolist() below waits
                static_in.copy_(host, non_blocking=True)
                graph.replay()
            out = out[:rows].tolist()  # note: CPU-GPU sync point
        if not top:
            self.last_top = None
            return out
        self.last_top = [row[1:] for row in out]
        return [row[0] for row in out]

    def move(self, src: int, dst: int, count: int) -> None:
        """Copy the K/V of ``count`` cache slots from ``src`` on to ``dst`` on (a verified candidate's tokens)."""
        if count > 0:
            ar = torch.arange(count, device=self.device)
            self.model.move(ar + src, ar + dst)


class FastSession:
    """One sequence on a model's fast engine: the decoders' session interface over a position pointer."""

    def __init__(self, engine: FastEngine):
        self.engine = engine
        self.device = engine.device
        self.pos = 0  # cache entries 0..pos-1 hold this sequence's kept tokens
        self._top: list[list[int]] | None = None  # the last step's likeliest tokens per output row, when asked for
        self._verified: tuple[int, int, list[int]] = (0, 0, [])  # the last verify: start, window width, candidate lengths

    @classmethod
    def for_model(cls, model) -> "FastSession":
        """A session on the model's engine, built (and its graphs captured) on first use."""
        return cls(prepare(model))

    def _check_owner(self) -> None:
        if self.engine.owner is not self:
            raise RuntimeError("another decode has taken over this model's fast engine: run decodes one at a time")

    def prepare_top(self, top: int) -> None:
        """Make sure passes that ask for each row's ``top`` likeliest tokens replay CUDA graphs too (captured once; a
        decode with branches calls it before its clock starts). Capturing writes junk K/V at the first slots, so this
        session takes the engine over, as ``prefill`` does: a decode it displaces fails at its next step."""
        with self.engine.lock:
            self.engine.owner = self
            self.engine.capture_top(top)

    def prefill(self, prompt_ids: list[int]) -> int:
        with self.engine.lock:
            self.engine.owner = self
            first = self.engine.prefill(prompt_ids)
        self.pos = len(prompt_ids)
        return first

    def forward(self, window: list[int]) -> list[int]:
        """Feed ``window`` right after the kept tokens; like the eager cache, it is kept until ``keep``."""
        return self._feed(window, [])

    def _feed(self, window: list[int], candidates: list[list[int]], top: int = 0) -> list[int]:
        """One ``FastEngine.step`` right after the kept tokens: the window's outputs, then the candidates'."""
        with self.engine.lock:
            self._check_owner()
            outputs = self.engine.step(list(window), self.pos, [list(c) for c in candidates], top)
            self._top = self.engine.last_top
        self.pos += len(window)
        return outputs

    def keep(self, accepted: int, width: int) -> None:
        """Of the last window of ``width`` inputs keep the first ``accepted``: move the pointer back."""
        self._check_owner()
        self.pos -= width - accepted

    def verify(self, window: list[int], candidates: list[list[int]], top: int = 0) -> tuple[list[int], list[list[int]]]:
        """Like ``forward``, with candidate continuations checked in the same pass (``FastEngine.step``): returns the
        window's outputs and each candidate's. Then either ``keep`` (the window's guesses) or ``keep_candidate``.
        ``top`` > 0: ``alternatives`` then gives the likeliest tokens of any output of this pass."""
        w = len(window)
        self._verified = (self.pos, w, [len(c) for c in candidates])
        flat = self._feed(window, candidates, top)
        outputs, cand_outputs, at = flat[:w], [], w
        for cand in candidates:
            cand_outputs.append(flat[at:at + len(cand)])
            at += len(cand)
        return outputs, cand_outputs

    def alternatives(self, row: int) -> list[int]:
        """The likeliest tokens of output ``row`` of the last ``verify`` (the window's outputs, then each candidate's),
        the likeliest first; empty unless it asked for them (``top``)."""
        return list(self._top[row]) if self._top else []

    def keep_candidate(self, index: int, matched: int) -> None:
        """After ``verify``, keep the window's first input and the first ``matched`` tokens of candidate ``index``:
        their K/V move to the slots right after it."""
        self._check_owner()
        start, w, lengths = self._verified
        with self.engine.lock:
            self.engine.move(start + w + sum(lengths[:index]), start + 1, matched)
        self.pos = start + 1 + matched


def choose_forms(times: dict[int, tuple[list[float], list[float]]]) -> tuple[dict[int, bool], bool]:
    """Each width's projection form from ``FastEngine.time_forms``' seconds (width -> (F.linear's, w @ x.T's)): True
    (w @ x.T) where its best time beats F.linear's. And whether the timings were steady: every form's median within
    ``TUNE_SPREAD`` of its best. They are not when other processes share the CPU, and then they can rank the forms
    the wrong way round: on a 2-core CPU F.linear of one token may run on one core (a matrix-vector product), w @ x.T
    on both, and only the second waits whenever another process holds a core."""
    forms = {W: min(wx) < min(linear) for W, (linear, wx) in times.items()}
    steady = all(statistics.median(t) <= (1 + TUNE_SPREAD) * min(t) for pair in times.values() for t in pair)
    return forms, steady


def tune_file() -> Path | None:
    """The file that keeps FastEngine.tune's choices across starts: $CLLM_CPU_TUNE_FILE, else the model cache's
    cpu-projection.json; None when the variable is "off"."""
    path = os.environ.get(TUNE_ENV)
    if path and path.lower() == "off":
        return None
    return Path(path).expanduser() if path else cache_dir() / "cpu-projection.json"


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (``cpuinfo``'s, e.g. "AMD EPYC 9454 48-Core Processor"), else what platform knows
    ("x86_64" on Linux): benchmarks record it, and CPU tunings are kept per CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open(cpuinfo) as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def _machine_key(key: tuple) -> str:
    """A tuning's key in the file: the model's shape, dtype, threads and widths, and what else sets the timings,
    the CPU's name, torch's version and the way of timing (another CPU, build or way is timed afresh)."""
    return f"{key} | {cpu_name()} | torch {torch.__version__} | tune {TUNE_VERSION}"


def _read_tune_file(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or broken: the forms are timed again and the file rewritten
        return {}
    return table if isinstance(table, dict) else {}


def _stored_forms(key: tuple) -> dict[int, bool] | None:
    """The forms a start before this one chose for ``key`` on this machine, if the file has them."""
    path = tune_file()
    entry = _read_tune_file(path).get(_machine_key(key)) if path else None
    try:
        return {int(W): bool(v) for W, v in entry.items()} if isinstance(entry, dict) and entry else None
    except (TypeError, ValueError):
        return None


def _store_forms(key: tuple, forms: dict[int, bool]) -> None:
    """Add this machine's choice to the file (atomically); a folder that cannot be written costs a retiming later."""
    path = tune_file()
    if path is None:
        return
    table = _read_tune_file(path)
    table[_machine_key(key)] = {str(W): v for W, v in forms.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass


def prepare(model, max_len: int | None = None, widths=WIDTHS, graphs: bool | None = None,
            progress: Callable[[str], None] | None = _stderr, fused_step: bool | None = None) -> FastEngine:
    """Build the model's fast engine and capture its steps, once; later calls return the same engine.

    Call it at load time so that no request pays for the capture (on CUDA) or the tuning (on the CPU). ``max_len``
    defaults to the model's context; ``graphs`` defaults to True on CUDA (CPU runs the same steps uncaptured);
    ``fused_step`` to the Triton step where the GPU can run it and it is the faster step (``StaticLlama``,
    ``FastEngine.choose_step``).
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = FastEngine(model, max_len=max_len, widths=widths, graphs=graphs, fused_step=fused_step)
            engine.capture(progress)
            engine.tune(progress)
            _ENGINES[model] = engine
    return engine


def release(model) -> None:
    """Drop the model's fast engine (its cache and graphs), e.g. before loading another model."""
    _ENGINES.pop(model, None)

"""The models the app serves: loaded once at start-up, warmed up, and swapped only on request."""
from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from decoding import DecodeConfig, LoadedModel, ModelLoadError, ar_decode, jacobi_decode, load_model, run

NO_ADAPTER = "none"  # --adapter none: no CLLM lanes even when the shipped adapter exists
# The window the page starts with. On a GPU a window of 16 costs little more than an AR step; on a CPU every row of a
# pass costs time, so there a narrow window is faster (docs/findings.md has the measurements).
GPU_WINDOW, CPU_WINDOW = 16, 4


def _log(msg: str) -> None:
    print(f"[jacobi-lens] {msg}", flush=True)


class TorchThread:
    """One long-lived thread on which every model load and decode of the app runs, when the models are on the CPU.

    Why: torch's CPU threads (OpenMP) serve the first thread that uses them at full speed; another thread that
    uses them later (a web server's handler, after the main thread loaded the models) gets them with slow
    wake-ups, which costs most on the many small matrix products of a 135M model's decode (docs/findings.md).
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jacobi-lens-torch")
        self._ident = self._pool.submit(threading.get_ident).result()

    def call(self, fn: Callable, *args):
        """fn(*args) on the torch thread; returns its result or raises its exception. Called from the torch
        thread itself, it runs at once (waiting for its own queue would never end)."""
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def stream(self, steps: Iterator) -> Iterator:
        """Advance a generator on the torch thread, yielding what it yields; closing this closes it there too."""
        done = object()
        try:
            while (item := self.call(next, steps, done)) is not done:
                yield item
        finally:
            self.call(steps.close)


_TORCH_THREAD: TorchThread | None = None
_TORCH_THREAD_LOCK = threading.Lock()


def on_zero_gpu() -> bool:
    """True on Hugging Face ZeroGPU Spaces, where a decode runs in a forked process that gets the GPU."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def torch_thread() -> TorchThread | None:
    """The process's torch thread, or None where models may live on a GPU (there a thread of our own gains
    nothing, and on ZeroGPU Spaces the GPU is attached in a forked process that would not have it)."""
    global _TORCH_THREAD
    if torch.cuda.is_available() or on_zero_gpu():
        return None
    with _TORCH_THREAD_LOCK:
        if _TORCH_THREAD is None:
            _TORCH_THREAD = TorchThread()
    return _TORCH_THREAD


class ModelHost:
    """The base model and, when an adapter or a CLLM checkpoint is given, the CLLM beside it.

    A failed load does not raise: ``error`` holds the message, the page shows it, and the app keeps serving.
    """

    def __init__(self, model: str, adapter: str | None, device: str = "auto", dtype: str = "auto",
                 cache_dir: str | None = None, cllm_model: str | None = None, engine: str = "auto"):
        self.device, self.dtype, self.cache_dir, self.engine_choice = device, dtype, cache_dir, engine
        self.engine = "eager"  # what the decoders run on, resolved at load time
        self.spec, self.adapter, self.cllm_model = model, adapter, cllm_model
        self.base: LoadedModel | None = None
        self.cllm: LoadedModel | None = None
        self.error: str | None = "not loaded yet"

    def _load_one(self, spec: str, adapter: str | None, what: str) -> LoadedModel:
        _log(f"loading {what}: {spec}" + (f" + adapter {adapter}" if adapter else "") + f" (device {self.device}, dtype {self.dtype}) ...")
        t0 = time.perf_counter()
        loaded = load_model(spec, adapter=adapter, device=self.device, dtype=self.dtype, cache=self.cache_dir)
        _log(f"loaded {loaded.name} on {loaded.device} in {loaded.dtype} in {time.perf_counter() - t0:.1f} s")
        return loaded

    def call(self, fn: Callable, *args):
        """fn(*args) on the torch thread where there is one (CPU machines), else here."""
        thread = torch_thread()
        return thread.call(fn, *args) if thread else fn(*args)

    def stream(self, steps: Iterator) -> Iterator:
        """A decoding generator (``run_race``) advanced on the torch thread where there is one, else here."""
        thread = torch_thread()
        return thread.stream(steps) if thread else steps

    def load(self, model: str | None = None, adapter: str | None = None, cllm_model: str | None = None) -> bool:
        """(Re)load the models; True on success. On failure the old models are dropped and ``error`` says why."""
        return self.call(self._load, model, adapter, cllm_model)

    def _load(self, model: str | None, adapter: str | None, cllm_model: str | None) -> bool:
        spec = model or self.spec
        adapter = None if adapter == NO_ADAPTER else adapter
        self.release()
        self.error = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.base = self._load_one(spec, None, "base model")
            if cllm_model:
                self.cllm = self._load_one(cllm_model, None, "CLLM")
            elif adapter:
                self.cllm = self._load_one(spec, adapter, "CLLM (base + adapter, merged)")
            self.engine = self.prepare_engine()
            self.warm_up()
        except ModelLoadError as exc:
            self.error = str(exc)
        except torch.OutOfMemoryError:
            self.error = f"{spec} does not fit in the device's memory: try --dtype bfloat16, a smaller model or --device cpu"
        except Exception as exc:  # any other failure must leave the app serving, with the reason in the page
            traceback.print_exc()
            self.error = f"could not load {spec}: {type(exc).__name__}: {exc}"
        if self.error:
            self.release()
            _log(f"MODEL NOT LOADED: {self.error}")
            return False
        self.spec, self.adapter, self.cllm_model = spec, adapter, cllm_model
        return True

    def models(self) -> list:
        return [m.model for m in (self.base, self.cllm) if m is not None]

    def prepare_engine(self) -> str:
        """Resolve --engine and build the fast engine now (graph capture), so no request pays for it."""
        if self.engine_choice == "eager":
            return "eager"
        from decoding import fast

        if self.engine_choice == "auto" and any(fast.default_engine(m) != "fast" for m in self.models()):
            return "eager"
        for m in self.models():
            reason = fast.supports(m)
            if reason:
                raise ModelLoadError(f"the fast engine cannot run this model ({reason}): use --engine eager")
            _log("building the fast engine (static cache, CUDA graphs on a GPU) ...")
            fast.prepare(m, progress=_log)
        return "fast"

    def release(self) -> None:
        """Drop the models (and any fast engine built for them) before loading others."""
        if self.engine == "fast":
            from decoding import fast

            for m in self.models():
                fast.release(m)
        self.base = self.cllm = None
        self.engine = "eager"

    def warm_up(self) -> None:
        """One short AR and Jacobi run per model, so the first race is not timed with cold kernels."""
        t0 = time.perf_counter()
        for loaded in filter(None, (self.base, self.cllm)):
            ids = loaded.tokenizer("Hello")["input_ids"] or [0]
            for decoder in (ar_decode, jacobi_decode):
                run(decoder, loaded.model, list(ids), DecodeConfig(max_new_tokens=4, n=16), engine=self.engine)
        _log(f"warm-up done in {time.perf_counter() - t0:.1f} s")

    def default_window(self) -> int:
        """The window size n the page starts with: narrow on a CPU, the paper's 16 elsewhere."""
        return CPU_WINDOW if self.base is not None and self.base.device.type == "cpu" else GPU_WINDOW

    def describe(self) -> str:
        """One line for the page header (plain text; the caller escapes it)."""
        if self.error:
            return f"No model loaded: {self.error}"
        cllm = f"CLLM: {self.cllm.name}" if self.cllm else "CLLM: none (no adapter found; start with --adapter PATH)"
        dtype = str(self.base.dtype).removeprefix("torch.")
        return f"Model: {self.base.name} · {self.base.device} · {dtype} · {self.engine} engine · {cllm}"

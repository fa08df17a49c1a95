"""The models the app serves: loaded once at start-up, warmed up, and swapped only on request."""
from __future__ import annotations

import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from decoding import DEFAULT_SPEC, DecodeConfig, LoadedModel, ModelLoadError, ar_decode, jacobi_decode, load_model, run
from decoding.models import PRESETS, default_adapter

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
        """Advance a generator on the torch thread, yielding what it yields; closing this closes it there too.

        The close is queued, not waited for: Gradio closes a cancelled job's generator on its event loop, which
        must not wait while the torch thread finishes a step of the next job."""
        done = object()
        try:
            while (item := self.call(next, steps, done)) is not done:
                yield item
        finally:
            if threading.get_ident() == self._ident:
                steps.close()
            else:
                self._pool.submit(steps.close)


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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name
# An absolute or home-relative path in a message ("org/name" is not one: its slash follows a letter).
SERVER_PATH = re.compile(r"(?<![\w.~-])~?/[^\s'\"`,;()\[\]{}<>]+")


def load_failure(spec: str, exc: Exception) -> str:
    """The message for a failed load (the server log gets the traceback of an unexpected failure)."""
    if isinstance(exc, ModelLoadError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"{spec} does not fit in the device's memory: try --dtype bfloat16, a smaller model or --device cpu"
    traceback.print_exception(exc)
    return f"could not load {spec}: {type(exc).__name__}: {exc}"


def hide_paths(message: str) -> str:
    """A message for visitors: every server path in it replaced (the server log keeps the full text)."""
    return SERVER_PATH.sub("<path>", message)


def under_root(name: str, root: str) -> str | None:
    """The absolute path of ``name`` inside ``root`` when it exists there (no way out through .. or links)."""
    base = Path(root).expanduser().resolve()
    path = (base / name).resolve()
    return str(path) if path != base and path.is_relative_to(base) and path.exists() else None


def custom_spec(spec: str, model_root: str | None) -> str:
    """What the loader gets for a model a visitor typed: the embedded model, a preset, a hub id (org/name), or with
    --model-root a folder or .gguf under that root, named relative to it. Anything else raises ModelLoadError."""
    spec = spec.strip()
    if spec == DEFAULT_SPEC or spec in PRESETS:
        return spec
    folder = under_root(spec, model_root) if model_root else None
    if folder:
        return folder
    if HUB_ID.fullmatch(spec) and not Path(spec).exists():  # the loader would take a local folder of that name first
        return spec
    local = ", a folder or .gguf under the model root (named relative to it)" if model_root else ""
    raise ModelLoadError(f"{spec!r} is not a model this app loads for visitors: give {DEFAULT_SPEC}, a preset "
                         f"({', '.join(PRESETS)}){local}, or a hub id like org/name")


def custom_adapter(adapter: str | None, spec: str, model_root: str | None) -> str | None:
    """The adapter folder for a visitor's load: "auto" (the shipped adapter of the embedded model), "none" or empty
    (no CLLM), or with --model-root a folder under that root. Anything else raises ModelLoadError."""
    name = (adapter or "").strip()
    if name in ("", NO_ADAPTER):
        return None
    if name == "auto":
        return default_adapter(spec)
    folder = under_root(name, model_root) if model_root else None
    if folder:
        return folder
    local = ", or a folder under the model root (named relative to it)" if model_root else ""
    raise ModelLoadError(f"adapter {name!r} is not one this app loads for visitors: give auto (the shipped adapter of "
                         f"{DEFAULT_SPEC}), none{local}")


class ModelHost:
    """The base model and, when an adapter or a CLLM checkpoint is given, the CLLM beside it.

    A failed load does not raise: the models that were serving stay, ``load_error`` says why, and when nothing was
    serving ``error`` holds the message too; the page shows it and the app keeps serving.
    On ZeroGPU Spaces the models load on the CPU (no CUDA work outside a ``spaces.GPU`` task) and ``attach_gpu``
    moves them to the GPU and builds the engine inside the first task of each GPU worker process.
    """

    def __init__(self, model: str, adapter: str | None, device: str = "auto", dtype: str = "auto",
                 cache_dir: str | None = None, cllm_model: str | None = None, engine: str = "auto"):
        self.device, self.dtype, self.cache_dir, self.engine_choice = device, dtype, cache_dir, engine
        self.engine = "eager"  # what the decoders run on, resolved at load time
        self.spec, self.adapter, self.cllm_model = model, adapter, cllm_model
        self.base: LoadedModel | None = None
        self.cllm: LoadedModel | None = None
        self.error: str | None = "not loaded yet"
        self.load_error: str | None = None  # why the latest load failed (None after a success)
        self.zero_gpu = on_zero_gpu() and device != "cpu"
        self._attached_pid: int | None = None  # the ZeroGPU worker process the models were moved to

    def _load_one(self, spec: str, adapter: str | None, what: str) -> LoadedModel:
        device, dtype = ("cpu", "bfloat16" if self.dtype == "auto" else self.dtype) if self.zero_gpu else (self.device, self.dtype)
        _log(f"loading {what}: {spec}" + (f" + adapter {adapter}" if adapter else "") + f" (device {device}, dtype {dtype}) ...")
        t0 = time.perf_counter()
        loaded = load_model(spec, adapter=adapter, device=device, dtype=dtype, cache=self.cache_dir)
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
        """(Re)load the models; True on success. On failure the models that were serving stay."""
        return self.call(self._load, model, adapter, cllm_model)

    def _load(self, model: str | None, adapter: str | None, cllm_model: str | None) -> bool:
        spec = model or self.spec
        adapter = None if adapter == NO_ADAPTER else adapter
        loaded: list[LoadedModel] = []
        try:
            loaded.append(self._load_one(spec, None, "base model"))
            if cllm_model:
                loaded.append(self._load_one(cllm_model, None, "CLLM"))
            elif adapter:
                loaded.append(self._load_one(spec, adapter, "CLLM (base + adapter, merged)"))
            engine = "eager" if self.zero_gpu else self.ready([m.model for m in loaded])
        except Exception as exc:  # any failure must leave the app serving, with the reason in the page
            self._drop([m.model for m in loaded])
            self.load_error = load_failure(spec, exc)
            if self.base is None:
                self.error = self.load_error
            _log(f"MODEL NOT LOADED: {self.load_error}" + (" (the models that were serving stay)" if self.base else ""))
            return False
        self.release()
        self.base, self.cllm = loaded[0], (loaded[1] if len(loaded) > 1 else None)
        self.engine, self.error, self.load_error, self._attached_pid = engine, None, None, None
        self.spec, self.adapter, self.cllm_model = spec, adapter, cllm_model
        return True

    def ready(self, models: list) -> str:
        """Build the engine for the models and warm them up; the engine's name."""
        engine = self.prepare_engine(models)
        self.warm_up(models, engine)
        return engine

    def attach_gpu(self) -> None:
        """Inside a ZeroGPU task: move the models to the task's GPU and build the engine there (CUDA graphs), once
        per worker process; the worker lives on between tasks, and the models and graphs with it. Elsewhere a no-op.
        Without a GPU in the worker (the ``spaces`` package's emulation on a CPU machine) the models stay on the CPU."""
        if not self.zero_gpu or self.base is None or self._attached_pid == os.getpid():
            return
        if torch.cuda.is_available():
            target = torch.device("cuda")
            for loaded in filter(None, (self.base, self.cllm)):
                loaded.model.to(target)
                loaded.device = target
        self.engine = self.ready(self.models())
        self._attached_pid = os.getpid()

    def models(self) -> list:
        return [m.model for m in (self.base, self.cllm) if m is not None]

    def prepare_engine(self, models: list) -> str:
        """Resolve --engine and build the fast engine now (graph capture), so no request pays for it."""
        if self.engine_choice == "eager":
            return "eager"
        from decoding import fast

        if self.engine_choice == "auto" and any(fast.default_engine(m) != "fast" for m in models):
            return "eager"
        for m in models:
            reason = fast.supports(m)
            if reason:
                raise ModelLoadError(f"the fast engine cannot run this model ({reason}): use --engine eager")
            _log("building the fast engine (static cache, CUDA graphs on a GPU) ...")
            fast.prepare(m, progress=_log)
        return "fast"

    @staticmethod
    def _drop(models: list) -> None:
        from decoding import fast

        for m in models:
            fast.release(m)
        if torch.cuda.is_available() and not on_zero_gpu():
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Drop the models (and any fast engine built for them)."""
        self._drop(self.models())
        self.base = self.cllm = None
        self.engine = "eager"

    def warm_up(self, models: list, engine: str) -> None:
        """One short AR and Jacobi run per model, so the first race is not timed with cold kernels."""
        t0 = time.perf_counter()
        for model in models:
            ids = [0, 1, 2]
            for decoder in (ar_decode, jacobi_decode):
                run(decoder, model, ids, DecodeConfig(max_new_tokens=4, n=16), engine=engine)
        _log(f"warm-up done in {time.perf_counter() - t0:.1f} s")

    def default_window(self) -> int:
        """The window size n the page starts with: narrow on a CPU, the paper's 16 elsewhere."""
        on_cpu = self.base is not None and self.base.device.type == "cpu" and not self.zero_gpu
        return CPU_WINDOW if on_cpu else GPU_WINDOW

    def describe(self) -> str:
        """One line for the page header (plain text; the caller escapes it)."""
        if self.error:
            return f"No model loaded: {self.error}"
        cllm = f"CLLM: {self.cllm.name}" if self.cllm else "CLLM: none (no adapter found; start with --adapter PATH)"
        dtype = str(self.base.dtype).removeprefix("torch.")
        where = "ZeroGPU (a GPU is attached for each race)" if self.zero_gpu else f"{self.base.device} · {self.engine} engine"
        return f"Model: {self.base.name} · {where} · {dtype} · {cllm}"

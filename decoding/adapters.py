"""LoRA adapter folders: peft's ``adapter_model.safetensors``, or that file split into shards of at most 15 MiB.

A committed file may be at most 16 MiB, and a LoRA of rank 24 on every linear layer of the embedded model is 14 MB in
bf16. A larger adapter is kept as ``adapter_model-00001-of-00003.safetensors`` and so on (``split_weights``); the loader
(``attach``) reads either form. peft itself reads only the single file, so a sharded folder is attached through its
public state-dict API (``set_peft_model_state_dict``).
"""
from __future__ import annotations

import re
from pathlib import Path

from .embedded import sha256

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
MAX_FILE_BYTES = 15 * 1024 * 1024  # a shard's most: under the 16 MiB a committed file (or one brought back from a GPU
# machine) may hold, with room for a tar header around it
_SHARD = re.compile(r"adapter_model-(\d{5})-of-(\d{5})\.safetensors")


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (from 1) of ``count``."""
    return f"adapter_model-{index:05d}-of-{count:05d}.safetensors"


def weight_files(folder: str | Path) -> list[Path]:
    """The adapter's weight files: [adapter_model.safetensors], or every shard in order; [] when there are none.
    ValueError when the folder holds both forms, or shards of an incomplete or mixed set."""
    folder = Path(folder)
    single = folder / WEIGHTS
    shards = sorted(p for p in folder.glob("adapter_model-*.safetensors") if _SHARD.fullmatch(p.name))
    if not shards:
        return [single] if single.is_file() else []
    if single.exists():
        raise ValueError(f"{folder} holds both {WEIGHTS} and its shards: keep one form")
    count = int(_SHARD.fullmatch(shards[0].name).group(2))
    if [p.name for p in shards] != [shard_name(i, count) for i in range(1, count + 1)]:
        raise ValueError(f"{folder} holds an incomplete set of weight shards: {', '.join(p.name for p in shards)}")
    return shards


def read_weights(folder: str | Path) -> dict:
    """Every tensor of the adapter, from the single file or all its shards."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no adapter weights ({WEIGHTS} or its shards)")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def weights_sha256(folder: str | Path) -> str | None:
    """sha256 of the adapter's weight bytes (the shards one after the other), None without weights. For a single
    file it is that file's sha256, as results recorded it before shards existed."""
    try:
        files = weight_files(folder) if folder else []
    except ValueError:
        return None
    return sha256(*files) if files else None


def split_weights(folder: str | Path, max_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """Rewrite ``adapter_model.safetensors`` as shards of at most ``max_bytes`` each when it is larger (tensors in
    name order, never split); returns the weight files. The tensors and the file's metadata are kept as they were."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    single = folder / WEIGHTS
    if not single.is_file() or single.stat().st_size <= max_bytes:
        return weight_files(folder)
    with safe_open(single, "pt") as f:
        metadata = f.metadata()
    state = load_file(single)
    groups, size = [[]], 0
    budget = max_bytes - 4096  # the header's metadata and padding; each tensor's own entry is counted with it
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size() + len(name) + 128  # data + its header entry
        if nbytes > budget:
            raise ValueError(f"tensor {name} alone is {nbytes} bytes, over the {max_bytes}-byte limit of a file")
        if groups[-1] and size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    paths = [folder / shard_name(i, len(groups)) for i in range(1, len(groups) + 1)]
    for path, names in zip(paths, groups):
        save_file({k: state[k].contiguous() for k in names}, path, metadata=metadata)
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path} came out at {path.stat().st_size} bytes, over {max_bytes}")
    single.unlink()
    return paths


def save_weights(state: dict, folder: str | Path, metadata: dict | None = None, max_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """Write an adapter's tensors into ``folder``: one file, or shards when they are over ``max_bytes``. ``metadata``
    defaults to what peft writes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / WEIGHTS, *(p for p in folder.glob("adapter_model-*.safetensors") if _SHARD.fullmatch(p.name))]:
        old.unlink(missing_ok=True)  # an earlier adapter's weights, in either form
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"} if metadata is None else metadata)
    return split_weights(folder, max_bytes)


def attach(model, folder: str | Path, trainable: bool = False):
    """``model`` as a peft model with the adapter in ``folder`` (single file or shards); ``trainable`` keeps its
    LoRA weights trainable (a second training phase). ValueError when the weights do not fit the model."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    folder = Path(folder)
    files = weight_files(folder)
    if files == [folder / WEIGHTS]:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    if not files:
        raise ValueError(f"{folder} holds no adapter weights ({WEIGHTS} or its shards)")
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = not trainable
    peft_model = PeftModel(model, config)
    result = set_peft_model_state_dict(peft_model, read_weights(folder))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"the weights do not match the model: {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:1]}), {len(missing)} missing (e.g. {missing[:1]})")
    if not trainable:
        peft_model.eval()
    return peft_model

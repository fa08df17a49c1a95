"""A LoRA adapter from a fully fine-tuned model: the truncated SVD of each weight's change.

    python -m experiments.extract --model runs/full/model --out runs/full/adapter --max-mib 15.5
    python -m experiments.extract --model runs/full/model --out runs/full/adapter --rank 24

Full fine-tuning trains best, but a whole model is far over the 16 MiB of a committed file. For each
target matrix, delta = W_tuned - W_base = U S V^T is cut to its first r singular values and stored as
LoRA factors B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T (scale 1), so base + adapter = the best rank-r
approximation of the tuned model. ``--rank`` gives every matrix the same rank; ``--max-mib`` shares a
file-size budget among the matrices where singular values are largest for their cost. Changes outside
the target matrices (embeddings, norms) cannot go into the adapter: train with ``--full-scope targets``
so there are none; the report says how large they were. Writes the adapter folder with
``extract_report.json`` (ranks, kept share of each change's energy) and the training settings.
"""
from __future__ import annotations

import heapq
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding import DEFAULT_SPEC, adapters, load_model

from decoding.cli import parse, print_table, save_settings
from training.settings import ALL_LINEAR
from training.train import MIB, target_modules, target_names

LOW_ENERGY = 0.5  # below this share of the change's squared norm, extract warns that the adapter needs an evaluation


@dataclass
class ExtractSettings:
    """Settings of one extraction; saved in the adapter's extract_report.json."""

    model: str = ""  # the fully fine-tuned model folder (train --lora-rank 0 writes out/model)
    base: str = DEFAULT_SPEC  # the base model it was tuned from
    out: str = ""  # the adapter folder to write
    targets: str = ALL_LINEAR  # comma-separated module names to extract (those the training changed)
    rank: int = 0  # the same rank for every matrix (0: use --max-mib)
    max_mib: float = 15.5  # with --rank 0: largest adapter file, shared among the matrices by singular value
    save_dtype: str = "bfloat16"  # dtype of the saved factors
    device: str = "auto"  # where the SVDs run: auto / cuda / cpu


@dataclass
class Delta:
    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    U: torch.Tensor  # [out, k]
    S: torch.Tensor  # [k], descending
    Vh: torch.Tensor  # [k, in]

    @property
    def cost(self) -> int:
        """Parameters one rank of this matrix costs: a row of A and a column of B."""
        return self.U.shape[0] + self.Vh.shape[1]


def weight_deltas(tuned, base, targets: str, device: torch.device) -> tuple[list[Delta], dict]:
    """SVDs of the target matrices' changes, and the Frobenius norms of every other change (not extractable)."""
    base_params = dict(base.named_parameters())
    deltas, other = [], {}
    target_weights = {f"{name}.weight" for name, _ in target_modules(tuned, targets)}
    for pname, w in tuned.named_parameters():
        if pname not in base_params or base_params[pname].shape != w.shape:
            raise SystemExit(f"{pname} does not match the base model: was the model tuned from {base.name_or_path}?")
        d = w.detach().to(device, torch.float32) - base_params[pname].detach().to(device, torch.float32)
        if pname in target_weights:
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            deltas.append(Delta(pname[: -len(".weight")], U, S, Vh))
        elif float(d.norm()) > 0:
            other[pname] = float(d.norm())
    if not deltas:
        raise SystemExit(f"no matrix named like {sorted(target_names(targets))} in {tuned.name_or_path}")
    return deltas, other


def allocate(deltas: list[Delta], budget_params: int) -> list[int]:
    """Ranks that keep the most squared singular value per parameter within the budget (greedy; exact for
    each matrix's descending values, since a matrix's next rank never pays more than its previous one)."""
    ranks = [0] * len(deltas)
    heap = [(-float(d.S[0]) ** 2 / d.cost, i) for i, d in enumerate(deltas) if len(d.S)]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, i = heapq.heappop(heap)
        d = deltas[i]
        if spent + d.cost > budget_params:
            continue  # this matrix's next rank no longer fits; a cheaper one may
        spent += d.cost
        ranks[i] += 1
        if ranks[i] < len(d.S):
            heapq.heappush(heap, (-float(d.S[ranks[i]]) ** 2 / d.cost, i))
    return ranks


def build_adapter(base, deltas: list[Delta], ranks: list[int], dtype: torch.dtype):
    """The base wrapped by peft with one LoRA per matrix of rank > 0 (scale 1), its factors set from the SVDs."""
    from peft import LoraConfig, get_peft_model

    kept = [(d, r) for d, r in zip(deltas, ranks) if r > 0]
    if not kept:
        raise SystemExit("the budget leaves no rank to any matrix (or the model did not change): raise it")
    pattern = {d.name: r for d, r in kept}
    top = max(pattern.values())
    cfg = LoraConfig(r=top, lora_alpha=top, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=sorted(pattern),
                     rank_pattern=pattern, alpha_pattern=pattern)
    model = get_peft_model(base, cfg)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for d, r in kept:
            root = d.S[:r].sqrt()
            layer = modules[d.name]
            layer.lora_A["default"].weight.copy_((root[:, None] * d.Vh[:r]).to(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.copy_((d.U[:, :r] * root[None, :]).to(layer.lora_B["default"].weight))
            if layer.scaling["default"] != 1.0:
                raise RuntimeError(f"{d.name}: LoRA scale {layer.scaling['default']}, expected 1")
    return model


def main(argv=None) -> dict:
    s = parse(ExtractSettings, argv)
    if not s.model or not s.out:
        raise SystemExit("give --model (a fully fine-tuned model folder) and --out (the adapter folder to write)")
    if s.rank < 0 or (s.rank == 0 and s.max_mib <= 0):
        raise SystemExit("give --rank > 0, or --rank 0 with --max-mib > 0")
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if s.device == "auto" else s.device))
    tuned = load_model(s.model, device="cpu", dtype="float32").model
    base = load_model(s.base, device="cpu", dtype="float32").model
    deltas, other = weight_deltas(tuned, base, s.targets, device)
    dtype = getattr(torch, s.save_dtype)
    bytes_per = torch.empty((), dtype=dtype).element_size()
    if s.rank:
        ranks = [min(s.rank, len(d.S)) for d in deltas]
    else:
        ranks = allocate(deltas, int(s.max_mib * MIB / bytes_per))
    energy = [float((d.S ** 2).sum()) for d in deltas]
    kept = [float((d.S[:r] ** 2).sum()) for d, r in zip(deltas, ranks)]
    model = build_adapter(base, deltas, ranks, dtype)
    out = Path(s.out)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items() if "lora_" in k}
    model.save_pretrained(str(out), state_dict=state)
    settings = Path(s.model) / "training_settings.json"
    if settings.exists():
        shutil.copy(settings, out / "training_settings.json")
    files = adapters.split_weights(out)  # shards of at most 15 MiB each when it is larger
    size = sum(f.stat().st_size for f in files)
    report = {
        "file_mib": size / MIB,
        "matrices": len(deltas),
        "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": sum(ranks) / len(ranks),
        "kept_energy": sum(kept) / max(sum(energy), 1e-30),  # share of sum ||delta||_F^2 the adapter keeps
        "relative_error": (1 - sum(kept) / max(sum(energy), 1e-30)) ** 0.5,  # ||delta - adapter||_F / ||delta||_F over all
        "ranks": {d.name: r for d, r in zip(deltas, ranks)},
        "kept_energy_by_matrix": {d.name: k / e if e else 1.0 for d, k, e in zip(deltas, kept, energy)},
        "other_changes_norm": other,  # tuned weights outside the targets that changed (lost in the adapter)
    }
    save_settings(s, out / "extract_report.json", **report)
    print_table("extract", [("adapter", str(out)), ("file MiB", report["file_mib"]), ("ranks", f"{min(ranks)}..{max(ranks)}"),
                            ("kept energy", report["kept_energy"]), ("relative error", report["relative_error"]),
                            ("other changed weights", len(other))])
    if len(files) > 1:
        print(f"{size / MIB:.1f} MiB, over the 16 MiB limit of a committed file: written as {len(files)} shards")
    if report["kept_energy"] < LOW_ENERGY:
        # An extraction that keeps a small share of the change can loop far more than the full model (docs/findings.md).
        print(f"warning: the adapter keeps only {report['kept_energy']:.0%} of the weight change, so it may not behave "
              "like the tuned model: run training.evaluate on it before shipping it")
    return report


if __name__ == "__main__":
    main()

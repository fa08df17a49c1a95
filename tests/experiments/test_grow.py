"""experiments.grow: a LoRA adapter grown to a higher rank, the same model until it is trained further."""
from __future__ import annotations

import json

import pytest
import torch

from decoding import adapters, load_model
from experiments import grow
from training import collect, train
from training.tiny import save_tiny
from training_fixtures import random_lora, tiny_inputs


def merged(model_dir, adapter):
    return load_model(str(model_dir), adapter=str(adapter), device="cpu", dtype="float32").model.state_dict()


def test_grown_adapters_change_the_model_as_before(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    random_lora(["q_proj", "v_proj", "down_proj"], 1, 4).save_pretrained(tmp_path / "a")
    before = merged(model, tmp_path / "a")
    out = grow.main(["--adapter", str(tmp_path / "a"), "--rank", "12", "--out", str(tmp_path / "g")])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 8 * 12 / 4  # the scale alpha / r is kept
    state = adapters.read_weights(out)
    A = next(v for k, v in state.items() if "q_proj.lora_A" in k)
    B = next(v for k, v in state.items() if "q_proj.lora_B" in k)
    assert A.shape[0] == 12 and B.shape[1] == 12 and not B[:, 4:].any() and A[4:].abs().max() > 0
    after = merged(model, out)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    # only the MLP: peft's rank and alpha patterns carry the grown modules
    only = grow.main(["--adapter", str(tmp_path / "a"), "--rank", "8", "--modules", r"mlp\.", "--out", str(tmp_path / "m")])
    config = json.loads((only / "adapter_config.json").read_text())
    assert config["r"] == 4 and len(config["rank_pattern"]) == 2 and set(config["rank_pattern"].values()) == {8}
    shapes = {k: v.shape for k, v in adapters.read_weights(only).items()}
    assert all(s[0] == (8 if "down_proj" in k else 4) for k, s in shapes.items() if "lora_A" in k)
    for k, v in merged(model, only).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    with pytest.raises(SystemExit, match="above the adapter's rank"):
        grow.main(["--adapter", str(tmp_path / "a"), "--rank", "4", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no LoRA module matches"):
        grow.main(["--adapter", str(tmp_path / "a"), "--rank", "8", "--modules", "k_proj", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="uniform-rank"):
        grow.main(["--adapter", str(only), "--rank", "16", "--out", str(tmp_path / "x")])


def test_training_from_a_grown_adapter_uses_the_new_rank(tmp_path):
    folder, prompts, _ = tiny_inputs(tmp_path)
    traj = tmp_path / "traj"
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "5", "--device", "cpu"])
    first = tmp_path / "first"
    train.main(["--model", str(folder), "--data", str(traj), "--out", str(first), "--lora-rank", "4", "--lora-alpha", "8",
                "--batch", "4", "--max-steps", "2", "--device", "cpu"])
    grown = grow.main(["--adapter", str(first / "adapter"), "--rank", "8", "--out", str(tmp_path / "grown")])
    train.main(["--model", str(folder), "--data", str(traj), "--out", str(tmp_path / "more"), "--init-adapter",
                str(grown), "--batch", "4", "--max-steps", "2", "--device", "cpu", "--lr", "1e-2"])
    state = adapters.read_weights(tmp_path / "more" / "adapter")
    Bs = [v for k, v in state.items() if "lora_B" in k]
    assert all(B.shape[1] == 8 for B in Bs) and any(B[:, 4:].abs().max() > 0 for B in Bs)  # the new columns learned

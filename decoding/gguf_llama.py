"""De-quantise a Llama GGUF into an ordinary transformers folder (safetensors, config, tokenizer) in one pass.

Why not ``from_pretrained(gguf_file=...)``: transformers parses the whole file's metadata with ``gguf.GGUFReader``
once for the config, once for the tokenizer and once more for the weights (about 8 s each on a small CPU, most of
it building an array object per vocabulary entry). Here the metadata is read once with ``struct`` (string arrays
are skipped, not built), the blocks are de-quantised with the ``gguf`` package's numpy kernels (the ones the loader
used), and q/k are un-permuted as the loader does, so the tensors are the loader's, bit for bit (tested).
The tokenizer is transformers' own GGUF conversion, which reads only the vocabulary and the merges.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
# GGUF tensor name (after "blk.N.") -> transformers Llama parameter name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GgufError(ValueError):
    """The file is not a GGUF this exporter can read."""


@dataclass
class GgufTensor:
    shape: tuple[int, ...]  # torch order (ggml stores the fastest-moving dimension first)
    qtype: int  # ggml type id
    data: np.ndarray  # the raw bytes, a view of the memory-mapped file


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8: pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _value(blob: np.ndarray, pos: int, vtype: int):
    """One metadata value and the offset after it. Arrays of strings come back as their length (not needed here)."""
    if vtype in SCALARS:
        return struct.unpack_from(SCALARS[vtype], blob, pos)[0], pos + struct.calcsize(SCALARS[vtype])
    if vtype == STRING:
        return _string(blob, pos)
    if vtype != ARRAY:
        raise GgufError(f"unknown metadata type {vtype}")
    etype, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if etype in SCALARS:
        width = struct.calcsize(SCALARS[etype])
        return list(struct.unpack_from(f"<{count}{SCALARS[etype][1]}", blob, pos)), pos + count * width
    if etype != STRING:
        raise GgufError(f"unknown array element type {etype}")
    for _ in range(count):
        pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
    return count, pos


def read_gguf(path: Path) -> tuple[dict, dict[str, GgufTensor]]:
    """The file's metadata (string arrays as their length) and its tensors (raw, memory-mapped)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    blob = np.memmap(path, mode="r", dtype=np.uint8)
    if blob.size < 24 or bytes(blob[:4]) != b"GGUF":
        raise GgufError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise GgufError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _string(blob, pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        meta[key], pos = _value(blob, pos + 4, vtype)
    table = []
    for _ in range(n_tensors):
        name, pos = _string(blob, pos)
        (ndim,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{ndim}Q", blob, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        table.append((name, tuple(reversed(dims)), qtype, offset))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    start = -(-pos // align) * align
    tensors = {}
    for name, shape, qtype, offset in table:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        size = int(np.prod(shape)) // block * block_bytes
        if start + offset + size > blob.size:
            raise GgufError(f"{path} is truncated (tensor {name} runs past the end)")
        tensors[name] = GgufTensor(shape, qtype, blob[start + offset: start + offset + size])
    return meta, tensors


def hf_name(name: str) -> str | None:
    """transformers' Llama name of a GGUF tensor (None for one it does not have)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}" if part in LAYER_NAMES else None
    return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in q and k (as transformers' GGUF loader does)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama_config(meta: dict, tied: bool):
    """The LlamaConfig the GGUF's metadata describes, with the fields transformers' loader sets."""
    from transformers import LlamaConfig

    if meta.get("general.architecture") != "llama":
        raise GgufError(f"only Llama GGUFs are exported here, not {meta.get('general.architecture')!r}")
    arch = "llama."
    heads = meta[arch + "attention.head_count"]
    cfg = LlamaConfig(
        vocab_size=meta["tokenizer.ggml.tokens"], hidden_size=meta[arch + "embedding_length"],
        intermediate_size=meta[arch + "feed_forward_length"], num_hidden_layers=meta[arch + "block_count"],
        num_attention_heads=heads, num_key_value_heads=meta.get(arch + "attention.head_count_kv", heads),
        max_position_embeddings=meta[arch + "context_length"], rms_norm_eps=meta[arch + "attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_theta": meta.get(arch + "rope.freq_base", 10000.0), "rope_type": "default"},
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"], dtype="float32",
    )
    cfg.unk_token_id = meta.get("tokenizer.ggml.unknown_token_id")
    cfg._model_name_or_path = meta.get("general.name", "")  # what the loader sets; kept so config.json is the same
    return cfg


def dequantised_state(meta: dict, tensors: dict[str, GgufTensor]) -> dict:
    """float32 torch tensors under transformers' names, q and k un-permuted."""
    import torch
    from gguf.quants import dequantize

    heads = meta["llama.attention.head_count"]
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    state = {}
    for name, t in tensors.items():
        target = hf_name(name)
        if target is None:
            continue
        w = dequantize(t.data, t.qtype).reshape(t.shape).astype(np.float32, copy=False)
        if ".attn_q." in name:
            w = unpermute(w, heads)
        elif ".attn_k." in name:
            w = unpermute(w, kv_heads)
        state[target] = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy())
    return state


def export_llama_gguf(gguf: Path, out: Path) -> None:
    """Write ``out``/model.safetensors, config.json, generation_config.json and the tokenizer files."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    meta, tensors = read_gguf(gguf)
    tied = "output.weight" not in tensors
    config = llama_config(meta, tied)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dequantised_state(meta, tensors), out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    tokenizer.save_pretrained(out)

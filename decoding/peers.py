"""transformers' own single-request decoding, timed as benchmark lanes beside ours (decoding.bench).

- ``hf_generate``: ``model.generate``, greedy, with its default dynamic cache;
- ``hf_static``: ``generate`` with ``cache_implementation="static"``, which transformers compiles on a GPU
  (torch.compile with CUDA graphs). Its first calls compile: the bench's warm-up pays that and reports its time. The
  cache is sized once, for the longest prompt of the run, so that no timed call recompiles for a new cache length;
- ``hf_lookup``: ``generate`` with ``prompt_lookup_num_tokens`` (prompt lookup decoding: tokens copied from the
  prompt and the answer so far, verified in one forward).

Assisted generation with a draft model is not a lane: it needs a smaller model with the same tokenizer, and the
embedded SmolLM2-135M is the smallest SmolLM2 there is.
"""
from __future__ import annotations

import time

import torch

from .decoders import DecodeConfig, sync_device

PEERS = ("hf_generate", "hf_static", "hf_lookup")


def generate(lm, ids: list[int], cfg: DecodeConfig, count_forwards: bool = False, **options) -> dict:
    """Greedy ``lm.model.generate`` on ``ids`` with ``options``, timed as our decoders are (device synchronised).

    ``count_forwards``: count the model's forward passes with a hook (prompt lookup verifies several tokens a pass);
    otherwise one a token. Not for the compiled path, where a hook would be traced into the compiled graph."""
    x = torch.tensor([ids], device=lm.device)
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda *_: calls.append(1)) if count_forwards else None
    try:
        sync_device(lm.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=cfg.max_new_tokens,
                eos_token_id=list(cfg.eos_token_ids) or None,
                pad_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None, **options)
        sync_device(lm.device)
        wall = time.perf_counter() - t0
    finally:
        if hook is not None:
            hook.remove()
    tokens = out[0, len(ids):].tolist()
    forwards = len(calls) if count_forwards else len(tokens)
    return {"tokens": tokens, "forwards": forwards, "wall_s": wall,
            "mean_accepted": (len(tokens) - 1) / (forwards - 1) if forwards > 1 else 1.0}


def peer_runners(lm, lookup_tokens: int, cache_len: int) -> dict:
    """Lane name -> function(ids, cfg) -> result, for transformers' lanes on ``lm``. ``cache_len``: the static cache's
    length (the longest prompt plus the new tokens); ``lookup_tokens``: prompt_lookup_num_tokens."""
    return {
        "hf_generate": lambda ids, cfg: generate(lm, ids, cfg),
        "hf_static": lambda ids, cfg: generate(lm, ids, cfg, cache_implementation="static", max_cache_len=cache_len),
        "hf_lookup": lambda ids, cfg: generate(lm, ids, cfg, count_forwards=True,
                                               prompt_lookup_num_tokens=lookup_tokens),
    }

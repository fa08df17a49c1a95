"""A Llama forward over a preallocated KV cache, for the fast engine (fast.py).

gpt-fast style: a plain ``nn.Module`` that reads the weights of a transformers ``LlamaForCausalLM``
(the merged CLLM included), a static cache ``[layers, B=1, KV, max_len, D]`` written at
``input_pos``, and a causal mask built from the positions inside the forward: a query sees the keys
at positions <= its own, so tokens rejected by Jacobi need no cache rollback; the session moves its
position pointer back and the stale entries are overwritten later.

Every shape in ``forward`` depends only on the window width T and the attended key length L (both
Python ints), so each (T, L) pair can be captured once as a CUDA graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")  # position-independent RoPE variants we reproduce exactly
# Windows of up to this many tokens attend token by token (no copies; each token reads all its keys), wider ones
# (and prefill) as one grouped batch (two copies; keys read once): on an H100 the first layout was the faster one up
# to 32 tokens, the second from 64 on (measured with SmolLM2-135M in bf16 over 512 keys).
PER_TOKEN_MAX = 32
# From this many tokens on, the unfused GPU step computes gate|up as rows (block()): each half is then contiguous, which
# the SiLU and product kernels prefer; for 2 and 4 tokens cuBLAS picks slower kernels for that form.
ROWS_MIN = 8
FUSED_STEP_MAX = 32  # the widest window the fused step runs (at most PER_TOKEN_MAX: it reads the mask as [T, L])
# The fused step (fused_step.py) is the default on a GPU that can run it, where it is the faster step: on an H100 an AR
# step of SmolLM2-135M 1.8x as fast as the unfused step, the same texts in bfloat16, but one of Llama-2-7B's shape 2.7x
# as slow (docs/engine.md). "off" here chooses the unfused step, "on" the fused step without timing it.
FUSED_STEP_ENV = "CLLM_FUSED_STEP"


class UnsupportedModel(ValueError):
    """The fast engine cannot run this model; the message says why (use the eager engine)."""


@dataclass
class StaticArgs:
    """The shape of a Llama model, read from its transformers config."""

    n_layers: int  # decoder blocks
    dim: int  # hidden size
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads KV (GQA: H is a multiple of KV)
    head_dim: int  # D
    vocab: int  # V
    eps: float  # RMSNorm epsilon
    rope: dict  # config.rope_parameters: rope_type, rope_theta, scaling fields
    context: int  # max_position_embeddings

    @classmethod
    def from_config(cls, config) -> "StaticArgs":
        """Read a LlamaConfig; raise UnsupportedModel for anything this forward does not reproduce."""
        if getattr(config, "model_type", None) != "llama":
            raise UnsupportedModel(f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise UnsupportedModel("attention or MLP biases are not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {config.hidden_act!r} is not silu")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModel("partial rotary embeddings are not supported")
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if n_heads % n_kv:
            raise UnsupportedModel(f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
        return cls(
            n_layers=config.num_hidden_layers,
            dim=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            vocab=config.vocab_size,
            eps=config.rms_norm_eps,
            rope=rope,
            context=int(getattr(config, "max_position_embeddings", 2048)),
        )


def rope_inv_freq(args: StaticArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, the same formulas as transformers (default, linear, llama3)."""
    dim = args.head_dim
    base = args.rope["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    kind = args.rope.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / args.rope["factor"]
    elif kind == "llama3":
        factor, lo, hi = args.rope["factor"], args.rope["low_freq_factor"], args.rope["high_freq_factor"]
        old_context = args.rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / lo, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / hi) * ~(wavelen > old_context / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(args: StaticArgs, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_len, D] and signed sin [max_len, D] = [-sin, sin], so that rope(x) = x*cos + roll(x)*sin.

    Computed like transformers (float32 angles on the model's device, then cast) so the rotated
    queries and keys match the eager model's bit for bit.
    """
    inv_freq = rope_inv_freq(args).to(device)
    pos = torch.arange(max_len, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [max_len, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
    sin = emb.sin()
    half = args.head_dim // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return emb.cos().to(dtype), signed_sin.to(dtype)


def fused_step_problem(args: StaticArgs, device: torch.device) -> str | None:
    """None when the fused step (fused_step.py: Triton kernels) can run a model of this shape on ``device``, else
    why not. Triton's interpreter (TRITON_INTERPRET=1) runs it on the CPU too, which is how the tests check it."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the fused step runs on a CUDA GPU"
    try:
        from . import fused_step
    except Exception as exc:  # noqa: BLE001 - no Triton, or one that does not load: the unfused step serves
        return f"Triton could not be imported ({type(exc).__name__}: {exc})"
    return fused_step.unsupported(args.head_dim)


def project(x: torch.Tensor, w, residual: torch.Tensor | None = None, wx: bool = False) -> torch.Tensor:
    """x [T, in] -> (residual +) x @ w.T [T, out], w [out, in] as stored by nn.Linear (or, on the CPU, a tuple of
    such weights whose outputs are concatenated: the unfused q|k|v and gate|up).

    F.linear (or addmm) by default, on every device. With ``wx`` on the CPU, as w @ x.T with a lone token doubled:
    F.linear of one token is a matrix-vector product, which MKL may run on one core (it did on a 2-core AMD EPYC),
    while two columns make it a matrix product on every core. Which form is faster depends on the CPU and the width,
    by about 2x either way: on that EPYC w @ x.T ran an AR step 1.4x and a 4-token pass 1.7x as fast as F.linear
    (assets/results/cpu_epyc_2core_fp32_pass_cost_by_width.json); on a 2-core Xeon with AMX F.linear ran AR about
    twice as fast as w @ x.T (engine/cpu_xeon_2core_fp32_heldout20_n4_t256_{wx,auto}.json in
    docs/archive/results-archive.tar.xz). So the fast engine times both forms per window width on the CPU it runs on
    (``FastEngine.tune``).
    """
    if wx and x.device.type == "cpu":
        xt = (x.repeat(2, 1) if x.shape[0] == 1 else x).t()
        out = torch.cat([torch.mm(wi, xt) for wi in w]) if isinstance(w, tuple) else torch.mm(w, xt)
        out = out[:, : x.shape[0]].t()  # [T, out], a view
    elif isinstance(w, tuple):
        out = torch.cat([F.linear(x, wi) for wi in w], dim=-1)
    else:
        return F.linear(x, w) if residual is None else torch.addmm(residual, x, w.t())
    return out if residual is None else residual + out


class StaticLlama(nn.Module):
    """Llama forward over a static KV cache; shares (or fuses copies of) the HF model's weights."""

    def __init__(self, hf_model, max_len: int, fused: bool | None = None, fused_step: bool | None = None):
        """``fused``: the GPU layout (fused copies of q|k|v and gate|up, gate and up computed as rows); by default
        on a GPU only. The tests set it on the CPU to check that layout's arithmetic against transformers.
        ``fused_step``: windows of up to FUSED_STEP_MAX tokens run as five Triton kernels a block (the fused
        layout, always); by default on a GPU where ``fused_step_problem`` finds none, unless $CLLM_FUSED_STEP is
        "off" (on the CPU only when asked for: Triton's interpreter, for the tests). The engine then keeps it only
        where it is the faster step (``FastEngine.choose_step``); $CLLM_FUSED_STEP=on keeps it without timing.
        True where it cannot run raises UnsupportedModel with the reason."""
        super().__init__()
        args = StaticArgs.from_config(hf_model.config)
        self.args = args
        self.max_len = max_len
        weight = hf_model.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self.embed = weight  # [V, dim]
        self.lm_head = hf_model.get_output_embeddings().weight  # [V, dim], the same tensor when tied
        self.final_norm = hf_model.model.norm.weight
        self.layers = []
        # On a GPU one GEMM instead of three (q|k|v) and two (gate|up): fewer kernels per step, for a fused copy of
        # those weights. On the CPU, where launches cost nothing, the model's own weights: no copy.
        problem = fused_step_problem(args, device)
        if fused_step and problem:
            raise UnsupportedModel(f"the fused step cannot run: {problem}")
        choice = os.environ.get(FUSED_STEP_ENV, "").lower()
        # chosen by default (not asked for, nor by $CLLM_FUSED_STEP=on): FastEngine.choose_step times it first
        self.fused_step_by_default = fused_step is None and choice != "on"
        if fused_step is None:
            fused_step = device.type == "cuda" and problem is None and choice != "off"
        self.fused_step = fused_step
        fused = (device.type != "cpu" or fused_step) if fused is None else fused or fused_step
        fuse = torch.cat if fused else tuple
        for layer in hf_model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "wqkv": fuse([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),  # [(H+2KV)*D, dim]
                "wo": att.o_proj.weight,  # [dim, H*D]
                "w13": fuse([mlp.gate_proj.weight, mlp.up_proj.weight]),  # [2I, dim]
                "w2": mlp.down_proj.weight,  # [dim, I]
                "attn_norm": layer.input_layernorm.weight,
                "mlp_norm": layer.post_attention_layernorm.weight,
            })
        if fused_step:  # where the fused step's split projections count their finished slices
            from . import fused_step as kernels

            rows = max(w.shape[0] for w in (self.layers[0]["wqkv"], self.layers[0]["wo"], self.layers[0]["w13"]))
            self.register_buffer("step_counters", kernels.counters(rows, device), persistent=False)
        cache_shape = (args.n_layers, 1, args.n_kv_heads, max_len, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, device=device, dtype=dtype), persistent=False)
        cos, sin = rope_tables(args, max_len, device, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("key_pos", torch.arange(max_len, device=device), persistent=False)
        # CPU only: window width -> whether its projections run as w @ x.T (project), set by FastEngine.tune; a width
        # not in it takes the choice of the next width up (past the widest, the widest's). Empty: F.linear everywhere.
        self.cpu_wx: dict[int, bool] = {}

    def uses_wx(self, T: int) -> bool:
        """Whether a forward of T tokens computes its projections as w @ x.T (``cpu_wx``)."""
        if not self.cpu_wx:
            return False
        widths = sorted(self.cpu_wx)
        return self.cpu_wx[next((w for w in widths if w >= T), widths[-1])]

    def uses_fused_step(self, T: int) -> bool:
        """Whether a forward of T tokens runs the fused step (``fused_step``, T <= FUSED_STEP_MAX)."""
        return self.fused_step and T <= FUSED_STEP_MAX

    def weight_bytes(self) -> int:
        """Bytes of weights one forward reads (the embedding rows it gathers are negligible)."""
        tensors = [self.lm_head, self.final_norm] + [
            t for layer in self.layers for w in layer.values() for t in (w if isinstance(w, tuple) else (w,))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_bytes(self, attend_len: int) -> int:
        """Bytes of K and V one forward reads when it attends to ``attend_len`` keys."""
        a = self.args
        return 2 * a.n_layers * a.n_kv_heads * attend_len * a.head_dim * self.k_cache.element_size()

    def mask(self, slots: torch.Tensor, anchors: torch.Tensor, groups: torch.Tensor, attend_len: int) -> torch.Tensor:
        """Additive mask for attention(): which cache entries each query row sees.

        Row t sees every key at a slot <= anchors[t] and, when groups[t] > 0, the keys this forward writes for rows of
        its own group at slots <= slots[t]. A plain window is anchors = slots, groups = 0: causal, key j visible to the
        query at slot p iff j <= p. A candidate n-gram verified beside the window (group g >= 1) is anchored at the
        window's first slot (the last accepted token) and sees its own earlier tokens, never the window's guesses.

        [T, 1, 1, L] for a window of up to PER_TOKEN_MAX tokens, [1, 1, T*n_rep, L] beyond (the two layouts)."""
        T = slots.shape[0]
        keys = self.key_pos[:attend_len]
        key_group = torch.full((attend_len,), -1, device=slots.device, dtype=groups.dtype).scatter(0, slots, groups)
        own_group = (key_group[None, :] == groups[:, None]) & (groups[:, None] > 0) & (keys[None, :] <= slots[:, None])
        visible = (keys[None, :] <= anchors[:, None]) | own_group  # [T, L]
        bias = torch.full((T, attend_len), float("-inf"), device=slots.device, dtype=self.cos.dtype)
        bias = bias.masked_fill(visible, 0.0)
        if T <= PER_TOKEN_MAX:
            return bias[:, None, None, :]
        n_rep = self.args.n_heads // self.args.n_kv_heads
        # rows in the grouped-query order of attention(): query t, then head r within its KV group
        return bias[:, None, :].expand(T, n_rep, attend_len).reshape(1, 1, T * n_rep, attend_len)

    def attention(self, i: int, x, cos, sin, slots, bias, attend_len: int, wx: bool = False) -> torch.Tensor:
        """Attention of block i on x [T, dim] -> [T, H*D]; writes K, V at the cache slots ``slots``."""
        a, w = self.args, self.layers[i]
        T, H, KV, D = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        qkv = project(x, w["wqkv"], wx=wx)  # [T, (H+2KV)*D]
        qk = qkv[:, : (H + KV) * D].view(T, H + KV, D)
        # rope on queries and keys at once; [x2, x1] by one cat (torch.roll copies a strided input first, and qk, a
        # column slice of qkv, is strided once T > 1: one kernel a layer more), sin carries the sign of rotate_half
        swapped = torch.cat((qk[..., D // 2 :], qk[..., : D // 2]), dim=-1)
        qk = qk * cos + swapped * sin  # [T, H+KV, D]
        v = qkv[:, (H + KV) * D :].view(T, KV, D)
        k_cache, v_cache = self.k_cache[i, 0], self.v_cache[i, 0]  # [KV, max_len, D]
        k_cache.index_copy_(1, slots, qk[:, H:].transpose(0, 1))
        v_cache.index_copy_(1, slots, v.transpose(0, 1))
        n_rep = H // KV
        if T <= PER_TOKEN_MAX:
            # Each token a batch row, the n_rep query heads of its KV group that row's queries: q and the output are
            # views of the projections (no permute copy) and K/V are expanded over the batch (no copy either).
            q = qk[:, :H].view(T, KV, n_rep, D)
            k = k_cache[None, :, :attend_len].expand(T, KV, attend_len, D)
            v = v_cache[None, :, :attend_len].expand(T, KV, attend_len, D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=D**-0.5)  # [T, KV, n_rep, D]
            return o.reshape(T, H * D)
        # Wide windows and prefill: one batch row, the n_rep query heads of a KV group become extra query rows
        # (two permute copies, but K/V are read once per KV head instead of once per token).
        q = qk[:, :H].view(T, KV, n_rep, D).permute(1, 0, 2, 3).reshape(1, KV, T * n_rep, D)
        k = k_cache[None, :, :attend_len]  # [1, KV, L, D]
        v = v_cache[None, :, :attend_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=D**-0.5)  # [1, KV, T*n_rep, D]
        return o.view(KV, T, n_rep, D).permute(1, 0, 2, 3).reshape(T, H * D)

    def block(self, i: int, x, cos, sin, slots, bias, attend_len: int, wx: bool = False) -> torch.Tensor:
        w, eps = self.layers[i], self.args.eps
        h = F.rms_norm(x, (x.shape[-1],), w["attn_norm"], eps)
        x = project(self.attention(i, h, cos, sin, slots, bias, attend_len, wx), w["wo"], residual=x, wx=wx)
        h = F.rms_norm(x, (x.shape[-1],), w["mlp_norm"], eps)
        if isinstance(w["w13"], tuple) or x.shape[0] < ROWS_MIN:  # the CPU's unfused weights, or a narrow window
            gate_up = project(h, w["w13"], wx=wx)  # [T, 2I]
            inter = gate_up.shape[-1] // 2
            return project(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w["w2"], residual=x, wx=wx)
        # On the GPU gate and up come out as rows, [2I, T]: each half is contiguous, so silu and the product run as
        # vectorised kernels (the halves of a [T, 2I] output are strided once T > 1), and the down projection reads
        # the [I, T] product transposed, without a copy.
        gate_up = torch.mm(w["w13"], h.t())
        inter = gate_up.shape[0] // 2
        return project((F.silu(gate_up[:inter]) * gate_up[inter:]).t(), w["w2"], residual=x, wx=wx)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, attend_len: int, last_only: bool = False,
                slots: torch.Tensor | None = None, anchors: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, wx: bool | None = None):
        """tokens, input_pos (RoPE positions): [T] int64 -> logits [T, V] (or [1, V] with last_only).

        By default row t is written to cache slot input_pos[t] and attends causally. ``slots``, ``anchors`` and
        ``groups`` ([T] int64 each, see ``mask``) let candidate rows share RoPE positions with the window while their
        K/V land in slots of their own. Attends to the first ``attend_len`` cache entries; the caller keeps every slot
        < attend_len <= max_len. ``wx`` forces the CPU's projection form (``project``); by default ``uses_wx``.
        """
        slots = input_pos if slots is None else slots
        anchors = slots if anchors is None else anchors
        groups = torch.zeros_like(slots) if groups is None else groups
        x = F.embedding(tokens, self.embed)  # [T, dim]
        cos = self.cos[input_pos][:, None, :]  # [T, 1, D]
        sin = self.sin[input_pos][:, None, :]
        bias = self.mask(slots, anchors, groups, attend_len)
        T = tokens.shape[0]
        if self.uses_fused_step(T):
            from . import fused_step

            cos, sin, bias = cos[:, 0], sin[:, 0], bias.view(T, attend_len)  # [T, D], [T, D], [T, L]
            for i, layer in enumerate(self.layers):
                x = fused_step.block(x, layer, self.k_cache[i, 0], self.v_cache[i, 0], cos, sin, slots, bias,
                                     self.args.eps, self.args.n_heads, self.step_counters)
        else:
            body_wx = self.uses_wx(T) if wx is None else wx
            for i in range(self.args.n_layers):
                x = self.block(i, x, cos, sin, slots, bias, attend_len, body_wx)
        if last_only:
            x = x[-1:]
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm, self.args.eps)
        return project(x, self.lm_head, wx=self.uses_wx(x.shape[0]) if wx is None else wx)

    @torch.no_grad()
    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of cache slots ``src`` to slots ``dst`` in every layer (a verified candidate's tokens to the
        slots after the last accepted token; their RoPE positions were already those of ``dst``)."""
        for cache in (self.k_cache, self.v_cache):
            cache.index_copy_(3, dst, cache.index_select(3, src))

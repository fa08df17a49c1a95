"""The fused step (decoding/fused_step.py: Triton kernels) against the unfused step and transformers, run by Triton's
interpreter on the CPU in float32: the same logits to rounding, the same K/V in the cache, the same texts token for
token. Skipped where Triton is not installed; on a GPU the same kernels run compiled (python -m decoding.fastcheck).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoding import DecodeConfig, ar_decode, fast, jacobi_decode, run
from decoding.llama_static import StaticLlama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama with heads of 32 (the smallest the kernels take), 2 query heads a KV head, an intermediate size
    that is no multiple of the kernels' blocks, in float32."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=101, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=None,
                    bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))
    return model.to(DEVICE).eval().requires_grad_(False)


def in_interpreter(check: str) -> None:
    """Run ``check`` (a function of this file) here on a GPU, else in a fresh process under Triton's interpreter,
    which must be switched on before Triton is first imported."""
    if torch.cuda.is_available():
        globals()[check]()
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, check], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fused_block_matches_the_unfused_one_and_transformers():
    in_interpreter("check_block")


def test_fused_engine_texts_equal_eager_ar():
    in_interpreter("check_texts")


SHAPES = {  # dim, query heads, KV heads, head size, intermediate size
    "SmolLM2-135M": (576, 9, 3, 64, 1536),
    "Llama-2-7B": (4096, 32, 32, 128, 11008),
}
H100_SHARED = 227 * 1024  # shared memory a block may use on an H100 (sm_90)
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the launch in ``calls`` instead of running it."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **named):
            self.calls.append((self.kernel, {**dict(zip(self.kernel.arg_names, args)), **named},
                               {"num_warps": num_warps, "num_stages": num_stages}))
        return launch


def launches(monkeypatch, shape: str, dtype: torch.dtype, T: int, L: int) -> list:
    """The kernel launches of one fused block (kernel, its arguments by name, its launch options) on an H100's 132
    multiprocessors with programmatic dependent launch, recorded by running ``fused_step.block`` on meta tensors
    with the kernels swapped for recorders."""
    from decoding import fused_step

    calls = []
    for name in ("_norm_qkv_rope", "_attention", "_linear_residual", "_norm_gate_up"):
        kernel = getattr(fused_step, name)
        if isinstance(kernel, Recorder):  # recorded before, in the same test
            kernel = kernel.kernel
        monkeypatch.setattr(fused_step, name, Recorder(kernel, calls))
    monkeypatch.setattr(fused_step, "_multiprocessors", lambda device: 132)
    # compiled and launched for programmatic dependent launch, as an H100 could
    monkeypatch.setattr(fused_step, "overlaps", lambda device: fused_step.PDL_MODES["start"])
    dim, H, KV, D, inter = SHAPES[shape]

    def t(*size, kind=dtype):
        return torch.empty(*size, dtype=kind, device="meta")

    weights = {"wqkv": t((H + 2 * KV) * D, dim), "wo": t(dim, H * D), "w13": t(2 * inter, dim), "w2": t(dim, inter),
               "attn_norm": t(dim), "mlp_norm": t(dim)}
    fused_step.block(t(T, dim), weights, t(KV, 1024, D), t(KV, 1024, D), t(T, D), t(T, D), t(T, kind=torch.int64),
                     t(T, L), 1e-5, H, t(64, kind=torch.int32))
    return calls


@pytest.mark.parametrize("shape, dtype", [("SmolLM2-135M", torch.bfloat16), ("SmolLM2-135M", torch.float32),
                                          ("Llama-2-7B", torch.bfloat16)])
def test_kernels_compile_for_an_h100_within_its_shared_memory(monkeypatch, shape, dtype):
    """Every kernel of a fused block, compiled by Triton for an H100 without a GPU (its compiler and ptxas come with
    the Triton package), at a single token and the widest window: it compiles, and a block's shared memory holds it
    (an H100 refused a launch that asked for 408 KiB; the engine then falls back to the unfused step)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for T in (1, 32):
        for kernel, args, options in launches(monkeypatch, shape, dtype, T, 512):
            signature, constants = {}, {}
            for p in kernel.params:
                value = args[p.name]
                if p.is_constexpr:
                    signature[p.name], constants[p.name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    signature[p.name] = TRITON_TYPES[value.dtype]
                else:
                    signature[p.name] = "i32" if isinstance(value, int) else "fp32"
            compiled = triton_compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options=options)
            assert compiled.metadata.shared <= H100_SHARED, (kernel.__name__, T, compiled.metadata.shared)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_token_is_split_alike_alone_and_in_a_window(monkeypatch, shape):
    """The attention's key parts and the projections' column slices are the same for a window of any width as for a
    single token, so each token's sums run in the same order either way: in bfloat16 a different order rounds
    differently, and a Jacobi text could then leave the AR text. (On an H200 in bfloat16, with the key parts chosen by
    tokens x KV heads, CLLM Jacobi texts left the AR text on 2 of 10 prompts. Triton's interpreter cannot show this
    bit for bit: numpy's matrix product rounds a row differently by its place in the tile.)"""
    def splits(T):
        return [{k: args[k] for k in ("S", "KS", "CHUNK") if k in args}
                for _, args, _ in launches(monkeypatch, shape, torch.bfloat16, T, 512)]

    assert splits(1) == splits(16) == splits(32)


@torch.no_grad()
def check_block():
    """Windows of 1 to 32 tokens after a prompt: logits as transformers' (plain windows) and as the unfused step's
    (candidate rows, their own masks), and the K/V each writes at its slots, to float32 rounding; the projections
    split over their columns (as on a card of 16 multiprocessors, fused_step.k_splits) and unsplit, as loops and
    unrolled."""
    model = small_llama()
    unfused = StaticLlama(model, 256, fused=True, fused_step=False)
    fused = StaticLlama(model, 256, fused_step=True)
    assert fused.fused_step and not unfused.fused_step
    prompt = torch.randint(0, 101, (10,), device=DEVICE)
    for m in (unfused, fused):
        m(prompt, torch.arange(10, device=DEVICE), 64)
    for T, L in ((1, 64), (5, 64), (16, 64), (17, 64), (32, 64), (1, 192), (5, 192), (17, 192)):
        # 192 keys: attention split into parts (fused_step.key_splits), one of them empty for a single token
        tokens = torch.randint(0, 101, (T,), device=DEVICE)
        pos = torch.arange(10, 10 + T, device=DEVICE)
        got = fused(tokens, pos, L)
        unfused(tokens, pos, L)  # writes the same slots of its own cache
        want = model(torch.cat([prompt, tokens])[None]).logits[0, 10:]
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-5), (T, L, (got - want).abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.allclose(fused.k_cache, unfused.k_cache, atol=1e-4)
        assert torch.allclose(fused.v_cache, unfused.v_cache, atol=1e-4)
    assert not fused.step_counters.any()  # each split projection left its counters as it found them
    # projections unsplit (each program walks all the columns): the same logits
    from decoding import fused_step

    fused_step.SPLIT_K_PROGRAMS = 0
    tokens, pos = torch.randint(0, 101, (5,), device=DEVICE), torch.arange(10, 15, device=DEVICE)
    want = model(torch.cat([prompt, tokens])[None]).logits[0, 10:]
    assert torch.allclose(fused(tokens, pos, 64), want, atol=2e-4, rtol=1e-5)
    # their slices as unrolled loops (fused_step.UNROLL), split and unsplit: the same logits
    for split in (None, 0):
        fused_step.SPLIT_K_PROGRAMS, fused_step.UNROLL = split, 32
        assert torch.allclose(fused(tokens, pos, 64), want, atol=2e-4, rtol=1e-5)
    fused_step.SPLIT_K_PROGRAMS, fused_step.UNROLL = None, 0
    # a window of 3 and two candidates of 2 anchored at its first slot (slots 10-16): each row's own mask
    rows = torch.tensor([10, 11, 12, 11, 12, 11, 12], device=DEVICE)
    slots = torch.arange(10, 17, device=DEVICE)
    anchors = torch.tensor([10, 11, 12, 10, 10, 10, 10], device=DEVICE)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2], device=DEVICE)
    tokens = torch.randint(0, 101, (7,), device=DEVICE)
    got = fused(tokens, rows, 64, slots=slots, anchors=anchors, groups=groups)
    want = unfused(tokens, rows, 64, slots=slots, anchors=anchors, groups=groups)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-5) and torch.equal(got.argmax(-1), want.argmax(-1))


def check_texts():
    """The fast engine on the fused step: AR, Jacobi with candidate n-grams and with branches give the eager AR text.
    The projections split in two (fewer programs than by default: the interpreter runs them one by one)."""
    from decoding import fused_step

    fused_step.SPLIT_K_PROGRAMS = 16
    model = small_llama(seed=1)
    engine = fast.prepare(model, fused_step=True, progress=None)
    assert engine.model.fused_step
    prompt = [5, 7, 9, 5, 7, 11, 3, 5, 7]
    ref = run(ar_decode, model, prompt, DecodeConfig(max_new_tokens=12)).tokens
    assert run(ar_decode, model, prompt, DecodeConfig(max_new_tokens=12), engine="fast").tokens == ref
    for extra in ({"candidates": 2, "candidate_len": 3}, {"branches": 2}):
        cfg = DecodeConfig(max_new_tokens=12, n=4, **extra)
        assert run(jacobi_decode, model, prompt, cfg, engine="fast").tokens == ref
    fast.release(model)


if __name__ == "__main__":
    globals()[sys.argv[1]]()

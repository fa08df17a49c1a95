"""The fused step: one Llama block as five Triton kernels, for windows of up to 32 tokens on a GPU.

A narrow window's forward is bound by kernel launches and latency, not by arithmetic or bytes: the unfused block runs
about eighteen kernels (the norms, RoPE, the cache writes, SiLU and the residual adds each apart from the four
projections and attention). Here a block is five:

1. ``_norm_qkv_rope``: RMSNorm, the q|k|v projection, RoPE on q and k, and K, V written into the cache at their slots;
2. ``_attention``: softmax(q k^T / sqrt(D) + bias) v over the first L cache entries, a program per (token, KV head)
   and part of the keys (a single token's attention to a few KV heads would otherwise occupy a few of the card's
   multiprocessors, each reading every key; ``key_splits``);
3. ``_linear_residual``: the output projection plus the residual, combining the attention's parts as it reads them;
4. ``_norm_gate_up``: RMSNorm, the gate|up projection and silu(gate) * up;
5. ``_linear_residual``: the down projection plus the residual.

The projections are GEMVs of a few rows, split two ways so that hundreds of programs share the weights' reads
(``k_splits``): a program computes BN output features for every token of the window (padded to 16 or 32 rows for
tl.dot) over one slice of the input's columns, and stores that partial sum; the last of a tile's slices to finish
(counted in a small buffer it resets) adds the partial sums in slice order, so the result does not depend on which
finished last, and applies the epilogue (RoPE and the cache writes, the residual, SiLU). One program walking all the
columns instead waits on one load after another: on an H100 that made the step 2.9 times as slow as the unfused
step, whose cuBLAS GEMVs split the columns too.

Rounding follows the unfused step: a projection's output is rounded to the model's dtype before RoPE and SiLU, as the
unfused kernels round it; a float32 model multiplies in true float32 (no TF32), so its text stays the eager model's,
token for token.

Importing this module needs Triton; ``llama_static`` imports it only where the fused step can run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BN = 16  # output features a program computes (tl.dot's smallest N)
BL = 64  # keys an attention program reads per iteration
# Attention programs to aim for by splitting the keys (key_splits): None, the card's multiprocessors; 0, no split
SPLIT_PROGRAMS: int | None = None
MAX_SPLITS = 16  # the output projection combines the parts in an unrolled loop: a bound on the code it compiles
# Programs a projection aims for by splitting its input's columns (k_splits): None, four per multiprocessor; 0, no
# split. At most MAX_K_SPLITS slices: the last one adds them in an unrolled loop
SPLIT_K_PROGRAMS: int | None = None
MAX_K_SPLITS = 32
# The projections' columns a program reads per iteration (the last one masked where they do not divide the input),
# and their launch settings: one pipeline stage, as a slice of a few blocks has nothing to overlap (two stages made an
# H200's AR step 2.5 times as slow: experiments.fused_sweep). 256 columns over three stages asked an H100 for 408 KiB
# of shared memory (227 KiB a block there)
BK = 64
NORM_BK = 256  # columns per load of the RMSNorm statistics, which every program of a norm kernel computes
LAUNCH = {"num_warps": 4, "num_stages": 1}
# A projection's slice of at most this many BK-column blocks runs as an unrolled loop (its loads free to be in flight
# together), a longer one as a loop; 0: always a loop. 0 by default until timed on a GPU: unrolled and unsplit
# (SPLIT_K_PROGRAMS 0), a projection needs no partial sums across programs (experiments.fused_sweep --unroll)
UNROLL = 0
# Programmatic dependent launch (Hopper and later: compute capability 9): a kernel may start before the one before it
# has finished; a projection loads its first block of weights, which no kernel writes, before it waits for that one.
# "start": each kernel lets the next launch as soon as its own programs run; "wait": once they have waited for the
# kernel before; "off": no overlap. Off by default: on an H100, for the 135M model, "start" made the AR step 0.10 ms
# slower and "wait" a window of 16 0.02 ms slower for 0.03 ms off the AR step
# (assets/results/h100_bf16_fused_step_pdl_sweep_random135m.json). Where the card lacks it, always off.
PDL = "off"
PDL_MODES = {"off": 0, "start": 1, "wait": 2}


def unsupported(head_dim: int) -> str | None:
    """None when the kernels fit a head size, else why not (RoPE pairs BN columns of each half of a head)."""
    if head_dim % (2 * BN) or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two and a multiple of {2 * BN}"
    return None


def key_splits(kv_heads: int, L: int, device: torch.device) -> tuple[int, int]:
    """(S, keys per part): attention over L keys split into S parts (a power of two up to MAX_SPLITS), so that a single
    token's programs (its KV heads) times S cover the card's multiprocessors, each part a whole number of BL-key
    blocks; the output projection combines the parts as it reads them. One part (no split) where the KV heads fill
    the card already, where the keys are one block, or where SPLIT_PROGRAMS is 0.

    The same S for a window of any width, as every other split here: a token's sums then run in the same order alone
    and in a window, so that in bfloat16 too a Jacobi text can equal the AR text. (With S chosen by tokens x KV heads,
    CLLM Jacobi texts left the AR text on 2 of 10 prompts on an H200 in bfloat16.)"""
    target = SPLIT_PROGRAMS if SPLIT_PROGRAMS is not None else _multiprocessors(device)
    blocks = triton.cdiv(L, BL)
    S = min(triton.next_power_of_2(triton.cdiv(target, kv_heads)), triton.next_power_of_2(blocks), MAX_SPLITS)
    if not target or S == 1:
        return 1, L
    return S, triton.cdiv(blocks, S) * BL


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # Triton's interpreter (the tests): a few parts, as on a small card
    return torch.cuda.get_device_properties(device).multi_processor_count


def k_splits(tiles: int, K: int, device: torch.device) -> tuple[int, int]:
    """(KS, columns per slice): a projection of ``tiles`` output tiles over K input columns split into KS slices of
    whole BK-column blocks, so that tiles x KS programs reach SPLIT_K_PROGRAMS (four per multiprocessor by default)."""
    target = SPLIT_K_PROGRAMS if SPLIT_K_PROGRAMS is not None else 4 * _multiprocessors(device)
    blocks = triton.cdiv(K, BK)
    KS = max(1, min(blocks, triton.cdiv(target, tiles), MAX_K_SPLITS))
    chunk = triton.cdiv(blocks, KS) * BK
    return triton.cdiv(K, chunk), chunk


def overlaps(device: torch.device) -> int:
    """How the kernels overlap on ``device``: PDL_MODES[PDL] on a card with programmatic dependent launch, else 0."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return PDL_MODES[PDL]
    return 0


def counters(rows: int, device: torch.device) -> torch.Tensor:
    """The zeroed counters that the split projections of a model whose widest projection has ``rows`` output
    features count their finished slices in (each kernel leaves them zero again). One buffer serves every block of
    a model, as its kernels run one after another on one stream."""
    return torch.zeros(triton.cdiv(rows, BN), device=device, dtype=torch.int32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 models: true float32 products, as the eager model's (tl.dot would use TF32)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _start(PDL: tl.constexpr):
    """With PDL 1 ("start"), let the next kernel launch now: its programs start as this kernel's finish and wait in
    ``_wait`` before they read anything this one writes."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait(PDL: tl.constexpr):
    """With PDL, wait until the kernel before this one has finished and its writes are visible (every program of
    every kernel launched with PDL calls this before it reads or writes what another kernel reads or writes); with
    PDL 2 ("wait"), then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _weights(w_ptr, rows, row_ok, cols, K):
    """The weight block w[rows, cols] [BN, BK] of w [*, K] (zero outside the rows in use and past K)."""
    return tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)


@triton.jit
def _rstd(x_ptr, T, DIM: tl.constexpr, eps, BT: tl.constexpr, NB: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the rows of x [T, DIM], float32 [BT] (its loads unrolled: all in flight at once)."""
    rt = tl.arange(0, BT)
    rk = tl.arange(0, NB)
    sumsq = tl.zeros((BT,), tl.float32)
    for k0 in tl.static_range(0, DIM, NB):
        cols = k0 + rk
        x = tl.load(x_ptr + rt[:, None] * DIM + cols[None, :], mask=(rt[:, None] < T) & (cols[None, :] < DIM),
                    other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return tl.rsqrt(sumsq / DIM + eps)


@triton.jit
def _norm_dot_pair(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, row_ok, T, DIM: tl.constexpr, eps, CHUNK: tl.constexpr,
                   BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr, UNROLL: tl.constexpr):
    """rms_norm(x) [T, DIM] times weight rows ``rows_a`` and ``rows_b`` of w [*, DIM], over this program's slice of
    the columns (program_id(1)): two [BT, BN] float32 partial sums. The slice's first block of weights is loaded
    before ``_wait``; x, which the kernel before writes, after it."""
    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    t_ok = rt[:, None] < T
    start = tl.program_id(1) * CHUNK
    wa = _weights(w_ptr, rows_a, row_ok, start + rk, DIM)
    wb = _weights(w_ptr, rows_b, row_ok, start + rk, DIM)
    _wait(PDL)
    rstd = _rstd(x_ptr, T, DIM, eps, BT, NB)
    acc_a = tl.zeros((BT, BN), tl.float32)
    acc_b = tl.zeros((BT, BN), tl.float32)
    if CHUNK // BK <= UNROLL:  # unrolled: every block's loads can be in flight at once
        for i in tl.static_range(CHUNK // BK):
            cols = start + i * BK + rk
            if i > 0:
                wa = _weights(w_ptr, rows_a, row_ok, cols, DIM)
                wb = _weights(w_ptr, rows_b, row_ok, cols, DIM)
            acc_a, acc_b = _norm_dots(acc_a, acc_b, wa, wb, x_ptr, nw_ptr, rstd, rt, t_ok, cols, DIM, IEEE)
    else:
        for k0 in range(start, start + CHUNK, BK):
            cols = k0 + rk
            if k0 > start:  # the first block's weights are loaded already
                wa = _weights(w_ptr, rows_a, row_ok, cols, DIM)
                wb = _weights(w_ptr, rows_b, row_ok, cols, DIM)
            acc_a, acc_b = _norm_dots(acc_a, acc_b, wa, wb, x_ptr, nw_ptr, rstd, rt, t_ok, cols, DIM, IEEE)
    return acc_a, acc_b


@triton.jit
def _norm_dots(acc_a, acc_b, wa, wb, x_ptr, nw_ptr, rstd, rt, t_ok, cols, DIM: tl.constexpr, IEEE: tl.constexpr):
    """acc_a, acc_b plus rms_norm(x) at columns ``cols`` times the weight blocks wa and wb [BN, BK]."""
    k_ok = cols < DIM
    x = tl.load(x_ptr + rt[:, None] * DIM + cols[None, :], mask=t_ok & k_ok[None, :], other=0.0)
    nw = tl.load(nw_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
    h = (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x.dtype)  # rounded once, as F.rms_norm's kernel
    acc_a += _dot(h, tl.trans(wa), IEEE)
    acc_b += _dot(h, tl.trans(wb), IEEE)
    return acc_a, acc_b


@triton.jit
def _store_part(acc, ws_ptr, slot, PARTS: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """Store this program's partial sum ``acc`` [BT, BN] (one of its tile's PARTS tiles, ``slot``) in the workspace
    [slices, tiles, PARTS, BT, BN] at (program_id(1), program_id(0))."""
    at = tl.arange(0, BT)[:, None] * BN + tl.arange(0, BN)[None, :]
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(ws_ptr + (tile * PARTS + slot) * BT * BN + at, acc)


@triton.jit
def _arrive(cnt_ptr, KS: tl.constexpr):
    """Count this program's slice as done (after every thread's partial sums are stored); True in the tile's last
    one, which resets the count for the next launch."""
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel") == KS - 1
    tl.store(cnt_ptr + tl.program_id(0), 0, mask=last)
    return last


@triton.jit
def _sum_parts(ws_ptr, slot, PARTS: tl.constexpr, KS: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """The full sum of the tile's ``slot`` over its KS slices, added in slice order (``.cg``: read from L2, where the
    other programs' stores are, not from this multiprocessor's L1)."""
    at = tl.arange(0, BT)[:, None] * BN + tl.arange(0, BN)[None, :]
    total = tl.zeros((BT, BN), tl.float32)
    for s in tl.static_range(KS):
        tile = s * tl.num_programs(0) + tl.program_id(0)
        total += tl.load(ws_ptr + (tile * PARTS + slot) * BT * BN + at, cache_modifier=".cg")
    return total


@triton.jit
def _reduce_pair(a, b, ws_ptr, cnt_ptr, KS: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """A norm kernel's two partial sums [BT, BN] over its slices: (a, b, last), their full sums in the tile's last
    program (``last`` True there; elsewhere a and b are left as they were, and nothing is stored with them)."""
    last = tl.program_id(1) == 0
    if KS > 1:
        _store_part(a, ws_ptr, 0, 2, BT, BN)
        _store_part(b, ws_ptr, 1, 2, BT, BN)
        last = _arrive(cnt_ptr, KS)
        if last:
            a = _sum_parts(ws_ptr, 0, 2, KS, BT, BN)
            b = _sum_parts(ws_ptr, 1, 2, KS, BT, BN)
    return a, b, last


@triton.jit(do_not_specialize=["T"])
def _norm_qkv_rope(x_ptr, nw_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, ws_ptr, cnt_ptr, T,
                   DIM: tl.constexpr, eps, max_len, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                   KS: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   NB: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, UNROLL: tl.constexpr):
    """Program (p, s): BN columns d of the first half of head p // PARTS (q heads, then k, then v) and the same columns
    of its second half, so that RoPE's pairs (d, d + D/2) meet in one program, over slice s of the input columns."""
    _start(PDL)
    PARTS: tl.constexpr = D // 2 // BN
    head = tl.program_id(0) // PARTS
    d = (tl.program_id(0) % PARTS) * BN + tl.arange(0, BN)
    rows_a = head * D + d
    rows_b = rows_a + D // 2
    a, b = _norm_dot_pair(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, d < D, T, DIM, eps, CHUNK, BT, BN, BK, NB, IEEE,
                          PDL, UNROLL)
    a, b, last = _reduce_pair(a, b, ws_ptr, cnt_ptr, KS, BT, BN)
    dtype = q_ptr.dtype.element_ty
    a = a.to(dtype).to(tl.float32)  # the projection's output, rounded as the unfused GEMM rounds it
    b = b.to(dtype).to(tl.float32)
    rt = tl.arange(0, BT)
    # the mask only in the tile's last program (tl.where: ``ok & last`` gives Triton's interpreter, which the tests
    # run, an integer tensor that it refuses as a mask)
    t_ok = tl.where(last, rt[:, None] < T, False)
    if head < H + KV:  # q and k: x * cos + rotate_half(x) * sin, the table's sin carrying rotate_half's sign
        at_a = rt[:, None] * D + d[None, :]
        ca = tl.load(cos_ptr + at_a, mask=t_ok, other=0.0).to(tl.float32)
        sa = tl.load(sin_ptr + at_a, mask=t_ok, other=0.0).to(tl.float32)
        cb = tl.load(cos_ptr + at_a + D // 2, mask=t_ok, other=0.0).to(tl.float32)
        sb = tl.load(sin_ptr + at_a + D // 2, mask=t_ok, other=0.0).to(tl.float32)
        a, b = ((a * ca).to(dtype).to(tl.float32) + (b * sa).to(dtype).to(tl.float32),
                (b * cb).to(dtype).to(tl.float32) + (a * sb).to(dtype).to(tl.float32))
    if head < H:  # q [T, H*D]
        out = q_ptr + rt[:, None] * (H * D) + rows_a[None, :]
    elif head < H + KV:  # the K cache [KV, max_len, D] at each row's slot
        slot = tl.load(slot_ptr + rt, mask=rt < T, other=0)
        out = k_ptr + (head - H) * max_len * D + slot[:, None] * D + d[None, :]
    else:  # the V cache
        slot = tl.load(slot_ptr + rt, mask=rt < T, other=0)
        out = v_ptr + (head - H - KV) * max_len * D + slot[:, None] * D + d[None, :]
    tl.store(out, a.to(dtype), mask=t_ok)
    tl.store(out + D // 2, b.to(dtype), mask=t_ok)


@triton.jit(do_not_specialize=["T", "L", "CHUNK"])
def _attention(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, m_ptr, l_ptr, T, L, CHUNK, max_len, scale, H: tl.constexpr,
               KV: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, SPLIT: tl.constexpr,
               IEEE: tl.constexpr, PDL: tl.constexpr):
    """Program (p, s): token p // KV against KV head p % KV, its H/KV query heads the rows; online softmax over keys
    s * CHUNK to (s + 1) * CHUNK of the first L. Without SPLIT (one part, s = 0): o [T, H*D], the output. With
    SPLIT: part s's unnormalised output o [S, T, H*D] (float32), its running maximum m and sum l [S, T, H], for
    ``_combine`` (a split that holds no key leaves m = -1e30 and l = 0: it weighs nothing there)."""
    _start(PDL)
    _wait(PDL)  # q and this step's keys and values come from the kernel before
    NREP: tl.constexpr = H // KV
    t = tl.program_id(0) // KV
    g = tl.program_id(0) % KV
    s = tl.program_id(1)
    r = tl.arange(0, BR)
    r_ok = (r < NREP)[:, None]
    dd = tl.arange(0, D)
    at_q = t * H * D + (g * NREP + r)[:, None] * D + dd[None, :]
    q = tl.load(q_ptr + at_q, mask=r_ok, other=0.0)
    m = tl.full((BR,), -1e30, tl.float32)  # finite: a block of masked keys gives exp(-inf) = 0, never NaN
    total = tl.zeros((BR,), tl.float32)
    acc = tl.zeros((BR, D), tl.float32)
    base = g * max_len * D
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for j0 in range(lo, hi, BL):
        j = j0 + tl.arange(0, BL)
        j_ok = j < hi
        at_kv = base + j[:, None] * D + dd[None, :]
        k = tl.load(k_ptr + at_kv, mask=j_ok[:, None], other=0.0)
        sc = _dot(q, tl.trans(k), IEEE) * scale
        sc += tl.load(bias_ptr + t * L + j, mask=j_ok, other=float("-inf")).to(tl.float32)[None, :]
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + at_kv, mask=j_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    if SPLIT:
        tl.store(o_ptr + s * T * H * D + at_q, acc, mask=r_ok)
        at_ml = (s * T + t) * H + g * NREP + r
        tl.store(m_ptr + at_ml, m, mask=r < NREP)
        tl.store(l_ptr + at_ml, total, mask=r < NREP)
    else:
        tl.store(o_ptr + at_q, (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _combine(o_ptr, m_ptr, l_ptr, rt, cols, ok, T, K, S: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
             BK: tl.constexpr):
    """The attention output at rows rt, columns cols of [T, K = H*D] from ``_attention``'s S parts: each part's
    sum weighed by exp(its maximum - the largest), over the parts' weighed sums of exp. Float32 [BT, BK]."""
    H = K // D
    at_ml = rt[:, None] * H + (cols // D)[None, :]
    at_o = rt[:, None] * K + cols[None, :]
    top = tl.full((BT, BK), -1e30, tl.float32)
    for s in tl.static_range(S):
        top = tl.maximum(top, tl.load(m_ptr + s * T * H + at_ml, mask=ok, other=-1e30))
    num = tl.zeros((BT, BK), tl.float32)
    den = tl.zeros((BT, BK), tl.float32)
    for s in tl.static_range(S):
        weight = tl.exp(tl.load(m_ptr + s * T * H + at_ml, mask=ok, other=-1e30) - top)
        num += weight * tl.load(o_ptr + s * T * K + at_o, mask=ok, other=0.0)
        den += weight * tl.load(l_ptr + s * T * H + at_ml, mask=ok, other=0.0)
    return num / tl.where(ok, den, 1.0)


@triton.jit(do_not_specialize=["T"])
def _linear_residual(x_ptr, w_ptr, res_ptr, out_ptr, m_ptr, l_ptr, ws_ptr, cnt_ptr, T, N, K, S: tl.constexpr,
                     D: tl.constexpr, KS: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, UNROLL: tl.constexpr):
    """out [T, N] = res + x [T, K] @ w[N, K]^T, the sum rounded once (as cuBLAS's addmm); program (p, s): BN output
    features over slice s of the columns. S > 1: x is the attention output in ``_attention``'s S parts (m_ptr,
    l_ptr theirs, D the head size), combined as it is read and rounded to the model's dtype, as the unsplit
    attention rounds its output. The slice's first block of weights is loaded before ``_wait``."""
    _start(PDL)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rows < N
    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    t_ok = rt[:, None] < T
    start = tl.program_id(1) * CHUNK
    w = _weights(w_ptr, rows, n_ok, start + rk, K)
    _wait(PDL)
    acc = tl.zeros((BT, BN), tl.float32)
    if CHUNK // BK <= UNROLL:  # unrolled: every block's loads can be in flight at once
        for i in tl.static_range(CHUNK // BK):
            cols = start + i * BK + rk
            if i > 0:
                w = _weights(w_ptr, rows, n_ok, cols, K)
            acc = _input_dot(acc, w, x_ptr, m_ptr, l_ptr, rt, t_ok, cols, T, K, S, D, BT, BK, IEEE)
    else:
        for k0 in range(start, start + CHUNK, BK):
            cols = k0 + rk
            if k0 > start:  # the first block's weights are loaded already
                w = _weights(w_ptr, rows, n_ok, cols, K)
            acc = _input_dot(acc, w, x_ptr, m_ptr, l_ptr, rt, t_ok, cols, T, K, S, D, BT, BK, IEEE)
    last = tl.program_id(1) == 0
    if KS > 1:
        _store_part(acc, ws_ptr, 0, 1, BT, BN)
        last = _arrive(cnt_ptr, KS)
        if last:
            acc = _sum_parts(ws_ptr, 0, 1, KS, BT, BN)
    at = rt[:, None] * N + rows[None, :]
    ok = tl.where(last, t_ok & n_ok[None, :], False)  # the mask only in the tile's last program
    acc += tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _input_dot(acc, w, x_ptr, m_ptr, l_ptr, rt, t_ok, cols, T, K, S: tl.constexpr, D: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """acc plus x at columns ``cols`` times the weight block w [BN, BK] (x as ``_linear_residual`` reads it)."""
    k_ok = cols[None, :] < K
    if S > 1:
        x = _combine(x_ptr, m_ptr, l_ptr, rt, cols, t_ok & k_ok, T, K, S, D, BT, BK).to(w.dtype)
    else:
        x = tl.load(x_ptr + rt[:, None] * K + cols[None, :], mask=t_ok & k_ok, other=0.0)
    acc += _dot(x, tl.trans(w), IEEE)
    return acc


@triton.jit(do_not_specialize=["T"])
def _norm_gate_up(x_ptr, nw_ptr, w_ptr, out_ptr, ws_ptr, cnt_ptr, T, DIM: tl.constexpr, INTER, eps,
                  KS: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  NB: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, UNROLL: tl.constexpr):
    """out [T, INTER] = silu(gate) * up of rms_norm(x), w = gate|up [2 INTER, DIM]; program (p, s): BN features over
    slice s of the columns."""
    _start(PDL)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rows < INTER
    gate, up = _norm_dot_pair(x_ptr, nw_ptr, w_ptr, rows, rows + INTER, n_ok, T, DIM, eps, CHUNK, BT, BN, BK, NB,
                              IEEE, PDL, UNROLL)
    gate, up, last = _reduce_pair(gate, up, ws_ptr, cnt_ptr, KS, BT, BN)
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)  # each rounded as the unfused kernels round them
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    rt = tl.arange(0, BT)
    tl.store(out_ptr + rt[:, None] * INTER + rows[None, :], (act * up).to(dtype),
             mask=tl.where(last, (rt[:, None] < T) & n_ok[None, :], False))


def block(x: torch.Tensor, w: dict, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor, eps: float, n_heads: int,
          count: torch.Tensor) -> torch.Tensor:
    """One Llama block on x [T, dim] (T <= llama_static.FUSED_STEP_MAX) -> [T, dim], writing K, V at ``slots`` of the
    block's caches.

    ``w``: the fused layout's weights (StaticLlama.layers[i]); caches [KV, max_len, D]; cos, sin [T, D] (the rows'
    RoPE tables, sin signed); slots [T] int64; bias [T, L]: 0 where a row sees a key, -inf elsewhere; ``count``: the
    model's ``counters``."""
    T, dim = x.shape
    KV, max_len, D = k_cache.shape
    H = n_heads
    inter = w["w2"].shape[1]
    BT = 16 if T <= 16 else 32
    pdl = overlaps(x.device)
    overlap = dict(PDL=pdl, launch_pdl=True) if pdl else dict(PDL=0)
    common = dict(BT=BT, BN=BN, BK=BK, IEEE=x.dtype == torch.float32, UNROLL=UNROLL, **overlap, **LAUNCH)

    def split(tiles: int, K: int, parts: int = 1) -> tuple[tuple[int, int], dict, torch.Tensor]:
        """A projection's grid, its slices' settings and its workspace for the partial sums."""
        KS, chunk = k_splits(tiles, K, x.device)
        ws = torch.empty(KS * tiles * parts * BT * BN if KS > 1 else 1, device=x.device, dtype=torch.float32)
        return (tiles, KS), dict(KS=KS, CHUNK=chunk), ws

    q = torch.empty(T, H * D, device=x.device, dtype=x.dtype)
    grid, slices, ws = split((H + 2 * KV) * (D // 2 // BN), dim, 2)
    _norm_qkv_rope[grid](x, w["attn_norm"], w["wqkv"], cos, sin, slots, q, k_cache, v_cache, ws, count, T, dim, eps,
                         max_len, H=H, KV=KV, D=D, NB=NORM_BK, **slices, **common)
    L = bias.shape[-1]
    S, chunk = key_splits(KV, L, x.device)
    if S == 1:
        o = m = l = torch.empty_like(q)  # m, l: not read
    else:
        o = torch.empty(S, T, H * D, device=x.device, dtype=torch.float32)
        m = torch.empty(S, T, H, device=x.device, dtype=torch.float32)
        l = torch.empty_like(m)
    _attention[(T * KV, S)](q, k_cache, v_cache, bias, o, m, l, T, L, chunk, max_len, D ** -0.5, H=H, KV=KV, D=D,
                            BR=max(16, triton.next_power_of_2(H // KV)), BL=BL, SPLIT=S > 1, IEEE=common["IEEE"],
                            num_warps=4, num_stages=3, **overlap)
    mid = torch.empty_like(x)
    grid, slices, ws = split(triton.cdiv(dim, BN), H * D)
    _linear_residual[grid](o, w["wo"], x, mid, m, l, ws, count, T, dim, H * D, S=S, D=D, **slices, **common)
    act = torch.empty(T, inter, device=x.device, dtype=x.dtype)
    grid, slices, ws = split(triton.cdiv(inter, BN), dim, 2)
    _norm_gate_up[grid](mid, w["mlp_norm"], w["w13"], act, ws, count, T, dim, inter, eps, NB=NORM_BK, **slices,
                        **common)
    out = torch.empty_like(x)
    grid, slices, ws = split(triton.cdiv(dim, BN), inter)
    _linear_residual[grid](act, w["w2"], mid, out, act, act, ws, count, T, dim, inter, S=1, D=D, **slices, **common)
    return out

"""Flash attention: the FlashAttention-2 schedule, forward and backward in Triton.

Owns `flash_attention` (the public function), its autograd Function, the launchers, the kernels and
`flash_attention_reference` (plain torch, the same function).

Shapes: q, k, v are (batch, heads, seq, head_dim) with one seq for all three; head_dim is 32, 64
or 128; seq is any length (blocks past the end are masked); dtype float16, bfloat16 or float32,
the same for all three. The output has q's shape and dtype.

Forward: one program per (query block, batch*head) streams the key/value blocks with an online
softmax in float32 (base-2 exponentials), writes O and the log-sum-exp of each query row
(batch, heads, seq) in float32, which is all the backward keeps besides the inputs.
Backward: a small kernel computes delta = rowsum(dO * O); one program per key block accumulates
dK and dV over the query blocks; one program per query block accumulates dQ over the key blocks.
No atomics. Causal attention masks key j > query i and skips the blocks above the diagonal.
Launch settings: each kernel's blocks, warps and pipeline stages are autotuned on a GPU per
sequence length, head dim, mask and dtype (`_GPU_CONFIGS`).
"""
import math

import torch

from ._utils import (KERNELS_INTERPRETED, SUPPORTED_DTYPES, Autotuned, check_float,
                     check_same_device, drop_blocks_longer_than, tl, triton, triton_runs_on)

SUPPORTED_HEAD_DIMS = (32, 64, 128)
# Kernels read only constexpr globals, put on the right of tensors in products (the interpreter
# cannot multiply a constexpr by a tensor). The kernels use exp2: scores are scaled by 1 / ln 2.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _keep_mask(rows, cols, seq_len, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the scores to keep: keys inside the sequence, causal if asked."""
    keep = cols[None, :] < seq_len
    if CAUSAL:
        keep = keep & (rows[:, None] >= cols[None, :])
    return keep


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptr, v_ptr, rows, lo, hi, seq_len, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the key/value blocks [lo, hi) into the running (acc, max, sum) of the query block."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_offsets = cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK:
            s = tl.where(_keep_mask(rows, cols, seq_len, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, seq_len, sm_scale,
                     CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * seq_len * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + base + q_offsets, mask=rows[:, None] < seq_len, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL:  # blocks left of the diagonal need no mask; the diagonal ones do
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:  # only the last, partial block needs the sequence mask
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + base, V + base, rows, 0, full_end, seq_len,
                               qk_scale, False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + base, V + base, rows, full_end, masked_end,
                               seq_len, qk_scale, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
                               HEAD_DIM)
    acc = acc / l_i[:, None]
    tl.store(O + base + q_offsets, acc.to(O.dtype.element_ty), mask=rows[:, None] < seq_len)
    lse = (m_i + tl.log2(l_i)) * LN2  # natural log-sum-exp of the scaled scores
    tl.store(LSE + bh * seq_len + rows, lse, mask=rows < seq_len)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = sum(dO[row] * O[row]) over the head dimension, in float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offsets, mask=rows[:, None] < n_rows, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=rows[:, None] < n_rows, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, cols, lo, hi, seq_len,
                    qk_scale, MASK: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate the key block's dK, dV over the query blocks [lo, hi).

    Query rows past the sequence load as zeros (q, dO, lse, delta), so they add nothing."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        in_seq = rows < seq_len
        offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + offsets, mask=in_seq[:, None], other=0.0)
        do = tl.load(do_ptr + offsets, mask=in_seq[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_ptr + rows, mask=in_seq, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=in_seq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASK:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, seq_len, sm_scale,
                          CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * seq_len * HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offsets = cols[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + base + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
    v = tl.load(V + base + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL:  # queries on the diagonal need the mask, those below it do not
        masked_end = tl.minimum(start_n + BLOCK_N, seq_len)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + base, DO + base, LSE + bh * seq_len,
                                 DELTA + bh * seq_len, cols, start_n, masked_end, seq_len, qk_scale,
                                 True, UPCAST, DOT_PRECISION, BLOCK_M, HEAD_DIM)
        full_start = start_n + BLOCK_N
    else:
        full_start = 0
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + base, DO + base, LSE + bh * seq_len,
                             DELTA + bh * seq_len, cols, full_start, seq_len, seq_len, qk_scale,
                             False, UPCAST, DOT_PRECISION, BLOCK_M, HEAD_DIM)
    tl.store(DK + base + kv_offsets, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=cols[:, None] < seq_len)
    tl.store(DV + base + kv_offsets, dv.to(DV.dtype.element_ty), mask=cols[:, None] < seq_len)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, rows, lo, hi, seq_len, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate the query block's dQ over the key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_offsets = cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_keep_mask(rows, cols, seq_len, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, seq_len, sm_scale,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * seq_len * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = rows < seq_len
    offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + base + offsets, mask=in_seq[:, None], other=0.0)
    do = tl.load(DO + base + offsets, mask=in_seq[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + bh * seq_len + rows, mask=in_seq, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * seq_len + rows, mask=in_seq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL:
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K + base, V + base, rows, 0, full_end, seq_len,
                       qk_scale, False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K + base, V + base, rows, full_end, masked_end,
                       seq_len, qk_scale, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    tl.store(DQ + base + offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_seq[:, None])


def _configs(shapes) -> list:
    """triton.Config of each (BLOCK_M, BLOCK_N, warps, stages)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# GPU configs of each kernel, in the style of Triton's FlashAttention-2 tutorial: for
# float16/bfloat16 (tensor-core dots) a few to tune among; for float32 (exact dots, not a fast
# path) one config of small blocks, 8 warps (4 take several times longer to compile). BLOCK_M is a
# multiple of BLOCK_N in the forward and dQ kernels, BLOCK_N of BLOCK_M in the dK/dV kernel: the
# causal loops rely on it.
_GPU_CONFIGS = {
    "fwd": {"half": _configs(((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                              (128, 128, 8, 3), (64, 64, 4, 4))),
            "float32": _configs(((64, 32, 8, 2),))},
    "dkdv": {"half": _configs(((32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2))),
             "float32": _configs(((32, 64, 8, 2),))},
    "dq": {"half": _configs(((128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2))),
           "float32": _configs(((64, 32, 8, 2),))},
}
# Under the interpreter: blocks small enough that the tests cover several blocks.
_INTERPRETER_CONFIGS = {"fwd": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}),
                        "dkdv": triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}),
                        "dq": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
# The block each kernel's grid splits the sequence into: longer ones than the sequence are pruned.
_GRID_BLOCK = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}
# _TUNED[kernel][precision]: the kernel autotuned per sequence length, head dim, mask and dtype.
_TUNED = {
    name: {precision: Autotuned(
        _KERNELS[name], configs, _INTERPRETER_CONFIGS[name],
        key=["seq_len", "HEAD_DIM", "CAUSAL"],
        prune_configs_by={"early_config_prune": drop_blocks_longer_than("seq_len",
                                                                        _GRID_BLOCK[name])})
        for precision, configs in by_precision.items()}
    for name, by_precision in _GPU_CONFIGS.items()
}


def _dot_options(dtype: torch.dtype) -> dict:
    """UPCAST and DOT_PRECISION of the kernels for ``dtype``: under the interpreter, bfloat16 is
    upcast to float32 in the kernel (the interpreter's bfloat16 arithmetic is wrong) and every
    dot is exact; on a GPU, float16/bfloat16 dots run on tensor cores, float32 ones exactly."""
    if KERNELS_INTERPRETED:
        return dict(UPCAST=dtype == torch.bfloat16, DOT_PRECISION="ieee")
    return dict(UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


_DOT_OPTIONS = {dtype: _dot_options(dtype) for dtype in SUPPORTED_DTYPES}


def _precision(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


def _flash_attention_forward(q, k, v, causal, sm_scale):
    batch, heads, seq_len, head_dim = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    _TUNED["fwd"][_precision(q.dtype)][
        lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)](
        q, k, v, o, lse, seq_len, sm_scale, CAUSAL=causal, HEAD_DIM=head_dim,
        **_DOT_OPTIONS[q.dtype])
    return o, lse


def _flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale):
    batch, heads, seq_len, head_dim = q.shape
    do = do.contiguous()
    delta = torch.empty_like(lse)
    n_rows = batch * heads * seq_len
    _attn_bwd_delta_kernel[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, HEAD_DIM=head_dim,
                                                      BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    precision = _precision(q.dtype)
    options = dict(CAUSAL=causal, HEAD_DIM=head_dim, **_DOT_OPTIONS[q.dtype])
    _TUNED["dkdv"][precision][lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * heads)](
        q, k, v, do, lse, delta, dk, dv, seq_len, sm_scale, **options)
    _TUNED["dq"][precision][lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)](
        q, k, v, do, lse, delta, dq, seq_len, sm_scale, **options)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves q, k, v, O and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _flash_attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; "
                             "q, k and v must have the same (batch, heads, seq, head_dim)")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; use one dtype")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q has head_dim {q.shape[-1]}; flash_attention supports head_dim "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")


def flash_attention_reference(q, k, v, causal=True, softmax_scale=None):
    """Plain-torch attention, softmax in float32: softmax(q k^T * scale, causal mask) v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, S, S)
    if causal:
        seq = q.shape[-2]
        above = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """Scaled dot-product attention with the Triton flash-attention kernels.

    Args:
        q, k, v: (batch, heads, seq, head_dim) tensors of one dtype (float16, bfloat16, float32)
            on one device; head_dim 32, 64 or 128. Non-contiguous inputs are copied.
        causal: mask key j > query i.
        softmax_scale: multiplies q k^T; default 1 / sqrt(head_dim).
    Returns:
        (batch, heads, seq, head_dim), q's dtype. Runs `flash_attention_reference` where the
        kernels cannot run (a CPU without ``TRITON_INTERPRET=1``) and for empty inputs.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.numel() == 0 or not triton_runs_on(q.device):
        return flash_attention_reference(q, k, v, causal, scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale)

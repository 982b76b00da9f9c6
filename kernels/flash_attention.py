"""Flash attention: the FlashAttention-2 schedule, forward and backward in Triton.

Owns `flash_attention` and `flash_attention_qkvpacked` (the public functions), their autograd
Functions, the launchers, the kernels and `flash_attention_reference` (plain torch).

Shapes: q, k, v are (batch, heads, seq, head_dim) with one seq for all three; head_dim is 32, 64
or 128; seq is any length (blocks past the end are masked); dtype float16, bfloat16 or float32,
the same for all three. The output has q's shape and dtype. The kernels take every tensor's
(batch, head, seq) strides (head_dim contiguous): q, k and v sharing one layout (views into one
packed tensor) are read in place, the output is written in q's memory order, and the packed form
(qkv as (batch, seq, 3, heads, head_dim)) writes its gradient into one tensor of qkv's layout.

Forward: one program per (batch*head, query block) streams the key/value blocks with an online
softmax in float32 (base-2 exponentials), writes O and the log-sum-exp of each query row
(batch, heads, seq) in float32, which is all the backward keeps besides the inputs.
Backward: a small kernel computes delta = rowsum(dO * O); one program per key block accumulates
dK and dV over the query blocks; one program per query block accumulates dQ over the key blocks.
No atomics. Causal attention masks key j > query i and skips the blocks above the diagonal.
Grids are (batch*heads, blocks): programs launch in order of their index, batch*head fastest, so
every head's first block starts before any head's second; under the causal mask the forward and
dQ kernels number the query blocks from the last, so the longest programs start first and the
shortest fill the last wave (dK/dV's first key blocks are already its longest).
Dropout on the attention probabilities (``dropout_p > 0``), as flash-attn does it: no mask is
stored; every kernel draws it again from a counter-based generator (Philox4x32-10, keyed by a
64-bit seed) at the same (batch*head, query row, key column), so the backward drops exactly what
the forward dropped. One Philox call gives eight 16-bit numbers, for eight neighbouring key
columns; a probability is kept when its number is >= round(dropout_p * 65536), so the rate in
effect is dropout_p rounded to a multiple of 1/65536, and the kept ones are scaled by the inverse
of that rate's keep probability (the expectation is exact). `dropout_keep_mask` computes the same
mask in plain torch, and `flash_attention_reference(..., seed=s)` uses it: the kernels and the
reference drop the same probabilities for one seed. Without a seed, one is drawn from torch's
default generator on the inputs' device (so `torch.manual_seed` and the model's tensor-parallel
RNG stream decide the masks, and a CUDA graph draws a new one on every replay).
Document masks (``document_ids``, Megatron's reset_attention_mask): a packed window of several
documents gives each token its document's id, (batch, seq) integers that never decrease along a
row; query i then attends key j only when their ids are equal (and j <= i when causal), so each
document attends only to itself. The launcher converts the ids once to a contiguous int32
(batch, seq) tensor; every kernel (forward, dK/dV, dQ) reads the ids of its rows and columns
(program_id(0) // heads is the batch row) and masks every block, the unmasked ("full") ones too;
in the forward a row may see no key of a whole block (its running max stays -inf), which adds
nothing. Under the causal mask the kernels also skip the blocks no document reaches: the forward
and dQ start at the key block holding the start of their first row's document, and dK/dV stops
after the query block holding the end of its last key's document (found by counting blocks by
their first or last ids, many blocks a load), so a window of short documents costs about what
they cost apart (non-causal attention skips nothing more). Every query sees at least itself, so
no row is empty; dropout draws the same masks with and without documents. `check_document_ids`
is the ids' input check, for every attention backend.

Launch settings: each kernel's blocks, warps and pipeline stages are autotuned on a GPU per
sequence length, head dim, mask, dropout, documents and dtype (`_GPU_CONFIGS`).
"""
import math

import torch

from ._utils import (KERNELS_INTERPRETED, SUPPORTED_DTYPES, Autotuned, cdiv, check_float,
                     check_same_device, drop_blocks_longer_than, tl, triton, triton_runs_on)

SUPPORTED_HEAD_DIMS = (32, 64, 128)
# Kernels read only constexpr globals, put on the right of tensors in products (the interpreter
# cannot multiply a constexpr by a tensor). The kernels use exp2: scores are scaled by 1 / ln 2.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Document masks: the blocks a program skips are counted this many blocks at a time.
SEARCH_BLOCKS = tl.constexpr(64)
# Dropout compares 16-bit random numbers with round(dropout_p * DROPOUT_LEVELS).
DROPOUT_LEVELS = 1 << 16
# Philox4x32's constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011),
# for `dropout_keep_mask`'s plain-torch copy of the generator the kernels call (`tl.philox`).
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


@triton.jit
def _dropout_keep(seed, rows, start_n, threshold, BLOCK_N: tl.constexpr):
    """(len(rows), BLOCK_N) bool: which probabilities of query rows `rows` and key columns
    [start_n, start_n + BLOCK_N) dropout keeps (start_n a multiple of 8), for this program's
    batch*head. Philox's counter is (column // 8, row, batch*head, 0); its four 32-bit outputs
    r_i, cut into low and high halves h, give column 8 * (column // 8) + 4 * h + i its number."""
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    zeros = tl.zeros([rows.shape[0], BLOCK_N // 8], tl.int32)
    c0 = (groups[None, :] + zeros).to(tl.uint32)
    c1 = (rows[:, None] + zeros).to(tl.uint32)
    c2 = (zeros + tl.program_id(0)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zeros.to(tl.uint32))
    h0 = tl.interleave(r0 & 0xFFFF, r0 >> 16)                       # column 8g + 4h (+ i)
    h1 = tl.interleave(r1 & 0xFFFF, r1 >> 16)
    h2 = tl.interleave(r2 & 0xFFFF, r2 >> 16)
    h3 = tl.interleave(r3 & 0xFFFF, r3 >> 16)
    numbers = tl.interleave(tl.interleave(h0, h2), tl.interleave(h1, h3))
    return numbers >= threshold


@triton.jit
def _keep_mask(rows, cols, seq_len, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the scores to keep: keys inside the sequence, causal if asked."""
    keep = cols[None, :] < seq_len
    if CAUSAL:
        keep = keep & (rows[:, None] >= cols[None, :])
    return keep


@triton.jit
def _document_ids(doc_ptr, idx, seq_len):
    """The document ids of positions `idx`; those past the sequence end read the last one's, so
    a query row past the end is never empty (no NaN), and the sequence masks (or the stores)
    keep such rows and columns out of every result as without documents."""
    return tl.load(doc_ptr + tl.minimum(idx, seq_len - 1))


@triton.jit
def _first_key_block(doc_ptr, start_m, BLOCK_N: tl.constexpr):
    """Causal forward and dQ with documents: the first key block the query block at `start_m`
    needs. The key blocks before it end before its first row's document: their last ids are
    smaller (ids never decrease), counted SEARCH_BLOCKS blocks at a time in one parallel load
    each (no chain of dependent loads)."""
    target = tl.load(doc_ptr + start_m)
    before = start_m * 0
    for chunk in range(0, start_m, SEARCH_BLOCKS * BLOCK_N):
        last = chunk + tl.arange(0, SEARCH_BLOCKS) * BLOCK_N + BLOCK_N - 1
        ids = tl.load(doc_ptr + last, mask=last < start_m, other=0)
        before += tl.sum(((ids < target) & (last < start_m)).to(tl.int32), 0)
    return before * BLOCK_N


@triton.jit
def _query_end(doc_ptr, start_n, last_key, seq_len, BLOCK_M: tl.constexpr):
    """Causal dK/dV with documents: where the query blocks that can see the key block at
    `start_n` (last key `last_key`) end: those from start_n on whose first row is of the last
    key's document or an earlier one (a prefix: ids never decrease), counted as in
    `_first_key_block`."""
    target = tl.load(doc_ptr + last_key)
    needed = start_n * 0
    for chunk in range(start_n, seq_len, SEARCH_BLOCKS * BLOCK_M):
        first = chunk + tl.arange(0, SEARCH_BLOCKS) * BLOCK_M
        ids = tl.load(doc_ptr + first, mask=first < seq_len, other=0)
        needed += tl.sum(((ids <= target) & (first < seq_len)).to(tl.int32), 0)
    return tl.minimum(start_n + needed * BLOCK_M, seq_len)


@triton.jit
def _document_offset(n_heads, seq_len):
    """Where this program's batch row starts in the (batch, seq) int32 document ids."""
    return (tl.program_id(0) // n_heads).to(tl.int64) * seq_len


@triton.jit
def _tile(idx, stride, HEAD_DIM: tl.constexpr):
    """Offsets of rows `idx` (seq positions) x head_dim of a tensor whose seq stride is `stride`,
    in int64: a packed tensor's seq stride times its length can pass 2**31."""
    return idx.to(tl.int64)[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_kv(k_ptr, v_ptr, cols, stride_s, seq_len, MASK: tl.constexpr, UPCAST: tl.constexpr,
             HEAD_DIM: tl.constexpr):
    """The key and value rows `cols`. The loops' unmasked blocks (MASK false: left of the causal
    diagonal, or before the last partial block) lie inside the sequence, so they load without a
    bounds mask; the masked ones load zeros past its end."""
    offsets = _tile(cols, stride_s, HEAD_DIM)
    if MASK:
        k = tl.load(k_ptr + offsets, mask=cols[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptr + offsets, mask=cols[:, None] < seq_len, other=0.0)
    else:
        k = tl.load(k_ptr + offsets)
        v = tl.load(v_ptr + offsets)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptr, v_ptr, doc_ptr, row_docs, stride_s, rows, lo, hi,
               seq_len, qk_scale, seed, threshold, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, DROPOUT: tl.constexpr, DOCUMENTS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the key/value blocks [lo, hi) into the running (acc, max, sum) of the query block.
    With dropout the sum counts every probability and acc only the kept ones (unscaled). With
    documents a row may see no key of a block (its max stays -inf): it adds nothing."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv(k_ptr, v_ptr, cols, stride_s, seq_len, MASK, UPCAST, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK:
            s = tl.where(_keep_mask(rows, cols, seq_len, CAUSAL), s, float("-inf"))
        if DOCUMENTS:
            col_docs = _document_ids(doc_ptr, cols, seq_len)
            s = tl.where(row_docs[:, None] == col_docs[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if DOCUMENTS:  # exp2(-inf - -inf) is NaN: a row without keys so far subtracts 0
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_exp = m_new
        p = tl.exp2(s - m_exp[:, None])
        alpha = tl.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rows, start_n, threshold, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed (an int64 on the device, so a CUDA graph's replays read new ones)."""
    seed = tl.full([], 0, tl.int64)
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _query_block_start(CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's first query row: block program_id(1), counted from the last one under the
    causal mask, whose last blocks take longest (see the module docstring)."""
    if CAUSAL:
        return (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    return tl.program_id(1) * BLOCK_M


@triton.jit
def _head_offset(n_heads, stride_b, stride_h):
    """Where this program's (batch, head) starts in a tensor of strides (stride_b, stride_h)."""
    bh = tl.program_id(0)
    return (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads).to(tl.int64) * stride_h


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEED, DOCS, seq_len, n_heads, sm_scale, threshold,
                     dropout_scale, stride_b, stride_h, stride_s, o_stride_b, o_stride_h,
                     o_stride_s, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                     DROPOUT: tl.constexpr, DOCUMENTS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    start_m = _query_block_start(CAUSAL, BLOCK_M)
    base = _head_offset(n_heads, stride_b, stride_h)
    rows = start_m + tl.arange(0, BLOCK_M)
    q = tl.load(Q + base + _tile(rows, stride_s, HEAD_DIM),
                mask=rows[:, None] < seq_len, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    seed = _load_seed(SEED, DROPOUT)
    doc_ptr = DOCS + _document_offset(n_heads, seq_len)
    row_docs = tl.zeros([BLOCK_M], tl.int32)
    if DOCUMENTS:
        row_docs = _document_ids(doc_ptr, rows, seq_len)
    first = 0           # the first key block; with documents, none before their first row's
    if CAUSAL:  # blocks left of the diagonal need no mask; the diagonal ones do
        if DOCUMENTS:
            first = _first_key_block(doc_ptr, start_m, BLOCK_N)
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:  # only the last, partial block needs the sequence mask
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + base, V + base, doc_ptr, row_docs, stride_s,
                               rows, first, full_end, seq_len, qk_scale, seed, threshold, False,
                               CAUSAL, UPCAST, DROPOUT, DOCUMENTS, DOT_PRECISION, BLOCK_N,
                               HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + base, V + base, doc_ptr, row_docs, stride_s,
                               rows, full_end, masked_end, seq_len, qk_scale, seed, threshold,
                               True, CAUSAL, UPCAST, DROPOUT, DOCUMENTS, DOT_PRECISION, BLOCK_N,
                               HEAD_DIM)
    acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * dropout_scale
    o_base = _head_offset(n_heads, o_stride_b, o_stride_h)
    tl.store(O + o_base + _tile(rows, o_stride_s, HEAD_DIM),
             acc.to(O.dtype.element_ty), mask=rows[:, None] < seq_len)
    lse = (m_i + tl.log2(l_i)) * LN2  # natural log-sum-exp of the scaled scores
    tl.store(LSE + tl.program_id(0).to(tl.int64) * seq_len + rows, lse, mask=rows < seq_len)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, seq_len, n_heads, o_stride_b, o_stride_h, o_stride_s,
                           do_stride_b, do_stride_h, do_stride_s, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta[row] = sum(dO[row] * O[row]) over the head dimension, in float32."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_seq = rows[:, None] < seq_len
    o = tl.load(O + _head_offset(n_heads, o_stride_b, o_stride_h)
                + _tile(rows, o_stride_s, HEAD_DIM), mask=in_seq, other=0.0).to(tl.float32)
    do = tl.load(DO + _head_offset(n_heads, do_stride_b, do_stride_h)
                 + _tile(rows, do_stride_s, HEAD_DIM), mask=in_seq, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.program_id(0).to(tl.int64) * seq_len + rows, tl.sum(o * do, 1),
             mask=rows < seq_len)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr, col_docs,
                    stride_s, do_stride_s, start_n, cols, lo, hi, seq_len, qk_scale, seed,
                    threshold, dropout_scale, MASK: tl.constexpr, UPCAST: tl.constexpr,
                    DROPOUT: tl.constexpr, DOCUMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate the key block's dK, dV over the query blocks [lo, hi).

    Query rows past the sequence load as zeros (q, dO, lse, delta), so they add nothing. With
    dropout, dV takes the kept probabilities scaled, and dS = P * (dP kept and scaled - delta)."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        in_seq = rows < seq_len
        q = tl.load(q_ptr + _tile(rows, stride_s, HEAD_DIM), mask=in_seq[:, None],
                    other=0.0)
        do = tl.load(do_ptr + _tile(rows, do_stride_s, HEAD_DIM),
                     mask=in_seq[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_ptr + rows, mask=in_seq, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=in_seq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASK:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        if DOCUMENTS:
            row_docs = _document_ids(doc_ptr, rows, seq_len)
            p_t = tl.where(col_docs[:, None] == row_docs[None, :], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep_t = tl.trans(_dropout_keep(seed, rows, start_n, threshold, BLOCK_N))
            dv += tl.dot(tl.where(keep_t, p_t * dropout_scale, 0.0).to(do.dtype), do,
                         input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEED, DOCS, seq_len, n_heads,
                          sm_scale, threshold, dropout_scale,
                          stride_b, stride_h, stride_s, do_stride_b, do_stride_h, do_stride_s,
                          g_stride_b, g_stride_h, g_stride_s,
                          CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
                          DOCUMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(1) * BLOCK_N
    base = _head_offset(n_heads, stride_b, stride_h)
    do_base = _head_offset(n_heads, do_stride_b, do_stride_h)
    row_base = tl.program_id(0).to(tl.int64) * seq_len
    cols = start_n + tl.arange(0, BLOCK_N)
    kv_offsets = _tile(cols, stride_s, HEAD_DIM)
    k = tl.load(K + base + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
    v = tl.load(V + base + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    seed = _load_seed(SEED, DROPOUT)
    doc_ptr = DOCS + _document_offset(n_heads, seq_len)
    col_docs = tl.zeros([BLOCK_N], tl.int32)
    if DOCUMENTS:
        col_docs = _document_ids(doc_ptr, cols, seq_len)
    if CAUSAL:  # queries on the diagonal need the mask, those below it do not
        masked_end = tl.minimum(start_n + BLOCK_N, seq_len)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + base, DO + do_base, LSE + row_base,
                                 DELTA + row_base, doc_ptr, col_docs, stride_s, do_stride_s,
                                 start_n, cols, start_n, masked_end, seq_len, qk_scale, seed,
                                 threshold, dropout_scale, True, UPCAST, DROPOUT, DOCUMENTS,
                                 DOT_PRECISION, BLOCK_M, BLOCK_N, HEAD_DIM)
        full_start = start_n + BLOCK_N
        query_end = seq_len
        if DOCUMENTS:  # no query after the end of the block's last key's document sees it
            query_end = _query_end(doc_ptr, start_n, masked_end - 1, seq_len, BLOCK_M)
    else:
        full_start = 0
        query_end = seq_len
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + base, DO + do_base, LSE + row_base,
                             DELTA + row_base, doc_ptr, col_docs, stride_s, do_stride_s, start_n,
                             cols, full_start, query_end, seq_len, qk_scale, seed, threshold,
                             dropout_scale, False, UPCAST, DROPOUT, DOCUMENTS, DOT_PRECISION,
                             BLOCK_M, BLOCK_N, HEAD_DIM)
    g_offsets = _head_offset(n_heads, g_stride_b, g_stride_h) + _tile(cols, g_stride_s, HEAD_DIM)
    tl.store(DK + g_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None] < seq_len)
    tl.store(DV + g_offsets, dv.to(DV.dtype.element_ty), mask=cols[:, None] < seq_len)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, doc_ptr, row_docs, stride_s, rows, lo, hi,
                  seq_len, qk_scale, seed, threshold, dropout_scale, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
                  DOCUMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Accumulate the query block's dQ over the key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv(k_ptr, v_ptr, cols, stride_s, seq_len, MASK, UPCAST, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_keep_mask(rows, cols, seq_len, CAUSAL), p, 0.0)
        if DOCUMENTS:
            col_docs = _document_ids(doc_ptr, cols, seq_len)
            p = tl.where(row_docs[:, None] == col_docs[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rows, start_n, threshold, BLOCK_N),
                          dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEED, DOCS, seq_len, n_heads, sm_scale,
                        threshold, dropout_scale, stride_b, stride_h, stride_s, do_stride_b,
                        do_stride_h, do_stride_s, g_stride_b, g_stride_h, g_stride_s,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
                        DOCUMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = _query_block_start(CAUSAL, BLOCK_M)
    base = _head_offset(n_heads, stride_b, stride_h)
    row_base = tl.program_id(0).to(tl.int64) * seq_len
    rows = start_m + tl.arange(0, BLOCK_M)
    in_seq = rows < seq_len
    q = tl.load(Q + base + _tile(rows, stride_s, HEAD_DIM), mask=in_seq[:, None],
                other=0.0)
    do = tl.load(DO + _head_offset(n_heads, do_stride_b, do_stride_h)
                 + _tile(rows, do_stride_s, HEAD_DIM), mask=in_seq[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + row_base + rows, mask=in_seq, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_base + rows, mask=in_seq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    seed = _load_seed(SEED, DROPOUT)
    doc_ptr = DOCS + _document_offset(n_heads, seq_len)
    row_docs = tl.zeros([BLOCK_M], tl.int32)
    if DOCUMENTS:
        row_docs = _document_ids(doc_ptr, rows, seq_len)
    first = 0
    if CAUSAL:
        if DOCUMENTS:
            first = _first_key_block(doc_ptr, start_m, BLOCK_N)
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K + base, V + base, doc_ptr, row_docs, stride_s,
                       rows, first, full_end, seq_len, qk_scale, seed, threshold, dropout_scale,
                       False, CAUSAL, UPCAST, DROPOUT, DOCUMENTS, DOT_PRECISION, BLOCK_N,
                       HEAD_DIM)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K + base, V + base, doc_ptr, row_docs, stride_s,
                       rows, full_end, masked_end, seq_len, qk_scale, seed, threshold,
                       dropout_scale, True, CAUSAL, UPCAST, DROPOUT, DOCUMENTS, DOT_PRECISION,
                       BLOCK_N, HEAD_DIM)
    tl.store(DQ + _head_offset(n_heads, g_stride_b, g_stride_h) + _tile(rows, g_stride_s, HEAD_DIM),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_seq[:, None])


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
        key=["seq_len", "HEAD_DIM", "CAUSAL", "DROPOUT", "DOCUMENTS"],
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


def _strides(t):
    """The (batch, head, seq) strides of a (batch, heads, seq, head_dim) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_in_layout(t):
    """An empty dense tensor of t's shape and dtype with its dimensions in t's memory order (for a
    view into a packed tensor, the packed order without the gaps) and its last one, head_dim,
    contiguous, as the kernels write it; broadcast dimensions (stride 0) go inside."""
    order = sorted(range(t.dim() - 1), key=lambda dim: -t.stride(dim)) + [t.dim() - 1]
    return torch.empty_permuted(t.shape, order, dtype=t.dtype, device=t.device)


def _one_layout(*tensors) -> bool:
    """The tensors share their strides and each row of head_dim is contiguous."""
    return tensors[0].stride(-1) == 1 and all(t.stride() == tensors[0].stride() for t in tensors)


def _dropout_threshold(dropout_p: float) -> int:
    """The 16-bit numbers below which a probability is dropped."""
    return round(dropout_p * DROPOUT_LEVELS)


def _dropout_args(dropout_p: float, seed, placeholder: torch.Tensor):
    """The kernels' dropout arguments (SEED, threshold, dropout_scale) and DROPOUT: without
    dropout ``placeholder`` stands for the seed tensor (it is never read)."""
    threshold = _dropout_threshold(dropout_p)
    if threshold == 0:
        return (placeholder, 0, 1.0), False
    return (seed, threshold, DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)), True


def _kernel_document_ids(document_ids):
    """The ids as the kernels read them, once a call: a contiguous int32 (batch, seq) tensor
    (None stays None)."""
    if document_ids is None:
        return None
    return document_ids.to(torch.int32).contiguous()


def _flash_attention_forward(q, k, v, causal, sm_scale, o, dropout_p, seed, docs):
    """Write the attention of q, k, v (one layout) into o (any layout); return the log-sum-exp.
    ``docs``: None or the int32 (batch, seq) document ids of `_kernel_document_ids`."""
    batch, heads, seq_len, head_dim = q.shape
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    (seed, threshold, dropout_scale), dropout = _dropout_args(dropout_p, seed, q)
    _TUNED["fwd"][_precision(q.dtype)][
        lambda meta: (batch * heads, cdiv(seq_len, meta["BLOCK_M"]))](
        q, k, v, o, lse, seed, q if docs is None else docs, seq_len, heads, sm_scale, threshold,
        dropout_scale, *_strides(q), *_strides(o), CAUSAL=causal, DROPOUT=dropout,
        DOCUMENTS=docs is not None, HEAD_DIM=head_dim, **_DOT_OPTIONS[q.dtype])
    return lse


def _flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale, dropout_p, seed, docs, dq,
                              dk, dv):
    """Write the gradients into dq, dk, dv (one layout among them; q, k, v share another)."""
    batch, heads, seq_len, head_dim = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(batch * heads, cdiv(seq_len, 64))](
        o, do, delta, seq_len, heads, *_strides(o), *_strides(do), HEAD_DIM=head_dim, BLOCK_M=64)
    precision = _precision(q.dtype)
    (seed, threshold, dropout_scale), dropout = _dropout_args(dropout_p, seed, q)
    scalars = (seq_len, heads, sm_scale, threshold, dropout_scale, *_strides(q), *_strides(do))
    options = dict(CAUSAL=causal, DROPOUT=dropout, DOCUMENTS=docs is not None, HEAD_DIM=head_dim,
                   **_DOT_OPTIONS[q.dtype])
    docs = q if docs is None else docs  # without documents q stands for the (unread) pointer
    _TUNED["dkdv"][precision][
        lambda meta: (batch * heads, cdiv(seq_len, meta["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, seed, docs, *scalars, *_strides(dk), **options)
    _TUNED["dq"][precision][
        lambda meta: (batch * heads, cdiv(seq_len, meta["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, seed, docs, *scalars, *_strides(dq), **options)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton kernels on q, k, v; saves them, O, the log-sum-exp, the dropout
    seed (a one-element tensor, or None without dropout) and the int32 document ids (or None)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, docs):
        if not _one_layout(q, k, v):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = _empty_in_layout(q)
        lse = _flash_attention_forward(q, k, v, causal, sm_scale, o, dropout_p, seed, docs)
        ctx.save_for_backward(q, k, v, o, lse, seed, docs)
        ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed, docs = ctx.saved_tensors
        dq, dk, dv = (_empty_in_layout(q) for _ in range(3))
        _flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, ctx.dropout_p,
                                  seed, docs, dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None


class FlashAttentionQKVPackedFunction(torch.autograd.Function):
    """Autograd for the Triton kernels on one (batch, seq, 3, heads, head_dim) tensor: q, k and v
    are read where they lie and the gradient is written into one tensor of qkv's layout."""

    @staticmethod
    def forward(ctx, qkv, causal, sm_scale, dropout_p, seed, docs):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))             # (b, h, s, d) views
        o = _empty_in_layout(qkv[:, :, 0])                               # (b, s, h, d)
        lse = _flash_attention_forward(q, k, v, causal, sm_scale, o.transpose(1, 2), dropout_p,
                                       seed, docs)
        ctx.save_for_backward(qkv, o, lse, seed, docs)
        ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, seed, docs = ctx.saved_tensors
        dqkv = _empty_in_layout(qkv)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        dq, dk, dv = (t.transpose(1, 2) for t in dqkv.unbind(2))
        _flash_attention_backward(do.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, ctx.causal,
                                  ctx.sm_scale, ctx.dropout_p, seed, docs, dq, dk, dv)
        return dqkv, None, None, None, None, None


def _check_inputs(q, k, v):
    check_qkv(q, k, v)
    _check_head_dim("q", q.shape[-1])


def check_qkv(q, k, v):
    """What every attention backend needs of q, k and v: 4-D (batch, heads, seq, head_dim), one
    shape, one floating dtype, one device (any head_dim: that limit is the Triton kernels')."""
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


def check_document_ids(document_ids, batch: int, seq: int, device) -> None:
    """What every attention backend needs of ``document_ids`` (not None): a (batch, seq) tensor
    of an integer dtype on ``device`` (q's), for q's batch and seq. Plain torch, no Triton, and
    no look at the values (that would wait for the device): that they never decrease along a row
    is the caller's promise."""
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor of shape (batch, seq) = "
                        f"({batch}, {seq}), got {type(document_ids).__name__}")
    if document_ids.is_floating_point() or document_ids.is_complex() or \
            document_ids.dtype == torch.bool:
        raise TypeError(f"document_ids has dtype {document_ids.dtype}; it must have an integer "
                        "dtype (e.g. torch.int64 or torch.int32)")
    if tuple(document_ids.shape) != (batch, seq):
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)} but q's "
                         f"(batch, seq) is ({batch}, {seq}); document_ids must be (batch, seq)")
    if document_ids.device != torch.device(device):
        raise ValueError(f"document_ids is on {document_ids.device} but q is on {device}; put "
                         f"document_ids on {device}")


def document_mask(document_ids: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(batch, 1, seq, seq) bool from (batch, seq) document ids: True where query i may attend
    key j, i.e. both are of one document (and j <= i when causal)."""
    mask = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    if causal:
        seq = document_ids.shape[1]
        mask = mask & torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return mask


def _check_head_dim(name: str, head_dim: int):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} has head_dim {head_dim}; flash_attention supports head_dim "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")


def _check_packed(qkv):
    check_float("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D (batch, seq, 3, heads, head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    _check_head_dim("qkv", qkv.shape[-1])


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or \
            not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r}: must be a number in [0, 1)")
    if _dropout_threshold(dropout_p) >= DROPOUT_LEVELS:
        raise ValueError(f"dropout_p={dropout_p!r} rounds to 1 at the kernels' steps of "
                         f"1/{DROPOUT_LEVELS}: it would drop everything; use at most "
                         f"{(DROPOUT_LEVELS - 1) / DROPOUT_LEVELS}")
    return float(dropout_p)


def _check_seed(seed) -> None:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return
    if not (isinstance(seed, torch.Tensor) and seed.numel() == 1 and seed.dtype == torch.int64):
        raise TypeError(f"seed must be None, an int or a one-element int64 tensor, got {seed!r}")


def _dropout_seed(dropout_p, seed, device):
    """(dropout_p, the seed as the kernels read it: a one-element int64 tensor on ``device``, or
    None when nothing is dropped), from arguments already checked. An int seed is taken modulo
    2**63; without one, one is drawn from torch's default generator on ``device``."""
    if _dropout_threshold(dropout_p) == 0:
        return dropout_p, None
    if seed is None:
        return dropout_p, torch.randint(0, 2 ** 62, (1,), device=device)
    if isinstance(seed, int):
        return dropout_p, torch.tensor([seed % 2 ** 63], dtype=torch.int64, device=device)
    if seed.device != torch.device(device):
        raise ValueError(f"seed is on {seed.device} but the attention's inputs are on {device}; "
                         f"put the seed on {device}")
    return dropout_p, seed.reshape(1)


def _philox_mulhilo(a: torch.Tensor, b: int):
    """(a * b) >> 32 and (a * b) mod 2**32 for int64 tensors of uint32 values and a uint32 b,
    from 16-bit halves (no product passes 2**63)."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (low >> 16)
    return a_hi * b_hi + (mid >> 16), ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def _philox(counter, key):
    """Philox4x32-10 of the counter words (four int64 tensors of uint32 values) and key (two
    ints), as `tl.philox` computes it."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _philox_mulhilo(c2, _PHILOX_ROUND[1])
        hi_a, lo_a = _philox_mulhilo(c0, _PHILOX_ROUND[0])
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _MASK32, (k1 + _PHILOX_KEY[1]) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(seed, batch_heads: int, seq_len: int, dropout_p: float, device="cpu"):
    """The mask of attention probabilities the kernels keep for ``seed``, in plain torch.

    Args:
        seed: an int, or a one-element int64 tensor (as `flash_attention` takes it).
        batch_heads, seq_len: the attention's batch x heads and its sequence length.
        dropout_p: the dropout rate; in effect rounded to a multiple of 1/65536.
    Returns:
        (mask, scale): mask (batch_heads, seq_len, seq_len) bool, [bh, query, key] True where
        the probability is kept; scale, what the kept ones are multiplied by (1 / the keep
        probability of the rounded rate).
    """
    dropout_p = check_dropout_p(dropout_p)
    _check_seed(seed)
    if _dropout_threshold(dropout_p) == 0:
        return torch.ones(batch_heads, seq_len, seq_len, dtype=torch.bool, device=device), 1.0
    if seed is None:
        raise ValueError("dropout_keep_mask needs the seed whose masks it computes")
    key = seed % 2 ** 63 if isinstance(seed, int) else int(seed) % 2 ** 64
    groups = torch.arange(cdiv(seq_len, 8)).view(1, 1, -1)
    rows = torch.arange(seq_len).view(1, -1, 1)
    heads = torch.arange(batch_heads).view(-1, 1, 1)
    shape = (batch_heads, seq_len, groups.shape[-1])
    counter = (groups.expand(shape), rows.expand(shape), heads.expand(shape),
               torch.zeros(shape, dtype=torch.int64))
    words = torch.stack(_philox(counter, (key & _MASK32, key >> 32)), dim=-1)   # (.., g, i)
    numbers = torch.stack((words & 0xFFFF, words >> 16), dim=-2)                # (.., g, h, i)
    numbers = numbers.reshape(batch_heads, seq_len, -1)[..., :seq_len]   # column 8g + 4h + i
    threshold = _dropout_threshold(dropout_p)
    return (numbers >= threshold).to(device), DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)


def flash_attention_reference(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0,
                              seed=None, document_ids=None):
    """Plain-torch attention, softmax in float32: softmax(q k^T * scale, causal mask) v.

    With ``dropout_p > 0`` the probabilities are dropped: with ``seed``, exactly those the
    Triton kernels drop for that seed (`dropout_keep_mask`); without one, by torch's
    ``F.dropout`` (torch's generator, other masks). With ``document_ids`` ((batch, seq)
    integers, see `flash_attention`) query i also sees key j only when both ids are equal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, S, S)
    if causal:
        seq = q.shape[-2]
        above = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[0], q.shape[-2], q.device)
        scores = scores.masked_fill(~document_mask(document_ids), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0 and seed is None:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    elif dropout_p > 0:
        batch, heads, seq, _ = q.shape
        keep, keep_scale = dropout_keep_mask(seed, batch * heads, seq, dropout_p, q.device)
        probs = probs * keep.view(batch, heads, seq, seq) * keep_scale
    return torch.matmul(probs, v.float()).to(q.dtype)


def flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, seed=None,
                    document_ids=None):
    """Scaled dot-product attention with the Triton flash-attention kernels.

    Args:
        q, k, v: (batch, heads, seq, head_dim) tensors of one dtype (float16, bfloat16, float32)
            on one device; head_dim 32, 64 or 128. Read in place when the three share their
            strides and head_dim is contiguous (e.g. views into one packed tensor); otherwise
            copied to contiguous tensors first.
        causal: mask key j > query i.
        softmax_scale: multiplies q k^T; default 1 / sqrt(head_dim).
        dropout_p: dropout on the attention probabilities, in [0, 1), rounded to a multiple of
            1/65536 (see the module docstring); the kept ones are scaled up to keep the mean.
        seed: the dropout masks' seed: an int or a one-element int64 tensor on q's device (read
            by the kernels there, so a CUDA graph can replay with new values); None draws one
            from torch's default generator on q's device.
        document_ids: None, or a (batch, seq) tensor of any integer dtype on q's device, the
            document of each token of a packed window (e.g. 0, 0, 0, 1, 1, 2, ...): query i then
            sees key j only when both are of one document (and j <= i when causal). The ids must
            not decrease along a row (not checked: that would wait for the device) and must fit
            in int32 (the kernels compare them as int32). The masks of a dropout seed stay the
            same with and without documents.
    Returns:
        (batch, heads, seq, head_dim), q's dtype, laid out in q's memory order. Runs
        `flash_attention_reference` where the
        kernels cannot run (a CPU without ``TRITON_INTERPRET=1``) and for empty inputs.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    dropout_p = check_dropout_p(dropout_p)
    _check_seed(seed)
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[0], q.shape[2], q.device)
    if q.numel() == 0 or not triton_runs_on(q.device):
        return flash_attention_reference(q, k, v, causal, scale, dropout_p, seed, document_ids)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale,
                                        *_dropout_seed(dropout_p, seed, q.device),
                                        _kernel_document_ids(document_ids))


def flash_attention_qkvpacked(qkv, causal=True, softmax_scale=None, dropout_p=0.0, seed=None,
                              document_ids=None):
    """`flash_attention` on q, k and v packed in one tensor, as a fused QKV projection gives them.

    Args:
        qkv: (batch, seq, 3, heads, head_dim), q, k, v along dim 2, any strides with head_dim
            contiguous (e.g. a (seq, batch, 3, heads, head_dim) tensor transposed): the kernels
            read it in place, and the gradient comes back in one tensor of the same layout, so
            neither direction copies q, k, v apart or back together.
        causal, softmax_scale, dropout_p, seed: as in `flash_attention`.
        document_ids: None, or the (batch, seq) document ids of the tokens, as in
            `flash_attention`.
    Returns:
        (batch, seq, heads, head_dim), laid out in qkv's order of batch and seq (for a
        seq-major qkv, the output transposed to (seq, batch, ...) is contiguous).
    """
    _check_packed(qkv)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if softmax_scale is None else float(softmax_scale)
    dropout_p = check_dropout_p(dropout_p)
    _check_seed(seed)
    if document_ids is not None:
        check_document_ids(document_ids, qkv.shape[0], qkv.shape[1], qkv.device)
    if qkv.numel() == 0 or not triton_runs_on(qkv.device):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return flash_attention_reference(q, k, v, causal, scale, dropout_p, seed,
                                         document_ids).transpose(1, 2)
    return FlashAttentionQKVPackedFunction.apply(qkv, bool(causal), scale,
                                                 *_dropout_seed(dropout_p, seed, qkv.device),
                                                 _kernel_document_ids(document_ids))

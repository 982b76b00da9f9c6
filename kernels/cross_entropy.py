"""Cross-entropy over a vocabulary: the loss in one read of the logits, the gradient in one more
(written over the logits if asked), in Triton.

Owns `cross_entropy` (the public function), its autograd Function, the kernels and
`cross_entropy_reference`, and the two building blocks of the vocab-parallel loss,
`cross_entropy_shard_stats` and `cross_entropy_shard_grad`, with their references.

Shapes: logits is (..., vocab) float16/bfloat16/float32, target is (...) integer; rows are the
flattened leading dimensions. The kernels read the logits in their own dtype, chunk by chunk
(online max and sum of exponentials in float32); no float32 copy of the logits is made.

`cross_entropy`: the forward kernel reads each row once (online max and sum of exponentials) and
writes the row's share of the mean loss (its loss over n_valid, the rows whose target is not
ignore_index; one torch sum adds them up) and its log-sum-exp (float32, all the backward keeps
besides the logits). The backward kernel reads the row again and writes (softmax - onehot) times
the incoming gradient / n_valid (with reduction="sum", n_valid is 1), into a new tensor or, with
`inplace_backward=True`, over the logits. With per-row weights w (a loss mask that need not be
0/1), a row's loss and gradient are multiplied by its w, and the mean divides by the weights of
the rows not ignored instead of their count. Ignored rows are not read: their gradient is written
as zeros. The mean is NaN when every row is ignored, as in torch. A target outside [0, vocab)
that is not ignore_index is an error on the CPU and gives a NaN loss on a GPU (checking it there
would synchronise).

Vocab parallel (each rank holds the logits of the vocabulary slice [vocab_start, vocab_end)):
`cross_entropy_shard_stats` gives per row the shard's max, sum(exp(logit - max)) and the target's
logit (0 when the target lies outside the shard); the ranks combine them into the global
log-sum-exp (max over ranks, rescaled sums, summed target logits), and in the backward
`cross_entropy_shard_grad` writes the shard's (softmax - onehot) times each row's gradient.

Each row is walked in chunks counted from its start rounded down to 16 bytes (`_aligned_row`), so
that the whole chunks load and store as vectors whatever the width. Launch settings: one program
a row; the vocabulary chunk BLOCK_V and the warps are autotuned on a GPU per row width.
"""
import numbers

import torch

from ._utils import (Autotuned, check_float, check_same_device, drop_blocks_longer_than, tl,
                     triton, triton_runs_on)


@triton.jit
def _online_max_sumexp(m, d, x):
    """Fold chunk x into the running max m (one for the row) and the sums d (one a lane, each of
    exp(x - m) over the lane's elements so far): one reduction across the program a chunk, the
    max; the sums add up once at the end. No finite element yet leaves m = -inf and d = 0."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
    return m_new, d


@triton.jit
def _aligned_row(BASE, row, width):
    """Row `row` of a (rows, width) tensor as (ptr, lead): ptr is the row's start rounded down
    to 16 bytes, lead the elements between ptr and the row. Chunks of the row counted from ptr
    can load and store whole 16-byte vectors whatever the width: counted from the row's own
    start, a width like GPT-2's 50257 classes leaves most rows unaligned and every access a
    single element."""
    align: tl.constexpr = 128 // BASE.dtype.element_ty.primitive_bitwidth
    start = row * width
    lead = start % align
    # lead in 32 bits: the column arithmetic of every element follows its type
    return BASE + tl.multiple_of(start - lead, align), lead.to(tl.int32)


@triton.jit
def _row_max_sumexp(ptr, lead, n_cols, BLOCK_V: tl.constexpr):
    """Online max and sum(exp(x - max)) of the n_cols elements at ptr + lead, chunk by chunk
    from the aligned ptr, in float32: the first chunk (holding the lead) and the last, partial
    one masked, the whole ones between without a mask, so that they load as vectors."""
    cols = tl.arange(0, BLOCK_V)
    end = lead + n_cols
    x = tl.load(ptr + cols, mask=(cols >= lead) & (cols < end), other=float("-inf"))
    m, d = _online_max_sumexp(float("-inf"), tl.zeros([BLOCK_V], tl.float32), x.to(tl.float32))
    whole = (end // BLOCK_V) * BLOCK_V
    for start in range(BLOCK_V, whole, BLOCK_V):
        m, d = _online_max_sumexp(m, d, tl.load(ptr + start + cols).to(tl.float32))
    if (whole >= BLOCK_V) & (whole < end):
        x = tl.load(ptr + whole + cols, mask=whole + cols < end, other=float("-inf"))
        m, d = _online_max_sumexp(m, d, x.to(tl.float32))
    return m, tl.sum(d, 0)


@triton.jit
def _row_grad_chunk(ptr, grad_ptr, idx, lead, n_cols, width, lse, local_target, scale,
                    MASKED: tl.constexpr):
    """grad = (exp(x - lse) - onehot) * scale at positions idx counted from the aligned row
    start: a class at lead <= idx < lead + n_cols, padding (gradient 0) up to lead + width.
    Unmasked, idx must lie among the classes."""
    col = idx - lead
    if MASKED:
        x = tl.load(ptr + idx, mask=(col >= 0) & (col < n_cols), other=0.0).to(tl.float32)
    else:
        x = tl.load(ptr + idx).to(tl.float32)
    g = (tl.exp(x - lse) - tl.where(col == local_target, 1.0, 0.0)) * scale
    if MASKED:
        g = tl.where(col < n_cols, g, 0.0)
        tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=(col >= 0) & (col < width))
    else:
        tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty))


@triton.jit
def _write_row_grad(ptr, grad_ptr, lead, n_cols, width, lse, local_target, scale,
                    BLOCK_V: tl.constexpr):
    """grad[j] = (exp(x[j] - lse) - [j == local_target]) * scale for the row's classes j <
    n_cols, 0 for its padding columns n_cols <= j < width, chunk by chunk from the aligned row
    start (see `_aligned_row`): whole chunks of classes without masks, the first chunk, the
    partial one and the padding with them."""
    cols = tl.arange(0, BLOCK_V)
    _row_grad_chunk(ptr, grad_ptr, cols, lead, n_cols, width, lse, local_target, scale, True)
    whole = ((lead + n_cols) // BLOCK_V) * BLOCK_V
    for start in range(BLOCK_V, whole, BLOCK_V):
        _row_grad_chunk(ptr, grad_ptr, start + cols, lead, n_cols, width, lse, local_target,
                        scale, False)
    for start in range(tl.maximum(whole, BLOCK_V), lead + width, BLOCK_V):
        _row_grad_chunk(ptr, grad_ptr, start + cols, lead, n_cols, width, lse, local_target,
                        scale, True)


@triton.jit
def _cross_entropy_fwd_kernel(LOGITS, TARGET, WEIGHT, LOSS, LSE, N_VALID, n_cols, width,
                              ignore_index, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row, read once: its loss over its first n_cols logits (times its WEIGHT when
    WEIGHTED) divided by N_VALID (the mean's share; 1 for a sum) and its log-sum-exp (0 for an
    ignored row, which is not read)."""
    row = tl.program_id(0).to(tl.int64)
    ptr, lead = _aligned_row(LOGITS, row, width)
    target = tl.load(TARGET + row).to(tl.int64)
    n_valid = tl.load(N_VALID).to(tl.float32)
    share = 1.0 / n_valid
    if WEIGHTED:
        share = tl.load(WEIGHT + row).to(tl.float32) / n_valid
    if target == ignore_index:
        # 0 / n_valid: 0, or NaN when every row is ignored (the mean of nothing, as in torch)
        tl.store(LOSS + row, tl.where(n_valid > 0, 0.0, float("nan")))
        tl.store(LSE + row, 0.0)
    else:
        m, d = _row_max_sumexp(ptr, lead, n_cols, BLOCK_V)
        lse = m + tl.log(d)
        in_range = (target >= 0) & (target < n_cols)
        target_logit = tl.load(ptr + lead + target, mask=in_range, other=float("nan"))
        tl.store(LOSS + row, (lse - target_logit.to(tl.float32)) * share)
        tl.store(LSE + row, lse)


@triton.jit
def _shard_stats_kernel(LOGITS, TARGET, STATS, n_cols, width, vocab_start, BLOCK_V: tl.constexpr):
    """One row of a shard `width` wide whose first n_cols columns are classes (the rest padding);
    STATS is (3, rows): max, sum of exponentials, target logit."""
    row = tl.program_id(0).to(tl.int64)
    n_rows = tl.num_programs(0)
    ptr, lead = _aligned_row(LOGITS, row, width)
    m, d = _row_max_sumexp(ptr, lead, n_cols, BLOCK_V)
    local = tl.load(TARGET + row).to(tl.int64) - vocab_start
    in_shard = (local >= 0) & (local < n_cols)
    target_logit = tl.load(ptr + lead + local, mask=in_shard, other=0.0).to(tl.float32)
    tl.store(STATS + row, m)
    tl.store(STATS + n_rows + row, d)
    tl.store(STATS + 2 * n_rows + row, target_logit)


@triton.jit
def _grad_kernel(LOGITS, TARGET, LSE, SCALE, GRAD, n_cols, width, vocab_start, ignore_index,
                 SCALE_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row's gradient (softmax - onehot) * scale over a shard `width` wide whose first n_cols
    columns are classes [vocab_start, vocab_start + n_cols); zeros for an ignored row (not read).
    SCALE is one float32 per row, or one for all rows."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row).to(tl.int64)
    ptr, lead = _aligned_row(LOGITS, row, width)
    grad_ptr, _ = _aligned_row(GRAD, row, width)
    if target == ignore_index:
        # as a row of padding, unread: exp(0 - inf) = 0
        _write_row_grad(ptr, grad_ptr, lead, 0, width, float("inf"), -1, 0.0, BLOCK_V)
    else:
        if SCALE_PER_ROW:
            scale = tl.load(SCALE + row).to(tl.float32)
        else:
            scale = tl.load(SCALE).to(tl.float32)
        local = target - vocab_start      # compared in 32 bits; -1 when outside the shard
        local = tl.where((local >= 0) & (local < n_cols), local, -1).to(tl.int32)
        _write_row_grad(ptr, grad_ptr, lead, n_cols, width, tl.load(LSE + row), local, scale,
                        BLOCK_V)


# (BLOCK_V, warps): the vocabulary chunk of one loop step, 8 or 16 elements a thread.
_GPU_CONFIGS = [triton.Config({"BLOCK_V": v}, num_warps=w)
                for v, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]
# Under the interpreter: small chunks, so that the tests cover several and a partial last one.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_V": 256}, num_warps=4)
# Chunks longer than the row are padding only; tuned per row width.
_PRUNE = {"early_config_prune": drop_blocks_longer_than("width", "BLOCK_V")}

_fwd_kernel = Autotuned(_cross_entropy_fwd_kernel, _GPU_CONFIGS, _INTERPRETER_CONFIG,
                        key=["width"], prune_configs_by=_PRUNE)
_shard_stats = Autotuned(_shard_stats_kernel, _GPU_CONFIGS, _INTERPRETER_CONFIG, key=["width"],
                         prune_configs_by=_PRUNE)
# GRAD may be LOGITS itself (written in place): the tuner restores it after each timed run.
_grad = Autotuned(_grad_kernel, _GPU_CONFIGS, _INTERPRETER_CONFIG, key=["width"],
                  prune_configs_by=_PRUNE, restore_value=["GRAD"])


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for the kernels: the forward reads the logits once (loss, log-sum-exp), the
    backward reads them again and writes the gradient, over them when ``inplace_backward``."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, n_cols, reduction, inplace_backward, weight):
        logits, target = logits.contiguous(), target.contiguous()
        width = logits.shape[-1]
        n_rows = target.numel()
        if weight is not None:
            weight = weight.reshape(-1).float().contiguous()
        if reduction == "sum":
            n_valid = torch.ones((), device=logits.device, dtype=torch.float32)
        elif weight is None:     # compared as int64, as the kernel compares: a narrower
            n_valid = (target.long() != ignore_index).sum(dtype=torch.float32)   # type wraps it
        else:
            n_valid = weight.masked_fill(target.reshape(-1).long() == ignore_index, 0.0).sum()
        loss_rows = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        lse = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        _fwd_kernel[(n_rows,)](logits, target, lse if weight is None else weight, loss_rows, lse,
                               n_valid, n_cols, width, ignore_index, WEIGHTED=weight is not None)
        ctx.save_for_backward(logits, target, lse, n_valid, weight)
        ctx.ignore_index, ctx.n_cols = ignore_index, n_cols
        ctx.inplace_backward, ctx.backward_done = inplace_backward, False
        loss = loss_rows.sum()
        return loss.to(logits.dtype) if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("cross_entropy(inplace_backward=True)'s backward ran twice on one "
                               "forward (retain_graph): the first wrote the gradient over the "
                               "logits; compute the loss again, or pass inplace_backward=False")
        logits, target, lse, n_valid, weight = ctx.saved_tensors
        ctx.backward_done = ctx.inplace_backward
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        scale = grad_loss.float() / n_valid                     # 0-d, on the device: no sync
        if weight is not None:
            scale = scale * weight                              # one a row
        _grad[(target.numel(),)](logits, target, lse, scale, grad, ctx.n_cols, logits.shape[-1],
                                 0, ctx.ignore_index, SCALE_PER_ROW=weight is not None)
        return grad, None, None, None, None, None, None


def _check_logits_target(logits, target):
    check_float("logits", logits)
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or \
            target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    check_same_device(logits=logits, target=target)
    if logits.dim() < 1 or target.shape != logits.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)} but logits has "
                         f"{tuple(logits.shape)}; target must be logits' shape without the last "
                         "(vocabulary) dimension")


def _check_weight(weight, target):
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor of per-row weights (or None), "
                        f"got {getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad, but cross_entropy does not differentiate its "
                         "per-row weights (a loss mask); pass weight.detach()")
    check_same_device(target=target, weight=weight)
    if weight.shape != target.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but target has "
                         f"{tuple(target.shape)}; give one weight per target")


def _check_integer(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: must be an int (a class index)")


def _check_target_range(target, ignore_index, n_classes):
    """On the CPU (where it costs no synchronisation) reject targets outside the vocabulary."""
    if target.device.type != "cpu":
        return
    target = target.long()      # a narrower type would wrap ignore_index and n_classes
    valid = target[target != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= n_classes):
        raise ValueError(f"target holds class {int(valid.min())}..{int(valid.max())} but there "
                         f"are {n_classes} classes; targets must lie in [0, {n_classes}) or "
                         f"equal ignore_index={ignore_index}")


def _check_vocab_size(logits, vocab_size):
    if vocab_size is None:
        return logits.shape[-1]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or \
            not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer in [1, "
                         f"{logits.shape[-1]}] (logits' last dimension), or None for all of it")
    return vocab_size


def cross_entropy_reference(logits, target, ignore_index=-100, vocab_size=None, reduction="mean",
                            inplace_backward=False, weight=None):
    """Plain torch: F.cross_entropy on float32 logits (the mean over non-ignored rows, returned
    in the logits' dtype, or their float32 sum); columns from `vocab_size` on are left out; with
    per-row `weight`, each row's loss times its weight, the mean over the weights of the rows
    not ignored. `inplace_backward` is accepted for the common signature and has no effect
    (torch's backward allocates the gradient)."""
    _check_reduction(reduction)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    flat_target = target.reshape(-1).long()
    losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               flat_target, ignore_index=ignore_index,
                                               reduction="none" if weight is not None else reduction)
    if weight is not None:
        weight = weight.reshape(-1).float().masked_fill(flat_target == ignore_index, 0.0)
        losses = (losses * weight).sum()
        if reduction == "mean":
            losses = losses / weight.sum()
    return losses.to(logits.dtype) if reduction == "mean" else losses


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'sum'")


def cross_entropy(logits, target, ignore_index=-100, vocab_size=None, reduction="mean",
                  inplace_backward=False, weight=None):
    """Cross-entropy of logits against target classes: the loss in one read of the logits, the
    gradient in one read and one write.

    Args:
        logits: (..., width) float16/bfloat16/float32. Non-contiguous logits are copied.
        target: (...) integer class indices in [0, vocab_size), or ignore_index.
        ignore_index: rows with this target add neither loss nor gradient.
        vocab_size: the classes in use, the first `vocab_size` columns; the columns after them
            are padding (Megatron's padded vocabulary), left out of the softmax, gradient 0.
            None: every column. Reading the padded logits in place saves a copy of them.
        reduction: "mean" (over the non-ignored rows; NaN when there are none, as in torch) or
            "sum" (of the non-ignored rows' losses; 0 when there are none). A sum needs no count
            of the rows, so no synchronisation, and is what a caller that normalises over
            micro-batches and ranks wants.
        inplace_backward: the backward writes the logits' gradient over the logits (no
            logits-sized buffer; a second backward of the same forward is then an error). For a
            caller that does not read the logits after the backward, as the model's loss.
        weight: (...) like target, floating point, or None: each row's loss and gradient times
            its weight (a loss mask, 0/1 or not); the mean then divides by the sum of the
            weights of the rows not ignored (NaN when that is 0). Not differentiated.
    Returns:
        0-d tensor: the mean in the logits' dtype, or the sum in float32. Runs
        `cross_entropy_reference` where the kernels cannot run and for empty logits.
    """
    n_classes = _check_arguments(logits, target, ignore_index, vocab_size, reduction, weight)
    if logits.numel() == 0 or not triton_runs_on(logits.device):
        return cross_entropy_reference(logits, target, ignore_index, vocab_size, reduction,
                                       weight=weight)
    return CrossEntropyFunction.apply(logits, target, int(ignore_index), n_classes, reduction,
                                      bool(inplace_backward), weight)


def cross_entropy_torch(logits, target, ignore_index=-100, vocab_size=None, reduction="mean",
                        inplace_backward=False, weight=None):
    """The `torch` backend: `cross_entropy_reference` after `cross_entropy`'s checks of its
    arguments."""
    _check_arguments(logits, target, ignore_index, vocab_size, reduction, weight)
    return cross_entropy_reference(logits, target, ignore_index, vocab_size, reduction,
                                   weight=weight)


def _check_arguments(logits, target, ignore_index, vocab_size, reduction, weight) -> int:
    """Every check of cross_entropy's arguments; returns the number of classes in use."""
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    _check_weight(weight, target)
    _check_integer("ignore_index", ignore_index)
    n_classes = _check_vocab_size(logits, vocab_size)
    _check_target_range(target, ignore_index, n_classes)
    return n_classes


def _shard_classes(logits, vocab_start, vocab_size):
    """How many of a shard's columns are classes: all, or those below the global `vocab_size`."""
    _check_integer("vocab_start", vocab_start)
    width = logits.shape[-1]
    if vocab_size is None:
        return width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r}: must be a positive integer (the global "
                         f"vocabulary, padding excluded), or None when the shard has no padding")
    return min(max(vocab_size - int(vocab_start), 0), width)


def cross_entropy_shard_stats_reference(logits, target, vocab_start, vocab_size=None):
    """Plain torch of `cross_entropy_shard_stats`."""
    n_classes = _shard_classes(logits, vocab_start, vocab_size)
    x = logits[..., :n_classes].float()
    row_max = x.max(dim=-1).values if n_classes else torch.full(target.shape, float("-inf"),
                                                                 device=logits.device)
    # a row whose classes here are all -inf: exp(-inf - 0) = 0, not exp(-inf - -inf) = NaN
    safe_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    sum_exp = torch.exp(x - safe_max.unsqueeze(-1)).sum(dim=-1)
    local = target.long() - vocab_start
    in_shard = (local >= 0) & (local < n_classes)
    picked = x.gather(-1, local.clamp(0, max(n_classes - 1, 0)).unsqueeze(-1)).squeeze(-1) \
        if n_classes else torch.zeros_like(sum_exp)
    return row_max, sum_exp, torch.where(in_shard, picked, torch.zeros_like(picked))


def cross_entropy_shard_stats(logits, target, vocab_start, vocab_size=None):
    """Per-row statistics of one vocabulary shard, for the vocab-parallel loss.

    Args:
        logits: (..., shard_vocab), the logits of classes [vocab_start, vocab_start + shard_vocab).
        target: (...) global class indices (any value; those outside the shard count as absent).
        vocab_start: the first global class of this shard.
        vocab_size: the global vocabulary; the shard's columns at or past it are padding, left
            out (read in place). None: every column is a class. A shard of padding only gives
            max -inf and sum_exp 0.
    Returns:
        (max, sum_exp, target_logit), each (...) float32: the shard's max logit,
        sum(exp(logit - max)) over the shard, and the target's logit (0 where the target lies
        outside the shard). Not differentiable: the vocab-parallel loss writes its gradient with
        `cross_entropy_shard_grad`. Combine over shards with M = max of maxes,
        lse = M + log(sum(sum_exp * exp(max - M))), loss = lse - sum(target_logit).
    """
    _check_logits_target(logits, target)
    n_classes = _shard_classes(logits, vocab_start, vocab_size)
    if logits.numel() == 0 or not triton_runs_on(logits.device):
        return cross_entropy_shard_stats_reference(logits, target, vocab_start, vocab_size)
    n_rows = target.numel()
    stats = torch.empty((3,) + tuple(target.shape), device=logits.device, dtype=torch.float32)
    _shard_stats[(n_rows,)](logits.contiguous(), target.contiguous(), stats, n_classes,
                            logits.shape[-1], int(vocab_start))
    return tuple(stats)


def cross_entropy_shard_grad_reference(logits, target, vocab_start, lse, grad_row=None,
                                       ignore_index=-100, vocab_size=None):
    """Plain torch of `cross_entropy_shard_grad` (returns a new tensor)."""
    n_classes = _shard_classes(logits, vocab_start, vocab_size)
    grad = torch.exp(logits.float() - lse.unsqueeze(-1))
    grad[..., n_classes:] = 0.0
    local = target.long() - vocab_start
    in_shard = (local >= 0) & (local < n_classes)
    onehot = torch.zeros_like(grad)
    onehot.scatter_(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1),
                    in_shard.unsqueeze(-1).float())
    scale = torch.ones_like(lse) if grad_row is None else grad_row.float()
    scale = torch.where(target.long() == ignore_index, torch.zeros_like(scale), scale)
    return ((grad - onehot) * scale.unsqueeze(-1)).to(logits.dtype)


def cross_entropy_shard_grad(logits, target, vocab_start, lse, grad_row=None, ignore_index=-100,
                             out=None, vocab_size=None):
    """Gradient of the vocab-parallel loss with respect to one shard's logits.

    Args:
        logits: (..., shard_vocab) of classes [vocab_start, vocab_start + shard_vocab).
        target: (...) global class indices.
        vocab_start: the first global class of this shard.
        lse: (...) float32, each row's log-sum-exp over the whole vocabulary.
        grad_row: (...) the gradient of each row's loss (e.g. grad_output / n_valid); 1 if None.
        ignore_index: rows with this target get a zero gradient.
        out: where to write (logits' shape and dtype, contiguous); may be ``logits`` itself,
            overwriting them. A new tensor if None.
        vocab_size: the global vocabulary; the shard's columns at or past it are padding and get
            gradient 0. None: every column is a class.
    Returns:
        (softmax - onehot) * grad_row over the shard, in the logits' dtype.
    """
    _check_logits_target(logits, target)
    _check_integer("ignore_index", ignore_index)
    others = {"lse": lse} if grad_row is None else {"lse": lse, "grad_row": grad_row}
    for name, t in others.items():
        check_float(name, t)
    check_same_device(logits=logits, **others, **({} if out is None else {"out": out}))
    if lse.shape != target.shape:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; it must match target's "
                         f"{tuple(target.shape)}")
    if grad_row is not None and grad_row.shape != target.shape:
        raise ValueError(f"grad_row has shape {tuple(grad_row.shape)}; it must match target's "
                         f"{tuple(target.shape)}")
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype
                            or not out.is_contiguous()):
        raise ValueError("out must be a contiguous tensor of the logits' shape and dtype")
    n_classes = _shard_classes(logits, vocab_start, vocab_size)
    if logits.numel() == 0 or not triton_runs_on(logits.device):
        grad = cross_entropy_shard_grad_reference(logits, target, vocab_start, lse, grad_row,
                                                  ignore_index, vocab_size)
        return grad if out is None else out.copy_(grad)
    logits = logits.contiguous()
    n_rows = target.numel()
    grad = torch.empty_like(logits) if out is None else out
    if grad_row is None:
        grad_row = torch.ones(n_rows, device=logits.device, dtype=torch.float32)
    _grad[(n_rows,)](logits, target.contiguous(), lse.float().contiguous(), grad_row.contiguous(),
                     grad, n_classes, logits.shape[-1], int(vocab_start), int(ignore_index),
                     SCALE_PER_ROW=True)
    return grad

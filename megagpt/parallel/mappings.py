"""Tensor-parallel collectives as named autograd functions (Megatron's mappings).

Each function is a forward collective paired with its adjoint in the backward:

| function                          | forward                    | backward                 |
|-----------------------------------|----------------------------|--------------------------|
| copy_to_tp_region                 | identity                   | all-reduce               |
| reduce_from_tp_region             | all-reduce                 | identity                 |
| scatter_to_tp_region              | keep my slice of last dim  | all-gather last dim      |
| gather_from_tp_region             | all-gather last dim        | keep my slice            |
| scatter_to_sequence_parallel      | keep my slice of dim 0     | all-gather dim 0         |
| gather_from_sequence_parallel     | all-gather dim 0           | reduce-scatter dim 0     |
| reduce_scatter_to_sequence_parallel | reduce-scatter dim 0     | all-gather dim 0         |
| linear_over_gathered_sequence     | all-gather dim 0, linear   | all-gather dim 0 again, reduce-scatter dim 0 |

Activations are laid out [seq, batch, hidden], so sequence parallelism splits dim 0 and the
collectives work on contiguous memory. `group=None` or a group of one rank makes each an identity,
returned without an autograd function (whose host cost, about 10 µs a call and as much again in
the backward, a one-GPU step would pay four times a layer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


# torch 2.13 names these two `*_single` and deprecates the old names (a FutureWarning from every
# rank); earlier versions have only the old names
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """In place, as Megatron does: autograd's version counter catches any saved tensor this touches."""
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"reduce-scatter: dim 0 ({x.shape[0]}) not divisible by the group size {n}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} ({x.shape[dim]}) not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    return _gather_dim0(x.movedim(-1, 0), group).movedim(0, -1).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_dim0(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_dim0(grad, ctx.group), None


class _LinearOverGatheredSequence(torch.autograd.Function):
    """F.linear of the sequence all-gathered from the tensor-parallel group that keeps only this
    rank's part of the input for the backward, which gathers it again for the weight's gradient
    (Megatron's way): a gather followed by F.linear would keep the whole sequence."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_dim0(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)     # under autocast the output (and its gradient) is 16-bit
        grad_input = _reduce_scatter_dim0(grad.matmul(weight), ctx.group)
        full = _gather_dim0(x, ctx.group)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_2d.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_bias = grad_2d.sum(0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce the gradient (input of a column-parallel layer)."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward (output of a row-parallel layer); identity backward."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; all-gather the gradient."""
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dimension; keep this rank's slice of the gradient."""
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[s, b, h] -> [s/tp, b, h], this rank's chunk; all-gather the gradient."""
    return x if _size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]; reduce-scatter the gradient (the consumer is tensor-parallel)."""
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group)


def linear_over_gathered_sequence(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, group) -> torch.Tensor:
    """F.linear(gather_from_sequence_parallel_region(x), weight, bias), [s/tp, b, in] ->
    [s, b, out], keeping [s/tp, b, in] rather than [s, b, in] for the backward."""
    if _size(group) == 1:
        return F.linear(x, weight, bias)
    return _LinearOverGatheredSequence.apply(x, weight, bias, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums [s, b, h] -> summed [s/tp, b, h]; all-gather the gradient."""
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group)

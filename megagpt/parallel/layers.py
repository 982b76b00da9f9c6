"""Tensor-parallel layers: column- and row-parallel linear layers and the vocab-parallel embedding.

Each sharded parameter records how it is split, so initialisation, checkpoint export and
resharding can rebuild the full tensor:

- `param.tp_dim`: the dimension split across the tensor-parallel group (absent: replicated);
- `param.tp_stride`: blocks along that dimension each rank takes a part of (3 for fused QKV);
- `param.sequence_parallel`: a replicated parameter applied to sequence shards, whose gradient
  must be summed over the tensor-parallel group (in training `DataParallel` does it before its
  data-parallel reduction; `reduce_sequence_parallel_grads` for a model used without it).

Activations are [seq, batch, hidden]; under sequence parallelism the layers take and return
[seq/tp, batch, hidden] at their outer edges.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megagpt.parallel.mappings import (copy_to_tp_region, linear_over_gathered_sequence,
                                       reduce_from_tp_region,
                                       reduce_scatter_to_sequence_parallel_region)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {d}")
    return n // d


def mark_sharded(param: nn.Parameter, dim: int, stride: int = 1) -> nn.Parameter:
    param.tp_dim, param.tp_stride = dim, stride
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) across the tensor-parallel group.

    Input [s, b, in] replicated (or [s/tp, b, in] under sequence parallelism, all-gathered here,
    and only this rank's part kept for the backward, which gathers it again, as Megatron does);
    output [s, b, out/tp], this rank's features. `stride` keeps fused blocks (QKV) together.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group=None, bias: bool = True,
                 sequence_parallel: bool = False, stride: int = 1):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        local = _divide(out_features, group_size(tp_group), "out_features")
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, in_features)), 0, stride)
        self.bias = mark_sharded(nn.Parameter(torch.zeros(local)), 0, stride) if bias else None

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        bias = self.bias if add_bias else None
        if self.sequence_parallel:   # keeps this rank's part of the sequence for the backward
            return linear_over_gathered_sequence(x, self.weight, bias, self.tp_group)
        return F.linear(copy_to_tp_region(x, self.tp_group), self.weight, bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features) across the tensor-parallel group.

    Input [s, b, in/tp] (the output of a column-parallel layer); the partial products are summed
    with an all-reduce, or reduce-scattered along the sequence under sequence parallelism, and the
    replicated bias is added after the sum. Output [s, b, out] or [s/tp, b, out].
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group=None, bias: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        local = _divide(in_features, group_size(tp_group), "in_features")
        self.weight = mark_sharded(nn.Parameter(torch.empty(out_features, local)), 1)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        if group_size(self.tp_group) == 1:   # nothing to sum: the bias in the product's launch
            return F.linear(x, self.weight, self.bias if add_bias else None)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = reduce_from_tp_region(y, self.tp_group)
        return y + self.bias if (add_bias and self.bias is not None) else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across the tensor-parallel group.

    Rank r holds rows [r * V/tp, (r+1) * V/tp) of the padded table. Token ids outside a rank's
    range look up zeros there; the sum over ranks (all-reduce, or a reduce-scatter along the
    sequence under sequence parallelism) gives every token its row.
    Input ids [b, s]; output [s, b, h] (or [s/tp, b, h]).
    """

    def __init__(self, padded_vocab_size: int, embedding_dim: int, *, tp_group=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        local = _divide(padded_vocab_size, group_size(tp_group), "padded_vocab_size")
        self.vocab_start = group_rank(tp_group) * local
        self.vocab_end = self.vocab_start + local
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, embedding_dim)), 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.t()                                   # (s, b)
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tp_region(out, self.tp_group)


def sequence_parallel_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]


def reduce_sequence_parallel_grads(modules, tp_group) -> None:
    """Sum, over the tensor-parallel group, the gradients of replicated parameters that saw only
    this rank's sequence shard (layer norms, row-parallel biases). One all-reduce for all."""
    if group_size(tp_group) == 1:
        return
    if isinstance(modules, nn.Module):
        modules = [modules]
    grads = [p.grad for m in modules for p in sequence_parallel_params(m) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

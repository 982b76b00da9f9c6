"""Distributed, resumable batch sampling (Megatron's MegatronPretrainingSampler).

Samples are consumed in index order (the datasets shuffle internally). Each step takes the next
`micro_batch_size * dp_size` indices; data-parallel rank r gets the r-th slice of
`micro_batch_size` of them, so ranks see disjoint micro-batches and, over `grad_accum` steps, one
global batch of `micro_batch_size * dp_size * grad_accum` samples is split among them. Resuming
from `consumed_samples` (a checkpoint's count, summed over ranks) continues with the same batches
an uninterrupted run would have produced.

Use it as a DataLoader's `batch_sampler`. Every `iter()` starts again from `consumed_samples`,
so an evaluation loader (`consumed_samples=0`) yields the same batches at each evaluation.
"""
from __future__ import annotations

from collections.abc import Iterator


class MegatronPretrainingSampler:
    """Yields, for one data-parallel rank, lists of `micro_batch_size` dataset indices.

    Args:
        total_samples: samples in the dataset (indices 0 .. total_samples - 1).
        consumed_samples: samples already consumed by all ranks together (resume point).
        micro_batch_size: samples per micro-batch on one rank.
        dp_rank: this rank's index in the data-parallel group, 0 <= dp_rank < dp_size.
        dp_size: data-parallel world size.
        drop_last: drop a final incomplete step (training). Without it, the final step's indices
            are split into slices of micro_batch_size as far as they go, so ranks past the end get
            no batch for that step and the last batch may be short.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        for name, value, low in (("total_samples", total_samples, 1),
                                 ("consumed_samples", consumed_samples, 0),
                                 ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_size", dp_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} must be in [0, dp_size={dp_size})")
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} leaves nothing of "
                             f"total_samples={total_samples}; fix: build the dataset with more "
                             f"samples (it needs at least max_steps x global batch)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last
        self.step_size = micro_batch_size * dp_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.step_size)
        return full + (0 if self.drop_last else int(rest > self.dp_rank * self.micro_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.dp_rank * self.micro_batch_size
        for step_start in range(self.consumed_samples, self.total_samples, self.step_size):
            if self.drop_last and step_start + self.step_size > self.total_samples:
                return
            start = step_start + offset
            end = min(start + self.micro_batch_size, self.total_samples)
            if start < end:
                yield list(range(start, end))

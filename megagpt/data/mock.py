"""Mock pretraining data (`data.mock: true`): random tokens of the right shape, no files needed.

Item i is drawn from a generator seeded by (seed, i), so it is the same on every rank, worker and
run, whatever order items are read in. Used by benchmarks and tests.
"""
from __future__ import annotations

import numpy as np
import torch

from megagpt.data.gpt_dataset import make_item


class MockGPTDataset(torch.utils.data.Dataset):
    """`num_samples` items of uniformly random token ids in [0, vocab_size).

    Items are the dict the real datasets return: `tokens`, `labels` (int64) and `loss_mask`
    (float32 ones), each (seq_length,); labels are tokens shifted by one as in real data.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        for name, value in (("num_samples", num_samples), ("seq_length", seq_length),
                            ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be positive")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def same_order(self, num_samples: int) -> bool:
        """Item i depends on the seed and i alone: any count serves the same order."""
        return True

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} mock samples")
        rng = np.random.default_rng([self.seed, i])
        return make_item(rng.integers(0, self.vocab_size, self.seq_length + 1))


def build_mock_datasets(seq_length: int, vocab_size: int, num_samples: tuple[int, int, int],
                        seed: int = 1234):
    """(train, valid, test) mock datasets, None where the count is zero; distinct per split."""
    return tuple(MockGPTDataset(n, seq_length, vocab_size, seed + 1_000_003 * k) if n else None
                 for k, n in enumerate(num_samples))

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
    With `eod_id` (in [0, vocab_size)), a window holds documents, as Megatron's mock data does:
    random lengths of 1 to seq_length / 2 tokens, each ending with `eod_id` (which the other
    tokens never are), so data.reset_attention_mask and its kin have boundaries to find.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234,
                 eod_id: int | None = None):
        for name, value in (("num_samples", num_samples), ("seq_length", seq_length),
                            ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be positive")
        if eod_id is not None and not 0 <= eod_id < vocab_size:
            raise ValueError(f"eod_id={eod_id} must be a token id below vocab_size={vocab_size}")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.eod_id = eod_id

    def __len__(self) -> int:
        return self.num_samples

    def same_order(self, num_samples: int) -> bool:
        """Item i depends on the seed and i alone: any count serves the same order."""
        return True

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} mock samples")
        rng = np.random.default_rng([self.seed, i])
        tokens = rng.integers(0, self.vocab_size, self.seq_length + 1)
        if self.eod_id is not None:
            tokens[tokens == self.eod_id] = (self.eod_id + 1) % self.vocab_size
            ends = np.cumsum(rng.integers(1, max(1, self.seq_length // 2) + 1,
                                          self.seq_length + 1)) - 1
            tokens[ends[ends <= self.seq_length]] = self.eod_id
        return make_item(tokens)


def mock_eod_id(tokenizer_eod_id: int, vocab_size: int) -> int:
    """The end-of-document id of mock data: the tokenizer's, or the vocabulary's last id when
    the tokenizer's lies beyond a smaller (test or benchmark) vocabulary."""
    return tokenizer_eod_id if tokenizer_eod_id < vocab_size else vocab_size - 1


def build_mock_datasets(seq_length: int, vocab_size: int, num_samples: tuple[int, int, int],
                        seed: int = 1234, eod_id: int | None = None):
    """(train, valid, test) mock datasets, None where the count is zero; distinct per split;
    windows of documents ending with `eod_id` when given (see MockGPTDataset)."""
    return tuple(MockGPTDataset(n, seq_length, vocab_size, seed + 1_000_003 * k, eod_id)
                 if n else None for k, n in enumerate(num_samples))


def mock_microbatches(cfg, generator: torch.Generator) -> list[dict]:
    """One step's micro-batches of random tokens for the benchmark tools (`bench_train.py`,
    `bench_memory.py`): batch_size x seq_length each, grad_accumulation_steps of them. Under
    data.reset_attention_mask, reset_position_ids or eod_mask_loss, windows of mock documents
    (MockGPTDataset's) with what the trainer's loader adds for them."""
    from megagpt.data.documents import asks_for_documents, document_collate
    from megagpt.data.tokenizer import load_tokenizer

    t, m = cfg.training, cfg.model
    shape = (t.batch_size, m.seq_length)
    if not asks_for_documents(cfg.data):
        return [{"tokens": torch.randint(0, m.vocab_size, shape, generator=generator),
                 "labels": torch.randint(0, m.vocab_size, shape, generator=generator)}
                for _ in range(t.grad_accumulation_steps)]
    eod = mock_eod_id(load_tokenizer(cfg.data.tokenizer_path, "data.tokenizer_path").eod_id,
                      m.vocab_size)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
    data = MockGPTDataset(t.batch_size * t.grad_accumulation_steps, m.seq_length, m.vocab_size,
                          seed, eod)
    collate = document_collate(cfg.data, eod)
    return [collate([data[j * t.batch_size + i] for i in range(t.batch_size)])
            for j in range(t.grad_accumulation_steps)]

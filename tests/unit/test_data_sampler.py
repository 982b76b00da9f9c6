"""MegatronPretrainingSampler: disjoint rank slices, deterministic order, resume, eval, errors."""
import pytest
import torch

from megagpt.data.mock import MockGPTDataset
from megagpt.data.sampler import MegatronPretrainingSampler


def batches(total, consumed, mb, dp, drop_last=True):
    return [list(MegatronPretrainingSampler(total, consumed, mb, r, dp, drop_last)) for r in range(dp)]


def test_ranks_get_disjoint_slices_of_each_global_batch():
    per_rank = batches(total=40, consumed=0, mb=2, dp=3)
    assert per_rank[0][:2] == [[0, 1], [6, 7]]
    assert per_rank[1][:2] == [[2, 3], [8, 9]]
    assert per_rank[2][:2] == [[4, 5], [10, 11]]
    seen = [i for rank in per_rank for b in rank for i in b]
    assert sorted(seen) == list(range(36))  # 6 full steps of 6; the last 4 samples dropped
    assert all(len(rank) == 6 == len(MegatronPretrainingSampler(40, 0, 2, r, 3)) for r, rank in enumerate(per_rank))


def test_resume_continues_exactly():
    full = batches(total=64, consumed=0, mb=2, dp=2)
    steps_done = 5  # micro-batch steps, each consumes mb * dp = 4 samples
    resumed = batches(total=64, consumed=steps_done * 4, mb=2, dp=2)
    assert all(r == f[steps_done:] for r, f in zip(resumed, full))


def test_every_iteration_restarts_for_evaluation():
    sampler = MegatronPretrainingSampler(10, 0, 2, 0, 1, drop_last=True)
    assert list(sampler) == list(sampler) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_without_drop_last_the_tail_is_split_as_far_as_it_goes():
    per_rank = batches(total=11, consumed=0, mb=2, dp=2, drop_last=False)
    assert per_rank[0] == [[0, 1], [4, 5], [8, 9]]
    assert per_rank[1] == [[2, 3], [6, 7], [10]]
    assert batches(total=9, consumed=0, mb=2, dp=2, drop_last=False)[1] == [[2, 3], [6, 7]]
    assert len(MegatronPretrainingSampler(9, 0, 2, 1, 2, drop_last=False)) == 2
    assert len(MegatronPretrainingSampler(11, 0, 2, 1, 2, drop_last=False)) == 3
    for total in range(1, 14):          # len() is what iterating gives, at every boundary
        for mb in (1, 2, 3):
            for dp in (1, 2, 3):
                for rank in range(dp):
                    for drop_last in (False, True):
                        s = MegatronPretrainingSampler(total, 0, mb, rank, dp, drop_last=drop_last)
                        assert len(s) == len(list(s)), (total, mb, rank, dp, drop_last)


@pytest.mark.parametrize("args, message", [
    ((0, 0, 1, 0, 1), "total_samples=0 must be an integer >= 1"),
    ((10, -1, 1, 0, 1), "consumed_samples=-1"),
    ((10, 0, 0, 0, 1), "micro_batch_size=0"),
    ((10, 0, 1, 2, 2), r"dp_rank=2 must be in \[0, dp_size=2\)"),
    ((10, 10, 1, 0, 1), "consumed_samples=10 leaves nothing of total_samples=10"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        MegatronPretrainingSampler(*args)


def test_as_a_dataloader_batch_sampler():
    ds = MockGPTDataset(12, seq_length=8, vocab_size=100)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=MegatronPretrainingSampler(12, 4, 2, 1, 2))
    batch = next(iter(loader))
    assert batch["tokens"].shape == (2, 8) and batch["loss_mask"].shape == (2, 8)
    assert torch.equal(batch["tokens"][0], ds[6]["tokens"])  # consumed 4, rank 1 of 2: samples 6, 7

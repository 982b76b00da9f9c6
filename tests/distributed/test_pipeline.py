"""Pipeline schedules: activation memory bound, and failures instead of hangs."""
import os
import time

import pytest
import torch

from megagpt.parallel import pipeline, state
from megagpt.parallel.pipeline import P2P, get_forward_backward_func
from megagpt.parallel.random import seed_everything
from megagpt.testing import fixed_batches, run_distributed, split_microbatches, tiny_config
from megagpt.training.engine import Engine


def test_schedule_choice():
    assert get_forward_backward_func(1, 1) is pipeline.forward_backward_no_pipelining
    assert get_forward_backward_func(2, 1) is pipeline.forward_backward_1f1b
    assert get_forward_backward_func(4, 2) is pipeline.forward_backward_interleaved


def _count_alive(rank, world, vp):
    cfg = tiny_config(pp=world, vp=vp, micro=1)      # 8 micro-batches
    ps = state.initialize_parallel(1, world)
    seed_everything(1, 0, ps.pp_rank)
    engine = Engine(cfg, ps, p2p_timeout_s=60)
    alive, peak = [0], [0]
    forward, backward = pipeline._forward_step, pipeline._backward_step

    def counting_forward(*args):
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        return forward(*args)

    def counting_backward(*args):
        alive[0] -= 1
        return backward(*args)

    pipeline._forward_step, pipeline._backward_step = counting_forward, counting_backward
    engine.train_step(split_microbatches(fixed_batches(1)[0], 0, 1, 1), 1e-3)
    return peak[0], len(engine.chunks[0].layers)


@pytest.mark.parametrize("pp", [2, 4])
def test_1f1b_keeps_at_most_pp_minus_rank_microbatches_alive(pp):
    results = run_distributed(_count_alive, pp, 1)
    assert [peak for peak, _ in results] == [pp - r for r in range(pp)]


def _never_sends(rank, world):
    p2p = P2P(pp_rank=rank, pp_size=2, prev_rank=1 - rank, next_rank=1 - rank, shape=(4, 2, 8),
              dtype=torch.float32, device=torch.device("cpu"), timeout_s=2)
    if rank == 1:
        start = time.monotonic()
        try:
            p2p.exchange(recv_prev=True)
        except RuntimeError as e:
            return str(e), time.monotonic() - start
        return "received", 0.0
    time.sleep(4)
    return None


def test_a_stage_that_never_sends_is_an_error_not_a_hang():
    message, waited = run_distributed(_never_sends, 2, timeout=60)[1]
    assert "pipeline rank 1: no activations from rank 0 within 2 s" in message
    assert "the neighbouring stage died or stopped sending" in message
    assert waited < 10


def _peer_dies(rank, world):
    p2p = P2P(pp_rank=rank, pp_size=2, prev_rank=1 - rank, next_rank=1 - rank, shape=(4, 2, 8),
              dtype=torch.float32, device=torch.device("cpu"), timeout_s=5)
    if rank == 0:
        os._exit(1)
    try:
        p2p.exchange(recv_prev=True)
    except RuntimeError as e:
        return str(e)
    return "received"


def test_a_dead_peer_is_an_error():
    with pytest.raises(RuntimeError, match="rank 0 exited with code 1 without a result"):
        run_distributed(_peer_dies, 2, timeout=30)

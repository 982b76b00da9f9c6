"""Pipeline schedules: activation memory bound, and failures instead of hangs."""
import datetime
import os
import time
import weakref

import pytest
import torch
import torch.distributed as dist

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


def _outputs_alive_at_backward(rank, world, vp, recompute):
    """For every backward of a chunk that sends its output: how many of this rank's sent outputs
    are still alive then (weak references to them)."""
    cfg = tiny_config(pp=world, vp=vp, micro=1, training__recompute=recompute)
    ps = state.initialize_parallel(1, world)
    seed_everything(1, 0, ps.pp_rank)
    engine = Engine(cfg, ps, p2p_timeout_s=60)
    sent, alive = [], []
    forward, backward = pipeline._forward_step, pipeline._backward_step

    def recording_forward(st, chunk_id, x):
        out = forward(st, chunk_id, x)
        if out.dim() > 0:                       # not the loss
            sent.append(weakref.ref(out))
        return out

    def recording_backward(st, chunk_id, x, out, grad):
        if grad is not None:
            alive.append(sum(ref() is not None for ref in sent))
        return backward(st, chunk_id, x, out, grad)

    pipeline._forward_step, pipeline._backward_step = recording_forward, recording_backward
    loss = engine.train_step(split_microbatches(fixed_batches(1)[0], 0, 1, 1), 1e-3).loss
    return alive, len(sent), loss


@pytest.mark.parametrize("vp,recompute", [(1, "none"), (2, "full")])
def test_a_sent_output_is_freed_before_its_backward(vp, recompute):
    """A stage keeps only the graph of an output it has sent (Megatron frees the same tensor): at
    each backward, none of its sent outputs is alive, except, in the interleaved steady state, the
    one forwarded just before and sent together with this backward's gradient."""
    results = run_distributed(_outputs_alive_at_backward, 2, vp, recompute)
    allowed = 0 if vp == 1 else 1
    for rank, (alive, n_sent, _) in enumerate(results):
        # 8 micro-batches; every chunk but the last virtual stage's sends its output
        assert n_sent == len(alive) == (8 * vp if rank == 0 else 8 * (vp - 1))
        assert max(alive, default=0) <= allowed
    reference = run_distributed(_outputs_alive_at_backward, 1, 1, recompute)[0][2]
    assert results[1][2] == pytest.approx(reference, rel=1e-5)


def _evaluate(rank, world, vp):
    """eval_step's loss, its forwards, the most of their outputs alive at a forward, and the
    exchange's timeout (the collectives')."""
    cfg = tiny_config(pp=world, vp=vp, micro=1, parallel__distributed_timeout_minutes=7)
    ps = state.initialize_parallel(1, world)
    seed_everything(1, 0, ps.pp_rank)
    engine = Engine(cfg, ps)
    made, alive, forward = [], [], pipeline._forward_step

    def recording_forward(st, chunk_id, x):
        alive.append(sum(ref() is not None for ref in made))
        out = forward(st, chunk_id, x)
        made.append(weakref.ref(out))
        return out

    pipeline._forward_step = recording_forward
    loss = engine.eval_step(split_microbatches(fixed_batches(1)[0], 0, 1, 1))
    return loss, len(made), max(alive), engine.p2p.timeout_s


@pytest.mark.parametrize("pp,vp", [(2, 1), (2, 2)])
def test_evaluation_matches_one_process_and_keeps_no_output(pp, vp):
    """Evaluation runs every forward first and keeps no output for a backward (it kept them all)."""
    reference = run_distributed(_evaluate, 1, 1)[0][0]
    for loss, made, alive, timeout_s in run_distributed(_evaluate, pp, vp):
        assert loss == pytest.approx(reference, rel=1e-6)
        assert made == 8 * vp and alive == 0       # 8 micro-batches, vp chunks each
        assert timeout_s == 7 * 60     # a CPU stage of a large model takes minutes a micro-batch


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
    assert "the neighbouring stage stopped sending; see its log" in message
    assert waited < 10


def _peer_dies(rank, world):
    p2p = P2P(pp_rank=rank, pp_size=2, prev_rank=1 - rank, next_rank=1 - rank, shape=(4, 2, 8),
              dtype=torch.float32, device=torch.device("cpu"), timeout_s=5)
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:   # once rank 1 is past joining the group (dying sooner failed its join instead)
        store.wait(["rank 1 joined"])
        os._exit(1)
    store.set("rank 1 joined", "1")
    try:
        p2p.exchange(recv_prev=True)
    except RuntimeError as e:
        return str(e)
    return "received"


def test_a_dead_peer_is_an_error():
    with pytest.raises(RuntimeError, match="rank 0 exited with code 1 without a result"):
        run_distributed(_peer_dies, 2, timeout=30)


class _Work:
    def __init__(self, waits):
        self.waits = waits

    def wait(self, *args):
        self.waits.append(args)


@pytest.mark.parametrize("device,timed", [("cpu", True), ("cuda", False)])
def test_waits_are_timed_on_the_cpu_and_stream_ordered_on_cuda(monkeypatch, device, timed):
    """gloo: a timed wait, so a silent peer is an error; NCCL: a plain wait, which only orders the
    compute stream after the transfer (a timed one would block the host on every exchange)."""
    waits = []
    monkeypatch.setattr(torch.distributed, "P2POp", lambda op, tensor, peer: (op, tensor, peer))
    monkeypatch.setattr(torch.distributed, "batch_isend_irecv",
                        lambda ops: [_Work(waits) for _ in ops])
    p2p = P2P(pp_rank=0, pp_size=2, prev_rank=1, next_rank=1, shape=(4, 2, 8),
              dtype=torch.float32, device=torch.device(device), timeout_s=7)
    p2p.exchange(send_next=torch.ones(4, 2, 8), send_prev=torch.ones(4, 2, 8))
    assert len(waits) == 2
    assert all(args == ((datetime.timedelta(seconds=7),) if timed else ()) for args in waits)


def _world(rank, world_size):
    return (rank, dist.get_world_size())


def test_a_port_taken_before_rank_0_listens_is_replaced(monkeypatch):
    import socket

    import megagpt.testing as testing
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], testing.free_port()]
        monkeypatch.setattr(testing, "free_port", lambda: ports.pop(0))
        assert testing.run_distributed(_world, 2) == [(0, 2), (1, 2)]
        assert ports == []

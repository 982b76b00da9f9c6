"""Tensor-parallel layers, collectives and the vocab-parallel loss equal their one-process math."""
import os

import pytest
import torch
import torch.nn.functional as F

from megagpt.parallel import state
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagpt.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megagpt.parallel.random import shard, unshard
from megagpt.testing import run_distributed


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _mlp_and_embedding(rank, world, sequence_parallel):
    ps = state.initialize_parallel(world, 1)
    g, r = ps.tp_group, ps.tp_rank
    torch.manual_seed(0)
    s, b, h, f, vocab, padded = 8, 3, 6, 12, 37, 40
    w1, b1, w2, b2 = torch.randn(f, h), torch.randn(f), torch.randn(h, f), torch.randn(h)
    table = torch.randn(padded, h)
    ids = torch.randint(0, vocab, (b, s))
    x = torch.randn(s, b, h, requires_grad=True)

    fc1 = ColumnParallelLinear(h, f, tp_group=g, sequence_parallel=sequence_parallel)
    fc2 = RowParallelLinear(f, h, tp_group=g, sequence_parallel=sequence_parallel)
    emb = VocabParallelEmbedding(padded, h, tp_group=g, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        fc1.weight.copy_(shard(w1, 0, r, world)); fc1.bias.copy_(shard(b1, 0, r, world))
        fc2.weight.copy_(shard(w2, 1, r, world)); fc2.bias.copy_(b2)
        emb.weight.copy_(shard(table, 0, r, world))
    x_in = x.chunk(world, 0)[r] if sequence_parallel else x
    y = fc2(F.gelu(fc1(x_in)))
    e = emb(ids)
    (y.square().sum() + e.square().sum()).backward()
    return dict(y=y.detach(), e=e.detach(), dx=x.grad, dw1=fc1.weight.grad, dw2=fc2.weight.grad,
                db1=fc1.bias.grad, db2=fc2.bias.grad, demb=emb.weight.grad,
                ref=(w1, b1, w2, b2, table, ids, x.detach()))


def _saved_by_column_parallel(rank, world, add_bias):
    ps = state.initialize_parallel(world, 1)
    fc1 = ColumnParallelLinear(6, 12, tp_group=ps.tp_group, sequence_parallel=True)
    x = torch.randn(4, 3, 6, requires_grad=True)               # this rank's part of s = 8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = fc1(x, add_bias=add_bias)
    y.sum().backward()
    return y.shape, sorted(saved), fc1.bias.grad is None


def _under_autocast(rank, world):
    ps = state.initialize_parallel(world, 1)
    fc1 = ColumnParallelLinear(6, 12, tp_group=ps.tp_group, sequence_parallel=True)
    x = torch.randn(4, 3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fc1(x)
    y.float().sum().backward()
    return y.dtype, x.grad.dtype, fc1.weight.grad.dtype, fc1.bias.grad.dtype


def test_sequence_parallel_column_layer_under_autocast():
    """Autocast makes the output and its gradient 16-bit over float32 weights: the backward
    multiplied a bf16 gradient by the float32 weight and failed."""
    for dtypes in run_distributed(_under_autocast, 2):
        assert dtypes == (torch.bfloat16, torch.float32, torch.float32, torch.float32)


@pytest.mark.parametrize("add_bias", [True, False])
def test_sequence_parallel_column_layer_keeps_only_its_part_of_the_input(add_bias):
    """The gathered [s, b, h] input was kept for the backward, tp times this rank's part; it
    is gathered again there instead, as Megatron does (its activation count assumes it)."""
    for y_shape, saved, no_bias_grad in run_distributed(_saved_by_column_parallel, 2, add_bias):
        assert y_shape == (8, 3, 6)
        assert saved == [(4, 3, 6), (6, 6)]                    # x's part and the weight shard
        assert no_bias_grad == (not add_bias)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_column_row_and_embedding_equal_one_process(sequence_parallel):
    world = 2
    outs = run_distributed(_mlp_and_embedding, world, sequence_parallel)
    w1, b1, w2, b2, table, ids, x = outs[0]["ref"]
    params = [p.clone().requires_grad_() for p in (w1, b1, w2, b2, table)]
    xr = x.clone().requires_grad_()
    y = F.linear(F.gelu(F.linear(xr, params[0], params[1])), params[2], params[3])
    e = F.embedding(ids.t(), params[4])
    (y.square().sum() + e.square().sum()).backward()
    cat = (lambda k: torch.cat([o[k] for o in outs], 0)) if sequence_parallel else (lambda k: outs[0][k])
    close(cat("y"), y.detach())
    close(cat("e"), e.detach())
    grad_x = outs[0]["dx"]
    if sequence_parallel:   # each rank only back-propagates into its own sequence shard of x
        grad_x = sum(o["dx"] for o in outs)
    close(grad_x, xr.grad)
    close(unshard([o["dw1"] for o in outs], 0), params[0].grad)
    close(unshard([o["db1"] for o in outs], 0), params[1].grad)
    close(unshard([o["dw2"] for o in outs], 1), params[2].grad)
    db2 = sum(o["db2"] for o in outs) if sequence_parallel else outs[0]["db2"]
    close(db2, params[3].grad)
    close(unshard([o["demb"] for o in outs], 0), params[4].grad)


def _cross_entropy(rank, world, fused=False, vocab=37, padded=40):
    if fused:    # the Triton shard kernels, interpreted on the CPU (this forked worker only)
        os.environ["TRITON_INTERPRET"] = "1"
    ps = state.initialize_parallel(world, 1)
    torch.manual_seed(1)
    logits = torch.randn(5, 3, padded) * 3
    logits[..., vocab:] = 5.0          # padding that would win the softmax if it were read
    target = torch.randint(0, vocab, (5, 3))
    local = logits.chunk(world, -1)[ps.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, vocab, ps.tp_group, fused=fused)
    weights = torch.arange(15.0).view(5, 3)
    (loss * weights).sum().backward()
    return loss.detach(), local.grad, logits, target


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("world, vocab, padded", [(1, 37, 40), (2, 37, 40), (4, 37, 40),
                                                  (4, 5, 8)])
def test_vocab_parallel_cross_entropy_ignores_padding(world, vocab, padded, fused):
    """padded 40 = 4 x 10: at world 4 the last shard holds 7 classes and 3 padding columns;
    5 classes padded to 8 over 4 ranks: the last two shards are padding only (a 65-character
    vocabulary padded to 256 at tp 2 makes one)."""
    outs = run_distributed(_cross_entropy, world, fused=fused, vocab=vocab, padded=padded)
    _, _, logits, target = outs[0]
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), target.reshape(-1),
                          reduction="none").view(5, 3)
    (ref * torch.arange(15.0).view(5, 3)).sum().backward()
    close(outs[0][0], ref.detach())
    grad = torch.cat([o[1] for o in outs], -1)
    close(grad, full.grad)
    assert torch.all(grad[..., vocab:] == 0)


def _fused_loss_twice(rank, world):
    os.environ["TRITON_INTERPRET"] = "1"   # this forked worker only
    ps = state.initialize_parallel(world, 1)
    torch.manual_seed(1)
    leaf = torch.randn(40, 5, requires_grad=True)
    logits = leaf.t()                      # non-contiguous: worked on a private copy
    target = torch.randint(0, 37, (5,))
    loss = vocab_parallel_cross_entropy(logits, target, 37, ps.tp_group, fused=True).sum()
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as e:
        return str(e), leaf.grad
    return "no error", leaf.grad


def test_fused_vocab_parallel_loss_non_contiguous_and_once_a_forward():
    """The fused loss writes its gradient over the logits: non-contiguous logits are copied
    first (the caller's tensor is left alone), and a second backward of one forward is an error
    instead of a gradient computed from the gradient."""
    message, grad = run_distributed(_fused_loss_twice, 1)[0]
    assert "backward ran twice on one forward" in message
    torch.manual_seed(1)
    full = torch.randn(40, 5).t().clone().requires_grad_()
    target = torch.randint(0, 37, (5,))
    F.cross_entropy(full[:, :37], target, reduction="sum").backward()
    close(grad, full.grad.t())


def test_shard_and_unshard_with_stride():
    full = torch.arange(24.0).view(12, 2)
    parts = [shard(full, 0, r, 2, stride=3) for r in range(2)]
    assert parts[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]
    close(unshard(parts, 0, stride=3), full)


def _hang(rank, world):
    if rank == 0:
        import time
        time.sleep(60)


def test_a_hanging_rank_becomes_an_error():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
        run_distributed(_hang, 2, timeout=5)


def _fail(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:(.|\n)*boom on purpose"):
        run_distributed(_fail, 2, timeout=30)


def _mappings(rank, world):
    """Each mapping's forward against its one-process meaning, and its backward against the
    forward's adjoint: <f(x), y> = <x, f*(y)>, where the gradient of sum(f(x) * y) with respect
    to x is f*(y). A tensor is replicated (R: the same on every rank, counted once in an inner
    product) or distributed (D: each rank's its own, summed over the ranks); so is its gradient."""
    from megagpt.parallel import mappings
    ps = state.initialize_parallel(world, 1)
    g, r = ps.tp_group, ps.tp_rank
    torch.manual_seed(0)
    full = torch.randn(world, 4, 6, 10)     # a tensor for each rank, [s, b, h], s and h even
    gathered = {0: torch.cat(list(full), 0), -1: torch.cat(list(full), -1)}
    kinds = {   # name: (input, output, the output's one-process meaning)
        "copy_to_tp_region": ("R", "D", full[0]),
        "reduce_from_tp_region": ("D", "R", full.sum(0)),
        "scatter_to_tp_region": ("R", "D", full[0].chunk(world, -1)[r]),
        "gather_from_tp_region": ("D", "R", gathered[-1]),
        "scatter_to_sequence_parallel_region": ("R", "D", full[0].chunk(world, 0)[r]),
        "gather_from_sequence_parallel_region": ("D", "D", gathered[0]),
        "reduce_scatter_to_sequence_parallel_region": ("D", "D", full.sum(0).chunk(world, 0)[r]),
    }
    results = {}
    for name, (kind_in, kind_out, expected) in kinds.items():
        x0 = full[0 if kind_in == "R" else r]
        x = x0.clone().requires_grad_()     # an all-reduce writes its sum over its input
        out = getattr(mappings, name)(x, g)
        close(out, expected)
        y = torch.randn(world, *out.shape)[0 if kind_out == "R" else r]
        (out * y).sum().backward()
        inner = torch.stack([(out.detach() * y).sum(), (x0 * x.grad).sum()]).double()
        torch.distributed.all_reduce(inner, group=g)
        inner /= torch.tensor([world if kind_out == "R" else 1, world if kind_in == "R" else 1])
        results[name] = inner.tolist()
    w, bias = torch.randn(5, 10), torch.randn(5)
    out = mappings.linear_over_gathered_sequence(full[r], w, bias, g)
    close(out, F.linear(gathered[0], w, bias))
    return results


def test_every_mapping_is_its_collective_and_its_backward_the_adjoint():
    """scatter_to_tp_region and gather_from_tp_region had no test: no layer uses them."""
    for results in run_distributed(_mappings, 2):
        assert set(results) == {"copy_to_tp_region", "reduce_from_tp_region",
                                "scatter_to_tp_region", "gather_from_tp_region",
                                "scatter_to_sequence_parallel_region",
                                "gather_from_sequence_parallel_region",
                                "reduce_scatter_to_sequence_parallel_region"}
        for name, (forward, backward) in results.items():
            assert forward == pytest.approx(backward, rel=1e-5, abs=1e-4), name

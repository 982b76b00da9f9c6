"""Tensor and sequence parallel GPT equals the one-process model: logits, loss, every gradient."""
import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist

from megagpt.config import KernelsConfig, ModelConfig
from megagpt.model.gpt import GPTStage, StageSpec, init_weights
from megagpt.parallel import state
from megagpt.parallel.layers import reduce_sequence_parallel_grads
from megagpt.parallel.random import get_rng_tracker, seed_everything, unshard
from megagpt.testing import run_distributed

KERNELS = KernelsConfig(attention="eager", layernorm="torch", softmax="torch", bias_gelu="torch",
                        cross_entropy="torch")
VOCAB = 1001   # not a multiple of any tp: exercises the padding


def _gather_full(t, dim, stride, group, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return unshard(parts, dim, stride)


def _run(rank, world, sequence_parallel=False, recompute="none", dropout=0.0, seed=7,
         cross_entropy="torch", attention="eager", d_model=64):
    if "triton" in (cross_entropy, attention):   # interpreted on the CPU (this worker only)
        os.environ["TRITON_INTERPRET"] = "1"
    ps = state.initialize_parallel(world, 1)
    seed_everything(seed, ps.tp_rank, ps.pp_rank)
    m = ModelConfig(vocab_size=VOCAB, d_model=d_model, n_heads=4, n_layers=2, seq_length=16,
                    dropout=dropout)
    kernels = dataclasses.replace(KERNELS, cross_entropy=cross_entropy, attention=attention)
    model = GPTStage(m, kernels, StageSpec(0, m.n_layers, True, True), tp_group=ps.tp_group,
                     sequence_parallel=sequence_parallel, recompute=recompute)
    init_weights(model, m, seed)
    data = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (3, 16), generator=data)
    labels = torch.randint(0, VOCAB, (3, 16), generator=data)
    model.train()
    losses = []
    for _ in range(2):      # two passes: dropout masks must keep advancing identically
        model.zero_grad()
        loss_sum, n = model(ids, labels)
        (loss_sum / n).backward()
        losses.append((loss_sum / n).item())
    reduce_sequence_parallel_grads(model, ps.tp_group)
    with torch.no_grad():
        model.eval()
        logits = _gather_full(model(ids), 2, 1, ps.tp_group, world)[..., :VOCAB]
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(p, "tp_dim"):
            g = _gather_full(g, p.tp_dim, p.tp_stride, ps.tp_group, world)
        if name == "embedding.wte.weight":
            g = g[:VOCAB]
        grads[name] = g
    return dict(losses=losses, logits=logits, grads=grads)


@functools.lru_cache(maxsize=None)
def reference(**kwargs):
    return run_distributed(_run, 1, **kwargs)[0]


def assert_same(out, ref, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0)
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=rtol, atol=max(atol, 1e-5))
    assert out["grads"].keys() == ref["grads"].keys()
    for k, g in ref["grads"].items():
        torch.testing.assert_close(out["grads"][k], g, rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("tp, sequence_parallel", [
    (2, False), (2, True),
    pytest.param(4, False, marks=pytest.mark.slow), pytest.param(4, True, marks=pytest.mark.slow)])
def test_tensor_parallel_equals_one_process(tp, sequence_parallel):
    outs = run_distributed(_run, tp, sequence_parallel=sequence_parallel)
    for out in outs:   # every rank agrees on the loss and holds the same gathered tensors
        assert_same(out, reference())


def test_fused_vocab_parallel_loss_equals_one_process():
    """kernels.cross_entropy=triton at tp 2 (the shard kernels, vocabulary 1001 padded) equals the
    one-process torch loss."""
    for out in run_distributed(_run, 2, sequence_parallel=True, cross_entropy="triton"):
        assert_same(out, reference())


def test_fused_loss_on_one_process_equals_torch():
    """kernels.cross_entropy=triton at tp 1: the fused kernel's float32 sum over the padded
    vocabulary, read in place, equals the torch loss."""
    assert_same(reference(cross_entropy="triton"), reference())


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, True)])
def test_triton_attention_equals_eager(tp, sequence_parallel):
    """kernels.attention=triton (the packed-qkv kernels, reading the fused projection in place,
    head dim 32) equals eager attention on one process, at tp 1 and at tp 2 with sequence
    parallelism."""
    for out in run_distributed(_run, tp, sequence_parallel=sequence_parallel, attention="triton",
                               d_model=128):
        assert_same(out, reference(d_model=128), atol=1e-5)


def test_dropout_is_deterministic_for_a_seed_under_tp_and_sp():
    first = run_distributed(_run, 2, sequence_parallel=True, dropout=0.2)
    again = run_distributed(_run, 2, sequence_parallel=True, dropout=0.2)
    other_seed = run_distributed(_run, 2, sequence_parallel=True, dropout=0.2, seed=8)
    assert first[0]["losses"] == again[0]["losses"]
    assert first[0]["losses"][0] != first[0]["losses"][1]           # new masks each pass
    assert first[0]["losses"] != other_seed[0]["losses"]
    no_dropout = run_distributed(_run, 2, sequence_parallel=True)
    assert first[0]["losses"] != no_dropout[0]["losses"]


def test_dropout_agrees_where_tensor_parallel_ranks_hold_the_same_activations():
    """Megatron's rule, without sequence parallelism: the residual stream and the embedding are
    replicated on every tensor-parallel rank, so their dropout masks must be the same (else
    the ranks' copies drift apart: the replicated parameters' own gradients, before any
    all-reduce, differ); a rank's attention heads are its own, so their masks come from a
    stream seeded per rank. Either rule broken left every other tensor-parallel test passing."""
    out = run_distributed(_run, 2, dropout=0.2)
    replicated = [k for k in out[0]["grads"] if "ln" in k or k.endswith(("proj.bias", "fc2.bias"))
                  or k == "embedding.wpe.weight"]
    assert len(replicated) == 15
    for k in replicated:
        assert torch.equal(out[0]["grads"][k], out[1]["grads"][k]), k
    draws = []
    for tp_rank in (0, 1):
        seed_everything(7, tp_rank)
        with get_rng_tracker().fork():
            heads = torch.rand(8)
        draws.append((torch.rand(8), heads))
    assert torch.equal(draws[0][0], draws[1][0])        # the default stream: replicated
    assert not torch.equal(draws[0][1], draws[1][1])    # the tensor-parallel one: per rank
    seed_everything(7, 0, pp_rank=1)                    # another stage: streams of its own
    with get_rng_tracker().fork():
        heads = torch.rand(8)
    assert not torch.equal(torch.rand(8), draws[0][0]) and not torch.equal(heads, draws[0][1])


@pytest.mark.parametrize("recompute, attention", [
    ("selective", "eager"), ("full", "eager"),
    pytest.param("full", "triton", marks=pytest.mark.slow)])
def test_recompute_gives_identical_gradients_with_dropout(recompute, attention):
    """Recomputing a block (or eager attention) in the backward draws the same dropout masks;
    for the Triton attention, the same seed from the tensor-parallel stream."""
    d_model = 128 if attention == "triton" else 64                  # head size 32 for the kernel
    base = run_distributed(_run, 2, sequence_parallel=True, dropout=0.2, attention=attention,
                           d_model=d_model)
    again = run_distributed(_run, 2, sequence_parallel=True, dropout=0.2, recompute=recompute,
                            attention=attention, d_model=d_model)
    for out, ref in zip(again, base):
        assert out["losses"] == ref["losses"]
        for k, g in ref["grads"].items():
            torch.testing.assert_close(out["grads"][k], g, rtol=0, atol=0, msg=k)

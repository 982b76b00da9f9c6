"""DataParallel: 16-bit parameters with float32 masters and gradient buckets (one process); the
tensor-parallel steps before the data-parallel reduction (two gloo processes)."""
import pytest
import torch
import torch.nn as nn

from megagpt.parallel import state
from megagpt.parallel.data_parallel import DataParallel, global_grad_norm
from megagpt.testing import run_distributed


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _loss(model, seed, dtype=None):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed))
    return model(x.to(dtype or next(model.parameters()).dtype)).float().pow(2).sum()


def test_bf16_parameters_keep_float32_masters_and_gradients():
    model = _model()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DataParallel(model, param_dtype=torch.bfloat16)
    named = dict(dp.optimizer_params())
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, fp32[name].bfloat16())
        assert named[name].dtype == torch.float32 and torch.equal(named[name], fp32[name])
        assert named[name].source is p

    # Two micro-batches: each bf16 gradient is added into the float32 slot and dropped.
    expected = {n: torch.zeros_like(v) for n, v in fp32.items()}
    for seed in (1, 2):
        copy = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        _loss(lambda x: torch.func.functional_call(model, copy, (x,)), seed, torch.bfloat16).backward()
        for n in expected:
            expected[n] += copy[n].grad.float()
        _loss(model, seed).backward()
    for name, p in model.named_parameters():
        assert p.grad is None
        assert torch.equal(named[name].grad, expected[name]), name

    with torch.no_grad():
        for master in named.values():
            master.add_(0.001)
    dp.after_optimizer_step()
    for name, p in model.named_parameters():
        assert torch.equal(p, named[name].detach().bfloat16())

    dp.zero_grad()
    assert all(torch.count_nonzero(master.grad) == 0 for master in named.values())


def test_master_weights_exposes_and_loads_the_float32_masters():
    model = _model()
    dp = DataParallel(model, param_dtype=torch.bfloat16)
    named = dict(dp.optimizer_params())
    new = {n: torch.full_like(v, 1.0 + 2 ** -12, dtype=torch.float32) for n, v in model.state_dict().items()}
    with dp.master_weights():
        state = model.state_dict()
        assert all(v.dtype == torch.float32 for v in state.values())
        model.load_state_dict(new)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(named[name].detach(), new[name])        # not rounded to bf16
        assert torch.equal(p, torch.ones_like(p))                   # 1 + 2**-12 in bf16
    _loss(model, 3).backward()                                      # still trains after the swap
    assert all(torch.count_nonzero(m.grad) > 0 for m in named.values())


def test_float32_parameters_are_their_own_masters():
    model = _model()
    dp = DataParallel(model)
    named = dict(dp.optimizer_params())
    for name, p in model.named_parameters():
        assert named[name] is p and p.dtype == torch.float32
    _loss(model, 1).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


def test_bad_param_dtype_and_a_half_precision_model_are_refused():
    with pytest.raises(ValueError, match=r"param_dtype=torch.int8 must be torch.float32, "
                                         r"torch.bfloat16 or torch.float16"):
        DataParallel(_model(), param_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"2.bias: DataParallel takes the model in float32 .* "
                                        r"got torch.bfloat16"):
        DataParallel(_model().bfloat16(), param_dtype=torch.bfloat16)


def _tensor_parallel_replicas(rank, world, dtype):
    """tp = 2: a sharded parameter, a replicated one whose two ranks' gradients differ (as kernels
    that round differently would make them), and one applied to sequence shards."""
    ps = state.initialize_parallel(world, 1)
    module = nn.Module()
    module.shard = nn.Parameter(torch.ones(3))
    module.shard.tp_dim = 0
    module.replica = nn.Parameter(torch.ones(4))
    module.sp = nn.Parameter(torch.ones(2))
    module.sp.sequence_parallel = True
    wrapper = DataParallel(module, tp_group=ps.tp_group, param_dtype=dtype)
    wrapper.zero_grad()
    wrapper.start_grad_sync()
    factor = 1.0 + rank / 3            # rank 1's gradient differs from rank 0's
    (module.shard.sum() * (rank + 1) + (module.replica * factor).sum()
     + (module.sp * (rank + 1)).sum()).backward()
    wrapper.finish_grad_sync()
    grads = {name: wrapper.main_grads[p].clone() for name, p in module.named_parameters()}
    return grads, global_grad_norm([wrapper], ps.tp_rank, ps.tp_group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_parallel_replicas_get_rank_0s_gradient(dtype):
    """A replicated parameter ends with tensor-parallel rank 0's gradient on every rank (so the
    replicas never drift apart); a sequence-parallel one with the sum over ranks; a sharded one
    keeps its own; the global norm counts the replicas once and agrees on both ranks."""
    (g0, norm0), (g1, norm1) = run_distributed(_tensor_parallel_replicas, 2, dtype)
    for grads, own in ((g0, 1.0), (g1, 2.0)):
        assert torch.equal(grads["replica"], torch.ones(4))
        assert torch.equal(grads["sp"], torch.full((2,), 3.0))
        assert torch.equal(grads["shard"], torch.full((3,), own))
    want = (3 * 1.0 ** 2 + 3 * 2.0 ** 2 + 4 * 1.0 + 2 * 3.0 ** 2) ** 0.5
    assert norm0 == norm1 == pytest.approx(want, rel=1e-6)


def test_the_norm_of_a_large_gradient_is_exact_on_the_cpu():
    """The CPU's float32 norm of a 6.4M-element gradient was 1.8e-4 off (its squares summed one
    after another), enough for layouts to log different norms: float64 there."""
    module = nn.Linear(2_560, 2_500, bias=False)
    wrapper = DataParallel(module)
    wrapper.zero_grad()
    wrapper.start_grad_sync()
    (module.weight * torch.randn(2_500, 2_560, generator=torch.Generator().manual_seed(0))
     * 1e-3).sum().backward()
    wrapper.finish_grad_sync()
    exact = wrapper.main_grads[module.weight].double().square().sum().sqrt().item()
    assert global_grad_norm([wrapper], 0) == pytest.approx(exact, rel=1e-7)


def _zero1_bf16(rank, world):
    """ZeRO-1 over two replicas with bf16 parameters: one optimizer step, then the masters read
    and loaded through `master_weights()`."""
    dist_state = state.initialize_parallel(1, 1)
    model = _model()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DataParallel(model, dp_group=dist_state.dp_group, zero_stage=1, param_dtype=torch.bfloat16)
    held = sum(b.main_buffer.numel() for b in dp.buckets)
    pieces = dict(dp.optimizer_params())
    dp.zero_grad()
    dp.start_grad_sync()
    _loss(model, 10 + rank).backward()
    dp.finish_grad_sync()
    with torch.no_grad():
        for piece in pieces.values():
            piece.sub_(piece.grad * 2 ** -10)
    dp.after_optimizer_step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with dp.master_weights(first_replica_reads=True):     # gathered to replica 0 only
        read = {n: p.detach().clone() for n, p in model.named_parameters()}
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with dp.master_weights():
        masters = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0 + 2 ** -12)     # rounds to 1.0 in bf16
    bf16 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(fp32=fp32, held=held, padded=sum(b.grad_buffer.numel() for b in dp.buckets),
                masters=masters, bf16=bf16, pieces={n: p.detach().clone() for n, p in pieces.items()},
                read=read, before=before, unchanged=unchanged)


def test_zero1_shards_the_float32_masters_and_gathers_them_for_master_weights():
    """Each replica keeps float32 masters for its half of the buckets only; after a step both
    replicas hold the same bf16 parameters, cast from the updated masters; `master_weights()`
    shows the whole float32 masters (one step of SGD on the summed gradient here) and what is
    written there lands in the shards unrounded."""
    r0, r1 = run_distributed(_zero1_bf16, 2)
    model = _model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for seed in (10, 11):     # each replica's bf16 gradient, summed in float32
        copy = {n: p.detach().bfloat16().requires_grad_() for n, p in model.named_parameters()}
        _loss(lambda x: torch.func.functional_call(model, copy, (x,)), seed, torch.bfloat16).backward()
        for n in grads:
            grads[n] += copy[n].grad.float()
    numel = sum(p.numel() for p in model.parameters())
    for r in (r0, r1):
        assert r["held"] == r["padded"] // 2 and r["padded"] - numel < 2 * len(r["fp32"])
        for name, p in model.named_parameters():
            want = r["fp32"][name] - grads[name] * 2 ** -10
            torch.testing.assert_close(r["masters"][name], want, rtol=0, atol=1e-6)
            assert r["masters"][name].dtype == torch.float32
            assert torch.equal(r["bf16"][name], torch.ones_like(p, dtype=torch.bfloat16))
        assert all(torch.equal(v, torch.full_like(v, 1.0 + 2 ** -12)) for v in r["pieces"].values())
    assert sum(v.numel() for r in (r0, r1) for v in r["pieces"].values()) == numel
    for name in r0["masters"]:
        assert torch.equal(r0["masters"][name], r1["masters"][name])
    # first_replica_reads: replica 0 reads the float32 masters (as master_weights() gives them
    # after the same step), replica 1 its own bf16 parameters; neither changes anything
    assert r0["unchanged"] and r1["unchanged"]
    for name in r0["read"]:
        assert torch.equal(r0["read"][name], r0["masters"][name])
        assert torch.equal(r1["read"][name], r1["before"][name])

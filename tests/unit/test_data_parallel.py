"""DataParallel on one process: 16-bit parameters with float32 masters and gradient buckets."""
import pytest
import torch
import torch.nn as nn

from megagpt.parallel.data_parallel import DataParallel


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

"""Autocast contexts, loss scalers, the agreed finite-gradient check and unscaling."""
import contextlib

import pytest
import torch

from megagpt.testing import run_distributed
from megagpt.training.precision import (ConstantScaler, DynamicLossScaler, autocast_context,
                                        grads_are_finite, make_scaler, unscale_)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_matmuls_in_half_over_fp32_weights(precision, dtype):
    linear = torch.nn.Linear(8, 8)
    with autocast_context(precision, torch.device("cpu")):
        out = linear(torch.randn(2, 8))
    assert out.dtype == dtype
    out.float().sum().backward()
    assert linear.weight.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32


def test_fp32_has_no_autocast():
    assert isinstance(autocast_context("fp32", "cpu"), contextlib.nullcontext)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"training.precision='fp8': must be one of fp32, bf16, fp16"):
        autocast_context("fp8", "cpu")
    with pytest.raises(ValueError, match=r"training.precision='half'"):
        make_scaler("half")


def test_make_scaler():
    assert isinstance(make_scaler("fp32"), ConstantScaler)
    assert isinstance(make_scaler("bf16"), ConstantScaler)
    scaler = make_scaler("fp16")
    assert isinstance(scaler, DynamicLossScaler) and scaler.scale == 2.0 ** 16


def test_constant_scaler_never_changes():
    scaler = ConstantScaler()
    scaler.update(True)
    scaler.load_state_dict({"scale": 8.0, "growth_tracker": 0, "hysteresis_tracker": 2})
    assert scaler.scale == 1.0 and scaler.state_dict() == {}


def test_backoff_waits_for_hysteresis_then_halves_each_bad_step():
    scaler = DynamicLossScaler(initial_scale=1024.0, hysteresis=2)
    scaler.update(True)
    assert scaler.scale == 1024.0            # first bad step: hysteresis absorbs it
    scaler.update(True)
    assert scaler.scale == 512.0             # second: back off
    scaler.update(True)
    assert scaler.scale == 256.0             # hysteresis used up: every bad step backs off
    scaler.update(False)
    scaler.update(True)
    assert scaler.scale == 128.0             # refilled only by growth, as in Megatron


def test_growth_after_interval_refills_hysteresis():
    scaler = DynamicLossScaler(initial_scale=4.0, growth_interval=3, hysteresis=2)
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 4.0
    scaler.update(False)
    assert scaler.scale == 8.0
    scaler.update(True)
    assert scaler.scale == 8.0               # hysteresis refilled by the growth
    for _ in range(2):
        scaler.update(False)
    scaler.update(True)                      # a bad step resets the growth count
    scaler.update(False)
    assert scaler.scale == 4.0


def test_min_scale_floor():
    scaler = DynamicLossScaler(initial_scale=2.0, min_scale=1.0, hysteresis=1)
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 1.0


def test_scaler_state_round_trip():
    a = DynamicLossScaler(initial_scale=64.0, growth_interval=5)
    for found_inf in (True, False, False):
        a.update(found_inf)
    b = DynamicLossScaler(growth_interval=5)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for found_inf in (False, False, False, True, True):
        a.update(found_inf)
        b.update(found_inf)
        assert a.scale == b.scale


def test_scaler_loads_empty_state_fresh_and_refuses_foreign_state():
    scaler = DynamicLossScaler()
    scaler.load_state_dict({})
    assert scaler.scale == 2.0 ** 16
    with pytest.raises(ValueError, match=r"lacks growth_tracker, hysteresis_tracker"):
        scaler.load_state_dict({"scale": 2.0})


@pytest.mark.parametrize("kw, message", [
    (dict(initial_scale=0.0), r"initial_scale=0.0 must be > 0"),
    (dict(backoff_factor=1.5), r"backoff_factor=1.5 must be in \(0, 1\)"),
    (dict(growth_factor=1.0), r"growth_factor=1.0 must be > 1"),
    (dict(hysteresis=0), r"hysteresis=0 must be >= 1"),
    (dict(growth_interval=0), r"growth_interval=0 must be >= 1"),
    (dict(min_scale=4.0, initial_scale=2.0), r"min_scale=4.0 must be in \(0, initial_scale\]"),
])
def test_bad_scaler_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        DynamicLossScaler(**kw)


def params_with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_found_without_distributed(bad):
    grads = [torch.randn(3, 3), torch.randn(4)]
    assert grads_are_finite(params_with_grads(*grads))
    grads[1][2] = bad
    assert not grads_are_finite(params_with_grads(*grads))


def test_parameters_without_grad_are_ignored():
    params = params_with_grads(torch.randn(2))
    params.append(torch.nn.Parameter(torch.zeros(2)))
    assert grads_are_finite(params)
    assert grads_are_finite([])


def _check_on_ranks(rank, world_size):
    grads = [torch.randn(4, 4), torch.randn(4)]
    if rank == 1:
        grads[0][1, 2] = float("nan")
    params = params_with_grads(*grads)
    clean = params_with_grads(torch.randn(3))
    return grads_are_finite(params), grads_are_finite(clean), grads_are_finite([])


def test_ranks_agree_when_one_rank_has_a_nan():
    results = run_distributed(_check_on_ranks, 2)
    assert results == [(False, True, True), (False, True, True)]


def _device_from_the_rank_not_the_backend(rank, world_size):
    import torch.distributed as dist

    def no_backend_name(*args, **kwargs):
        raise AssertionError("grads_are_finite read the backend's name to pick a device")

    reduced_on = []
    all_reduce = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        reduced_on.append(str(tensor.device))
        return all_reduce(tensor, *args, **kwargs)

    dist.get_backend, dist.all_reduce = no_backend_name, spy
    # rank 0 has gradients; rank 1 holds parameters without any (the case that fell back to the
    # backend's name, which under "cpu:gloo,cuda:nccl" put one rank's flag on the CPU)
    params = (params_with_grads(torch.randn(3)) if rank == 0
              else [torch.nn.Parameter(torch.zeros(3))])
    return (grads_are_finite(params), grads_are_finite([], device=torch.device("cpu")),
            grads_are_finite([]), reduced_on)


def test_the_flag_is_reduced_on_the_ranks_device_whatever_the_backend():
    results = run_distributed(_device_from_the_rank_not_the_backend, 2)
    assert results == [(True, True, True, ["cpu", "cpu", "cpu"])] * 2


def test_an_explicit_device_holds_the_flag(monkeypatch):
    import torch.distributed as dist
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: seen.append((t.device, t.shape)))
    params = params_with_grads(torch.tensor([1.0, float("inf")]))
    assert not grads_are_finite(params, device="cpu")
    assert grads_are_finite([], device="cpu")
    assert seen == [(torch.device("cpu"), torch.Size([1]))] * 2


def test_unscale_divides_in_place():
    grads = [torch.randn(3, 3), torch.randn(5)]
    params = params_with_grads(*grads)
    params.append(torch.nn.Parameter(torch.zeros(1)))
    unscale_(params, 1024.0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g / 1024.0)   # a power of two: exact
    with pytest.raises(ValueError, match=r"scale=0.0 must be > 0"):
        unscale_(params, 0.0)

"""Autocast contexts and loss scalers."""
import contextlib

import pytest
import torch

from megagpt.training.precision import (ConstantScaler, DynamicLossScaler, autocast_context,
                                        make_scaler)


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
    # Megatron's defaults: a scale halved on the second overflow in a row, doubled after
    # 1000 clean steps, never below 1
    assert (scaler.hysteresis, scaler.growth_interval, scaler.min_scale) == (2, 1000, 1.0)
    assert (scaler.backoff_factor, scaler.growth_factor) == (0.5, 2.0)


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
    scaler.update(True)                      # one of the two overflows hysteresis allows
    assert scaler.scale == 4.0 and scaler.state_dict()["hysteresis_tracker"] == 1
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 4.0
    scaler.update(False)
    assert scaler.scale == 8.0 and scaler.state_dict()["hysteresis_tracker"] == 2
    scaler.update(True)
    assert scaler.scale == 8.0               # hysteresis refilled by the growth: no backoff
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



def test_what_a_gpu_before_ampere_lacks_is_refused_before_the_run():
    """A T4 or V100: Triton does not compile bf16 there (the first kernel failed) and torch
    emulates it; flash-attn 2 does not run there."""
    from megagpt.testing import tiny_config
    from megagpt.training.precision import gpu_problems
    cfg = tiny_config(training__precision="bf16", kernels__attention="flash_attn")
    problems = gpu_problems(cfg, (7, 5), "Tesla T4")
    assert problems == [
        "training.precision=bf16 needs a GPU of compute capability 8.0 or newer (A100, H100, RTX "
        "30xx and later); this GPU (Tesla T4) has compute capability 7.5; fix: "
        "training.precision=fp16 (with dynamic loss scaling, as Megatron trains on V100s)",
        "kernels.attention=flash_attn: flash-attn 2 needs compute capability 8.0 or newer; this "
        "GPU (Tesla T4) has compute capability 7.5; fix: kernels.attention=sdpa"]
    assert gpu_problems(cfg, (8, 0), "A100") == []
    assert gpu_problems(tiny_config(training__precision="fp16"), (7, 0), "V100") == []

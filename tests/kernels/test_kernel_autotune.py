"""Launch configs: one under the interpreter, valid GPU lists, and the same results with each.

On a GPU the autotuner picks among each kernel's configs by timing them, so every config must
give the reference's result for every shape. Each test here pins a kernel to one GPU config (an
autotuner with a single config runs it without timing) and checks the op against its reference:
under the interpreter with the GPU configs' block sizes, on a GPU compiled as they would run.
"""
import importlib
import itertools

import pytest
import torch
import triton

from megagpt.kernels import (bias_gelu, bias_gelu_reference, cross_entropy,
                             cross_entropy_reference, cross_entropy_shard_grad,
                             cross_entropy_shard_grad_reference, cross_entropy_shard_stats,
                             cross_entropy_shard_stats_reference, flash_attention,
                             flash_attention_reference, layer_norm, layer_norm_reference,
                             scaled_masked_softmax, scaled_masked_softmax_reference)
from megagpt.kernels import _utils

fa, ln, sm, bg, ce = (importlib.import_module(f"megagpt.kernels.{name}") for name in
                      ("flash_attention", "layer_norm", "softmax", "bias_gelu", "cross_entropy"))

F32, F16 = torch.float32, torch.float16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning runs on a GPU")
BLOCK_NS = [2 ** i for i in range(17)]  # every row width's power of two up to 65536


def _row_kernels(block_n):
    return [ln._fwd_kernel(block_n), ln._bwd_kernel(block_n), sm._fwd_kernel(block_n),
            sm._bwd_kernel(block_n)]


def _all_tuned():
    return ([fa._TUNED[name][precision] for name in fa._TUNED for precision in fa._TUNED[name]]
            + [k for block_n in BLOCK_NS for k in _row_kernels(block_n)]
            + [bg._fwd_kernel, bg._bwd_kernel, ce._fwd_kernel, ce._shard_stats, ce._grad])


def test_every_kernel_is_autotuned_with_one_config_under_the_interpreter(device):
    for tuned in _all_tuned():
        assert isinstance(tuned, _utils.Autotuned), tuned
        if device == "cpu":
            assert len(tuned.tuner.configs) == 1, (tuned.kernel.__name__, tuned.tuner.configs)


def test_later_launches_reuse_the_chosen_config(device, monkeypatch):
    """The first launch of a key goes through the autotuner, later ones launch directly with
    the config it chose."""
    x, weight, bias = torch.randn(5, 300, device=device), torch.ones(300, device=device), \
        torch.zeros(300, device=device)
    tuned = ln._fwd_kernel(triton.next_power_of_2(300))
    monkeypatch.setattr(tuned, "chosen", {})
    layer_norm(x, weight, bias)
    key = (300, F32, F32, F32, F32, F32)  # n_cols, then the tensor arguments' dtypes
    assert list(tuned.chosen) == [key]
    assert tuned.chosen[key]["BLOCK_M"] in [c.kwargs["BLOCK_M"] for c in tuned.tuner.configs]
    assert f"BLOCK_M={tuned.chosen[key]['BLOCK_M']}" in \
        _utils.autotune_choices()["_layer_norm_fwd_kernel"][str(key)]
    tuner_run = tuned.tuner.run
    monkeypatch.setattr(tuned.tuner, "run", lambda *args, **kwargs: pytest.fail("tuned again"))
    torch.testing.assert_close(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    # another dtype is another key: tuned again
    monkeypatch.setattr(tuned.tuner, "run", tuner_run)
    layer_norm(x.half(), weight, bias)
    assert list(tuned.chosen) == [key, (300, torch.float16, F32, F32, torch.float16, F32)]


def test_a_launch_for_another_gpu_makes_it_current(device, monkeypatch):
    """Triton launches on the current GPU: a launch whose tensors live on another one runs
    inside torch.cuda.device(their device), and only then."""
    entered = []

    class Recorder:
        def __init__(self, where):
            self.where = where

        def __enter__(self):
            entered.append(self.where)

        def __exit__(self, *exc):
            return False

    x, weight, bias = torch.randn(3, 40, device=device), torch.randn(40, device=device), \
        torch.randn(40, device=device)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(_utils, "on_another_gpu", lambda where: not entered)
    torch.testing.assert_close(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    assert entered == [x.device]


def test_which_devices_count_as_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _utils.on_another_gpu(torch.device("cuda", 1))
    assert not _utils.on_another_gpu(torch.device("cuda", 0))
    assert not _utils.on_another_gpu(torch.device("cpu"))


@pytest.mark.parametrize("block_n", BLOCK_NS)
@pytest.mark.parametrize("max_tile", [16384, ln.BWD_MAX_TILE])
def test_row_configs_fit_the_row(block_n, max_tile):
    """Whole rows, 1k to max_tile elements and 8 to 32 a thread, or one row with 16 warps when a
    row is longer than max_tile."""
    configs = _utils.row_configs(block_n, max_tile)
    assert configs and len({(c.kwargs["BLOCK_M"], c.num_warps) for c in configs}) == len(configs)
    for config in configs:
        block_m = config.kwargs["BLOCK_M"]
        assert block_m >= 1 and triton.next_power_of_2(block_m) == block_m
        tile = block_m * block_n
        if block_n > max_tile:
            assert (block_m, config.num_warps) == (1, 16)
        else:
            assert 1024 <= tile <= max_tile
            assert 8 <= tile // (32 * config.num_warps) <= 32


def test_attention_configs_keep_the_causal_loops_aligned():
    """BLOCK_M a multiple of BLOCK_N in the forward and dQ kernels, the reverse in dK/dV."""
    for name, by_precision in fa._GPU_CONFIGS.items():
        for config in itertools.chain(*by_precision.values(), [fa._INTERPRETER_CONFIGS[name]]):
            m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
            assert (n % m == 0) if name == "dkdv" else (m % n == 0), (name, config)


def test_bias_gelu_backward_row_ranges_suit_every_config(monkeypatch):
    """On a GPU the row ranges are multiples of every config's BLOCK_M and cover the rows."""
    assert all(bg.ROW_MULTIPLE % c.kwargs["BLOCK_M"] == 0 for c in bg._BWD_CONFIGS)
    monkeypatch.setattr(bg, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(bg, "multiprocessor_count", lambda index: 132)
    for n_rows, n_cols in ((1, 8), (100, 3072), (8192, 3072), (16384, 8192), (5, 300000)):
        rows_per_program, ranges = bg._bwd_row_ranges(n_rows, n_cols, torch.device("cuda", 0))
        assert rows_per_program % bg.ROW_MULTIPLE == 0
        assert (ranges - 1) * rows_per_program < n_rows <= ranges * rows_per_program


def test_drop_blocks_longer_than():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (64, 128, 256) for w in (4, 8)]
    prune = _utils.drop_blocks_longer_than("size", "BLOCK")
    assert prune(configs, {"size": 1000}) == configs
    assert prune(configs, {"size": 100}) == configs[:4]
    assert prune(configs, {"size": 17}) == configs[:2]  # all too long: the shortest block


def _each_config(monkeypatch, *tuned_and_configs):
    """Yield once for each config index, with every given kernel pinned to its config at that
    index (cycling through the shorter lists), so that every config of every kernel runs: an
    autotuner with a single config runs it without timing."""
    rounds = max(len(configs) for _, configs in tuned_and_configs)
    for i in range(rounds):
        for tuned, configs in tuned_and_configs:
            monkeypatch.setattr(tuned.tuner, "configs", [configs[i % len(configs)]])
            monkeypatch.setattr(tuned, "chosen", {})
        yield i


@pytest.mark.parametrize("shape", [(37, 100), (6, 1029)], ids=str)
def test_layer_norm_with_each_config(compare, device, monkeypatch, shape):
    block_n = triton.next_power_of_2(shape[-1])
    x = (torch.randn(shape, device=device) * 2 + 0.5).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], device=device)).requires_grad_()
    bias = (0.3 * torch.randn(shape[-1], device=device)).requires_grad_()
    for _ in _each_config(monkeypatch,
                          (ln._fwd_kernel(block_n), _utils.row_configs(block_n)),
                          (ln._bwd_kernel(block_n), _utils.row_configs(block_n, ln.BWD_MAX_TILE))):
        compare(layer_norm, layer_norm_reference, [x, weight, bias], F32, ["x", "weight", "bias"])


@pytest.mark.parametrize("shape,causal", [((2, 3, 17, 17), True), ((5, 1000), False)], ids=str)
def test_softmax_with_each_config(compare, device, monkeypatch, shape, causal):
    block_n = triton.next_power_of_2(shape[-1])
    x = (torch.randn(shape, device=device) * 3).requires_grad_()
    for _ in _each_config(monkeypatch, (sm._fwd_kernel(block_n), _utils.row_configs(block_n)),
                          (sm._bwd_kernel(block_n), _utils.row_configs(block_n))):
        compare(lambda t: scaled_masked_softmax(t, 0.5, causal),
                lambda t: scaled_masked_softmax_reference(t, 0.5, causal), [x], F32, ["x"])


def test_bias_gelu_with_each_config(compare, device, monkeypatch):
    x = (torch.randn(150, 300, device=device) * 3).requires_grad_()
    bias = torch.randn(300, device=device).requires_grad_()
    for _ in _each_config(monkeypatch, (bg._fwd_kernel, bg._FWD_CONFIGS),
                          (bg._bwd_kernel, bg._BWD_CONFIGS)):
        compare(bias_gelu, bias_gelu_reference, [x, bias], F32, ["x", "bias"])


def test_cross_entropy_with_each_config(compare, device, monkeypatch):
    logits = (torch.randn(7, 3000, device=device) * 2).requires_grad_()
    target = torch.randint(0, 3000, (7,), device=device)
    target[::3] = -100
    shard = logits.detach()[:, 1000:2500].contiguous()
    lse = torch.logsumexp(logits.detach(), dim=-1)
    for _ in _each_config(monkeypatch, (ce._fwd_kernel, ce._GPU_CONFIGS),
                          (ce._shard_stats, ce._GPU_CONFIGS), (ce._grad, ce._GPU_CONFIGS)):
        compare(lambda t: cross_entropy(t, target), lambda t: cross_entropy_reference(t, target),
                [logits], F32, ["logits"])
        compare(lambda t: cross_entropy(t * 1, target, inplace_backward=True),
                lambda t: cross_entropy_reference(t, target), [logits], F32, ["logits"])
        got = cross_entropy_shard_stats(shard, target, 1000, vocab_size=2400)
        want = cross_entropy_shard_stats_reference(shard, target, 1000, vocab_size=2400)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        out = shard.clone()
        cross_entropy_shard_grad(out, target, 1000, lse, vocab_size=2400, out=out)
        torch.testing.assert_close(out, cross_entropy_shard_grad_reference(
            shard, target, 1000, lse, vocab_size=2400), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_with_each_config(compare, device, monkeypatch, dtype, causal):
    precision = fa._precision(dtype)
    inputs = [torch.randn(1, 2, 150, 32, device=device, dtype=dtype, requires_grad=True)
              for _ in range(3)]
    for _ in _each_config(monkeypatch, *[(fa._TUNED[name][precision], configs[precision])
                                         for name, configs in fa._GPU_CONFIGS.items()]):
        compare(lambda q, k, v: flash_attention(q, k, v, causal),
                lambda q, k, v: flash_attention_reference(q, k, v, causal), inputs, dtype, "qkv",
                atol32=1e-4)


@needs_cuda
def test_in_place_loss_backward_survives_autotuning():
    """As below, for cross_entropy(inplace_backward=True): its gradient is written over the
    logits, which the tuner's timed runs must restore (a width no other test tunes)."""
    leaf = (torch.randn(64, 8300, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 8300, (64,), device="cuda")
    ref = leaf.detach().float().requires_grad_()
    cross_entropy_reference(ref, target).backward()
    cross_entropy(leaf * 1, target, inplace_backward=True).backward()
    torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=2e-2, atol=1e-4)


@needs_cuda
def test_in_place_shard_grad_survives_autotuning():
    """The tuner times every config on the first call of a new width: with out=logits each timed
    run overwrites the logits, so it must restore them before the run whose result is kept."""
    logits = torch.randn(64, 8200, device="cuda", dtype=torch.bfloat16) * 2
    target = torch.randint(0, 8200, (64,), device="cuda")
    lse = torch.logsumexp(logits.float(), dim=-1)
    want = cross_entropy_shard_grad_reference(logits, target, 0, lse)
    assert len(ce._PRUNE["early_config_prune"](ce._grad.tuner.configs,
                                               {"width": 8200})) > 1
    cross_entropy_shard_grad(logits, target, 0, lse, out=logits)
    torch.testing.assert_close(logits.float(), want.float(), rtol=2e-2, atol=1e-3)


def test_autotune_off_launches_the_first_config(monkeypatch):
    configs, interpreter = ["a", "b", "c"], "interpreted"
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    assert _utils.launch_configs(configs, interpreter) == configs
    monkeypatch.setattr(_utils, "AUTOTUNE", False)
    assert _utils.launch_configs(configs, interpreter) == ["a"]
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", True)
    assert _utils.launch_configs(configs, interpreter) == ["interpreted"]

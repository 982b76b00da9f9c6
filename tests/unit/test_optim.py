"""Weight-decay groups, the optimizer choice and the learning-rate schedule."""
import math
import sys
import types

import pytest
import torch

from megagpt.config import KernelsConfig, ModelConfig, TrainingConfig
from megagpt.model.gpt import GPTStage, StageSpec
from megagpt.training.optim import build_optimizer, lr_at, param_groups, set_lr


def training_config(**kw) -> TrainingConfig:
    args = dict(learning_rate=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=110, batch_size=2)
    args.update(kw)
    return TrainingConfig(**args)


def named(**shapes):
    return [(name.replace("__", "."), torch.nn.Parameter(torch.zeros(shape)))
            for name, shape in shapes.items()]


def test_decay_only_on_linear_weight_matrices():
    params = named(embedding__wte__weight=(50, 8), embedding__wpe__weight=(16, 8),
                   output_weight=(50, 8), layers__0__ln1__weight=(8,), layers__0__ln1__bias=(8,),
                   layers__0__attn__qkv__weight=(24, 8), layers__0__attn__qkv__bias=(24,),
                   layers__0__attn__proj__weight=(8, 8), layers__0__mlp__fc1__weight=(32, 8),
                   layers__0__mlp__fc2__bias=(8,), final_ln__weight=(8,))
    by_id = {id(p): name for name, p in params}
    decay, no_decay = param_groups(params, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(by_id[id(p)] for p in decay["params"]) == [
        "layers.0.attn.proj.weight", "layers.0.attn.qkv.weight", "layers.0.mlp.fc1.weight"]
    assert len(no_decay["params"]) == len(params) - 3


@pytest.mark.parametrize("spec", [StageSpec(0, 2, True, True), StageSpec(1, 2, False, True)],
                         ids=["whole-model", "last-stage"])
def test_groups_of_the_real_model(spec):
    m = ModelConfig(vocab_size=100, d_model=16, n_heads=2, n_layers=2, seq_length=8)
    stage = GPTStage(m, KernelsConfig(), spec)
    decay, no_decay = param_groups(stage.named_parameters(), 0.1)
    names = {id(p): n for n, p in stage.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(".weight") and ("attn." in n or "mlp." in n) for n in decayed)
    assert len(decayed) == 4 * (spec.last_layer - spec.first_layer)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert ("output_weight" in names.values()) == (not spec.pre_process)


def test_frozen_parameters_are_left_out_and_nothing_trainable_is_an_error():
    params = named(layers__0__mlp__fc1__weight=(4, 4), layers__0__mlp__fc1__bias=(4,))
    params[1][1].requires_grad_(False)
    decay, no_decay = param_groups(params, 0.1)
    assert len(decay["params"]) == 1 and no_decay["params"] == []
    params[0][1].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(params, 0.1)


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match=r"training.weight_decay=-0.1: must be >= 0"):
        param_groups(named(w=(2, 2)), -0.1)


def test_adamw_settings_on_cpu():
    t = training_config(adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(named(layers__0__mlp__fc1__weight=(4, 4), final_ln__bias=(4,)), t, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (3e-4, (0.8, 0.9), 1e-6)
    assert not group["fused"]


def test_adamw_is_fused_on_cuda(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kw: seen.update(kw) or "adamw")
    assert build_optimizer(named(w=(2, 2)), training_config(), "cuda:0") == "adamw"
    assert seen["fused"] is True


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_apex_not_importable_names_the_field_and_the_alternative(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "apex", None)   # makes `import apex...` raise ImportError
    with pytest.raises(RuntimeError, match=r'training.optimizer="apex".*not importable.*'
                                           r'training.optimizer="adamw"'):
        build_optimizer(named(w=(2, 2)), training_config(optimizer="apex"), device)


def test_apex_fused_adam_in_adamw_mode(monkeypatch):
    class FusedAdam:
        def __init__(self, groups, **kw):
            self.groups, self.kw = groups, kw
    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=FusedAdam)
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    t = training_config(optimizer="apex")
    opt = build_optimizer(named(w=(2, 2)), t, "cuda")
    assert opt.kw == dict(adam_w_mode=True, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    with pytest.raises(RuntimeError, match=r"runs on CUDA only, but the parameters are on cpu"):
        build_optimizer(named(w=(2, 2)), t, "cpu")


def test_warmup_is_linear_and_reaches_the_peak():
    t = training_config()
    assert lr_at(0, t) == pytest.approx(3e-4 / 10)
    assert lr_at(4, t) == pytest.approx(3e-4 * 5 / 10)
    assert lr_at(9, t) == pytest.approx(3e-4)
    assert lr_at(10, t) == pytest.approx(3e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_boundaries_and_monotonic(schedule):
    t = training_config(lr_schedule=schedule)
    lrs = [lr_at(s, t) for s in range(10, 130)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(3e-4)
    assert lr_at(110, t) == pytest.approx(3e-5)
    assert lr_at(500, t) == pytest.approx(3e-5)
    mid = 3e-5 + 0.5 * (3e-4 - 3e-5)   # halfway: cosine and linear meet there
    assert lr_at(60, t) == pytest.approx(mid)
    quarter = lr_at(35, t)
    if schedule == "cosine":
        assert quarter == pytest.approx(3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi / 4)))
    else:
        assert quarter == pytest.approx(3e-4 - 2.7e-4 * 0.25)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_schedule_is_megatrons_one_update_ahead_in_the_warm_up(schedule):
    """megatron-core's OptimizerParamScheduler (a test extra), as docs/training.md says: its
    update k uses its rate at k steps done, k / warmup of the peak in the warm-up (0 first);
    ours (k + 1) / warmup, and the same rate from the end of the warm-up on."""
    pytest.importorskip("megatron.core", reason="megatron-core is a test extra on Linux x86-64")
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    t = training_config(lr_schedule=schedule, lr_decay_steps=100)
    optimizer = types.SimpleNamespace(param_groups=[{}])
    theirs = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.learning_rate, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.lr_decay_steps,
        lr_decay_style=schedule, start_wd=0.1, end_wd=0.1, wd_incr_steps=100,
        wd_incr_style="constant")
    megatron = []
    for _ in range(130):
        megatron.append(optimizer.param_groups[0]["lr"])      # the rate of the next update
        theirs.step(1)
    ours = [lr_at(k, t) for k in range(130)]
    assert megatron[0] == 0.0
    assert ours[:t.warmup_steps] == pytest.approx(megatron[1:t.warmup_steps + 1], rel=1e-12)
    assert ours[t.warmup_steps:] == pytest.approx(megatron[t.warmup_steps:], rel=1e-12)


def test_lr_decay_steps_overrides_max_steps():
    t = training_config(lr_decay_steps=60)
    assert lr_at(60, t) == pytest.approx(3e-5)
    assert lr_at(35, t) == pytest.approx(3e-5 + 0.5 * 2.7e-4)


def test_constant_keeps_the_peak_after_warmup():
    t = training_config(lr_schedule="constant")
    assert lr_at(0, t) == pytest.approx(3e-5)
    assert [lr_at(s, t) for s in (9, 10, 109, 1000)] == [pytest.approx(3e-4)] * 4


def test_no_warmup_starts_at_the_peak():
    t = training_config(warmup_steps=0, max_steps=100)
    assert lr_at(0, t) == pytest.approx(3e-4)
    assert lr_at(100, t) == pytest.approx(3e-5)


def test_decay_of_length_zero_drops_to_min_lr_after_warmup():
    t = training_config(warmup_steps=10, lr_decay_steps=10)
    assert lr_at(9, t) == pytest.approx(3e-4)
    assert lr_at(10, t) == pytest.approx(3e-5)


@pytest.mark.parametrize("kw, step, message", [
    (dict(lr_decay_steps=5), 20, r"training.lr_decay_steps=5 .* smaller than "
                                 r"training.warmup_steps=10"),
    (dict(warmup_steps=-1), 0, r"training.warmup_steps=-1: must be >= 0"),
    (dict(), -1, r"step=-1 must be >= 0"),
    (dict(lr_schedule="step"), 20, r"training.lr_schedule='step'"),
])
def test_bad_schedule_inputs(kw, step, message):
    with pytest.raises(ValueError, match=message):
        lr_at(step, training_config(**kw))


def test_set_lr_sets_every_group():
    opt = build_optimizer(named(layers__0__mlp__fc1__weight=(4, 4), final_ln__bias=(4,)),
                          training_config(), "cpu")
    set_lr(opt, 1.5e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.5e-4, 1.5e-4]


def test_zero1_shard_views_are_grouped_by_their_parameter():
    from megagpt.training.optim import param_groups
    weight = torch.nn.Parameter(torch.randn(4, 3))
    piece = torch.nn.Parameter(weight.detach().reshape(-1)[2:7])
    piece.source = weight
    bias_piece = torch.nn.Parameter(torch.zeros(3))
    bias_piece.source = torch.nn.Parameter(torch.zeros(3))
    decay, no_decay = param_groups([("layers.0.mlp.fc1.weight", piece),
                                    ("layers.0.mlp.fc1.bias", bias_piece)], 0.1)
    assert decay["params"] == [piece] and no_decay["params"] == [bias_piece]

"""Training through DeepSpeed (`parallel.deepspeed_config`): the merged config and its messages,
losses equal to the native data-parallel path on 2 gloo processes (ZeRO-1, 2 and 3), exact resume,
skipped non-finite steps, and the torchrun command line.

The config tests run everywhere; the training tests need deepspeed (`pip install -e
'.[deepspeed]'`; the `test` extra installs it) and are skipped, saying so, without it.
"""
import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megagpt.config import ConfigError
from megagpt.parallel import state
from megagpt.testing import check_a_damaged_file_stops_every_rank, run_distributed, tiny_config
from megagpt.training.checkpoint import CheckpointError, check_compatible
from megagpt.training.ds_config import merge_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
DS_DIR = ROOT / "configs" / "deepspeed"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 6
# fp32, dropout 0, the same data: DeepSpeed averages gradients over ranks and divides by the
# accumulation steps where the native path sums pre-scaled ones, so they differ in rounding only
# (measured: at most 3.5e-8 relative over 6 steps)
LOSS_RTOL = 1e-5

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]'); the DeepSpeed engine is "
           "optional, the test extra installs it")


def ds_file(name: str) -> str:
    return str(DS_DIR / f"{name}.json")


def run_config(run_dir: Path, steps: int, ds: str | None = None, **overrides):
    if ds is not None:
        overrides["parallel__deepspeed_config"] = ds
    settings = dict(checkpoint__save_dir=str(run_dir / "ckpt"), checkpoint__save_interval=3,
                    logging__run_dir=str(run_dir), logging__progress_bar=False,
                    training__log_interval=1, training__eval_interval=0, data__num_workers=0)
    return tiny_config(dp=2, steps=steps, **{**settings, **overrides})


def losses(run_dir, key: str = "loss") -> list[float]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if key in r]


EVALUATED = dict(training__eval_interval=3, training__eval_iters=1)   # steps 3 and 6


# ---- the merged config and its messages (no deepspeed needed) --------------------------------

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_shipped_files_take_batch_optimizer_and_precision_from_our_config(stage):
    raw = json.loads((DS_DIR / f"zero{stage}.json").read_text())
    cfg = tiny_config(dp=2, parallel__deepspeed_config=ds_file(f"zero{stage}"))
    t = cfg.training
    merged, problems = merge_deepspeed_config(raw, cfg, dp=2)
    assert problems == []
    assert merged["train_micro_batch_size_per_gpu"] == t.batch_size == 2
    assert merged["gradient_accumulation_steps"] == t.grad_accumulation_steps == 2
    assert merged["train_batch_size"] == 8
    assert merged["gradient_clipping"] == t.grad_clip
    assert merged["zero_optimization"]["stage"] == stage
    assert merged["optimizer"] == {"type": "AdamW", "params": {
        "lr": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
        "weight_decay": t.weight_decay, "torch_adam": True}}
    assert "bf16" not in merged and "fp16" not in merged and "scheduler" not in merged
    assert raw == json.loads((DS_DIR / f"zero{stage}.json").read_text())    # not modified

    bf16, _ = merge_deepspeed_config(raw, tiny_config(dp=2, training__precision="bf16"), dp=2)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp16, _ = merge_deepspeed_config(raw, tiny_config(dp=2, training__precision="fp16"), dp=2)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def test_auto_values_and_agreeing_values_are_accepted():
    cfg = tiny_config(dp=2, training__precision="bf16")
    raw = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
           "train_batch_size": 8, "gradient_clipping": 0.5, "bf16": {"enabled": "auto"},
           "optimizer": {"type": "Adam", "params": {"lr": "auto", "betas": [0.9, 0.95]}},
           "zero_optimization": {"stage": 2, "overlap_comm": True}}
    merged, problems = merge_deepspeed_config(raw, cfg, dp=2)
    assert problems == []
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["bf16"] == {"enabled": True}
    assert merged["optimizer"]["params"]["lr"] == cfg.training.learning_rate
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    # "auto" precision sections (Hugging Face's files) resolve to training.precision's
    fp32 = tiny_config(dp=2)
    merged, problems = merge_deepspeed_config(
        {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, fp32, dp=2)
    assert problems == [] and not merged["bf16"]["enabled"] and not merged["fp16"]["enabled"]
    # agreeing means equal: a learning rate 0.5% off, or a bool for a number, is refused
    lr = fp32.training.learning_rate
    assert len(merge_deepspeed_config({"optimizer": {"type": "AdamW", "params": {
        "lr": lr * 1.005}}}, fp32, dp=2)[1]) == 1
    clip_1 = tiny_config(dp=2, training__grad_clip=1.0)
    assert len(merge_deepspeed_config({"gradient_clipping": True}, clip_1, dp=2)[1]) == 1


def test_torch_autocast_and_the_old_bf16_name_count_as_precision_settings():
    cfg = tiny_config(dp=2, training__precision="bf16")
    merged, problems = merge_deepspeed_config(
        {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, cfg, dp=2)
    assert problems == [] and "bf16" not in merged          # autocast over fp32 weights, as asked
    merged, problems = merge_deepspeed_config(
        {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 1}}, cfg, dp=2)
    assert problems == [] and merged["bf16"] == {"enabled": True} and "bfloat16" not in merged
    _, problems = merge_deepspeed_config(
        {"torch_autocast": {"enabled": True, "dtype": "float16"}}, cfg, dp=2)
    assert problems == [
        "parallel.deepspeed_config=None sets torch_autocast.dtype=float16, but "
        "training.precision=bf16; fix: remove that setting from None (it is filled from "
        "training.precision) or set training.precision=fp16"]


CONTRADICTIONS = [
    ({"train_micro_batch_size_per_gpu": 4},
     "sets train_micro_batch_size_per_gpu=4, but training.batch_size=2; fix: remove "
     "train_micro_batch_size_per_gpu from {file} (it is filled from training.batch_size) or set "
     "training.batch_size=4"),
    ({"gradient_accumulation_steps": 8},
     "sets gradient_accumulation_steps=8, but training.grad_accumulation_steps=2; fix:"),
    ({"train_batch_size": 32},
     "sets train_batch_size=32, but the global batch is training.batch_size x "
     "training.grad_accumulation_steps x data-parallel size = 2 x 2 x 2 = 8; fix:"),
    ({"gradient_clipping": 1.0}, "sets gradient_clipping=1.0, but training.grad_clip=0.5; fix:"),
    ({"bf16": {"enabled": True}},
     "sets bf16.enabled=true, but training.precision=fp32; fix: remove that setting from {file} "
     "(it is filled from training.precision) or set training.precision=bf16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}},
     "sets optimizer.params.lr=0.1, but training.learning_rate=0.003; fix:"),
    ({"optimizer": {"type": "SGD"}}, "sets optimizer.type=\"SGD\", but training.optimizer=adamw"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a scheduler (\"WarmupLR\"), but the learning rate "
                                          "follows training.lr_schedule=cosine"),
    ({"zero_optimization": {"stage": 3}},
     "sets zero_optimization.stage=3, but parallel.zero_stage=1; fix:"),
    # a bare true reached deepspeed.initialize: a TypeError traceback
    ({"bf16": True}, ": bf16=true must be an object (DeepSpeed reads bf16.enabled); fix:"),
    ({"optimizer": {"type": "AdamW", "params": 1}}, ": optimizer.params must be an object"),
    # passed through unchecked: a run that was not the AdamW or the precision the config says,
    # and with bf16.check_grad_overflow=false a NaN step was applied (the weights became NaN)
    # while the log said it was skipped
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
     "sets optimizer.params.amsgrad=true, which training.* has no setting for"),
    ({"optimizer": {"type": "AdamW", "params": {"bias_correction": False}}},
     "sets optimizer.params.bias_correction=false, but training.optimizer=adamw is AdamW with "
     "bias correction"),
    ({"amp": {"enabled": True}}, "enables amp (apex AMP), but the precision is "
                                 "training.precision=fp32"),
    ({"bf16": {"enabled": "auto", "check_grad_overflow": False}},
     "sets bf16.check_grad_overflow=false, so a step with non-finite gradients would be applied"),
]


@pytest.mark.parametrize("setting,message", CONTRADICTIONS,
                         ids=[next(iter(s)) for s, _ in CONTRADICTIONS])
def test_a_contradicting_deepspeed_config_is_refused_at_load_with_both_values(tmp_path, setting,
                                                                              message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **setting}))
    with pytest.raises(ConfigError) as info:
        tiny_config(dp=2, zero=1, parallel__deepspeed_config=str(path))
    expected = (f"parallel.deepspeed_config={path}" + ("" if message.startswith(":") else " ")
                + message.format(file=path))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_zero_stage_0_takes_the_file_stage_and_a_missing_file_is_named(tmp_path):
    cfg = tiny_config(dp=2, parallel__deepspeed_config=ds_file("zero3"))       # zero_stage 0
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    assert merge_deepspeed_config(raw, cfg, 2)[0]["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match=r"parallel.deepspeed_config=.*nope.json: "
                                          r"parallel.deepspeed_config file not found"):
        tiny_config(dp=2, parallel__deepspeed_config=str(tmp_path / "nope.json"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero_stage_0_with_16_bit_weights_is_refused(tmp_path, precision):
    # DeepSpeed's stage-0 FP16 optimizer wrapper steps AdamW once at start-up and saves 16-bit
    # weights as the model's: refused before it runs. fp32 at stage 0 is plain data parallelism.
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError) as info:
        tiny_config(dp=2, parallel__deepspeed_config=str(path), training__precision=precision)
    assert any(p.startswith(f"parallel.deepspeed_config={path}: ZeRO stage 0 with "
                            f"training.precision={precision} goes through DeepSpeed's FP16 "
                            f"optimizer wrapper") for p in info.value.problems), info.value.problems
    tiny_config(dp=2, parallel__deepspeed_config=str(path), training__precision="fp32")


def test_deepspeed_with_tensor_or_pipeline_parallelism_is_refused():
    with pytest.raises(ConfigError) as info:
        tiny_config(tp=2, parallel__deepspeed_config=ds_file("zero2"))
    assert any(p.startswith(f"parallel.deepspeed_config={ds_file('zero2')}: the DeepSpeed engine "
                            f"runs data parallel only, but tensor_parallel_size=2 and "
                            f"pipeline_parallel_size=1; fix: set both to 1") for p in
               info.value.problems), info.value.problems


def test_the_engine_refuses_a_config_changed_after_validation(tmp_path):
    """A config changed after validation (as pretrain_gpt.py changes the native path's precision
    on a CPU): the engine checks the merged DeepSpeed config again."""
    from megagpt.training.ds_engine import DeepSpeedEngine
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    cfg = tiny_config(dp=1, training__precision="bf16", parallel__deepspeed_config=str(path))
    cfg.training.precision = "fp32"
    layout = types.SimpleNamespace(tp_world_size=1, pp_world_size=1, dp_world_size=1)
    with pytest.raises(ConfigError, match="sets bf16.enabled=true, but training.precision=fp32"):
        DeepSpeedEngine(cfg, layout)


def test_a_checkpoint_of_the_other_engine_is_refused_with_the_fix():
    meta = {"config": {"model": vars(tiny_config().model)},
            "parallel": {"tp": 1, "pp": 1, "dp": 2, "vp": 1, "zero_stage": 2, "engine": "deepspeed"}}
    native = {"tp": 1, "pp": 1, "dp": 2, "vp": 1, "zero_stage": 0}
    with pytest.raises(CheckpointError, match="saved by the deepspeed engine, this run trains "
                                              "through the native engine.*set "
                                              "parallel.deepspeed_config"):
        check_compatible(meta, tiny_config().model, native, where="ckpt/step_0000003")
    check_compatible(meta, tiny_config().model, native, with_optimizer=False)   # weights: fine
    check_compatible(meta, tiny_config().model, {**meta["parallel"]})
    # another stage: the DeepSpeed file's, which parallel.zero_stage=0 leaves alone (the message
    # said to set parallel.zero_stage, which then contradicted the file)
    with pytest.raises(CheckpointError, match=r"saved at DeepSpeed ZeRO stage 2, this run's "
                                              r"DeepSpeed config has stage 3: .* fix: resume with "
                                              r"a DeepSpeed file of stage 2 \(configs/deepspeed/"
                                              r"zero2.json, or zero_optimization.stage=2\) and "
                                              r"parallel.zero_stage 0 or 2, or convert it to a "
                                              r"weights-only checkpoint"):
        check_compatible(meta, tiny_config().model, {**meta["parallel"], "zero_stage": 3},
                         where="ck")
    stage_0 = {**meta, "parallel": {**meta["parallel"], "zero_stage": 0}}
    with pytest.raises(CheckpointError, match=r"a DeepSpeed file of stage 0 \(zero_optimization."
                                              r"stage=0\) and parallel.zero_stage 0, or convert"):
        check_compatible(stage_0, tiny_config().model, meta["parallel"], where="ck")
    with pytest.raises(CheckpointError, match=r"data-parallel size 2, this run has 4 with DeepSpeed "
                                              r"ZeRO stage 2: its optimizer state is sharded"):
        check_compatible(meta, tiny_config().model, {**meta["parallel"], "dp": 4}, where="ck")
    # another precision: DeepSpeed looks for the other precision's files (a FileNotFoundError
    # traceback before); a CPU run of bf16 was trained as fp32 until DeepSpeed's bf16 ran there
    fp32 = {**meta, "config": {**meta["config"], "training": {"precision": "fp32"}}}
    with pytest.raises(CheckpointError, match=r"trained through DeepSpeed in fp32, this run in "
                                              r"bf16: .* fix: training.precision=fp32 to resume, "
                                              r"or convert it"):
        check_compatible(fp32, tiny_config().model, {**meta["parallel"], "precision": "bf16"},
                         where="ck")
    check_compatible(fp32, tiny_config().model, {**meta["parallel"], "precision": "fp32"})


# ---- training on 2 gloo processes -------------------------------------------------------------

def _train(rank, world, run_dir, steps, ds=None, max_steps=None, **overrides):
    from megagpt.model.gpt import gather_full_state_dict
    from megagpt.training.trainer import Trainer
    cfg = run_config(Path(run_dir), max_steps or steps, ds, **overrides)
    ps = state.initialize_parallel(1, 1)
    try:
        trainer = Trainer(cfg, ps, log=lambda *a: None)
        trainer.train(until=steps)
        if ds is None:
            return gather_full_state_dict(trainer.engine.chunks[0]) if rank == 0 else {}
        return trainer.engine.full_state_dict()
    finally:
        state.destroy_parallel()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The native data-parallel path, dp 2: losses, final weights, and its save dir."""
    run_dir = tmp_path_factory.mktemp("native")
    weights = run_distributed(_train, 2, str(run_dir), STEPS, **EVALUATED)[0]
    return losses(run_dir), weights, run_dir / "ckpt", losses(run_dir, "val_loss")


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_losses_equal_the_native_data_parallel_path(tmp_path, native, stage):
    weights = run_distributed(_train, 2, str(tmp_path), STEPS, ds_file(f"zero{stage}"),
                              timeout=300, **EVALUATED)[0]
    ours, reference = losses(tmp_path), native[0]
    assert len(ours) == STEPS
    assert ours == pytest.approx(reference, rel=LOSS_RTOL, abs=0)
    # validation sums both replicas' batches, as the native path does (one replica's alone was
    # half the loss)
    assert len(native[3]) == 2
    assert losses(tmp_path, "val_loss") == pytest.approx(native[3], rel=LOSS_RTOL, abs=0)
    for name, value in native[1].items():          # the native gather leaves out the padding
        assert torch.allclose(weights[name][:len(value)], value, rtol=0, atol=1e-5), name
    meta = json.loads((tmp_path / "ckpt" / "step_0000006" / "meta.json").read_text())
    assert meta["parallel"]["engine"] == "deepspeed" and meta["parallel"]["zero_stage"] == stage
    assert any(f.startswith("deepspeed/") for f in meta["files"])


def _straight_and_resumed(rank, world, run_dir, stage):
    run_dir, ds = Path(run_dir), ds_file(f"zero{stage}")
    straight = _train(rank, world, run_dir / "a", STEPS, ds)
    _train(rank, world, run_dir / "b", STEPS // 2, ds, max_steps=STEPS)
    resumed = _train(rank, world, run_dir / "b", STEPS, ds)
    return straight, resumed


@needs_deepspeed
def test_bf16_maps_to_deepspeed_bf16_and_trains_close_to_fp32(tmp_path, native):
    run_distributed(_train, 2, str(tmp_path), STEPS, ds_file("zero2"), timeout=300,
                    training__precision="bf16")
    assert losses(tmp_path) == pytest.approx(native[0], rel=1e-3)    # bf16 weights, fp32 master


def _start_from(rank, world, run_dir, source):
    from megagpt.training.trainer import Trainer
    cfg = run_config(Path(run_dir), STEPS, ds_file("zero2"), checkpoint__pretrained=source)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    return trainer.engine.full_state_dict()


@needs_deepspeed
def test_pretrained_weights_reach_deepspeed(tmp_path, native):
    """checkpoint.pretrained loads into the model before deepspeed.initialize, so ZeRO's fp32
    master copy starts from them too (here the native run's last checkpoint)."""
    weights = run_distributed(_start_from, 2, str(tmp_path), str(native[2]), timeout=300)[0]
    for name, value in native[1].items():
        assert torch.equal(weights[name][:len(value)], value), name


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow)])
def test_resume_on_the_deepspeed_path_continues_exactly(tmp_path, stage):
    from megagpt.convert import load_source
    straight, resumed = run_distributed(_straight_and_resumed, 2, str(tmp_path), stage,
                                        timeout=300)[0]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "b")) == STEPS
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    # keep_last 3 of steps 3 and 6, `latest`, and the weights readable as any checkpoint of ours
    save_dir = tmp_path / "b" / "ckpt"
    assert (save_dir / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in save_dir.iterdir()) == [".lock", "latest", "step_0000003",
                                                          "step_0000006"]   # .lock: the run's
    source = load_source(str(save_dir))
    for name, value in source.full_state.items():   # unpadded, as every full state of ours
        assert torch.equal(value, resumed[name][:len(value)]), name


def _nan_at_step_2(rank, world, run_dir, ds, zero, **overrides):
    from megagpt.training.trainer import Trainer
    cfg = run_config(Path(run_dir), 4, ds, parallel__zero_stage=zero, **overrides)
    ps = state.initialize_parallel(1, 1)
    trainer = Trainer(cfg, ps, log=lambda *a: None)
    model = trainer.engine.chunks[0]
    weight = model.layers["0"].mlp.fc1.weight
    trainer.train(until=2)
    before = trainer.engine.full_state_dict()
    hook = weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan"))) \
        if rank == 1 else None                              # one rank sees the NaN
    trainer.train(until=3)
    if hook is not None:
        hook.remove()
    after = trainer.engine.full_state_dict()
    trainer.train(until=4)
    return trainer.skipped_total, before, after


@needs_deepspeed
@pytest.mark.parametrize("zero", [0, 2])
def test_a_non_finite_gradient_skips_the_step_on_every_rank(tmp_path, zero):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": zero}}))
    out = run_distributed(_nan_at_step_2, 2, str(tmp_path), str(path), zero, timeout=300)
    assert [o[0] for o in out] == [1, 1]
    skipped, before, after = out[0]
    for name, value in before.items():
        assert torch.equal(value, after[name]), name               # the update was skipped
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "skipped" in r] == [0, 0, 1, 1]
    assert [r["grad_norm"] is None for r in records if "skipped" in r] == [False, False, True, False]


def test_the_loss_sums_are_added_once_as_float_did_one_by_one():
    """The engines keep each micro-batch's loss sum as a tensor and convert them together: the
    sum is exactly the float64 left-to-right sum of float(loss_sum) per micro-batch."""
    from megagpt.training.engine import sum_losses
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        sums = [(torch.rand((), generator=g) * 10 ** k).to(dtype) for k in range(-3, 6)] * 3
        assert sum_losses(sums) == sum(float(x) for x in sums)
    assert sum_losses([]) == 0.0


def _host_syncs_of_a_step(rank, world, ds):
    """Which micro-batches the token count sees, and what the loss sums are when they are added."""
    from megagpt.testing import split_microbatches
    import megagpt.training.ds_engine as ds_engine
    from megagpt.training.ds_engine import DeepSpeedEngine
    cfg = tiny_config(dp=2, steps=2, parallel__deepspeed_config=ds)
    ps = state.initialize_parallel(1, 1)
    engine = DeepSpeedEngine(cfg, ps)
    engine.start()
    counted, added = [], []
    global_tokens, sum_losses = engine.global_tokens, ds_engine.sum_losses

    def spy_tokens(microbatches):
        counted.append(all(any(mb is own for own in given) for mb in microbatches))
        return global_tokens(microbatches)

    def spy_sum(loss_sums):
        value = sum_losses(loss_sums)
        added.append((len(loss_sums), all(isinstance(x, torch.Tensor) for x in loss_sums),
                      value == sum(float(x) for x in loss_sums)))
        return value

    engine.global_tokens, ds_engine.sum_losses = spy_tokens, spy_sum
    batch = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_length + 1),
                          generator=torch.Generator().manual_seed(rank))
    given = split_microbatches(batch, ps.dp_rank, 2, cfg.training.batch_size)
    for mb in given:
        mb["loss_mask"][:, ::3] = 0                               # not every token counts
    result = engine.train_step(given, 1e-3)
    val = engine.eval_step(given)
    expected_tokens = int(2 * sum(float(mb["loss_mask"].sum()) for mb in given))  # same per rank
    return counted, added, result.tokens == expected_tokens, math.isfinite(val)


@needs_deepspeed
def test_tokens_are_counted_before_the_device_copy_and_losses_summed_once(tmp_path):
    """As Engine does: no host sync per micro-batch (on a GPU, loss_mask.sum() after the copy
    and float(loss_sum) each were one), and the same reported values."""
    gas = tiny_config(dp=2).training.grad_accumulation_steps
    out = run_distributed(_host_syncs_of_a_step, 2, ds_file("zero1"), timeout=300)
    for counted, added, tokens_ok, val_finite in out:
        assert counted == [True, True]                  # train_step, eval_step: the caller's own
        assert added == [(gas, True, True)] * 2         # once a step, tensors, float's exact sum
        assert tokens_ok and val_finite


@needs_deepspeed
@pytest.mark.slow
def test_torchrun_pretrain_gpt_trains_through_deepspeed_and_resumes(tmp_path):
    """In bf16, with a DeepSpeed file that says so: a CPU run of the native path is fp32, but
    DeepSpeed's CPU accelerator has its bf16 mode (pretrain_gpt.py turned the run into fp32, and
    the engine then refused the file's bf16 with a traceback on every rank)."""
    ds = tmp_path / "zero2_bf16.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))

    def run(steps):
        cmd = [str(TORCHRUN), "--nproc_per_node", "2", "pretrain_gpt.py",
               "--config", "configs/training/tiny_deepspeed.json", "--data.mock=true",
               f"--parallel.deepspeed_config={ds}", "--training.precision=bf16",
               "--data.num_workers=0", "--model.n_layers=2", "--model.d_model=64",
               "--model.estimated_parameters=null", f"--training.max_steps={steps}",
               "--training.warmup_steps=1", "--training.log_interval=1",
               "--training.eval_interval=2",
               f"--logging.run_dir={tmp_path}", f"--checkpoint.save_dir={tmp_path / 'ckpt'}",
               "--checkpoint.save_interval=0"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    out = run(2)
    assert f"DeepSpeed ZeRO-2 ({ds})" in out and "bf16 on cpu" in out, out
    out = run(4)
    assert "resumed from" in out and "at step 2" in out
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


@needs_deepspeed
def test_zero0_under_torch_autocast_gets_its_norm_and_check_here(tmp_path, native):
    """DeepSpeed reports no gradient norm for ZeRO-0 under torch_autocast (torch's AdamW steps
    unwrapped, as in fp32): every applied update was logged as a skipped non-finite step, the
    schedule stood still and the run aborted at max_skipped_steps."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    run_distributed(_train, 2, str(tmp_path), STEPS, str(path), timeout=300,
                    training__precision="bf16")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "loss" in r] == [0] * STEPS
    norms = [r["grad_norm"] for r in records if "loss" in r]
    assert all(math.isfinite(n) and n > 0 for n in norms), norms
    assert losses(tmp_path) == pytest.approx(native[0], rel=1e-2)   # trained, as native did
    out = run_distributed(_nan_at_step_2, 2, str(tmp_path / "nan"), str(path), 0, timeout=300,
                          training__precision="bf16")
    skipped, before, after = out[0]
    assert [o[0] for o in out] == [1, 1]                    # and a non-finite step is skipped
    assert all(torch.equal(value, after[name]) for name, value in before.items())


def test_deepspeed_without_its_gradient_norm_is_refused(tmp_path):
    """`compute_grad_norm: false` leaves ZeRO 1-2 in fp32 without any check of the gradients:
    a NaN step was applied and logged as fine (and with clipping on, DeepSpeed itself raised)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}))
    with pytest.raises(ConfigError, match=r"sets zero_optimization.compute_grad_norm=false, but "
                                          r"every step's gradients are checked through their norm "
                                          r".* fix: remove compute_grad_norm"):
        tiny_config(dp=2, parallel__deepspeed_config=str(path))


def test_deepspeeds_fp16_scaler_skips_at_its_minimum_instead_of_raising(monkeypatch):
    """At its minimum scale, with the hysteresis used up, DeepSpeed's dynamic scaler raised a
    bare Exception from inside step(), ending the run with a traceback; it now stays there and
    the step counts as a fault, as with our scaler."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megagpt.training.ds_engine import keep_skipping_at_min_scale
    monkeypatch.setattr("deepspeed.runtime.fp16.loss_scaler.dist.get_rank", lambda: 0)
    scaler = DynamicLossScaler(init_scale=1.0, scale_window=1000, min_scale=1.0, delayed_shift=1,
                               consecutive_hysteresis=False)
    with pytest.raises(Exception, match="already at minimum"):
        scaler.update_scale(True)
    keep_skipping_at_min_scale(SimpleNamespace(loss_scaler=scaler))
    scaler.update_scale(True)
    assert scaler.cur_scale == 1.0
    keep_skipping_at_min_scale(SimpleNamespace())          # bf16, ZeRO-0: nothing to change


def _scaler_settings_applied(rank, world, run_dir, ds):
    import megagpt.training.ds_engine as ds_engine
    applied, real = [], ds_engine.keep_skipping_at_min_scale
    ds_engine.keep_skipping_at_min_scale = lambda optimizer: (applied.append(1), real(optimizer))
    _train(rank, world, run_dir, STEPS // 2, ds, max_steps=STEPS)     # saves at STEPS // 2
    started = len(applied)
    _train(rank, world, run_dir, STEPS, ds)                           # resumes it
    return started, len(applied) - started


@needs_deepspeed
def test_the_min_scale_setting_is_applied_at_start_and_again_after_a_resume(tmp_path):
    """A resume replaces DeepSpeed's loss scaler with the saved one, which raises at its minimum
    again (a checkpoint from before the setting, or DeepSpeed's default pickled with it)."""
    out = run_distributed(_scaler_settings_applied, 2, str(tmp_path), ds_file("zero2"), timeout=300)
    assert out == [(1, 2), (1, 2)]


def test_an_fp16_skip_is_exempt_only_while_deepspeeds_scale_can_back_off():
    """An overflow counts as the scaler's work only with a dynamic scale above its minimum: a
    static `fp16.loss_scale` (DeepSpeed then skips forever) or one at its minimum is a fault,
    as is a scaler whose fields this DeepSpeed names otherwise."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    from megagpt.training.ds_engine import scale_can_back_off
    dynamic = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1.0,
                                delayed_shift=2, consecutive_hysteresis=False)
    assert scale_can_back_off(SimpleNamespace(loss_scaler=dynamic))      # ZeRO's optimizers
    dynamic.cur_scale = 1.0
    assert not scale_can_back_off(SimpleNamespace(loss_scaler=dynamic))
    assert not scale_can_back_off(SimpleNamespace(loss_scaler=LossScaler(scale=128)))
    fp16_optimizer = SimpleNamespace(loss_scale_config=SimpleNamespace(
        dynamic_loss_scale=True, cur_scale=1024.0, min_loss_scale=1.0))
    assert scale_can_back_off(fp16_optimizer)
    assert not scale_can_back_off(SimpleNamespace())



# packed fine-tuning whose examples are kept apart (a window holds several of them)
SFT_DOCUMENTS = dict(model__vocab_size=50257, model__seq_length=128, training__mode="finetune",
                     data__mock=False, data__format="sft", data__split="90,10,0",
                     data__train_data_path=[str(ROOT / "megagpt/data/assets/sft_example.jsonl")],
                     data__reset_attention_mask=True, data__reset_position_ids=True)


@needs_deepspeed
def test_document_masks_and_positions_reach_the_deepspeed_model(tmp_path):
    steps = 3
    run_distributed(_train, 2, str(tmp_path / "native"), steps, **SFT_DOCUMENTS)
    run_distributed(_train, 2, str(tmp_path / "ds"), steps, ds_file("zero1"), **SFT_DOCUMENTS)
    plain = {k: v for k, v in SFT_DOCUMENTS.items() if not k.startswith("data__reset")}
    run_distributed(_train, 2, str(tmp_path / "plain"), steps, ds_file("zero1"), **plain)
    ours = losses(tmp_path / "ds")
    assert ours == pytest.approx(losses(tmp_path / "native"), rel=LOSS_RTOL, abs=0)
    assert ours[0] != pytest.approx(losses(tmp_path / "plain")[0], rel=1e-4)


def _resume_damaged(rank, world, run_dir):
    from megagpt.training.trainer import Trainer
    try:
        Trainer(run_config(Path(run_dir), 4, ds_file("zero2")), state.initialize_parallel(1, 1),
                log=lambda *a: None)
    except Exception as e:
        return type(e).__name__, str(e)
    return "built", ""


@needs_deepspeed
def test_a_rank_that_cannot_read_its_files_stops_every_rank_on_deepspeed(tmp_path):
    """Our files beside DeepSpeed's (the loop's state, the random streams): one rank's damaged
    file stops it with the file named and the other at once, told why."""
    run_distributed(_train, 2, str(tmp_path), 2, ds_file("zero2"), 4)
    check_a_damaged_file_stops_every_rank(tmp_path, _resume_damaged, timeout=120)

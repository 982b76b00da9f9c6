"""The DeepSpeed config a run trains with: the JSON named by `parallel.deepspeed_config`,
completed from our config, and every contradiction between the two.

Our config stays the one source of truth. Each setting both describe is taken from ours where the
DeepSpeed file leaves it out (or writes `"auto"`, as Hugging Face's integration does), and a value
the file sets must agree with ours:

    DeepSpeed key                          ours
    train_micro_batch_size_per_gpu         training.batch_size
    gradient_accumulation_steps            training.grad_accumulation_steps
    train_batch_size                       batch_size x grad_accumulation_steps x data-parallel size
    gradient_clipping                      training.grad_clip
    bf16 / fp16 (.enabled), torch_autocast training.precision (fp16: dynamic loss scaling from
                                           2**16, window 1000, hysteresis 2, as ours)
    zero_optimization.stage                parallel.zero_stage (0 there means "the file's stage")
    optimizer: AdamW, params lr, betas,    training.learning_rate, adam_beta1/2, adam_eps,
      eps, weight_decay, torch_adam        weight_decay; torch_adam is true for optimizer "adamw"
                                           (torch's AdamW, no op build), false for "apex"
                                           (DeepSpeed's fused Adam)

The learning rate follows our schedule (`training.lr_schedule`), set on the optimizer every step,
so a `scheduler` section is refused; so are settings that would make the run other than the
config describes or unchecked: optimizer.params our AdamW has no setting for (`amsgrad`, ...),
`bias_correction: false`, an enabled `amp` section, `bf16.check_grad_overflow: false` and
`zero_optimization.compute_grad_norm: false`. Everything else in the file (ZeRO buckets, offload,
communication settings, ...) goes to DeepSpeed unchanged.

Pure Python (no torch, no deepspeed): `megagpt.config` calls `deepspeed_config_problems` while
validating, so a contradiction is reported before launch, with the validator's other problems.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

AUTO = "auto"
DS_OPTIMIZERS = ("adamw", "adam")
# the optimizer.params keys our AdamW settings cover (max_grad_norm is refused: training.grad_clip)
ADAMW_PARAMS = ("lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode",
                "bias_correction", "max_grad_norm")
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}
AUTOCAST_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "torch.bfloat16": "bf16",
                   "float16": "fp16", "fp16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _given(section: dict, key: str) -> bool:
    return key in section and section[key] is not None and section[key] != AUTO


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def resolve_deepspeed_path(cfg) -> Path:
    """`parallel.deepspeed_config` as a path: relative to the working directory, else to the
    config file's folder or a parent of it (as `model.config_file`)."""
    from megagpt.config import resolve_path
    return resolve_path(cfg.parallel.deepspeed_config, cfg.source)


def merge_deepspeed_config(ds: dict, cfg, dp: int) -> tuple[dict, list[str]]:
    """The DeepSpeed config to train with, and the contradictions found.

    Args:
        ds: the DeepSpeed file's JSON object (not modified).
        cfg: our `Config`.
        dp: the data-parallel size (`parallel.world_size` here, since tp = pp = 1).

    Returns (merged, problems): merged is `ds` completed from `cfg` (see the module docstring);
    problems lists each contradiction, naming the file's key, both values and the fix.
    """
    t, name = cfg.training, cfg.parallel.deepspeed_config
    merged = copy.deepcopy(ds)
    problems: list[str] = []

    def fill(section: dict, key: str, ours_name: str, ours, where: str | None = None,
             fix_ours: str | None = None) -> None:
        """section[key] := ours when left out or "auto"; a problem when it disagrees."""
        where = where or key
        if not _given(section, key):
            section[key] = ours
        elif not _same(section[key], ours):
            fix = fix_ours or f"set {ours_name}={_show(section[key])}"
            problems.append(f"parallel.deepspeed_config={name} sets {where}={_show(section[key])}, "
                            f"but {ours_name}={_show(ours)}; fix: remove {where} from {name} (it is "
                            f"filled from {ours_name}) or {fix}")

    if not isinstance(merged, dict):
        return merged, [f"parallel.deepspeed_config={name}: must hold a JSON object (a DeepSpeed "
                        f"config), found {type(merged).__name__}"]

    # batch
    gbs = t.batch_size * t.grad_accumulation_steps * dp
    fill(merged, "train_micro_batch_size_per_gpu", "training.batch_size", t.batch_size)
    fill(merged, "gradient_accumulation_steps", "training.grad_accumulation_steps",
         t.grad_accumulation_steps)
    if not _given(merged, "train_batch_size"):
        merged["train_batch_size"] = gbs
    elif not _same(merged["train_batch_size"], gbs):
        problems.append(f"parallel.deepspeed_config={name} sets train_batch_size="
                        f"{_show(merged['train_batch_size'])}, but the global batch is "
                        f"training.batch_size x training.grad_accumulation_steps x data-parallel "
                        f"size = {t.batch_size} x {t.grad_accumulation_steps} x {dp} = {gbs}; fix: "
                        f"remove train_batch_size from {name} (it is filled from the global batch) "
                        f"or change those three so that their product is "
                        f"{_show(merged['train_batch_size'])}")
    fill(merged, "gradient_clipping", "training.grad_clip", t.grad_clip)

    # precision
    _merge_precision(merged, t.precision, name, problems)

    if isinstance(merged.get("amp"), dict) and merged["amp"].get("enabled") is True:
        problems.append(f"parallel.deepspeed_config={name} enables amp (apex AMP), but the "
                        f"precision is training.precision={t.precision}, which fills bf16/fp16; "
                        f"fix: remove the amp section from {name}")
    if isinstance(merged.get("bf16"), dict) and merged["bf16"].get("check_grad_overflow") is False:
        # without it DeepSpeed's bf16 ZeRO optimizer applies a step whose gradient norm is NaN
        problems.append(f"parallel.deepspeed_config={name} sets bf16.check_grad_overflow=false, "
                        f"so a step with non-finite gradients would be applied (the run's weights "
                        f"become NaN) where ours skips it; fix: remove check_grad_overflow from "
                        f"{name}")

    # ZeRO stage: parallel.zero_stage=0 (the default) takes the file's stage
    zero = merged.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"parallel.deepspeed_config={name}: zero_optimization must be an object")
    elif not _given(zero, "stage"):
        zero["stage"] = cfg.parallel.zero_stage
    elif cfg.parallel.zero_stage != 0:
        fill(zero, "stage", "parallel.zero_stage", cfg.parallel.zero_stage,
             where="zero_optimization.stage")
    if isinstance(zero, dict) and zero.get("stage") not in (0, 1, 2, 3):
        problems.append(f"parallel.deepspeed_config={name} sets zero_optimization.stage="
                        f"{_show(zero.get('stage'))}; it must be 0, 1, 2 or 3")
    elif isinstance(zero, dict) and zero.get("stage") == 0 and any(
            isinstance(merged.get(p), dict) and merged[p].get("enabled") is True
            for p in ("bf16", "fp16")):
        # 16-bit weights at stage 0: DeepSpeed's FP16 optimizer wrappers step once with zero
        # gradients when built (Adam one step ahead, the weights decayed) and keep no float32
        # weights we can save (autocast over float32 weights does not use them)
        problems.append(f"parallel.deepspeed_config={name}: ZeRO stage 0 with training.precision="
                        f"{t.precision} goes through DeepSpeed's FP16 optimizer wrapper, which "
                        f"takes an optimizer step before training and checkpoints 16-bit weights; "
                        f"fix: zero_optimization.stage 1, 2 or 3 (or parallel.zero_stage), or the "
                        f"native path (no parallel.deepspeed_config) for data parallelism without "
                        f"ZeRO")

    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        # at ZeRO 1-2 in fp32 the norm is DeepSpeed's only check of the gradients
        problems.append(f"parallel.deepspeed_config={name} sets zero_optimization."
                        f"compute_grad_norm=false, but every step's gradients are checked "
                        f"through their norm (a non-finite one skips the step) and the norm is "
                        f"logged; fix: remove compute_grad_norm from {name}")

    # optimizer and learning rate
    _merge_optimizer(merged, t, name, problems, fill)
    if merged.get("scheduler"):
        kind = merged["scheduler"].get("type") if isinstance(merged["scheduler"], dict) else None
        problems.append(f"parallel.deepspeed_config={name} has a scheduler ({_show(kind)}), but the "
                        f"learning rate follows training.lr_schedule={t.lr_schedule} (warm-up "
                        f"{t.warmup_steps} steps, min_lr {t.min_lr}), set every step; fix: remove "
                        f"the scheduler section and set the training.* schedule fields instead")
    merged.setdefault("steps_per_print", None)     # our metrics log the steps
    return merged, problems


def _merge_precision(merged: dict, precision: str, name: str, problems: list[str]) -> None:
    if "bfloat16" in merged and "bf16" not in merged:      # DeepSpeed's older name
        merged["bf16"] = merged.pop("bfloat16")
    found = len(problems)
    for key in ("bf16", "fp16", "torch_autocast"):
        if key in merged and not isinstance(merged[key], dict):
            problems.append(f"parallel.deepspeed_config={name}: {key}={_show(merged[key])} must "
                            f"be an object (DeepSpeed reads {key}.enabled); fix: remove it (it is "
                            f"filled from training.precision) or write {{\"enabled\": true}}")
    if len(problems) > found:
        return
    declared = {}                                           # precision -> where the file says so
    for p in ("bf16", "fp16"):
        if isinstance(merged.get(p), dict) and merged[p].get("enabled") is True:
            declared[p] = f"{p}.enabled=true"
    autocast = merged.get("torch_autocast")
    if isinstance(autocast, dict) and autocast.get("enabled") is True:
        dtype = str(autocast.get("dtype", "bfloat16"))
        declared.setdefault(AUTOCAST_DTYPES.get(dtype, dtype), f"torch_autocast.dtype={dtype}")
    found = len(problems)
    for p, where in declared.items():
        if p != precision:
            problems.append(f"parallel.deepspeed_config={name} sets {where}, but "
                            f"training.precision={precision}; fix: remove that setting from {name} "
                            f"(it is filled from training.precision) or set training.precision={p}")
    section = merged.get(precision) if precision != "fp32" else None
    if isinstance(section, dict) and section.get("enabled") is False:
        problems.append(f"parallel.deepspeed_config={name} sets {precision}.enabled=false, but "
                        f"training.precision={precision}; fix: remove the {precision} section from "
                        f"{name} (it is filled from training.precision) or set training.precision "
                        f"to the precision the file uses")
    if len(problems) > found:
        return
    for p in ("bf16", "fp16"):
        if isinstance(merged.get(p), dict) and merged[p].get("enabled") == AUTO:
            merged[p]["enabled"] = p == precision
    if precision == "fp32" or (precision in declared and not isinstance(section, dict)):
        return                                              # fp32, or torch_autocast says it
    section = dict(section or {})
    section["enabled"] = True
    if precision == "fp16":
        for key, value in FP16_DEFAULTS.items():
            section.setdefault(key, value)
    merged[precision] = section


def _merge_optimizer(merged: dict, t, name: str, problems: list[str], fill) -> None:
    opt = merged.setdefault("optimizer", {})
    if not isinstance(opt, dict):
        problems.append(f"parallel.deepspeed_config={name}: optimizer must be an object")
        return
    kind = opt.get("type", AUTO)
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        problems.append(f"parallel.deepspeed_config={name}: optimizer.params must be an object")
        return
    if kind == AUTO:
        opt["type"] = "AdamW"
    elif str(kind).lower() not in DS_OPTIMIZERS or (str(kind).lower() == "adam" and
                                                  params.get("adam_w_mode", True) is False):
        problems.append(f"parallel.deepspeed_config={name} sets optimizer.type={_show(kind)}"
                        f"{' with adam_w_mode=false' if str(kind).lower() == 'adam' else ''}, but "
                        f"training.optimizer={t.optimizer} is AdamW (decoupled weight decay); fix: "
                        f"remove the optimizer section from {name} (it is filled from training.*) "
                        f"or set its type to AdamW")
    fill(params, "lr", "training.learning_rate", t.learning_rate, where="optimizer.params.lr")
    fill(params, "betas", "[training.adam_beta1, training.adam_beta2]",
         [t.adam_beta1, t.adam_beta2], where="optimizer.params.betas",
         fix_ours="set training.adam_beta1 and training.adam_beta2 to those values")
    fill(params, "eps", "training.adam_eps", t.adam_eps, where="optimizer.params.eps")
    fill(params, "weight_decay", "training.weight_decay", t.weight_decay,
         where="optimizer.params.weight_decay")
    if "max_grad_norm" in params:
        problems.append(f"parallel.deepspeed_config={name} sets optimizer.params.max_grad_norm; "
                        f"fix: remove it (the gradient clipping is training.grad_clip, DeepSpeed's "
                        f"gradient_clipping)")
    if params.get("bias_correction", True) is not True:
        problems.append(f"parallel.deepspeed_config={name} sets optimizer.params.bias_correction="
                        f"{_show(params['bias_correction'])}, but training.optimizer="
                        f"{t.optimizer} is AdamW with bias correction (as the native path); fix: "
                        f"remove bias_correction from {name}")
    for key in sorted(set(params) - set(ADAMW_PARAMS)):
        problems.append(f"parallel.deepspeed_config={name} sets optimizer.params.{key}="
                        f"{_show(params[key])}, which training.* has no setting for (the run would "
                        f"not be the AdamW the config describes); fix: remove it from {name}")
    if not _given(params, "torch_adam"):
        params["torch_adam"] = t.optimizer != "apex"


def deepspeed_config_problems(cfg) -> list[str]:
    """The problems with `parallel.deepspeed_config` for config validation: an unreadable file,
    or contradictions with our config (see `merge_deepspeed_config`)."""
    from megagpt.config import ConfigFileError, read_json
    name = cfg.parallel.deepspeed_config
    try:
        ds = read_json(resolve_deepspeed_path(cfg), "parallel.deepspeed_config")
    except ConfigFileError as e:
        return [f"parallel.deepspeed_config={name}: {e}"]
    return merge_deepspeed_config(ds, cfg, cfg.parallel.data_parallel_size)[1]


def _show(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)

"""The optimizer and the learning-rate schedule.

This file owns three things the training loop asks for:

- which parameters get weight decay (`param_groups`): weight matrices of linear layers do; biases,
  LayerNorm weights and biases, and the embeddings (`wte`, `wpe`, and `output_weight`, the last
  pipeline stage's copy of the tied embedding) do not;
- the optimizer (`build_optimizer`): AdamW, fused on CUDA, or apex's FusedAdam in AdamW mode;
- the learning rate at each step (`lr_at`, applied with `set_lr`): linear warm-up, then cosine or
  linear decay to `training.min_lr`, or constant.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from megagpt.config import TrainingConfig
from megagpt.kernels import BackendUnavailable

EMBEDDING_NAMES = ("wte", "wpe", "output_weight")


def is_embedding(name: str) -> bool:
    """True for the word and position embeddings and the output layer's copy of the tied one."""
    return any(part in EMBEDDING_NAMES for part in name.split("."))


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float) -> list[dict]:
    """Split parameters into a decay group and a no-decay group for AdamW.

    Args:
        named_params: (name, parameter) pairs, e.g. `stage.named_parameters()`; parameters with
            `requires_grad=False` are left out.
        weight_decay: the decoupled weight decay of the decay group (`training.weight_decay`).

    Returns two groups, always in this order (so optimizer state lines up across ranks):
    `{"params": [...], "weight_decay": weight_decay}` with every parameter of 2 or more
    dimensions that is not an embedding, and `{"params": [...], "weight_decay": 0.0}` with the rest.
    """
    if not weight_decay >= 0:
        raise ValueError(f"training.weight_decay={weight_decay}: must be >= 0 (0 turns decay off)")
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        shape_of = getattr(param, "source", param)   # a ZeRO-1 shard view decides by its parameter
        (decay if shape_of.ndim >= 2 and not is_embedding(name) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("param_groups: no trainable parameters were given (every parameter has "
                         "requires_grad=False, or the iterable was empty)")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    training_cfg: TrainingConfig,
                    device: torch.device | str) -> torch.optim.Optimizer:
    """AdamW over `param_groups(named_params, training_cfg.weight_decay)`.

    Args:
        named_params: (name, parameter) pairs of the model stage(s) this rank trains.
        training_cfg: reads `optimizer`, `learning_rate`, `adam_beta1`, `adam_beta2`, `adam_eps`,
            `weight_decay`.
        device: where the parameters live; on CUDA, torch's AdamW runs its fused kernel.

    `training.optimizer="apex"` uses `apex.optimizers.FusedAdam(adam_w_mode=True)`, which needs
    NVIDIA apex built with its CUDA extensions and a CUDA device; otherwise it is an error that
    says so and names the alternative.
    """
    t = training_cfg
    device = torch.device(device)
    groups = param_groups(named_params, t.weight_decay)
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=True if device.type == "cuda" else None, **kwargs)
    if t.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise BackendUnavailable(
                f"training.optimizer=\"apex\": apex.optimizers.FusedAdam is not importable ({e}); "
                f"fix: install NVIDIA apex with its CUDA extensions, or set "
                f"training.optimizer=\"adamw\" (torch's AdamW, fused on CUDA)") from e
        if device.type != "cuda":
            raise BackendUnavailable(
                f"training.optimizer=\"apex\": apex's FusedAdam runs on CUDA only, but the "
                f"parameters are on {device}; fix: set training.optimizer=\"adamw\"")
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    raise ValueError(f"training.optimizer={t.optimizer!r}: must be \"adamw\" or \"apex\"")


def lr_at(step: int, training_cfg: TrainingConfig) -> float:
    """The learning rate of the update made at optimizer step `step` (0-based).

    Args:
        step: optimizer steps completed before this update (0 for the first update).
        training_cfg: reads `learning_rate`, `min_lr`, `lr_schedule`, `warmup_steps`,
            `lr_decay_steps` (the step at which the decay ends; default `max_steps`), `max_steps`.

    Warm-up is linear, `lr * (step + 1) / warmup_steps`, so the first update uses a small non-zero
    rate and step `warmup_steps - 1` the peak. Then, over `decay = lr_decay_steps - warmup_steps`
    steps, `progress = (step - warmup_steps) / decay` (clipped to [0, 1]) gives
    cosine: `min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))`,
    linear: `lr - (lr - min_lr) * progress`; `min_lr` holds after the decay, and from the end of
    warm-up on when decay is 0. `constant` keeps the peak after warm-up.
    """
    t = training_cfg
    if step < 0:
        raise ValueError(f"lr_at: step={step} must be >= 0 (optimizer steps completed)")
    if t.warmup_steps < 0:
        raise ValueError(f"training.warmup_steps={t.warmup_steps}: must be >= 0")
    peak, floor, warmup = t.learning_rate, t.min_lr, t.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if t.lr_schedule == "constant":
        return peak
    decay_end = t.lr_decay_steps if t.lr_decay_steps is not None else t.max_steps
    decay = decay_end - warmup
    if decay < 0:
        raise ValueError(f"training.lr_decay_steps={decay_end} (default training.max_steps) is "
                         f"smaller than training.warmup_steps={warmup}: the decay would end before "
                         f"warm-up does; fix: set lr_decay_steps >= {warmup} or shorten warm-up")
    progress = 1.0 if decay == 0 else min(max((step - warmup) / decay, 0.0), 1.0)
    if t.lr_schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    if t.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    raise ValueError(f"training.lr_schedule={t.lr_schedule!r}: must be \"cosine\", \"linear\" "
                     f"or \"constant\"")


def set_hyperparameters(optimizer: torch.optim.Optimizer, training_cfg: TrainingConfig) -> None:
    """The config's betas, eps and weight decay on the groups of `param_groups` (decay group
    first): a loaded optimizer state brings the saved run's, and a resume follows the config."""
    t = training_cfg
    decay, no_decay = optimizer.param_groups
    for group in (decay, no_decay):
        group["betas"] = (t.adam_beta1, t.adam_beta2)
        group["eps"] = t.adam_eps
    decay["weight_decay"], no_decay["weight_decay"] = t.weight_decay, 0.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (decay and no-decay alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr

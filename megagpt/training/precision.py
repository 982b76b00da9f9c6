"""Mixed precision: the parameter dtype, loss scaling and the agreed non-finite gradient check.

Training in bf16 or fp16 is Megatron's scheme: the model's parameters (`param_dtype`) and
activations are 16-bit, gradients accumulate and are reduced in float32, and the optimizer
updates float32 master weights (megagpt/parallel/data_parallel.py). `autocast_context` is the
other common scheme, autocast over float32 weights; the benchmarks' Hugging Face peer runs in it.

fp16 also needs loss scaling: `DynamicLossScaler` is Megatron's dynamic grad scaler. The engine
(megagpt/training/engine.py) multiplies the loss by `scaler.scale` before backward, divides the
gradients by it after their reduction, finds a non-finite step through the global gradient norm
(the same number on every rank, so every rank skips the same steps), and calls
`scaler.update(found_inf)` every step. fp32 and bf16 get a `ConstantScaler` with the same
interface and a scale of 1.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"training.precision={precision!r}: must be one of "
                         f"{', '.join(PRECISIONS)}")


def gpu_problems(cfg, capability: tuple[int, int], name: str) -> list[str]:
    """What this config asks of the GPU that a GPU of compute `capability` (major, minor) named
    `name` lacks: bf16 arithmetic and flash-attn 2 need Ampere (8.0) or newer. Torch emulates
    bf16 on older GPUs, slowly, and Triton does not compile it there: the run would crash in its
    first kernel or crawl."""
    problems = []
    if capability < (8, 0):
        found = f"this GPU ({name}) has compute capability {capability[0]}.{capability[1]}"
        if cfg.training.precision == "bf16":
            problems.append(f"training.precision=bf16 needs a GPU of compute capability 8.0 or "
                            f"newer (A100, H100, RTX 30xx and later); {found}; fix: "
                            f"training.precision=fp16 (with dynamic loss scaling, as Megatron "
                            f"trains on V100s)")
        if cfg.kernels.attention == "flash_attn":
            problems.append(f"kernels.attention=flash_attn: flash-attn 2 needs compute capability "
                            f"8.0 or newer; {found}; fix: kernels.attention=sdpa")
    return problems


def param_dtype(precision: str) -> torch.dtype:
    """The model's parameter dtype for `training.precision`: float32, bfloat16 or float16."""
    _check_precision(precision)
    return {"fp32": torch.float32, **AUTOCAST_DTYPES}[precision]


def autocast_context(precision: str, device_type: str | torch.device):
    """The context to run forward and backward in.

    Args:
        precision: `training.precision`: "fp32" (no autocast), "bf16" or "fp16".
        device_type: "cuda" or "cpu" (a torch.device is accepted too).

    Returns `torch.autocast(device_type, dtype=torch.bfloat16 | torch.float16)`, or
    `contextlib.nullcontext()` for fp32.
    """
    _check_precision(precision)
    device_type = torch.device(device_type).type
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


class ConstantScaler:
    """A scale of 1 that never changes: fp32 and bf16 need no loss scaling."""

    @property
    def scale(self) -> float:
        return 1.0

    def update(self, found_inf: bool) -> None:
        """Nothing to adapt; present so the loop treats every precision alike."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Accepts any saved scaler state (a run may resume an fp16 checkpoint in bf16)."""


class DynamicLossScaler:
    """Megatron's dynamic loss scaler for fp16.

    Args:
        initial_scale: the starting scale (2**16).
        min_scale: the scale never backs off below this.
        growth_factor: the scale is multiplied by this after `growth_interval` good steps in a row.
        backoff_factor: the scale is multiplied by this on a non-finite step, once hysteresis is
            used up.
        growth_interval: consecutive finite steps before the scale grows.
        hysteresis: non-finite steps tolerated before backing off. As in Megatron, the counter
            is refilled when the scale grows (not on every good step): after `hysteresis`
            non-finite steps since the last growth, every further non-finite step backs off. A
            burst of that many non-finite steps in a row therefore always backs off, and an
            isolated one does not.
    """

    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2):
        checks = [("initial_scale", initial_scale, initial_scale > 0, "> 0"),
                  ("min_scale", min_scale, 0 < min_scale <= initial_scale, "in (0, initial_scale]"),
                  ("growth_factor", growth_factor, growth_factor > 1, "> 1"),
                  ("backoff_factor", backoff_factor, 0 < backoff_factor < 1, "in (0, 1)"),
                  ("growth_interval", growth_interval, growth_interval >= 1, ">= 1"),
                  ("hysteresis", hysteresis, hysteresis >= 1, ">= 1")]
        for name, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"DynamicLossScaler: {name}={value} must be {rule}")
        self._scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @property
    def scale(self) -> float:
        """The factor to multiply the loss by before backward."""
        return self._scale

    def update(self, found_inf: bool) -> None:
        """Adapt the scale after a step; `found_inf` must be the same on every rank."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state; an empty one (a checkpoint from an fp32/bf16 run) starts fresh."""
        if not state:
            return
        missing = [k for k in ("scale", "growth_tracker", "hysteresis_tracker") if k not in state]
        if missing:
            raise ValueError(f"DynamicLossScaler.load_state_dict: the saved state lacks "
                             f"{', '.join(missing)} (has {', '.join(sorted(state)) or 'nothing'}); "
                             f"it is not a DynamicLossScaler state")
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def make_scaler(precision: str, initial_scale: float = 2.0 ** 16):
    """A `DynamicLossScaler(initial_scale)` for fp16, a `ConstantScaler` for fp32 and bf16."""
    _check_precision(precision)
    return DynamicLossScaler(initial_scale) if precision == "fp16" else ConstantScaler()

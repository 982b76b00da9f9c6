"""Shared helpers of the kernel files: where Triton can run, and the input checks.

Triton decides at ``@triton.jit`` time (when a kernel module is imported) whether a kernel is
compiled for a GPU or run by its CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
``megagpt.kernels`` is imported. ``KERNELS_INTERPRETED`` records which of the two the kernels of
this import are. On the CPU they run only when they were built for the interpreter and
``TRITON_INTERPRET=1`` is still set when called; otherwise the public functions run the
plain-torch references, so the model works on any machine.

Where Triton is not installed at all (it ships wheels for Linux only), a stand-in module lets the
kernel files import and define their kernels; every public function then runs its reference.
"""
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)  # kernels stay plain, never-called functions
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)  # annotations, constants

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = "float16, bfloat16, float32"

if HAS_TRITON:
    @triton.jit
    def _probe_kernel():
        pass

    KERNELS_INTERPRETED = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)
else:
    KERNELS_INTERPRETED = False


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set now to a value triton reads as on (1/true/on/yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs_on(device) -> bool:
    """True when this import's Triton kernels can run on tensors of ``device``.

    CUDA: always (Triton installed). CPU: only under the interpreter. Raises when
    ``TRITON_INTERPRET=1`` is set now but the kernels were compiled for the GPU, since the
    variable was set after ``megagpt.kernels`` was imported and cannot take effect.
    """
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    if interpreter_requested() and not KERNELS_INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, but megagpt.kernels was imported before it was set, so its "
            "kernels were built for a GPU; set TRITON_INTERPRET=1 before importing megagpt.kernels"
        )
    return KERNELS_INTERPRETED and interpreter_requested()


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` is a tensor of a supported floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {_DTYPE_NAMES}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise unless every tensor lies on the same device; names them when they do not."""
    names = list(tensors)
    first = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != first:
            raise ValueError(f"{names[0]} is on {first} but {name} is on {tensors[name].device}; "
                             "all inputs must be on one device")


def check_last_dim(name: str, t: torch.Tensor, size: int, of: str) -> None:
    """Raise unless ``t`` is 1-D of length ``size`` (the last dimension of ``of``)."""
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) to match the last dimension of {of}, "
                         f"got {tuple(t.shape)}")

"""Scaled, optionally causal softmax over the last dimension (attention scores), in Triton.

Owns `scaled_masked_softmax` (the public function), its autograd Function, the launchers, the
kernels and `scaled_masked_softmax_reference`.

Shapes: x is (..., n) with n <= 65536, flattened to rows; with ``causal=True`` x is
(..., sq, sk) and key j > query i is masked, as Megatron's upper-triangular mask does (top-left
aligned: row i of each (sq, sk) matrix keeps keys 0..i). y = softmax(scale * x) with masked
entries 0, in x's dtype; the arithmetic is float32.

Forward: each program normalises BLOCK_M whole rows. Backward: the same layout,
dx = scale * y * (dy - sum(dy * y)) from the saved output (masked entries have y = 0, hence
dx = 0). Launch settings: BLOCK_M and the warps are autotuned on a GPU per row width
(`row_configs`).
"""
import functools

import torch

from ._utils import (Autotuned, cdiv, check_float, next_power_of_2, row_configs, tl, triton,
                     triton_runs_on)

MAX_WIDTH = 65536
LOG2E = tl.constexpr(1.4426950408889634)   # kernels read only constexpr globals


@triton.jit
def _softmax_fwd_kernel(X, Y, n_rows, n_cols, sq, scale, CAUSAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    keep = cols[None, :] < n_cols  # rows past the end load zeros and stay finite
    if CAUSAL:
        keep = keep & (cols[None, :] <= (rows % sq)[:, None])
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    x = tl.where(keep, x * scale, float("-inf"))
    # exp(a) = exp2(a log2 e), log2 e applied after the subtraction: to the scores themselves,
    # their rounding would grow with their size, not with their distance from the maximum
    e = tl.exp2((x - tl.max(x, 1)[:, None]) * LOG2E)
    y = e * (1.0 / tl.sum(e, 1))[:, None]      # one division a row, not one an element
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, n_rows, n_cols, scale, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    y = tl.load(Y + offsets, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
    dx = scale * y * (dy - tl.sum(dy * y, 1)[:, None])
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=inside)


# Under the interpreter: several rows a program and a partial last block in the tests' shapes.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 4}, num_warps=4)


@functools.lru_cache(maxsize=None)
def _fwd_kernel(block_n: int):
    """The forward kernel, autotuned among the configs for rows padded to ``block_n``."""
    return Autotuned(_softmax_fwd_kernel, row_configs(block_n), _INTERPRETER_CONFIG,
                     key=["n_cols", "CAUSAL"])


@functools.lru_cache(maxsize=None)
def _bwd_kernel(block_n: int):
    """The backward kernel, autotuned among the configs for rows padded to ``block_n``."""
    return Autotuned(_softmax_bwd_kernel, row_configs(block_n), _INTERPRETER_CONFIG,
                     key=["n_cols"])


class ScaledMaskedSoftmaxFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves the output y."""

    @staticmethod
    def forward(ctx, x, scale, causal):
        x = x.contiguous()
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        sq = x.shape[-2] if causal else 1
        block_n = next_power_of_2(n_cols)
        y = torch.empty_like(x)
        _fwd_kernel(block_n)[lambda meta: (cdiv(n_rows, meta["BLOCK_M"]),)](
            x, y, n_rows, n_cols, sq, scale, CAUSAL=causal, BLOCK_N=block_n)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dy = dy.contiguous()
        n_cols = y.shape[-1]
        n_rows = y.numel() // n_cols
        block_n = next_power_of_2(n_cols)
        dx = torch.empty_like(y)
        _bwd_kernel(block_n)[lambda meta: (cdiv(n_rows, meta["BLOCK_M"]),)](
            y, dy, dx, n_rows, n_cols, ctx.scale, BLOCK_N=block_n)
        return dx, None, None


def _check_inputs(x, causal):
    check_float("x", x)
    if x.dim() < (2 if causal else 1):
        need = "(..., sq, sk) when causal" if causal else "at least one dimension"
        raise ValueError(f"x has shape {tuple(x.shape)}; scaled_masked_softmax needs {need}")


def scaled_masked_softmax_reference(x, scale=1.0, causal=False):
    """Plain torch: softmax(scale * x) over the last dimension in float32, key j > query i
    masked when causal; returned in x's dtype."""
    scores = x.float() * scale
    if causal:
        sq, sk = x.shape[-2:]
        above = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.softmax(scores, dim=-1).to(x.dtype)


def scaled_masked_softmax(x, scale=1.0, causal=False):
    """softmax(scale * x) over the last dimension with the Triton kernels.

    Args:
        x: (..., n) float16/bfloat16/float32, n <= 65536; (..., sq, sk) when causal.
            Non-contiguous x is copied.
        scale: multiplies x before the mask and the softmax.
        causal: mask key j > query i (each (sq, sk) matrix's upper triangle).
    Returns:
        x's shape and dtype. Runs `scaled_masked_softmax_reference` where the kernels cannot
        run and for empty x.
    """
    _check_inputs(x, causal)
    if x.numel() == 0 or not triton_runs_on(x.device):
        return scaled_masked_softmax_reference(x, scale, causal)
    if x.shape[-1] > MAX_WIDTH:         # the kernels' limit, not the reference's
        raise ValueError(f"x has last dimension {x.shape[-1]}; the Triton scaled_masked_softmax "
                         f"supports up to {MAX_WIDTH} (kernels.softmax=torch has no limit)")
    return ScaledMaskedSoftmaxFunction.apply(x, float(scale), bool(causal))


def scaled_masked_softmax_torch(x, scale=1.0, causal=False):
    """The `torch` backend: `scaled_masked_softmax_reference` after `scaled_masked_softmax`'s
    checks of its input."""
    _check_inputs(x, causal)
    return scaled_masked_softmax_reference(x, scale, causal)

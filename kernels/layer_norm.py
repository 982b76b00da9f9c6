"""Layer norm over the last dimension: fused forward and backward in Triton.

Owns `layer_norm` (the public function), its autograd Function, the launchers, the kernels and
`layer_norm_reference`.

Shapes: x is (..., n) with n <= 65536, read as (rows, n); weight and bias are (n,). x and the
parameters may differ in dtype (float16/bfloat16 activations with float32 parameters); the
statistics are computed in float32, y has x's dtype, dweight and dbias the parameters' dtype.

Forward: each program normalises BLOCK_M whole rows and keeps each row's mean and 1/std (float32,
one (2, rows) buffer) for the backward.
Backward: a fixed number of programs (four a multiprocessor), each owning a contiguous range of
rows, BLOCK_M rows at a time: it writes dx for each row and sums dy * x_hat and dy over its rows
in registers, then stores one partial row of dweight and of dbias into one (2, programs, n)
buffer. The final sum over programs (far smaller than x) is one torch reduction for both: no
second pass over a buffer of x's size.
Launch settings: BLOCK_M and the warps are autotuned on a GPU per row width (`row_configs`).
"""
import functools

import torch

from ._utils import (KERNELS_INTERPRETED, Autotuned, cdiv, check_float, check_last_dim,
                     check_same_device, multiprocessor_count, next_power_of_2, row_configs, tl,
                     triton, triton_runs_on)

MAX_WIDTH = 65536
# The backward holds two float32 accumulators of its tile besides x and dy: smaller tiles.
BWD_MAX_TILE = 4096


@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, STATS, n_rows, n_cols, eps, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    in_cols = cols < n_cols
    mask = (rows[:, None] < n_rows) & in_cols[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / n_cols + eps)
    w = tl.load(W + cols, mask=in_cols, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=in_cols, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + rows, mean, mask=rows < n_rows)
    tl.store(STATS + n_rows + rows, rstd, mask=rows < n_rows)


@triton.jit
def _layer_norm_bwd_kernel(X, W, DY, STATS, DX, PARTIAL, n_rows, n_cols, rows_per_program,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_cols = cols < n_cols
    w = tl.load(W + cols, mask=in_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        in_rows = rows < row_end
        mask = in_rows[:, None] & in_cols[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(STATS + rows, mask=in_rows, other=0.0)
        rstd = tl.load(STATS + n_rows + rows, mask=in_rows, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        w_dy = w[None, :] * dy
        c_xhat = tl.sum(x_hat * w_dy, 1) / n_cols
        c_mean = tl.sum(w_dy, 1) / n_cols
        dx = (w_dy - (x_hat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    dw_offset = pid.to(tl.int64) * n_cols
    db_offset = (tl.num_programs(0) + pid).to(tl.int64) * n_cols
    tl.store(PARTIAL + dw_offset + cols, tl.sum(dw, 0), mask=in_cols)
    tl.store(PARTIAL + db_offset + cols, tl.sum(db, 0), mask=in_cols)


# Under the interpreter: several rows a program and a partial last block in the tests' shapes.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 4}, num_warps=4)


@functools.lru_cache(maxsize=None)
def _fwd_kernel(block_n: int):
    """The forward kernel, autotuned among the configs for rows padded to ``block_n``."""
    return Autotuned(_layer_norm_fwd_kernel, row_configs(block_n), _INTERPRETER_CONFIG,
                     key=["n_cols"])


@functools.lru_cache(maxsize=None)
def _bwd_kernel(block_n: int):
    """The backward kernel, autotuned among the configs for rows padded to ``block_n``."""
    return Autotuned(_layer_norm_bwd_kernel, row_configs(block_n, BWD_MAX_TILE),
                     _INTERPRETER_CONFIG, key=["n_cols"])


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: four a multiprocessor on a GPU, a handful under the
    interpreter (enough that the tests cover several programs with unequal row counts)."""
    if KERNELS_INTERPRETED or device.type != "cuda":
        return min(n_rows, 4)
    return min(n_rows, 4 * multiprocessor_count(device.index))


class LayerNormFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves x, weight, and each row's mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        block_n = next_power_of_2(n_cols)
        y = torch.empty_like(x)
        stats = torch.empty((2, n_rows), device=x.device, dtype=torch.float32)
        _fwd_kernel(block_n)[lambda meta: (cdiv(n_rows, meta["BLOCK_M"]),)](
            x, weight, bias, y, stats, n_rows, n_cols, eps, BLOCK_N=block_n)
        ctx.save_for_backward(x, weight, stats)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        n_cols = x.shape[-1]
        n_rows = stats.shape[1]
        dy = dy.contiguous()
        rows_per_program = cdiv(n_rows, _backward_programs(n_rows, x.device))
        programs = cdiv(n_rows, rows_per_program)
        dx = torch.empty_like(x)
        partial = torch.empty((2, programs, n_cols), device=x.device, dtype=torch.float32)
        block_n = next_power_of_2(n_cols)
        _bwd_kernel(block_n)[(programs,)](x, weight, dy, stats, dx, partial, n_rows, n_cols,
                                          rows_per_program, BLOCK_N=block_n)
        sums = partial.sum(1)
        if ctx.bias_dtype == weight.dtype:
            dweight, dbias = sums.to(weight.dtype)
        else:
            dweight, dbias = sums[0].to(weight.dtype), sums[1].to(ctx.bias_dtype)
        return dx, dweight, dbias, None


def _check_inputs(x, weight, bias):
    check_float("x", x)
    check_float("weight", weight)
    check_float("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised)")
    width = x.shape[-1]
    check_last_dim("weight", weight, width, "x")
    check_last_dim("bias", bias, width, "x")


def layer_norm_reference(x, weight, bias, eps=1e-5):
    """Plain torch: F.layer_norm (whose statistics are float32 for every dtype); with parameters
    of another dtype than x, computed on float32 copies and returned in x's dtype."""
    if weight.dtype == x.dtype and bias.dtype == x.dtype:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    """Layer norm over the last dimension with the fused Triton kernels.

    Args:
        x: (..., n) float16/bfloat16/float32, n <= 65536. Non-contiguous x is copied.
        weight, bias: (n,) on x's device, any of those dtypes.
        eps: added to the variance.
    Returns:
        (..., n) in x's dtype. Runs `layer_norm_reference` where the kernels cannot run
        and for empty x.
    """
    _check_inputs(x, weight, bias)
    if x.numel() == 0 or not triton_runs_on(x.device):
        return layer_norm_reference(x, weight, bias, eps)
    if x.shape[-1] > MAX_WIDTH:         # the kernels' limit, not the reference's
        raise ValueError(f"x has last dimension {x.shape[-1]}; the Triton layer_norm supports up "
                         f"to {MAX_WIDTH} (kernels.layernorm=torch has no limit)")
    return LayerNormFunction.apply(x, weight, bias, float(eps))


def layer_norm_torch(x, weight, bias, eps=1e-5):
    """The `torch` backend: `layer_norm_reference` after `layer_norm`'s checks of its inputs."""
    _check_inputs(x, weight, bias)
    return layer_norm_reference(x, weight, bias, eps)

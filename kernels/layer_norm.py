"""Layer norm over the last dimension: fused forward and backward in Triton.

Owns `layer_norm` (the public function), its autograd Function, the launchers, the kernels and
`layer_norm_reference`.

Shapes: x is (..., n) with n <= 65536, flattened to (rows, n); weight and bias are (n,). x and the
parameters may differ in dtype (float16/bfloat16 activations with float32 parameters); the
statistics are computed in float32, y has x's dtype, dweight and dbias the parameters' dtype.

Forward: each program normalises whole rows (several when they are short) and keeps each row's
mean and 1/std (float32) for the backward.
Backward: a fixed number of programs, each owning a contiguous range of rows: it writes dx for
each row and sums dy * x_hat and dy over its rows in registers, then stores one partial row of
dweight and of dbias. The final sum over programs (programs x n, far smaller than x) is one torch
reduction: no second pass over a buffer of x's size.
"""
import torch

from ._utils import (KERNELS_INTERPRETED, check_float, check_last_dim, check_same_device, tl,
                     triton, triton_runs_on)

MAX_WIDTH = 65536


@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, eps, BLOCK_M: tl.constexpr,
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
    tl.store(MEAN + rows, mean, mask=rows < n_rows)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _layer_norm_bwd_kernel(X, W, DY, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, n_rows, n_cols,
                           rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    n_own = tl.minimum(rows_per_program, n_rows - row_start)
    base = row_start.to(tl.int64) * n_cols
    for i in range(0, n_own):
        offsets = base + i * n_cols + cols
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row_start + i)
        rstd = tl.load(RSTD + row_start + i)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        w_dy = w * dy
        c_xhat = tl.sum(x_hat * w_dy, 0) / n_cols
        c_mean = tl.sum(w_dy, 0) / n_cols
        dx = (w_dy - (x_hat * c_xhat + c_mean)) * rstd
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=mask)


def _num_warps(elements: int) -> int:
    return min(16, max(1, elements // 512))


def _bwd_num_warps(block_n: int) -> int:
    """The backward loops over rows, one at a time: at least 4 warps hide its latency."""
    return max(4, _num_warps(block_n))


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: a few a multiprocessor on a GPU, a handful under the
    interpreter (enough that the tests cover several programs with unequal row counts)."""
    if KERNELS_INTERPRETED or device.type != "cuda":
        return max(1, min(n_rows, 4))
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, 4 * sm_count))


class LayerNormFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves x, weight, and each row's mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        weight, bias = weight.contiguous(), bias.contiguous()
        n_rows, n_cols = x2d.shape
        block_n = triton.next_power_of_2(n_cols)
        block_m = max(1, 4096 // block_n)  # several rows a program when they are short
        y = torch.empty_like(x2d)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2d, weight, bias, y, mean, rstd, n_rows, n_cols, eps, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n))
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy2d = dy.reshape(n_rows, n_cols).contiguous()
        block_n = triton.next_power_of_2(n_cols)
        programs = _backward_programs(n_rows, x2d.device)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)
        dx = torch.empty_like(x2d)
        dw_partial = torch.empty((programs, n_cols), device=x2d.device, dtype=torch.float32)
        db_partial = torch.empty((programs, n_cols), device=x2d.device, dtype=torch.float32)
        _layer_norm_bwd_kernel[(programs,)](
            x2d, weight, dy2d, mean, rstd, dx, dw_partial, db_partial, n_rows, n_cols,
            rows_per_program, BLOCK_N=block_n, num_warps=_bwd_num_warps(block_n))
        dweight = dw_partial.sum(0).to(weight.dtype)
        dbias = db_partial.sum(0).to(ctx.bias_dtype)
        return dx.view(dy.shape), dweight, dbias, None


def _check_inputs(x, weight, bias):
    check_float("x", x)
    check_float("weight", weight)
    check_float("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised)")
    check_last_dim("weight", weight, x.shape[-1], "x")
    check_last_dim("bias", bias, x.shape[-1], "x")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"x has last dimension {x.shape[-1]}; layer_norm supports up to "
                         f"{MAX_WIDTH}")


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
    return LayerNormFunction.apply(x, weight, bias, float(eps))

"""Bias add + GPT-2's tanh GeLU, fused in Triton.

Owns `bias_gelu` (the public function), its autograd Function, the launchers, the kernels and
`bias_gelu_reference`.

y = gelu_tanh(x + bias) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), u = x + bias, the
GeLU of GPT-2 (Hugging Face's "gelu_new", torch's ``approximate="tanh"``).

Shapes: x is (..., n) (rows x n once flattened), bias is (n,); they may differ in dtype (float16 or
bfloat16 activations with a float32 bias). y has x's dtype; the arithmetic is float32.

Forward: elementwise over x's flat index. Backward: a grid of (column block, row range)
programs; each writes dx for its tile rows and sums dx over its rows in registers into one partial
row of dbias; the final sum over the row ranges is one small torch reduction.
tanh is written with exp (Triton's interpreter has no libdevice tanh), in a form that cannot
overflow.
"""
import torch

from ._utils import (KERNELS_INTERPRETED, check_float, check_last_dim, check_same_device, tl,
                     triton, triton_runs_on)

# Kernels read only constexpr globals; they multiply them on the right of tensors (the interpreter
# cannot multiply a constexpr by a tensor).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    """tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|): never overflows."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, t, -t)


@triton.jit
def _tanh_arg(u):
    """sqrt(2/pi) (u + 0.044715 u^3)."""
    return (u + u * u * u * GELU_COEF) * SQRT_2_OVER_PI


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, n_elements, n_cols, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + offsets % n_cols, mask=mask, other=0.0).to(tl.float32)
    u = x + b
    y = 0.5 * u * (1.0 + _tanh(_tanh_arg(u)))
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(X, BIAS, DY, DX, DBIAS_PARTIAL, n_rows, n_cols, rows_per_program,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < n_cols
    b = tl.load(BIAS + cols, mask=in_cols, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & in_cols[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        u = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(_tanh_arg(u))
        dgelu = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * (
            1.0 + u * u * (3.0 * GELU_COEF)) * SQRT_2_OVER_PI
        dx = dy * dgelu
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, 0)
    tl.store(DBIAS_PARTIAL + pid_m * n_cols + cols, dbias, mask=in_cols)


def _fwd_block() -> int:
    return 256 if KERNELS_INTERPRETED else 1024


def _bwd_layout(n_rows: int, n_cols: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, rows_per_program, row programs) of the backward: about four programs a
    multiprocessor on a GPU; small tiles and a few row ranges under the interpreter."""
    if KERNELS_INTERPRETED or device.type != "cuda":
        block_m, block_n, target_programs = 16, 32, 8
    else:
        block_m, block_n = 32, 128
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    col_blocks = triton.cdiv(n_cols, block_n)
    row_programs = max(1, min(triton.cdiv(n_rows, block_m), target_programs // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_programs), block_m) * block_m
    return block_m, block_n, rows_per_program, triton.cdiv(n_rows, rows_per_program)


class BiasGeluFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves x and bias (u = x + bias is recomputed)."""

    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        bias = bias.contiguous()
        y = torch.empty_like(x)
        block = _fwd_block()
        _bias_gelu_fwd_kernel[(triton.cdiv(x.numel(), block),)](x, bias, y, x.numel(),
                                                               x.shape[-1], BLOCK=block)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        block_m, block_n, rows_per_program, row_programs = _bwd_layout(n_rows, n_cols, x.device)
        partial = torch.empty((row_programs, n_cols), device=x.device, dtype=torch.float32)
        _bias_gelu_bwd_kernel[(triton.cdiv(n_cols, block_n), row_programs)](
            x, bias, dy, dx, partial, n_rows, n_cols, rows_per_program, BLOCK_M=block_m,
            BLOCK_N=block_n)
        return dx, partial.sum(0).to(bias.dtype)


def _check_inputs(x, bias):
    check_float("x", x)
    check_float("bias", bias)
    check_same_device(x=x, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one bias is added over)")
    check_last_dim("bias", bias, x.shape[-1], "x")


def bias_gelu_reference(x, bias):
    """Plain torch: F.gelu(x + bias, approximate="tanh") in float32, returned in x's dtype."""
    return torch.nn.functional.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype)


def bias_gelu(x, bias):
    """GPT-2's tanh GeLU of (x + bias) with the fused Triton kernels.

    Args:
        x: (..., n) float16/bfloat16/float32. Non-contiguous x is copied.
        bias: (n,) on x's device.
    Returns:
        x's shape and dtype; the backward gives dx and the reduced dbias. Runs
        `bias_gelu_reference` where the kernels cannot run and for empty x.
    """
    _check_inputs(x, bias)
    if x.numel() == 0 or not triton_runs_on(x.device):
        return bias_gelu_reference(x, bias)
    return BiasGeluFunction.apply(x, bias)

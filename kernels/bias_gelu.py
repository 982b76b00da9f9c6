"""Bias add + GeLU, fused in Triton: GPT-2's tanh GeLU, or the exact one (erf).

Owns `bias_gelu` (the public function), its autograd Function, the launchers, the kernels and
`bias_gelu_reference`.

y = gelu(x + bias), u = x + bias, as torch's ``F.gelu(u, approximate=...)``:
- ``approximate="tanh"`` (the default): 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), the GeLU
  of GPT-2 (Hugging Face's "gelu_new"; megatron-core's fused bias-GeLU);
- ``approximate="none"``: 0.5 u (1 + erf(u / sqrt(2))) (Hugging Face's "gelu"; megatron-core's
  unfused ``F.gelu``).

Shapes: x is (..., n) (rows x n once flattened), bias is (n,); they may differ in dtype (float16 or
bfloat16 activations with a float32 bias). y has x's dtype; the arithmetic is float32.

Forward: elementwise, in (BLOCK_M rows, BLOCK_N columns) tiles, so that each program loads its
columns' bias once (no modulo an element to find its column). Backward: a grid of (column block,
row range) programs; each writes dx for its rows, BLOCK_M at a time, and sums dx over its rows in
registers into one partial row of dbias; the final sum over the row ranges is one small torch
reduction.
Launch settings: the tiles and warps are autotuned on a GPU; the row ranges of the backward are
fixed by the launcher (the partial dbias buffer has one row a range).
tanh is written with exp (Triton's interpreter has no libdevice tanh), in a form that cannot
overflow.
"""
import torch

from ._utils import (KERNELS_INTERPRETED, Autotuned, cdiv, check_float, check_last_dim,
                     check_same_device, multiprocessor_count, tl, triton, triton_runs_on)

# Kernels read only constexpr globals; they multiply them on the right of tensors (the interpreter
# cannot multiply a constexpr by a tensor).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
APPROXIMATIONS = ("tanh", "none")


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
def _gelu(u, TANH: tl.constexpr):
    if TANH:
        return 0.5 * u * (1.0 + _tanh(_tanh_arg(u)))
    else:
        return 0.5 * u * (1.0 + tl.math.erf(u * SQRT_HALF))


@triton.jit
def _gelu_grad(u, TANH: tl.constexpr):
    """d gelu(u) / du."""
    if TANH:
        t = _tanh(_tanh_arg(u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * (
            1.0 + u * u * (3.0 * GELU_COEF)) * SQRT_2_OVER_PI
    else:
        return 0.5 * (1.0 + tl.math.erf(u * SQRT_HALF)) + u * tl.exp(-0.5 * u * u) * INV_SQRT_2PI


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, n_rows, n_cols, TANH: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile; the tiles of a row block are consecutive programs."""
    col_blocks = tl.cdiv(n_cols, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < n_cols
    mask = (rows[:, None] < n_rows) & in_cols[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    b = tl.load(BIAS + cols, mask=in_cols, other=0.0).to(tl.float32)
    u = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    tl.store(Y + offsets, _gelu(u, TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(X, BIAS, DY, DX, DBIAS_PARTIAL, n_rows, n_cols, rows_per_program,
                          TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < n_cols
    b = tl.load(BIAS + cols, mask=in_cols, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & in_cols[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        u = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_grad(u, TANH)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dbias += dx
    tl.store(DBIAS_PARTIAL + pid_m * n_cols + cols, tl.sum(dbias, 0), mask=in_cols)


# (BLOCK_M, BLOCK_N, warps): 4k or 8k elements a tile, 32 a thread, in rows of 128 to 1024.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                for m, n, w in ((4, 1024, 4), (8, 1024, 8), (8, 512, 4), (16, 512, 8),
                                (32, 256, 8), (64, 128, 8))]
# The backward's row ranges are multiples of ROW_MULTIPLE rows, so that every config's BLOCK_M
# divides them; (BLOCK_M, BLOCK_N, warps) of 4k or 8k elements, 16 or 32 a thread.
ROW_MULTIPLE = 64
_BWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                for m, n, w in ((32, 128, 4), (32, 128, 8), (64, 128, 8), (16, 256, 4),
                                (32, 256, 8))]
# Under the interpreter: small tiles, so that the tests cover several tiles and partial ones.
_INTERPRETER_FWD_CONFIG = triton.Config({"BLOCK_M": 8, "BLOCK_N": 32}, num_warps=4)
_INTERPRETER_BWD_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)

_fwd_kernel = Autotuned(_bias_gelu_fwd_kernel, _FWD_CONFIGS, _INTERPRETER_FWD_CONFIG,
                        key=["n_cols", "TANH"])
_bwd_kernel = Autotuned(_bias_gelu_bwd_kernel, _BWD_CONFIGS, _INTERPRETER_BWD_CONFIG,
                        key=["n_cols", "TANH"])


def _bwd_row_ranges(n_rows: int, n_cols: int, device: torch.device):
    """(rows_per_program, row ranges) of the backward: about eight programs a multiprocessor
    counted in columns of 128 (the configs' middle width) on a GPU; a few ranges of 16 rows or
    more under the interpreter."""
    if KERNELS_INTERPRETED or device.type != "cuda":
        block_n, row_multiple, target_programs = 32, 16, 8
    else:
        block_n, row_multiple = 128, ROW_MULTIPLE
        target_programs = 8 * multiprocessor_count(device.index)
    ranges = max(1, min(cdiv(n_rows, row_multiple),
                        target_programs // cdiv(n_cols, block_n)))
    rows_per_program = cdiv(cdiv(n_rows, ranges), row_multiple) * row_multiple
    return rows_per_program, cdiv(n_rows, rows_per_program)


class BiasGeluFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves x and bias (u = x + bias is recomputed)."""

    @staticmethod
    def forward(ctx, x, bias, tanh):
        x, bias = x.contiguous(), bias.contiguous()
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        y = torch.empty_like(x)
        _fwd_kernel[lambda meta: (cdiv(n_rows, meta["BLOCK_M"])
                                  * cdiv(n_cols, meta["BLOCK_N"]),)](
            x, bias, y, n_rows, n_cols, tanh)
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        rows_per_program, row_ranges = _bwd_row_ranges(n_rows, n_cols, x.device)
        dx = torch.empty_like(x)
        partial = torch.empty((row_ranges, n_cols), device=x.device, dtype=torch.float32)
        _bwd_kernel[lambda meta: (cdiv(n_cols, meta["BLOCK_N"]), row_ranges)](
            x, bias, dy, dx, partial, n_rows, n_cols, rows_per_program, ctx.tanh)
        return dx, partial.sum(0).to(bias.dtype), None


def _check_inputs(x, bias, approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate={approximate!r}: must be \"tanh\" (GPT-2's GeLU) or "
                         f"\"none\" (the exact GeLU, with erf)")
    check_float("x", x)
    check_float("bias", bias)
    check_same_device(x=x, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one bias is added over)")
    check_last_dim("bias", bias, x.shape[-1], "x")


def bias_gelu_reference(x, bias, approximate="tanh"):
    """Plain torch: F.gelu(x + bias, approximate=approximate) in float32, in x's dtype."""
    return torch.nn.functional.gelu(x.float() + bias.float(), approximate=approximate).to(x.dtype)


def bias_gelu(x, bias, approximate="tanh"):
    """The GeLU of (x + bias) with the fused Triton kernels.

    Args:
        x: (..., n) float16/bfloat16/float32. Non-contiguous x is copied.
        bias: (n,) on x's device.
        approximate: "tanh" (GPT-2's GeLU) or "none" (the exact one, with erf), as F.gelu's.
    Returns:
        x's shape and dtype; the backward gives dx and the reduced dbias. Runs
        `bias_gelu_reference` where the kernels cannot run and for empty x.
    """
    _check_inputs(x, bias, approximate)
    if x.numel() == 0 or not triton_runs_on(x.device):
        return bias_gelu_reference(x, bias, approximate)
    return BiasGeluFunction.apply(x, bias, approximate == "tanh")


def bias_gelu_torch(x, bias, approximate="tanh"):
    """The `torch` backend: `bias_gelu_reference` after `bias_gelu`'s checks of its inputs."""
    _check_inputs(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)

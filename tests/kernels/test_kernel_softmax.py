"""scaled_masked_softmax against its reference: output and dx; the causal alignment; bad input."""
import pytest
import torch

from megagpt.kernels import scaled_masked_softmax, scaled_masked_softmax_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")


def _check(compare, shape, scale, causal, dtype, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    compare(lambda t: scaled_masked_softmax(t, scale, causal),
            lambda t: scaled_masked_softmax_reference(t, scale, causal), [x], dtype, ["x"])


# (shape, scale, causal): square and non-square score matrices, odd widths, a 1000-wide row.
CASES = [
    ((2, 3, 17, 17), 0.125, True),
    ((1, 2, 33, 7), 1.0, True),
    ((2, 5, 20), 0.5, True),
    ((2, 3, 17, 20), 0.5, False),
    ((5, 1000), 1.0, False),
    ((9, 1), 2.0, False),
]


@pytest.mark.parametrize("shape,scale,causal", CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_matches_reference(compare, device, shape, scale, causal, dtype):
    _check(compare, shape, scale, causal, dtype, device)


def test_bf16_interpreted_or_compiled(compare, device):
    _check(compare, (2, 2, 19, 19), 0.25, True, BF16, device)


@pytest.mark.parametrize("scale,offset", [(0.125, 0.0), (0.125, 400.0), (0.1020620726, 400.0)])
def test_large_scores_keep_float32_precision(device, scale, offset):
    """The rounding of the exponent follows a score's distance from its row's maximum, not the
    score's size: scores around 400 (+-8) keep every probability above 1e-4 within 1e-6 of the
    reference in float32. (Scaling by log2 e before subtracting the maximum gave 3.6e-6.)"""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 64, device=device) * (80.0 if offset == 0 else 8.0) + offset
    ref = scaled_masked_softmax_reference(x.double(), scale, True)
    y = scaled_masked_softmax(x, scale, causal=True).double()
    kept = ref > 1e-4
    assert ((y - ref).abs() / ref)[kept].max().item() < 1e-6


def test_causal_mask_is_megatron_upper_triangle(device):
    """Key j > query i gets probability 0; the rest sums to 1 (sq > sk: late rows see all)."""
    y = scaled_masked_softmax(torch.randn(3, 6, 4, device=device), 1.0, causal=True)
    above = torch.ones(6, 4, dtype=torch.bool, device=device).triu(1)
    assert torch.all(y[:, above] == 0) and torch.all(y[:, ~above] > 0)
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 6, device=device))


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_gpu(compare, causal):
    _check(compare, (2, 4, 1024, 1024), 0.125, causal, BF16, "cuda")


@pytest.mark.parametrize("make_x,causal,message", [
    (lambda d: torch.randn(4, 8, device=d).double(), False, "x has dtype torch.float64"),
    (lambda d: torch.randint(0, 3, (4, 8), device=d), False, "x has dtype torch.int64"),
    (lambda d: torch.randn(8, device=d), True, r"needs \(..., sq, sk\) when causal"),
    (lambda d: torch.randn(2, 70000, device=d), False, "last dimension 70000"),
])
def test_bad_input(device, make_x, causal, message):
    with pytest.raises((ValueError, TypeError), match=message):
        scaled_masked_softmax(make_x(device), 1.0, causal)

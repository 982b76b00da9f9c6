"""bias_gelu against bias_gelu_reference, for the tanh GeLU and the exact one: output and dx,
dbias; the GeLU's tails; bad input."""
import functools

import pytest
import torch

from megagpt.kernels import bias_gelu, bias_gelu_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")
APPROXIMATE = pytest.mark.parametrize("approximate", ["tanh", "none"])


def _pair(approximate):
    return (functools.partial(bias_gelu, approximate=approximate),
            functools.partial(bias_gelu_reference, approximate=approximate))


def _inputs(shape, x_dtype, bias_dtype, device, spread=3.0):
    x = (torch.randn(shape, device=device) * spread).to(x_dtype).requires_grad_()
    bias = torch.randn(shape[-1], device=device).to(bias_dtype).requires_grad_()
    return [x, bias]


# Rows not a multiple of the backward's tile and column block; odd widths.
@pytest.mark.parametrize("shape", [(37, 100), (2, 19, 300), (50, 33), (3, 1)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@APPROXIMATE
def test_matches_reference(compare, device, shape, dtype, approximate):
    compare(*_pair(approximate), _inputs(shape, dtype, dtype, device), dtype, ["x", "bias"])


@APPROXIMATE
def test_large_arguments(compare, device, approximate):
    """|x + bias| up to ~100: the tanh must neither overflow nor lose the tails."""
    compare(*_pair(approximate), _inputs((16, 64), F32, F32, device, spread=30.0), F32,
            ["x", "bias"])


@pytest.mark.parametrize("dtype,magnitude", [(F32, 1e4), (F16, 6e4)], ids=str)
@APPROXIMATE
def test_huge_arguments_are_the_identity_or_zero(device, dtype, magnitude, approximate):
    """Far out in the tails GeLU is u (gradient 1) or 0 (gradient 0): no overflow to NaN."""
    u = torch.tensor([-1.0, -0.5, -0.01, 0.01, 0.5, 1.0], device=device) * magnitude
    x = u.to(dtype).repeat(3, 1).requires_grad_()
    bias = torch.zeros(6, device=device, dtype=dtype, requires_grad=True)
    y = bias_gelu(x, bias, approximate)
    y.backward(torch.ones_like(y))
    expected = torch.where(x > 0, x, torch.zeros_like(x)).detach()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, (x > 0).to(dtype))
    torch.testing.assert_close(bias.grad, 3 * (x[0] > 0).to(dtype))


@pytest.mark.parametrize("x_dtype", [F16, BF16], ids=str)
@APPROXIMATE
def test_half_activations_with_float32_bias(compare, device, x_dtype, approximate):
    compare(*_pair(approximate), _inputs((21, 130), x_dtype, F32, device), x_dtype,
            ["x", "bias"])


def test_is_gpt2_gelu(device):
    """The reference itself: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    x, bias = torch.randn(5, 8, device=device), torch.randn(8, device=device)
    u = x + bias
    expected = 0.5 * u * (1 + torch.tanh(0.7978845608028654 * (u + 0.044715 * u ** 3)))
    torch.testing.assert_close(bias_gelu(x, bias), expected, rtol=1e-5, atol=1e-6)


def test_the_exact_gelu_and_its_gradient(device):
    """approximate="none": 0.5 u (1 + erf(u / sqrt(2))), gradient Phi(u) + u phi(u); it differs
    from the tanh GeLU (by up to 4.7e-4, at |u| = 2.7)."""
    x = torch.linspace(-6, 6, 97, device=device, dtype=torch.float64).float().reshape(1, 97)
    x.requires_grad_()
    bias = torch.zeros(97, device=device)
    y = bias_gelu(x, bias, "none")
    y.backward(torch.ones_like(y))
    u = x.detach().double()
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(y.double(), u * normal.cdf(u), rtol=1e-5, atol=1e-6)
    grad = normal.cdf(u) + u * normal.log_prob(u).exp()
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-6)
    assert 3e-4 < (y - bias_gelu(x, bias)).abs().max().item() < 5e-4


@needs_cuda
@pytest.mark.parametrize("width", [3072, 8192])
@APPROXIMATE
def test_bf16_on_gpu(compare, width, approximate):
    compare(*_pair(approximate), _inputs((4096, width), BF16, BF16, "cuda"), BF16, ["x", "bias"])


@pytest.mark.parametrize("make_inputs,message", [
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(4, device=d)),
     r"bias must have shape \(8,\) to match the last dimension of x, got \(4,\)"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device=d).double()),
     "bias has dtype torch.float64; supported"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device="meta")),
     "x is on .* but bias is on meta"),
    (lambda d: (torch.tensor(1.0, device=d), torch.randn(1, device=d)),
     "x must have at least one dimension"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device=d), "erf"),
     "approximate='erf': must be \"tanh\" .* or \"none\""),
])
def test_bad_input(device, make_inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bias_gelu(*make_inputs(device))

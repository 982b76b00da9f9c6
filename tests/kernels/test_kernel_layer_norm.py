"""layer_norm against layer_norm_reference: output and dx, dweight, dbias; bad input."""
import pytest
import torch

from megagpt.kernels import layer_norm, layer_norm_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")


def _inputs(shape, x_dtype, param_dtype, device):
    width = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(x_dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(width, device=device)).to(param_dtype).requires_grad_()
    bias = (0.3 * torch.randn(width, device=device)).to(param_dtype).requires_grad_()
    return [x, weight, bias]


# Rows not a multiple of the backward's programs, odd widths (3, 100, 1000, 1029).
@pytest.mark.parametrize("shape", [(37, 100), (3, 13, 1000), (5, 3), (130, 1029)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_matches_reference(compare, device, shape, dtype):
    compare(layer_norm, layer_norm_reference, _inputs(shape, dtype, dtype, device), dtype,
            ["x", "weight", "bias"])


@pytest.mark.parametrize("x_dtype", [F16, BF16], ids=str)
def test_half_activations_with_float32_parameters(compare, device, x_dtype):
    inputs = _inputs((19, 300), x_dtype, F32, device)
    compare(layer_norm, layer_norm_reference, inputs, x_dtype, ["x", "weight", "bias"])


def test_rows_far_from_zero_and_constant_rows(device):
    """A row offset by 1e4 (a two-pass variance, no E[x^2] - E[x]^2 cancellation) and a row
    of one value (variance 0: the output is the bias) against float64."""
    x = torch.randn(4, 96, device=device)
    x[0] += 1e4          # E[x^2] - E[x]^2 in float32 would be off by more than the variance
    x[1] = 3.0
    x[2] = 0.0
    x.requires_grad_()
    weight = (1 + 0.3 * torch.randn(96, device=device)).requires_grad_()
    bias = (0.3 * torch.randn(96, device=device)).requires_grad_()
    grad = torch.randn(4, 96, device=device)
    y = layer_norm(x, weight, bias)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), grad))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y64 = torch.nn.functional.layer_norm(x64, (96,), w64, b64, eps=1e-5)
    want = (y64, *torch.autograd.grad(y64, (x64, w64, b64), grad.double()))
    for name, g, w in zip(["y", "dx", "dweight", "dbias"], got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=2e-3, msg=name)
    torch.testing.assert_close(y[1:3], bias.detach().expand(2, 96))


def test_eps(compare, device):
    compare(lambda x, w, b: layer_norm(x, w, b, eps=0.1),
            lambda x, w, b: layer_norm_reference(x, w, b, eps=0.1),
            _inputs((7, 64), F32, F32, device), F32, ["x", "weight", "bias"])


def test_eps_with_parameters_in_another_dtype(compare, device):
    """16-bit x with float32 weight and bias (the torch backend under mixed precision) takes
    its own path in the reference: eps reaches it too."""
    x, w, b = _inputs((7, 64), F16, F32, device)
    want = torch.nn.functional.layer_norm(x.float(), (64,), w, b, eps=0.5).to(F16)
    torch.testing.assert_close(layer_norm_reference(x, w, b, eps=0.5), want)
    compare(lambda x, w, b: layer_norm(x, w, b, eps=0.5),
            lambda x, w, b: layer_norm_reference(x, w, b, eps=0.5), [x, w, b], F16,
            ["x", "weight", "bias"])


def test_non_contiguous_x(device):
    x = torch.randn(64, 24, device=device).t()  # (24, 64), transposed
    weight, bias = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.testing.assert_close(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("width", [768, 2048])
def test_bf16_on_gpu(compare, width):
    compare(layer_norm, layer_norm_reference, _inputs((4096, width), BF16, BF16, "cuda"), BF16,
            ["x", "weight", "bias"])


@pytest.mark.parametrize("make_inputs,message", [
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(7, device=d), torch.randn(8, device=d)),
     r"weight must have shape \(8,\) to match the last dimension of x, got \(7,\)"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device=d), torch.randn(1, 8, device=d)),
     r"bias must have shape \(8,\)"),
    (lambda d: (torch.randn(4, 8, device=d).double(), torch.randn(8, device=d),
                torch.randn(8, device=d)), "x has dtype torch.float64; supported"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device="meta"),
                torch.randn(8, device=d)), "x is on .* but weight is on meta"),
    (lambda d: (torch.randn(2, 70000, device=d), torch.randn(70000, device=d),
                torch.randn(70000, device=d)), "last dimension 70000; the Triton layer_norm supports up to"),
])
def test_bad_input(device, make_inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        layer_norm(*make_inputs(device))

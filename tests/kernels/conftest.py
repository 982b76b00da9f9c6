"""Kernel tests: on CUDA when a GPU is present, else under Triton's CPU interpreter.

Triton decides when a ``@triton.jit`` kernel is defined, i.e. when ``megagpt.kernels`` is
imported, whether it is compiled or interpreted (it reads ``TRITON_INTERPRET`` then, through
``triton.knobs``); ``megagpt.kernels`` also checks the variable at each call. Without a GPU,
``tests/conftest.py`` imports ``megagpt.kernels`` once, first, with ``TRITON_INTERPRET=1`` and
restores the variable (re-importing the kernels later breaks Triton's interpreter); the
``_triton_mode`` fixture here sets it again for each kernel test only, so tests in other folders
keep the plain-torch path and its speed.
"""

import zlib

import pytest
import torch

import megagpt.kernels._utils as _kernel_utils   # tests/conftest.py has imported it first

ON_GPU = torch.cuda.is_available() and not _kernel_utils.interpreter_requested()
DEVICE = "cuda" if ON_GPU else "cpu"

if not ON_GPU:

    if not _kernel_utils.KERNELS_INTERPRETED:
        raise RuntimeError("megagpt.kernels was imported with compiled kernels on a machine "
                           "without a GPU; tests/conftest.py must import it first with "
                           "TRITON_INTERPRET=1 (run pytest from the repository root)")

# Tolerances (rtol, atol) of a kernel against the float32 reference of the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    """Every kernel test runs the Triton kernels: interpreted on the CPU, compiled on CUDA."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from megagpt.kernels._utils import triton_runs_on

    assert triton_runs_on(DEVICE), "the kernel tests would compare the reference with itself"


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test's random inputs are drawn from a seed of its own name: a comparison at a
    tolerance's edge fails every run, or none, instead of now and then."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """The kernels' output buffers (torch.empty / empty_like / empty_permuted) start as NaN, so an element that a
    kernel fails to write fails the comparison instead of passing on leftover memory."""
    empty, empty_like, empty_permuted = torch.empty, torch.empty_like, torch.empty_permuted

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like",
                        lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_permuted",
                        lambda *args, **kwargs: poison(empty_permuted(*args, **kwargs)))


@pytest.fixture
def device():
    return DEVICE


def assert_close(actual, expected, dtype, name, atol32=1e-5):
    """Compare a kernel result (``dtype``) with a float32 reference, with ``dtype``'s tolerance
    (``atol32`` replaces the float32 atol, e.g. for attention's longer sums)."""
    rtol, atol = TOLERANCES[dtype]
    if dtype == torch.float32:
        atol = atol32
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def float32_leaves(*tensors):
    """float32 copies of the inputs that require grad, for the reference."""
    return [t.detach().float().requires_grad_() for t in tensors]


@pytest.fixture
def compare():
    """compare(kernel_fn, reference_fn, inputs, dtype, names, atol32): runs the kernel on
    ``inputs`` (leaves of ``dtype`` requiring grad) and the reference on their float32 copies,
    then checks the output and the gradient of every input for one random upstream gradient."""

    def run(kernel_fn, reference_fn, inputs, dtype, names, atol32=1e-5):
        out = kernel_fn(*inputs)
        ref_inputs = float32_leaves(*inputs)
        ref_out = reference_fn(*ref_inputs)
        assert out.dtype == inputs[0].dtype and out.shape == ref_out.shape
        assert_close(out, ref_out, dtype, "output", atol32)
        grad_out = torch.randn_like(ref_out).to(out.dtype).float()  # the same upstream values
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)
        for name, inp, grad, ref_grad in zip(names, inputs, grads, ref_grads):
            assert grad.dtype == inp.dtype and grad.shape == inp.shape, name
            assert_close(grad, ref_grad, dtype, f"d{name}", atol32)

    return run

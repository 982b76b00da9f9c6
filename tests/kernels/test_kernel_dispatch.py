"""Backend choice (resolve_backend, get_op) and where the public functions run the kernels."""
import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

from megagpt.kernels import (BACKENDS, flash_attention_reference, get_op, layer_norm,
                             layer_norm_reference, resolve_backend)
from megagpt.kernels import _utils

# The package's `layer_norm` attribute is the function; the file is reached by its module name.
layer_norm_module = importlib.import_module("megagpt.kernels.layer_norm")

OPS = list(BACKENDS)


def test_backends_are_the_config_choices():
    assert BACKENDS == {
        "attention": ("auto", "triton", "flash_attn", "sdpa", "eager"),
        "layernorm": ("auto", "triton", "torch", "apex"),
        "softmax": ("auto", "triton", "torch"),
        "bias_gelu": ("auto", "triton", "torch"),
        "cross_entropy": ("auto", "triton", "torch"),
    }


@pytest.mark.parametrize("op", OPS)
def test_auto_is_triton_on_cuda_and_under_the_interpreter(op, device):
    assert resolve_backend(op, "auto", "cuda") == "triton"
    assert resolve_backend(op, "auto", device) == "triton"  # the interpreter, or a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU without the interpreter")
@pytest.mark.parametrize("op", OPS)
def test_auto_is_torch_on_a_plain_cpu(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve_backend(op, "auto", "cpu") == ("sdpa" if op == "attention" else "torch")
    with pytest.raises(RuntimeError, match=f"kernels.{op}=triton: the Triton kernels cannot run "
                                           "on cpu: they need a CUDA GPU, or TRITON_INTERPRET=1"):
        get_op(op, "triton", "cpu")
    with pytest.raises(RuntimeError) as info:   # only the backends that run on a CPU are offered
        get_op(op, "triton", "cpu")
    offered = str(info.value).split("choose one of: ")[1].split(", ")
    assert offered == [b for b in BACKENDS[op] if b not in ("triton", "flash_attn", "apex")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU without the interpreter")
def test_public_functions_run_the_reference_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(layer_norm_module.LayerNormFunction, "apply",
                        lambda *args: pytest.fail("the kernel ran without the interpreter"))
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_reference(x, w, b))


@pytest.mark.parametrize("value,on", [("1", True), ("y", True), ("TRUE", True), ("0", False),
                                      ("off", False)])
def test_the_interpreter_variable_is_read_as_triton_reads_it(monkeypatch, value, on):
    """"y" turned Triton's interpreter on, but not ours: the kernels were interpreted while
    `auto` chose torch and `triton` was refused as needing TRITON_INTERPRET=1."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _utils.interpreter_requested() is on


def test_interpreter_requested_after_import_is_an_error(monkeypatch):
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="imported before it was set"):
        _utils.triton_runs_on("cpu")


def test_unknown_op_or_choice():
    with pytest.raises(ValueError, match="unknown kernel op 'rmsnorm'; ops: attention"):
        resolve_backend("rmsnorm", "auto", "cpu")
    with pytest.raises(ValueError, match="kernels.softmax='fast' is not a backend; choose one of "
                                         "auto, triton, torch"):
        get_op("softmax", "fast", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors where flash-attn and "
                                                      "apex cannot run")
@pytest.mark.parametrize("op,choice,message", [
    ("attention", "flash_attn", r"needs `flash_attn.flash_attn_func`, which does not import .*"
                                r"pip install flash-attn --no-build-isolation.*choose one of: "
                                r"auto, triton, sdpa, eager"),
    ("layernorm", "apex", r"needs `apex.normalization.fused_layer_norm`, which does not import "
                          r".*build NVIDIA apex.*choose one of: auto, triton, torch"),
])
def test_optional_packages_say_what_to_do(op, choice, message, monkeypatch):
    with pytest.raises(RuntimeError, match=message):
        get_op(op, choice, "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")    # where triton cannot run either, it is not offered
    with pytest.raises(RuntimeError, match=message.replace("triton, ", "")):
        get_op(op, choice, "cpu")


@pytest.mark.parametrize("op,choice,modules,message", [
    ("attention", "flash_attn", {"flash_attn": types.ModuleType("flash_attn")},
     r"needs `flash_attn.flash_attn_func`, which does not import \(module 'flash_attn' has no "
     r"attribute 'flash_attn_func'\)"),
    ("layernorm", "apex", {"apex": types.ModuleType("apex"),
                           "apex.normalization": types.ModuleType("apex.normalization"),
                           "apex.normalization.fused_layer_norm":
                               types.ModuleType("apex.normalization.fused_layer_norm"),
                           "fused_layer_norm_cuda": None},
     r"needs `fused_layer_norm_cuda`, which does not import .*build NVIDIA apex from source with "
     r"its CUDA extensions"),
])
def test_a_package_installed_without_its_cuda_extension_is_refused_at_build(
        op, choice, modules, message, monkeypatch):
    """flash-attn 2 imports without its compiled module (and 1.x has no flash_attn_func), apex
    without fused_layer_norm_cuda: both passed the check and failed at the first forward."""
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(RuntimeError, match=message):
        get_op(op, choice, "cpu")


def _wrong(*args, **kwargs):
    return args, kwargs


@pytest.mark.parametrize("op,call,error", [
    ("cross_entropy", _wrong(torch.randn(6, 10), torch.randint(0, 10, (3, 2))),
     r"target has shape \(3, 2\) but logits has \(6, 10\)"),
    ("cross_entropy", _wrong(torch.randn(6, 10), torch.randint(0, 10, (6,)).float()),
     "target must be an integer tensor"),
    ("cross_entropy", _wrong(torch.randn(6, 10), torch.randint(0, 10, (6,)), ignore_index=2.5),
     r"ignore_index=2.5: must be an int"),
    ("cross_entropy", _wrong(torch.randn(6, 10), torch.randint(0, 10, (6,)),
                             weight=torch.rand(6, requires_grad=True)),
     r"weight requires grad, but cross_entropy does not differentiate .* weight.detach\(\)"),
    ("bias_gelu", _wrong(torch.randn(4, 8), torch.randn(1)), r"bias must have shape \(8,\)"),
    ("bias_gelu", _wrong(torch.randn(4, 8), torch.randn(4, 1)), r"bias must have shape \(8,\)"),
    ("layernorm", _wrong(torch.randn(3, 8).double(), torch.randn(8).double(),
                         torch.randn(8).double()), "x has dtype torch.float64"),
    ("softmax", _wrong(torch.randn(5), causal=True), r"needs \(..., sq, sk\) when causal"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_bad_input_is_the_same_error_on_every_backend(op, call, error, backend):
    """The torch backend ran the bare references: a target of the wrong shape or dtype, a bias
    that broadcasts, a float ignore_index (the kernel truncated it to a real class) went through
    silently."""
    args, kwargs = call
    with pytest.raises((TypeError, ValueError), match=error):
        get_op(op, backend, "cpu")(*args, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
@pytest.mark.parametrize("k_shape,dtype,error", [
    ((2, 1, 17, 32), torch.float32, r"k has shape \(2, 1, 17, 32\) but q has \(2, 2, 17, 32\)"),
    ((2, 2, 9, 32), torch.float32, r"k has shape \(2, 2, 9, 32\) but q has \(2, 2, 17, 32\)"),
    ((2, 2, 17, 32), torch.float64, "q has dtype torch.float64"),
])
def test_a_bad_attention_input_is_the_same_error_on_every_backend(backend, k_shape, dtype, error):
    """sdpa and eager broadcast one k head over two, and computed in float64."""
    q = torch.randn(2, 2, 17, 32, dtype=dtype)
    k = torch.randn(*k_shape, dtype=dtype)
    with pytest.raises((TypeError, ValueError), match=error):
        get_op("attention", backend, "cpu")(q, k, k.clone())


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
@pytest.mark.parametrize("dropout_p", [1.0, -0.1, True])
def test_a_bad_dropout_p_is_the_same_error_on_every_backend(backend, dropout_p):
    """sdpa and eager returned zeros for dropout_p=1 and applied none below 0."""
    q = torch.randn(1, 2, 9, 32)
    with pytest.raises(ValueError, match=rf"dropout_p={dropout_p!r}: must be a number in \[0, 1\)"):
        get_op("attention", backend, "cpu")(q, q.clone(), q.clone(), dropout_p=dropout_p)


def test_attention_backends_agree(device):
    q, k, v = (torch.randn(2, 2, 21, 32, device=device) for _ in range(3))
    expected = flash_attention_reference(q, k, v, causal=True, softmax_scale=0.2)
    for choice in ("auto", "triton", "sdpa", "eager"):
        out = get_op("attention", choice, device)(q, k, v, causal=True, softmax_scale=0.2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4, msg=choice)


@pytest.mark.parametrize("op,make_args", [
    ("layernorm", lambda d: (torch.randn(5, 40, device=d), torch.randn(40, device=d),
                             torch.randn(40, device=d))),
    ("softmax", lambda d: (torch.randn(2, 9, 9, device=d), 0.5, True)),
    ("bias_gelu", lambda d: (torch.randn(5, 40, device=d), torch.randn(40, device=d))),
    ("bias_gelu", lambda d: (torch.randn(5, 40, device=d) * 2, torch.randn(40, device=d), "none")),
    ("cross_entropy", lambda d: (torch.randn(6, 40, device=d),
                                 torch.randint(0, 40, (6,), device=d))),
])
def test_triton_and_torch_backends_agree(op, make_args, device):
    args = make_args(device)
    torch.testing.assert_close(get_op(op, "triton", device)(*args),
                               get_op(op, "torch", device)(*args), rtol=1e-5, atol=1e-5)


def test_imports_and_runs_without_triton(tmp_path):
    """Where Triton is not installed, megagpt.kernels imports and runs the references."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from megagpt.kernels import get_op, layer_norm, layer_norm_reference\n"
        "x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)\n"
        "assert torch.equal(layer_norm(x, w, b), layer_norm_reference(x, w, b))\n"
        "assert get_op('softmax', 'auto', 'cuda').__name__ == 'scaled_masked_softmax_torch'\n"
        "try:\n"
        "    get_op('softmax', 'triton', 'cpu')\n"
        "except RuntimeError as err:\n"
        "    assert 'the `triton` package is not installed' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('choosing triton without triton must fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _fake_module(monkeypatch, name, **attrs):
    """Install a stand-in package module ``name`` (and its parents) into sys.modules."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]),
                            types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def test_flash_attn_backend_transposes_to_its_layout(monkeypatch, device):
    """flash_attn_func takes and returns (batch, seq, heads, head_dim): a stand-in that computes
    attention in that layout must give the reference's result through the backend."""
    rates = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.shape == (2, 19, 3, 32)
        rates.append(dropout_p)
        out = flash_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal, softmax_scale)
        return out.transpose(1, 2)

    _fake_module(monkeypatch, "flash_attn", flash_attn_func=flash_attn_func)
    fn = get_op("attention", "flash_attn", "cuda")
    q, k, v = (torch.randn(2, 3, 19, 32, device=device).half() for _ in range(3))
    torch.testing.assert_close(fn(q, k, v, causal=True, softmax_scale=0.3),
                               flash_attention_reference(q, k, v, True, 0.3))
    fn(q, k, v, causal=True, dropout_p=0.25)                 # flash-attn drops by itself
    assert rates == [0.0, 0.25]
    with pytest.raises(TypeError, match="supports float16 and bfloat16 only"):
        fn(q.float(), k.float(), v.float())


def test_flash_attn_backend_gives_each_document_a_sequence_of_its_own(monkeypatch, device):
    """With document_ids the backend calls flash_attn_varlen_func on the tokens of every row,
    flattened, each document one sequence (cu_seqlens): a stand-in computing attention
    sequence by sequence must give the reference's masked result, gradients included, and
    the offsets are read once for the ids every layer of a micro-batch shares."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        assert q.dim() == 3 and cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k
        calls.append((cu_q.tolist(), max_q))
        pieces = [flash_attention_reference(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                            causal, softmax_scale)[0].transpose(0, 1)
                  for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(pieces)

    _fake_module(monkeypatch, "flash_attn", flash_attn_func=None,
                 flash_attn_varlen_func=flash_attn_varlen_func)
    fn = get_op("attention", "flash_attn", "cuda")
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 6]], device=device)
    q, k, v = (torch.randn(2, 3, 9, 32, device=device).half().requires_grad_() for _ in range(3))
    out = fn(q, k, v, causal=True, softmax_scale=0.3, document_ids=ids)
    want = flash_attention_reference(q, k, v, True, 0.3, document_ids=ids)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for got, expected in zip(grads, torch.autograd.grad(want.float().sum(), (q, k, v))):
        torch.testing.assert_close(got, expected)
    fn(q, k, v, causal=True, document_ids=ids)              # the same ids: no new offsets
    assert [c[0] for c in calls] == [[0, 3, 5, 9, 17, 18]] * 2 and calls[0][1] == 8
    assert importlib.import_module("megagpt.kernels.dispatch")._VARLEN[0] is ids
    with pytest.raises(ValueError, match=r"document_ids has shape \(2, 8\)"):
        fn(q, k, v, document_ids=ids[:, :8])


def test_apex_backend_calls_fused_layer_norm_affine(monkeypatch, device):
    def fused_layer_norm_affine(x, weight, bias, normalized_shape, eps):
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)

    _fake_module(monkeypatch, "apex.normalization.fused_layer_norm",
                 fused_layer_norm_affine=fused_layer_norm_affine)
    _fake_module(monkeypatch, "fused_layer_norm_cuda")       # its compiled extension
    fn = get_op("layernorm", "apex", "cuda")
    x, w, b = torch.randn(4, 24, device=device), torch.randn(24, device=device), torch.randn(
        24, device=device)
    torch.testing.assert_close(fn(x, w, b, 1e-3), layer_norm_reference(x, w, b, 1e-3))


@pytest.mark.parametrize("op,args", [
    ("softmax", (torch.randn(2, 70000),)),
    ("layernorm", (torch.randn(2, 70000), torch.randn(70000), torch.randn(70000))),
])
def test_the_kernels_width_limit_is_not_the_torch_backends(op, args):
    assert get_op(op, "torch", "cpu")(*args).shape == (2, 70000)
    with pytest.raises(ValueError, match="last dimension 70000; the Triton .* supports up to 65536"):
        get_op(op, "triton", "cpu")(*args)


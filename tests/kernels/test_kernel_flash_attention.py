"""flash_attention (and its packed-qkv form) against flash_attention_reference: output and
dq, dk, dv, strided inputs read in place, dropout (the kernels' masks against dropout_keep_mask);
bad input."""
import pytest
import torch

from megagpt.kernels import (dropout_keep_mask, flash_attention, flash_attention_qkvpacked,
                             flash_attention_reference)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")

# (batch, heads, seq, head_dim, causal, dtype): every seq, head_dim, mask and dtype at least once.
FAST_CASES = [
    (1, 2, 1, 32, True, F32),
    (2, 2, 17, 64, False, F32),
    (1, 2, 100, 128, True, F32),
    (1, 2, 257, 32, False, F32),
    (1, 2, 257, 64, True, F16),
    (2, 2, 100, 32, False, F16),
    (1, 2, 17, 128, True, F16),
    (1, 2, 100, 64, True, BF16),
]
SLOW_CASES = [
    (1, 2, seq, head_dim, causal, dtype)
    for seq in (1, 17, 100, 257) for head_dim in (32, 64, 128) for causal in (True, False)
    for dtype in (F32, F16)
    if (1, 2, seq, head_dim, causal, dtype) not in FAST_CASES
    and (2, 2, seq, head_dim, causal, dtype) not in FAST_CASES
]


def _case_id(value):
    return str(value).replace("torch.", "")


def _inputs(batch, heads, seq, head_dim, dtype, device):
    return [torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(3)]


def _check_case(compare, device, batch, heads, seq, head_dim, causal, dtype, softmax_scale=None):
    compare(lambda q, k, v: flash_attention(q, k, v, causal, softmax_scale),
            lambda q, k, v: flash_attention_reference(q, k, v, causal, softmax_scale),
            _inputs(batch, heads, seq, head_dim, dtype, device), dtype, "qkv", atol32=1e-4)


@pytest.mark.parametrize("batch,heads,seq,head_dim,causal,dtype", FAST_CASES, ids=_case_id)
def test_matches_reference(compare, device, batch, heads, seq, head_dim, causal, dtype):
    _check_case(compare, device, batch, heads, seq, head_dim, causal, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("batch,heads,seq,head_dim,causal,dtype", SLOW_CASES, ids=_case_id)
def test_matches_reference_more_shapes(compare, device, batch, heads, seq, head_dim, causal, dtype):
    _check_case(compare, device, batch, heads, seq, head_dim, causal, dtype)


def test_softmax_scale(compare, device):
    _check_case(compare, device, 1, 2, 40, 64, True, F32, softmax_scale=0.3)


def test_non_contiguous_inputs(compare, device):
    """q, k, v as the usual views of a (batch, seq, heads, head_dim) projection."""
    def views(*bshd):
        return [t.transpose(1, 2) for t in bshd]

    bshd = [torch.randn(1, 33, 2, 32, device=device, requires_grad=True) for _ in range(3)]
    out = flash_attention(*views(*bshd))
    ref_leaves = [t.detach().clone().requires_grad_() for t in bshd]
    ref = flash_attention_reference(*views(*ref_leaves))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, bshd, grad_out)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-4)


def _grad_layout_spy(t):
    """Records the strides of the gradient autograd hands to ``t``."""
    seen = {}

    def hook(grad):
        seen["stride"] = grad.stride()

    t.register_hook(hook)
    return seen


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_views_of_one_packed_tensor_are_read_in_place(compare, device, dtype, causal):
    """q, k, v as the model makes them from its fused projection, (seq, batch, 3, heads, head_dim)
    permuted: the kernels read them where they lie and write O in the same memory order (so the
    model's permute back to (seq, batch, ...) needs no copy)."""
    seq, batch, heads, head_dim = 33, 2, 2, 32
    packed = torch.randn(seq, batch, 3, heads, head_dim, device=device, dtype=dtype,
                         requires_grad=True)

    def run(fn):
        def attend(x):
            q, k, v = x.permute(2, 1, 3, 0, 4)
            out = fn(q, k, v, causal)
            assert out.shape == (batch, heads, seq, head_dim)
            return out
        return attend

    out = run(flash_attention)(packed)
    assert out.permute(2, 0, 1, 3).is_contiguous()
    compare(run(flash_attention), run(flash_attention_reference), [packed], dtype, ["qkv"],
            atol32=1e-4)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_major", [False, True], ids=["bs3hd", "sb3hd"])
def test_qkvpacked_matches_reference(compare, device, dtype, causal, seq_major):
    """flash_attention_qkvpacked on (batch, seq, 3, heads, head_dim): as a contiguous tensor, and
    as the model's (seq, batch, ...) projection transposed; the output is laid out in qkv's order
    and the gradient comes back in qkv's layout (no copies either way)."""
    batch, seq, heads, head_dim = 2, 45, 2, 64
    shape = (seq, batch, 3, heads, head_dim) if seq_major else (batch, seq, 3, heads, head_dim)
    leaf = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    def packed_input(x):
        return x.transpose(0, 1) if seq_major else x

    def reference(x):
        q, k, v = (t.transpose(1, 2) for t in packed_input(x).unbind(2))
        return flash_attention_reference(q, k, v, causal).transpose(1, 2)

    qkv = packed_input(leaf)
    seen = _grad_layout_spy(qkv)
    out = flash_attention_qkvpacked(qkv, causal)
    assert out.shape == (batch, seq, heads, head_dim)
    assert (out.transpose(0, 1) if seq_major else out).is_contiguous()
    out.float().sum().backward()
    assert seen["stride"] == qkv.stride()
    compare(lambda x: flash_attention_qkvpacked(packed_input(x), causal), reference, [leaf],
            dtype, ["qkv"], atol32=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_broadcast_inputs(compare, device, causal):
    """Inputs expanded along the batch (stride 0) are read in place; the outputs and gradients
    are dense with head_dim contiguous."""
    def expanded(fn):
        return lambda q, k, v: fn(*(t.expand(3, -1, -1, -1) for t in (q, k, v)), causal)

    compare(expanded(flash_attention), expanded(flash_attention_reference),
            _inputs(1, 2, 20, 32, F32, device), F32, "qkv", atol32=1e-4)

    def packed(fn):
        return lambda x: fn(x.expand(3, -1, -1, -1, -1), causal)

    def packed_reference(x):
        q, k, v = (t.transpose(1, 2) for t in x.expand(3, -1, -1, -1, -1).unbind(2))
        return flash_attention_reference(q, k, v, causal).transpose(1, 2)

    leaf = torch.randn(1, 20, 3, 2, 32, device=device, requires_grad=True)
    compare(packed(flash_attention_qkvpacked), packed_reference, [leaf], F32, ["qkv"],
            atol32=1e-4)


def test_qkvpacked_runs_the_reference_where_triton_cannot(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    qkv = torch.randn(2, 9, 3, 2, 32, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    want = flash_attention_reference(q, k, v, True).transpose(1, 2)
    torch.testing.assert_close(flash_attention_qkvpacked(qkv), want)


@pytest.mark.parametrize("make_qkv,message", [
    (lambda d: torch.randn(2, 9, 2, 32, device=d),
     r"qkv must be 5-D \(batch, seq, 3, heads, head_dim\), got shape \(2, 9, 2, 32\)"),
    (lambda d: torch.randn(2, 9, 4, 2, 32, device=d), r"got shape \(2, 9, 4, 2, 32\)"),
    (lambda d: torch.randn(2, 9, 3, 2, 48, device=d), "qkv has head_dim 48; flash_attention "
                                                      "supports head_dim 32, 64, 128"),
    (lambda d: torch.randn(2, 9, 3, 2, 32, device=d).double(), "qkv has dtype torch.float64"),
])
def test_qkvpacked_bad_input(device, make_qkv, message):
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention_qkvpacked(make_qkv(device))


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_gpu(compare, head_dim, causal):
    """bf16 with the compiled kernels, at a length that fills several blocks of every kernel."""
    compare(lambda q, k, v: flash_attention(q, k, v, causal),
            lambda q, k, v: flash_attention_reference(q, k, v, causal),
            _inputs(2, 4, 1000, head_dim, BF16, "cuda"), BF16, "qkv")


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_qkvpacked_bf16_on_gpu_in_the_models_layout(compare, head_dim):
    """bf16, compiled, on the model's (seq, batch, 3 * heads * head_dim) projection output,
    transposed to batch-first as the model passes it (strides with gaps, read in place)."""
    seq, batch, heads = 1000, 2, 4
    leaf = torch.randn(seq, batch, 3 * heads * head_dim, device="cuda", dtype=BF16,
                       requires_grad=True)

    def packed(x):
        return x.view(seq, batch, 3, heads, head_dim).transpose(0, 1)

    def reference(x):
        q, k, v = (t.transpose(1, 2) for t in packed(x).unbind(2))
        return flash_attention_reference(q, k, v, True).transpose(1, 2)

    compare(lambda x: flash_attention_qkvpacked(packed(x)), reference, [leaf], BF16, ["qkv"])


@pytest.mark.parametrize("make_inputs,message", [
    (lambda d: [torch.randn(1, 2, 8, 32, device=d), torch.randn(1, 2, 9, 32, device=d),
                torch.randn(1, 2, 8, 32, device=d)], "k has shape"),
    (lambda d: [torch.randn(1, 2, 8, 48, device=d)] * 3, "head_dim 48.*32, 64, 128"),
    (lambda d: [torch.randn(2, 8, 32, device=d)] * 3, "q must be 4-D"),
    (lambda d: [torch.randn(1, 2, 8, 32, device=d, dtype=torch.float64)] * 3,
     "q has dtype torch.float64; supported: float16, bfloat16, float32"),
    (lambda d: [torch.randn(1, 2, 8, 32, device=d), torch.randn(1, 2, 8, 32, device=d).half(),
                torch.randn(1, 2, 8, 32, device=d)], "k has dtype torch.float16 but q has"),
    (lambda d: [torch.randn(1, 2, 8, 32, device=d), torch.randn(1, 2, 8, 32, device="meta"),
                torch.randn(1, 2, 8, 32, device=d)], "q is on .* but k is on meta"),
])
def test_bad_input(device, make_inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention(*make_inputs(device))


# Dropout: (batch, heads, seq, head_dim, causal, dtype, dropout_p).
DROPOUT_CASES = [
    (1, 2, 1, 32, True, F32, 0.2),
    (2, 3, 17, 64, False, F32, 0.5),
    (1, 2, 100, 128, True, F16, 0.1),
    (1, 2, 257, 32, False, F16, 0.3),
    (1, 2, 70, 64, True, BF16, 0.2),
]


@pytest.mark.parametrize("batch,heads,seq,head_dim,causal,dtype,dropout_p", DROPOUT_CASES,
                         ids=_case_id)
def test_dropout_matches_the_reference_with_the_same_seed(compare, device, batch, heads, seq,
                                                          head_dim, causal, dtype, dropout_p):
    """Forward and every gradient with dropout equal the reference dropping by the same seed:
    the forward and both backward kernels draw the masks dropout_keep_mask gives."""
    compare(lambda q, k, v: flash_attention(q, k, v, causal, None, dropout_p, seed=2024),
            lambda q, k, v: flash_attention_reference(q, k, v, causal, None, dropout_p, 2024),
            _inputs(batch, heads, seq, head_dim, dtype, device), dtype, "qkv", atol32=1e-4)


@pytest.mark.parametrize("seq", [32, 45])
def test_the_kernels_drop_exactly_dropout_keep_mask(device, seq):
    """With q = k = 0 every probability is 1/seq, and with one-hot values row i of the output
    holds keep[i, j] * scale / seq at column j: the mask read straight off the kernel."""
    batch, heads, head_dim, dropout_p, seed = 2, 3, 64, 0.3, 17
    q = torch.zeros(batch, heads, seq, head_dim, device=device)
    v = torch.eye(seq, head_dim, device=device).expand(batch, heads, seq, head_dim)
    out = flash_attention(q, q, v, causal=False, dropout_p=dropout_p, seed=seed)
    keep, scale = dropout_keep_mask(seed, batch * heads, seq, dropout_p)
    torch.testing.assert_close(out[..., :seq].cpu(), keep.view(batch, heads, seq, seq) * scale / seq)
    assert 0 < keep.sum() < keep.numel()


def test_dropout_keep_mask_drops_at_the_rate_asked_and_independently():
    batch_heads, seq = 4, 512
    for dropout_p in (0.1, 0.5):
        keep, scale = dropout_keep_mask(123, batch_heads, seq, dropout_p)
        rate = round(dropout_p * 65536) / 65536
        assert scale == pytest.approx(1 / (1 - rate))
        n = keep.numel()
        dropped = 1 - keep.float()
        assert abs(dropped.mean().item() - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
        for a, b in [(dropped[0], dropped[1]),                  # heads
                     (dropped[:, :-1], dropped[:, 1:]),         # neighbouring rows
                     (dropped[..., :-1], dropped[..., 1:]),     # neighbouring columns
                     (dropped[..., :-8], dropped[..., 8:])]:    # columns of neighbouring groups
            both = (a * b).mean().item()
            assert abs(both - rate ** 2) < 4 * (rate ** 2 * (1 - rate ** 2) / a.numel()) ** 0.5
    same, _ = dropout_keep_mask(123, batch_heads, seq, 0.1)
    assert torch.equal(same, dropout_keep_mask(torch.tensor([123]), batch_heads, seq, 0.1)[0])
    for other in (124, 123 + 2 ** 32):                 # both halves of the seed key the generator
        assert not torch.equal(same, dropout_keep_mask(other, batch_heads, seq, 0.1)[0])
    keep, scale = dropout_keep_mask(123, 2, 5, 0.0)
    assert keep.all() and scale == 1.0


def test_dropout_without_a_seed_draws_one_from_torch(device):
    q, k, v = (torch.randn(1, 2, 40, 32, device=device) for _ in range(3))
    torch.manual_seed(5)
    first = flash_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.3), first)
    assert not torch.equal(flash_attention(q, k, v, dropout_p=0.3), first)    # the next draw
    plain = flash_attention(q, k, v)
    assert not torch.allclose(first, plain)
    # a rate that rounds to 0 at steps of 1/65536 drops nothing
    assert torch.equal(flash_attention(q, k, v, dropout_p=1e-6), plain)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.0), plain)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_qkvpacked_in_the_models_layout(compare, device, causal):
    """The packed kernels with dropout on the model's (seq, batch, 3, heads, head_dim) projection
    transposed to batch-first, against the reference with the same seed."""
    seq, batch, heads, head_dim = 37, 2, 2, 32
    leaf = torch.randn(seq, batch, 3, heads, head_dim, device=device, requires_grad=True)

    def reference(x):
        q, k, v = (t.transpose(1, 2) for t in x.transpose(0, 1).unbind(2))
        return flash_attention_reference(q, k, v, causal, None, 0.25, 99).transpose(1, 2)

    compare(lambda x: flash_attention_qkvpacked(x.transpose(0, 1), causal, dropout_p=0.25,
                                                seed=99),
            reference, [leaf], F32, ["qkv"], atol32=1e-4)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dropout_p=-0.1), ValueError, r"dropout_p=-0.1: must be a number in \[0, 1\)"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p=1.0: must be a number in \[0, 1\)"),
    (dict(dropout_p="0.1"), ValueError, r"dropout_p='0.1': must be a number"),
    (dict(dropout_p=True), ValueError, r"dropout_p=True: must be a number"),
    (dict(dropout_p=0.999999), ValueError, "rounds to 1 at the kernels' steps of 1/65536"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be None, an int or a one-element int64"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2])), TypeError, "one-element int64 tensor"),
    (dict(dropout_p=0.1, seed=torch.tensor([1.0])), TypeError, "one-element int64 tensor"),
    (dict(dropout_p=0.1, seed=torch.tensor([1], device="meta")), ValueError,
     "seed is on meta but the attention's inputs are on"),
])
def test_dropout_bad_input(device, kwargs, error, message):
    q = torch.randn(1, 2, 8, 32, device=device)
    with pytest.raises(error, match=message):
        flash_attention(q, q, q, **kwargs)
    with pytest.raises(error, match=message):
        flash_attention_qkvpacked(torch.randn(1, 8, 3, 2, 32, device=device), **kwargs)


def test_model_attention_dropout_draws_its_seed_from_the_tensor_parallel_stream(device):
    """The model's Triton attention with dropout (packed, reading the fused projection) equals
    the reference dropping by the seed the tensor-parallel RNG stream gives: each tensor-parallel
    rank, holding other heads, draws its own masks."""
    from megagpt.config import KernelsConfig, ModelConfig
    from megagpt.model.gpt import GPTStage, StageSpec, init_weights
    from megagpt.parallel.random import get_rng_tracker, seed_everything

    seq, batch, d_model, heads = 24, 2, 64, 2
    m = ModelConfig(vocab_size=64, d_model=d_model, n_heads=heads, n_layers=1, seq_length=seq,
                    dropout=0.3)
    kernels = KernelsConfig(attention="triton", layernorm="torch", softmax="torch",
                            bias_gelu="torch", cross_entropy="torch")
    stage = GPTStage(m, kernels, StageSpec(0, 1, True, True), device=device).train()
    init_weights(stage, m, seed=0)
    attn = stage.layers["0"].attn
    assert attn.ops.attention_qkvpacked is not None
    x = torch.randn(seq, batch, d_model, device=device)
    seed_everything(3, device=device)
    out = attn(x)
    seed_everything(3, device=device)
    with get_rng_tracker().fork():
        seed = torch.randint(0, 2 ** 62, (1,), device=device)
    q, k, v = attn.qkv(x).view(seq, batch, 3, heads, d_model // heads).permute(2, 1, 3, 0, 4)
    y = flash_attention_reference(q, k, v, True, None, 0.3, seed)
    want = attn.proj(y.permute(2, 0, 1, 3).reshape(seq, batch, d_model))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    attn.eval()                                   # no dropout in evaluation
    torch.testing.assert_close(attn(x), attn.proj(flash_attention_reference(q, k, v, True).permute(
        2, 0, 1, 3).reshape(seq, batch, d_model)), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_bf16_on_gpu(compare, head_dim):
    """bf16 with dropout, compiled, against the reference with the same seed (a seed tensor on
    the GPU, as the model draws it)."""
    seed = torch.tensor([31337], device="cuda")
    compare(lambda q, k, v: flash_attention(q, k, v, True, None, 0.1, seed),
            lambda q, k, v: flash_attention_reference(q, k, v, True, None, 0.1, seed),
            _inputs(2, 4, 1000, head_dim, BF16, "cuda"), BF16, "qkv")

"""cross_entropy against cross_entropy_reference (loss and dlogits, ignore_index, odd vocabularies);
the vocab-parallel building blocks: shard statistics and gradients recombine to the full loss."""
import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import (cross_entropy, cross_entropy_reference, cross_entropy_shard_grad,
                             cross_entropy_shard_grad_reference, cross_entropy_shard_stats,
                             cross_entropy_shard_stats_reference)
from megagpt.kernels.cross_entropy import cross_entropy_torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")


def _logits_target(rows_shape, vocab, dtype, device, ignore_every=5, ignore_index=-100):
    logits = (torch.randn(*rows_shape, vocab, device=device) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, rows_shape, device=device)
    target.view(-1)[::ignore_every] = ignore_index
    return logits, target


def _check(compare, rows_shape, vocab, dtype, device, ignore_index=-100):
    logits, target = _logits_target(rows_shape, vocab, dtype, device, ignore_index=ignore_index)
    compare(lambda x: cross_entropy(x, target, ignore_index),
            lambda x: cross_entropy_reference(x, target, ignore_index), [logits], dtype, ["logits"])


# (rows, vocab): several chunks with a partial last one, a vocabulary under one chunk, 3-D logits,
# whole chunks only (the interpreter's chunk is 256).
@pytest.mark.parametrize("rows_shape,vocab", [
    ((37,), 1000), ((4, 9), 77), ((6,), 768),
    pytest.param((3,), 50257, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_matches_reference(compare, device, rows_shape, vocab, dtype):
    _check(compare, rows_shape, vocab, dtype, device)


@pytest.mark.parametrize("dtype,scale", [(F16, 3e4), (F32, 1e30)], ids=str)
def test_huge_logits(device, dtype, scale):
    """Logits of fp16's range (whose loss, up to twice the scale, still fits it) or at 1e30: the
    loss and its gradient against float64, no overflow in the running max or the sum of
    exponentials."""
    logits = (torch.rand(9, 300, device=device) * 2 - 1) * scale
    logits[:, 7] = scale                       # one large winner a row, and some ties with it
    logits = logits.to(dtype).requires_grad_()
    target = torch.randint(0, 300, (9,), device=device)
    target[0], target[1] = 7, -100
    loss = cross_entropy(logits, target)
    loss.backward()
    x64 = logits.detach().double().requires_grad_()
    want = F.cross_entropy(x64, target)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-3, atol=0)
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-3, atol=1e-3)


def test_bf16_interpreted_or_compiled(compare, device):
    _check(compare, (13,), 500, BF16, device)


def test_other_ignore_index_and_int32_target(compare, device):
    logits, target = _logits_target((20,), 300, F32, device, ignore_every=3, ignore_index=7)
    target = target.int()
    compare(lambda x: cross_entropy(x, target, 7), lambda x: cross_entropy_reference(x, target, 7),
            [logits], F32, ["logits"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16], ids=str)
def test_narrow_integer_targets(compare, device, dtype):
    """Targets of a type narrower than int32 (a byte-level model's uint8): the ignored rows are
    counted, and the range checked, in int64. Compared in the target's own type, -100 wrapped
    to 156 in uint8 (class 156's rows were left out of the mean) and 256 classes to 0 (every
    target out of range)."""
    top = {torch.uint8: 255, torch.int8: 127, torch.int16: 300}[dtype]
    vocab = top + 1
    logits = (torch.randn(12, vocab, device=device) * 2).requires_grad_()
    target = torch.randint(0, vocab, (12,), device=device)
    target[:3] = torch.tensor([156 % vocab, top, 0])
    if dtype != torch.uint8:
        target[5] = -100
    target = target.to(dtype)
    compare(lambda x: cross_entropy(x, target), lambda x: cross_entropy_reference(x, target),
            [logits], F32, ["logits"])
    for backend in (cross_entropy, cross_entropy_torch):
        backend(logits.detach(), target)              # in range: no error
    weight = torch.rand(12, device=device) + 0.5     # the weighted mean's divisor too
    wide = target.long()
    expected = (F.cross_entropy(logits.detach(), wide, reduction="none") * weight).sum() / \
        weight[wide != -100].sum()
    torch.testing.assert_close(cross_entropy(logits.detach(), target, weight=weight), expected)
    # the vocab-parallel loss's gradient of a shard: softmax - one-hot, zero on ignored rows
    lse = torch.logsumexp(logits.detach(), -1)
    grad = cross_entropy_shard_grad(logits.detach(), target, 0, lse)
    want = cross_entropy_shard_grad_reference(logits.detach(), target, 0, lse)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    exact = torch.softmax(logits.detach(), -1) - F.one_hot(wide.clamp(min=0), vocab)
    torch.testing.assert_close(want, exact.masked_fill((wide == -100)[:, None], 0.0),
                               rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_nan_and_zero_grad(device):
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100, device=device))
    assert torch.isnan(loss)
    loss.backward()
    assert torch.all(logits.grad == 0)


# (width, vocab_size): odd widths, so that the rows start at every offset within 16 bytes: one
# short of a chunk (interpreter: 256), just over one, several chunks, padding over whole chunks.
@pytest.mark.parametrize("width,vocab_size", [(1, None), (7, None), (255, None), (257, None),
                                              (603, None), (603, 250), (601, 513)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_rows_at_every_alignment(device, dtype, width, vocab_size):
    """The kernels walk each row from its start rounded down to 16 bytes (so most chunks load
    and store as vectors whatever the width): every row's loss and gradient, in place or not,
    equals the reference's, and no row's gradient spills into its neighbours."""
    leaf, target = _logits_target((9,), width, dtype, device, ignore_every=4)
    target = target.clamp(max=(vocab_size or width) - 1).masked_fill(target == -100, -100)
    ref = leaf.detach().float().requires_grad_()
    ref_loss = cross_entropy_reference(ref, target, vocab_size=vocab_size, reduction="sum")
    ref_loss.backward()
    rtol, atol = (1e-5, 1e-5) if dtype == F32 else (5e-3, 5e-4)
    for inplace in (False, True):
        logits = leaf * 1
        loss = cross_entropy(logits, target, vocab_size=vocab_size, reduction="sum",
                             inplace_backward=inplace)
        grad, = torch.autograd.grad(loss, leaf)
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(grad.float(), ref.grad, rtol=rtol, atol=atol)
    start = 1 if vocab_size is None else 0
    stats = cross_entropy_shard_stats(leaf.detach(), target + start, start, vocab_size)
    expected = cross_entropy_shard_stats_reference(leaf.detach(), target + start, start,
                                                   vocab_size)
    for got, want in zip(stats, expected):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_sum_reduction_in_float32(compare, device, dtype):
    """reduction="sum": the float32 sum of the non-ignored rows' losses, padded vocabulary too."""
    logits, target = _logits_target((5, 7), 333, dtype, device)
    target = target.clamp(max=300).masked_fill(target == -100, -100)
    assert cross_entropy(logits, target, vocab_size=301, reduction="sum").dtype == F32
    compare(lambda x: cross_entropy(x, target, vocab_size=301, reduction="sum").to(dtype),
            lambda x: cross_entropy_reference(x, target, vocab_size=301, reduction="sum"),
            [logits], dtype, ["logits"])


def test_sum_of_no_rows_is_zero_with_zero_grad(device):
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100, device=device), reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_bad_reduction(device):
    logits, target = _logits_target((3,), 20, F32, device)
    for fn in (cross_entropy, cross_entropy_reference):
        with pytest.raises(ValueError, match=r"reduction='none': must be 'mean' or 'sum'"):
            fn(logits, target, reduction="none")


def test_backward_scales_by_the_incoming_gradient(device):
    logits, target = _logits_target((11,), 200, F32, device)
    (3.5 * cross_entropy(logits, target)).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    (3.5 * cross_entropy_reference(ref_logits, target)).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_padded_vocabulary_read_in_place(compare, device, dtype):
    """vocab_size < width: the padding columns are out of the softmax and get gradient 0."""
    logits, target = _logits_target((3, 7), 333, dtype, device)
    target = target.clamp(max=300).masked_fill(target == -100, -100)
    compare(lambda x: cross_entropy(x, target, vocab_size=301),
            lambda x: cross_entropy_reference(x, target, vocab_size=301), [logits], dtype,
            ["logits"])
    cross_entropy(logits, target, vocab_size=301).backward()
    assert torch.all(logits.grad[..., 301:] == 0)
    assert torch.any(logits.grad[..., :301] != 0)


def test_padding_after_whole_chunks(compare, device):
    """The classes fill whole chunks (2 x 256 under the interpreter) and the padding starts a
    chunk of its own."""
    logits, target = _logits_target((7,), 600, F32, device)
    target = target.clamp(max=511).masked_fill(target == -100, -100)
    compare(lambda x: cross_entropy(x, target, vocab_size=512),
            lambda x: cross_entropy_reference(x, target, vocab_size=512), [logits], F32,
            ["logits"])


@pytest.mark.parametrize("vocab_size", [0, 11, 2.0, True])
def test_bad_vocab_size(device, vocab_size):
    logits, target = torch.randn(4, 10, device=device), torch.zeros(4, dtype=torch.long,
                                                                   device=device)
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size!r}: must be an integer in "
                                         r"\[1, 10\]"):
        cross_entropy(logits, target, vocab_size=vocab_size)


def test_target_in_the_padding_is_outside_the_vocabulary():
    logits, target = torch.randn(4, 10), torch.tensor([1, 2, 8, -100])
    with pytest.raises(ValueError, match=r"class 1..8 but there are 8 classes"):
        cross_entropy(logits, target, vocab_size=8)


@needs_cuda
def test_bf16_on_gpu(compare):
    _check(compare, (512,), 50257, BF16, "cuda")


@needs_cuda
def test_bf16_on_gpu_as_the_model_calls_it(compare):
    """The model's loss: GPT-2's vocabulary padded to 50304, a float32 sum, the gradient written
    over the logits (compiled, bf16)."""
    logits, target = _logits_target((512,), 50304, BF16, "cuda")
    target = target.clamp(max=50256).masked_fill(target == -100, -100)
    compare(lambda x: cross_entropy(x * 1, target, vocab_size=50257, reduction="sum",
                                    inplace_backward=True).to(BF16),
            lambda x: cross_entropy_reference(x, target, vocab_size=50257, reduction="sum"),
            [logits], BF16, ["logits"])


def _split(vocab, cut):
    return [(0, cut), (cut, vocab)]


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_shards_recombine_to_the_full_loss_and_gradient(device, dtype):
    """Two vocabulary shards, combined as the vocab-parallel loss does, give cross_entropy."""
    vocab = 1000
    logits, target = _logits_target((29,), vocab, dtype, device)
    logits = logits.detach()
    shards = _split(vocab, 437)
    stats = [cross_entropy_shard_stats(logits[:, a:b], target, a) for a, b in shards]
    for (a, b), got in zip(shards, stats):
        want = cross_entropy_shard_stats_reference(logits[:, a:b].float(), target, a)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    global_max = torch.maximum(stats[0][0], stats[1][0])
    sum_exp = sum(s * torch.exp(m - global_max) for m, s, _ in stats)
    lse = global_max + torch.log(sum_exp)
    valid = target != -100
    row_loss = lse - (stats[0][2] + stats[1][2])
    loss = row_loss[valid].sum() / valid.sum()

    ref_logits = logits.float().requires_grad_()
    ref_loss = cross_entropy_reference(ref_logits, target)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)

    grad_row = torch.full_like(lse, 1.0 / valid.sum().item())
    grads = [cross_entropy_shard_grad(logits[:, a:b], target, a, lse, grad_row) for a, b in shards]
    assert all(g.dtype == dtype for g in grads)
    rtol, atol = (1e-5, 1e-7) if dtype == F32 else (5e-3, 1e-5)
    torch.testing.assert_close(torch.cat(grads, dim=-1).float(), ref_logits.grad, rtol=rtol,
                               atol=atol)


def test_padded_shards_recombine(device):
    """Four shards of a 1024-wide padded vocabulary of 700 classes: the third holds padding after
    its first 188 columns, the fourth only padding (max -inf, sum_exp 0, gradient 0)."""
    logits, target = _logits_target((13,), 1024, F32, device, ignore_every=6)
    logits = logits.detach()
    target = target.clamp(max=699).masked_fill(target == -100, -100)
    shards = [(a, a + 256) for a in range(0, 1024, 256)]
    stats = [cross_entropy_shard_stats(logits[:, a:b].contiguous(), target, a, vocab_size=700)
             for a, b in shards]
    for (a, b), got in zip(shards, stats):
        want = cross_entropy_shard_stats_reference(logits[:, a:b], target, a, vocab_size=700)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert torch.all(stats[3][0] == float("-inf")) and torch.all(stats[3][1] == 0)
    global_max = torch.stack([m for m, _, _ in stats]).max(0).values
    lse = global_max + torch.log(sum(se * torch.exp(m - global_max) for m, se, _ in stats))
    valid = target != -100
    loss = (lse - sum(t for _, _, t in stats))[valid].sum() / valid.sum()
    ref_logits = logits.clone().requires_grad_()
    ref_loss = cross_entropy_reference(ref_logits, target, vocab_size=700)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grad_row = torch.full_like(lse, 1.0 / valid.sum().item())
    grads = [cross_entropy_shard_grad(logits[:, a:b].contiguous(), target, a, lse, grad_row,
                                      vocab_size=700) for a, b in shards]
    torch.testing.assert_close(torch.cat(grads, dim=-1), ref_logits.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grads[3] == 0) and torch.all(grads[2][:, 188:] == 0)


def test_a_shard_whose_classes_are_all_minus_inf_recombines(device):
    """Its max is -inf and its sum of exponentials 0, in the kernel and the reference alike (the
    reference's exp(-inf - -inf) made the sum, then the recombined loss, NaN)."""
    logits = torch.randn(3, 8, device=device)
    logits[:, :4] = float("-inf")                   # shard 0: every class -inf, no padding
    target = torch.tensor([5, 6, 7], device=device)
    for stats in (cross_entropy_shard_stats, cross_entropy_shard_stats_reference):
        row_max, sum_exp, picked = stats(logits[:, :4].contiguous(), target, 0)
        assert torch.all(row_max == float("-inf")) and torch.all(sum_exp == 0)
        assert torch.all(picked == 0)
        other = stats(logits[:, 4:].contiguous(), target, 4)
        top = torch.maximum(row_max, other[0])
        lse = top + torch.log(sum_exp * torch.exp(row_max - top)
                              + other[1] * torch.exp(other[0] - top))
        torch.testing.assert_close(lse - other[2], F.cross_entropy(
            logits, target, reduction="none"))


def test_shard_grad_in_place_and_defaults(device):
    """out=logits overwrites the shard; grad_row=None means 1; ignored rows get zeros."""
    logits, target = _logits_target((9,), 300, F32, device, ignore_every=4)
    shard = logits.detach()[:, 100:220].contiguous()
    lse = torch.logsumexp(logits.detach(), dim=-1)
    want = cross_entropy_shard_grad_reference(shard, target, 100, lse)
    assert torch.all(want[target == -100] == 0)
    got = cross_entropy_shard_grad(shard, target, 100, lse, out=shard)
    assert got.data_ptr() == shard.data_ptr()
    torch.testing.assert_close(shard, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make_inputs,message", [
    (lambda d: (torch.randn(4, 10, device=d), torch.zeros(5, dtype=torch.long, device=d)),
     r"target has shape \(5,\) but logits has \(4, 10\)"),
    (lambda d: (torch.randn(4, 10, device=d), torch.zeros(4, device=d)),
     "target must be an integer tensor"),
    (lambda d: (torch.randn(4, 10, device=d).double(), torch.zeros(4, dtype=torch.long, device=d)),
     "logits has dtype torch.float64; supported"),
    (lambda d: (torch.randn(4, 10, device=d), torch.zeros(4, dtype=torch.long, device="meta")),
     "logits is on .* but target is on meta"),
])
def test_bad_input(device, make_inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cross_entropy(*make_inputs(device))


def test_target_outside_the_vocabulary(device):
    """An error where checking is free (CPU tensors); a NaN loss on a GPU, where it would sync."""
    logits, target = torch.randn(4, 10, device=device), torch.tensor([1, 2, 10, -100],
                                                                    device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"target holds class 1..10 but there are 10 "
                                             r"classes; targets must lie in \[0, 10\)"):
            cross_entropy(logits, target)
    else:
        assert torch.isnan(cross_entropy(logits, target))


def test_shard_grad_bad_input(device):
    logits, target = torch.randn(4, 10, device=device), torch.zeros(4, dtype=torch.long,
                                                                   device=device)
    with pytest.raises(ValueError, match=r"lse has shape \(3,\)"):
        cross_entropy_shard_grad(logits, target, 0, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="out must be a contiguous tensor"):
        cross_entropy_shard_grad(logits, target, 0, torch.zeros(4, device=device),
                                 out=torch.empty(4, 10, device=device).half())
    # a float64 lse failed inside torch's scatter; an integer lse or grad_row went through
    with pytest.raises(TypeError, match="lse has dtype torch.float64"):
        cross_entropy_shard_grad(logits, target, 0, torch.zeros(4, device=device).double())
    with pytest.raises(TypeError, match="grad_row has dtype torch.int64"):
        cross_entropy_shard_grad(logits, target, 0, torch.zeros(4, device=device),
                                 torch.ones(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="logits is on .* but out is on meta"):
        cross_entropy_shard_grad(logits, target, 0, torch.zeros(4, device=device),
                                 out=torch.empty(4, 10, device="meta"))


def test_second_backward_of_an_inplace_backward_is_an_error(device):
    logits, target = _logits_target((5,), 40, F32, device)
    loss = cross_entropy(logits.detach().clone().requires_grad_(), target, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward ran twice on one forward.*"
                                           r"inplace_backward=False"):
        loss.backward()


def test_second_backward_without_inplace_gives_the_gradient_again(device):
    logits, target = _logits_target((5,), 40, F32, device)
    loss = cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward_writes_the_gradient_over_the_logits(device, dtype, reduction):
    """The logits' gradient is their own storage, and equals the reference's (padded vocabulary,
    ignored rows, an incoming gradient other than 1); the forward leaves the logits untouched."""
    leaf, target = _logits_target((4, 6), 333, dtype, device)
    target = target.clamp(max=300).masked_fill(target == -100, -100)
    seen = {}

    def keep_grad(grad):
        seen["ptr"], seen["grad"] = grad.data_ptr(), grad.clone()

    logits = leaf * 1                    # a non-leaf, as a model's logits are
    logits.register_hook(keep_grad)
    before = logits.detach().clone()
    loss = cross_entropy(logits, target, vocab_size=301, reduction=reduction,
                         inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    (2.5 * loss).backward()
    assert seen["ptr"] == logits.data_ptr()
    ref = before.float().requires_grad_()
    (2.5 * cross_entropy_reference(ref, target, vocab_size=301, reduction=reduction)).backward()
    rtol, atol = (1e-5, 1e-6) if dtype == F32 else (5e-3, 5e-4)
    torch.testing.assert_close(seen["grad"].float(), ref.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss.float(), cross_entropy_reference(
        before, target, vocab_size=301, reduction=reduction).float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_row_weights(compare, device, dtype, reduction):
    """Per-row weights (a loss mask that is not 0/1: zeros, fractions, above 1) multiply each
    row's loss and gradient; the mean divides by the weights of the rows not ignored."""
    logits, target = _logits_target((5, 7), 300, dtype, device)
    weight = torch.rand(5, 7, device=device) * 2
    weight[0, :3] = 0.0
    compare(lambda x: cross_entropy(x, target, reduction=reduction, weight=weight).to(dtype),
            lambda x: cross_entropy_reference(x, target, reduction=reduction,
                                              weight=weight).to(dtype),
            [logits], dtype, ["logits"])
    losses = F.cross_entropy(logits.detach().float().reshape(-1, 300),
                                               target.reshape(-1), reduction="none")
    kept = (target.reshape(-1) != -100).float() * weight.reshape(-1)
    expected = (losses * kept).sum() / (kept.sum() if reduction == "mean" else 1.0)
    torch.testing.assert_close(cross_entropy(logits, target, reduction=reduction,
                                             weight=weight).float(), expected,
                               rtol=5e-3 if dtype == F16 else 1e-5, atol=1e-4)


def test_ones_as_weights_change_nothing(device):
    logits, target = _logits_target((3, 11), 120, F32, device)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            cross_entropy(logits, target, reduction=reduction,
                          weight=torch.ones(3, 11, device=device)),
            cross_entropy(logits, target, reduction=reduction))


def test_strided_row_weights(device):
    """A weight tensor that is a strided view is read as its values, not as its storage."""
    logits, target = _logits_target((9,), 50, F32, device)
    every_other = torch.rand(18, device=device)[::2]
    torch.testing.assert_close(cross_entropy(logits, target, weight=every_other),
                               cross_entropy_reference(logits, target, weight=every_other))


def test_row_weights_with_inplace_backward_and_padding(device):
    leaf, target = _logits_target((4, 6), 333, F32, device)
    target = target.clamp(max=300).masked_fill(target == -100, -100)
    weight = torch.rand(4, 6, device=device)
    logits = leaf * 1
    loss = cross_entropy(logits, target, vocab_size=301, reduction="sum", inplace_backward=True,
                         weight=weight)
    grad, = torch.autograd.grad(3.0 * loss, leaf)
    ref = leaf.detach().clone().requires_grad_()
    ref_loss = cross_entropy_reference(ref, target, vocab_size=301, reduction="sum",
                                       weight=weight)
    ref_grad, = torch.autograd.grad(3.0 * ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("weight,error,message", [
    (lambda d: torch.ones(4, device=d, dtype=torch.int64), TypeError,
     "weight must be a floating-point tensor"),
    (lambda d: [1.0] * 4, TypeError, "weight must be a floating-point tensor"),
    (lambda d: torch.ones(5, device=d), ValueError,
     r"weight has shape \(5,\) but target has \(4,\)"),
    (lambda d: torch.ones(4, device="meta"), ValueError, "target is on .* but weight is on meta"),
])
def test_bad_weight(device, weight, error, message):
    logits, target = _logits_target((4,), 10, F32, device)
    with pytest.raises(error, match=message):
        cross_entropy(logits, target, weight=weight(device))


def test_the_models_fused_loss_weights_by_a_fractional_loss_mask(device):
    """The model's loss with the Triton cross-entropy equals the torch one (the sum of per-token
    losses times loss_mask, and the mask's sum), loss and every gradient, for a mask of zeros,
    fractions and values above 1."""
    from megagpt.config import KernelsConfig, ModelConfig
    from megagpt.model.gpt import GPTStage, StageSpec, init_weights

    m = ModelConfig(vocab_size=90, d_model=64, n_heads=2, n_layers=1, seq_length=12, dropout=0.0)
    data = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 90, (3, 12), generator=data).to(device)
    labels = torch.randint(0, 90, (3, 12), generator=data).to(device)
    mask = (torch.rand(3, 12, generator=data) * 2).to(device)
    mask[0, :4] = 0.0
    results = {}
    for backend in ("triton", "torch"):
        kernels = KernelsConfig(attention="eager", layernorm="torch", softmax="torch",
                                bias_gelu="torch", cross_entropy=backend)
        stage = GPTStage(m, kernels, StageSpec(0, 1, True, True), device=device)
        init_weights(stage, m, seed=1)
        loss_sum, n_tokens = stage(ids, labels, mask)
        loss_sum.backward()
        results[backend] = (loss_sum.detach(), n_tokens,
                            {k: p.grad for k, p in stage.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1])
    for name, grad in results["torch"][2].items():
        torch.testing.assert_close(results["triton"][2][name], grad, rtol=1e-4, atol=1e-5,
                                   msg=name)

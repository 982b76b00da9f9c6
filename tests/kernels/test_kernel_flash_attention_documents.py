"""flash_attention with document masks (``document_ids``, packed windows of several documents)
against flash_attention_reference with the same ids: output and dq, dk, dv, the packed-qkv form,
dropout with a seed; one document a row equals no documents; the reference against attention
computed document by document; bad ids."""
import pytest
import torch

from megagpt.kernels import (check_document_ids, flash_attention, flash_attention_qkvpacked,
                             flash_attention_reference)

F32, F16 = torch.float32, torch.float16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU")

# The document lengths of each batch row, by sequence length. The interpreter's blocks are 64
# query rows by 32 keys (forward, dQ) and 32 by 64 (dK/dV): documents of length 1, documents
# crossing block boundaries, documents starting mid-block, and other splits in each row.
SPLITS = {
    1: [[1], [1], [1]],
    17: [[5, 1, 11], [17], [1, 15, 1]],
    100: [[3, 40, 1, 56], [64, 36], [1, 1, 97, 1]],
    257: [[1, 1, 63, 64, 100, 28], [31, 2, 200, 24], [257]],
    300: [[63, 1, 64, 1, 127, 44], [128, 129, 43], [1, 255, 2, 42]],   # at the GPU's blocks
    1000: [[1, 500, 499], [1000], [250, 250, 250, 250]],
    2100: [[2049, 51], [5, 2043, 52]],     # more than 64 blocks of 32 before a document starts
}
# The (BLOCK_M, BLOCK_N) of the forward, dK/dV and dQ kernels that a GPU's autotuner may choose
# in float16/bfloat16 (_GPU_CONFIGS; float32's are the interpreter's own).
GPU_BLOCKS = [((128, 64), (32, 128), (128, 32)), ((128, 128), (64, 128), (128, 64)),
              ((64, 64), (32, 128), (128, 64))]

# (batch, heads, seq, head_dim, causal, dtype): every seq, head_dim, mask and dtype at least once.
FAST_CASES = [
    (1, 2, 1, 32, True, F32),
    (3, 2, 17, 64, False, F32),
    (2, 3, 100, 128, True, F32),
    (2, 2, 100, 32, False, F16),
    (2, 2, 257, 64, True, F16),
]
SLOW_CASES = [
    (2, 2, seq, head_dim, causal, dtype)
    for seq, head_dim in ((1, 64), (17, 128), (100, 64), (257, 32), (257, 128))
    for causal in (True, False) for dtype in (F32, F16)
    if not any(case[2:] == (seq, head_dim, causal, dtype) for case in FAST_CASES)
]


def _case_id(value):
    return str(value).replace("torch.", "")


def _inputs(batch, heads, seq, head_dim, dtype, device):
    return [torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(3)]


def _document_ids(batch, seq, device, dtype=torch.int64):
    """(batch, seq) ids of the documents of SPLITS[seq], each row its own split; the ids start
    anywhere (negative ones too) and grow by uneven steps, as only their equality matters."""
    rows = []
    for b in range(batch):
        lengths = torch.tensor(SPLITS[seq][b % len(SPLITS[seq])])
        ids = 3 * b - 4 + torch.cumsum(torch.arange(1, len(lengths) + 1), 0)
        rows.append(torch.repeat_interleave(ids, lengths))
    return torch.stack(rows).to(device=device, dtype=dtype)


def _check_case(compare, device, batch, heads, seq, head_dim, causal, dtype,
                ids_dtype=torch.int64):
    docs = _document_ids(batch, seq, device, ids_dtype)
    compare(lambda q, k, v: flash_attention(q, k, v, causal, document_ids=docs),
            lambda q, k, v: flash_attention_reference(q, k, v, causal, document_ids=docs),
            _inputs(batch, heads, seq, head_dim, dtype, device), dtype, "qkv", atol32=1e-4)


# On a GPU the fast cases compile the same kernels; the slow ones would spend the GPU check's time.
CPU_SLOW = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(),
                                                 reason="the fast cases cover it on a GPU")]


@pytest.mark.parametrize("batch,heads,seq,head_dim,causal,dtype", FAST_CASES + [
    pytest.param(*case, marks=CPU_SLOW) for case in SLOW_CASES], ids=_case_id)
def test_matches_reference(compare, device, batch, heads, seq, head_dim, causal, dtype):
    _check_case(compare, device, batch, heads, seq, head_dim, causal, dtype)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's blocks set by hand")
@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=str)
def test_the_block_sizes_a_gpu_may_choose(compare, device, monkeypatch, blocks):
    """The skipped blocks' bounds at the GPU's block sizes: documents starting and ending at, just
    before and just after their edges, causal and not, float32 and float16."""
    import importlib

    import triton

    fa = importlib.import_module("megagpt.kernels.flash_attention")   # the module, not the function

    for name, (block_m, block_n) in zip(("fwd", "dkdv", "dq"), blocks):
        for tuned in fa._TUNED[name].values():
            config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n})
            monkeypatch.setattr(tuned.tuner, "configs", [config])
            monkeypatch.setattr(tuned, "chosen", {})
    for causal, dtype in ((True, F32), (True, F16), (False, F32)):
        _check_case(compare, device, 3, 1, 300, 32, causal, dtype)
    assert fa._TUNED["fwd"]["float32"].tuner.best_config.kwargs["BLOCK_M"] == blocks[0][0]


@pytest.mark.slow
def test_more_blocks_before_a_document_than_one_count_takes(compare, device):
    """Bounds counted over more than one load of 64 blocks (sequence 2100, blocks of 32)."""
    _check_case(compare, device, 2, 1, 2100, 32, True, F32)


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_on_gpu(compare, head_dim):
    _check_case(compare, "cuda", 3, 4, 1000, head_dim, True, torch.bfloat16)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_any_integer_dtype(compare, device, ids_dtype):
    """The ids in any integer dtype (uint8 with non-negative ones)."""
    docs = _document_ids(2, 17, device) + 4
    q, k, v = (torch.randn(2, 2, 17, 32, device=device) for _ in range(3))
    want = flash_attention(q, k, v, document_ids=docs)
    assert torch.equal(flash_attention(q, k, v, document_ids=docs.to(ids_dtype)), want)


def test_non_contiguous_document_ids(device):
    """Ids as a view with other strides (a (seq, batch) tensor transposed) read as their values."""
    docs = _document_ids(2, 100, device)
    q, k, v = (torch.randn(2, 2, 100, 32, device=device) for _ in range(3))
    view = docs.t().contiguous().t()
    assert not view.is_contiguous()
    torch.testing.assert_close(flash_attention(q, k, v, document_ids=view),
                               flash_attention_reference(q, k, v, document_ids=docs),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seq_major,causal,dtype", [
    (False, True, F32), (True, False, F16),
    *[pytest.param(seq_major, causal, dtype, marks=pytest.mark.slow)
      for seq_major, causal, dtype in ((False, False, F32), (False, True, F16), (False, False, F16),
                                       (True, True, F32), (True, False, F32), (True, True, F16))],
], ids=_case_id)
def test_qkvpacked_matches_reference(compare, device, seq_major, causal, dtype):
    """flash_attention_qkvpacked with documents, on a contiguous (batch, seq, 3, heads, head_dim)
    and on the model's (seq, batch, ...) projection transposed."""
    batch, seq, heads, head_dim = 2, 100, 2, 64
    shape = (seq, batch, 3, heads, head_dim) if seq_major else (batch, seq, 3, heads, head_dim)
    leaf = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    docs = _document_ids(batch, seq, device)

    def packed_input(x):
        return x.transpose(0, 1) if seq_major else x

    def reference(x):
        q, k, v = (t.transpose(1, 2) for t in packed_input(x).unbind(2))
        return flash_attention_reference(q, k, v, causal, document_ids=docs).transpose(1, 2)

    compare(lambda x: flash_attention_qkvpacked(packed_input(x), causal, document_ids=docs),
            reference, [leaf], dtype, ["qkv"], atol32=1e-4)


@pytest.mark.parametrize("batch,heads,seq,head_dim,causal,dtype,dropout_p", [
    (2, 2, 17, 64, False, F32, 0.5),
    (2, 2, 100, 32, True, F32, 0.2),
    pytest.param(2, 2, 257, 128, False, F16, 0.3, marks=pytest.mark.slow),
], ids=_case_id)
def test_dropout_matches_the_reference_with_the_same_seed(compare, device, batch, heads, seq,
                                                          head_dim, causal, dtype, dropout_p):
    """Dropout and documents together: the kernels drop what the reference drops for the seed."""
    docs = _document_ids(batch, seq, device)
    compare(lambda q, k, v: flash_attention(q, k, v, causal, None, dropout_p, seed=7,
                                            document_ids=docs),
            lambda q, k, v: flash_attention_reference(q, k, v, causal, None, dropout_p, 7,
                                                      document_ids=docs),
            _inputs(batch, heads, seq, head_dim, dtype, device), dtype, "qkv", atol32=1e-4)


def test_dropout_qkvpacked_with_documents(compare, device):
    seq, batch, heads, head_dim = 100, 2, 2, 32
    leaf = torch.randn(seq, batch, 3, heads, head_dim, device=device, requires_grad=True)
    docs = _document_ids(batch, seq, device)

    def reference(x):
        q, k, v = (t.transpose(1, 2) for t in x.transpose(0, 1).unbind(2))
        return flash_attention_reference(q, k, v, True, None, 0.25, 99,
                                         document_ids=docs).transpose(1, 2)

    compare(lambda x: flash_attention_qkvpacked(x.transpose(0, 1), True, dropout_p=0.25, seed=99,
                                                document_ids=docs),
            reference, [leaf], F32, ["qkv"], atol32=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, pytest.param(0.3, marks=pytest.mark.slow)])
def test_one_document_a_row_equals_no_documents(device, causal, dropout_p):
    """One document a row (any id) masks nothing: output and gradients equal those without
    document_ids, bit for bit under the interpreter (the same blocks, the same sums)."""
    q, k, v = _inputs(2, 2, 100, 32, F32, device)
    docs = torch.tensor([[3], [-2]], device=device).expand(2, 100)

    def run(document_ids):
        out = flash_attention(q, k, v, causal, None, dropout_p, seed=5, document_ids=document_ids)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    grad_out = torch.randn(2, 2, 100, 32, device=device)
    for got, want in zip(run(docs), run(None)):
        if device == "cpu":
            assert torch.equal(got, want)
        else:  # compiled, the extra selects may change the instruction schedule
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _attention_document_by_document(q, k, v, causal, lengths_by_row):
    """Attention computed on each document's own slice of q, k, v (plain softmax in float64),
    concatenated: an independent statement of what the document mask means."""
    rows = []
    for b, lengths in enumerate(lengths_by_row):
        pieces, start = [], 0
        for length in lengths:
            qd, kd, vd = (t[b, :, start:start + length].double() for t in (q, k, v))
            scores = qd @ kd.transpose(-2, -1) / q.shape[-1] ** 0.5
            if causal:
                scores = scores + torch.full((length, length), float("-inf"), dtype=scores.dtype,
                                             device=scores.device).triu(1)
            pieces.append(torch.softmax(scores, -1) @ vd)
            start += length
        rows.append(torch.cat(pieces, dim=-2))
    return torch.stack(rows).to(q.dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [1, 17, 100, 257])
def test_reference_against_attention_document_by_document(device, seq, causal):
    batch = 3
    q, k, v = (torch.randn(batch, 2, seq, 32, device=device) for _ in range(3))
    lengths = [SPLITS[seq][b % len(SPLITS[seq])] for b in range(batch)]
    want = _attention_document_by_document(q, k, v, causal, lengths)
    got = flash_attention_reference(q, k, v, causal, document_ids=_document_ids(batch, seq, device))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_path_where_triton_cannot_run(monkeypatch):
    """Where the kernels cannot run, both functions run the reference with the documents."""
    monkeypatch.delenv("TRITON_INTERPRET")
    docs = _document_ids(2, 17, "cpu")
    qkv = torch.randn(2, 17, 3, 2, 32)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    want = flash_attention_reference(q, k, v, False, document_ids=docs)
    torch.testing.assert_close(flash_attention(q, k, v, False, document_ids=docs), want)
    torch.testing.assert_close(flash_attention_qkvpacked(qkv, False, document_ids=docs),
                               want.transpose(1, 2))


@pytest.mark.parametrize("make_ids,error,message", [
    (lambda d: [[0] * 8] * 2, TypeError,
     r"document_ids must be a torch.Tensor of shape \(batch, seq\) = \(2, 8\), got list"),
    (lambda d: torch.zeros(2, 8, device=d), TypeError,
     r"document_ids has dtype torch.float32; it must have an integer dtype"),
    (lambda d: torch.zeros(2, 8, device=d, dtype=torch.bool), TypeError,
     r"document_ids has dtype torch.bool; it must have an integer dtype"),
    (lambda d: torch.zeros(8, 2, device=d, dtype=torch.long), ValueError,
     r"document_ids has shape \(8, 2\) but q's \(batch, seq\) is \(2, 8\); document_ids must "
     r"be \(batch, seq\)"),
    (lambda d: torch.zeros(8, device=d, dtype=torch.long), ValueError,
     r"document_ids has shape \(8,\) but q's \(batch, seq\) is \(2, 8\)"),
    (lambda d: torch.zeros(2, 8, device="meta", dtype=torch.long), ValueError,
     r"document_ids is on meta but q is on .*; put document_ids on"),
])
def test_bad_document_ids(device, make_ids, error, message):
    q = torch.randn(2, 2, 8, 32, device=device)
    with pytest.raises(error, match=message):
        flash_attention(q, q, q, document_ids=make_ids(device))
    with pytest.raises(error, match=message):
        flash_attention_qkvpacked(torch.randn(2, 8, 3, 2, 32, device=device),
                                  document_ids=make_ids(device))
    with pytest.raises(error, match=message):
        check_document_ids(make_ids(device), 2, 8, q.device)


def test_check_document_ids_accepts_every_integer_dtype(device):
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        check_document_ids(torch.zeros(2, 8, dtype=dtype, device=device), 2, 8, device)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")   # the first document's rows
def test_causal_kernels_skip_the_blocks_no_document_reaches(device):
    """Two documents of 128 tokens (a block boundary for every block size the kernels use): the
    second one's queries never compute the first one's key blocks, nor the first one's keys the
    second one's query blocks. Each block they skip holds NaN, which any computed block would
    spread (0 x NaN), so finite results equal to the documents alone show the skipping."""
    seq, half = 256, 128
    ids = torch.tensor([[0] * half + [1] * half], device=device)
    q, k, v = (torch.randn(1, 2, seq, 32, device=device) for _ in range(3))
    grad = torch.randn(1, 2, seq, 32, device=device)

    def attend(q, k, v, grad, **kwargs):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = flash_attention(q, k, v, True, **kwargs)
        out.backward(grad)
        return out.detach(), q.grad, k.grad, v.grad

    second = slice(half, seq)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, :half] = v_nan[:, :, :half] = float("nan")      # the first document's keys
    out, dq, _, _ = attend(q, k_nan, v_nan, grad, document_ids=ids)
    alone = attend(q[:, :, second], k[:, :, second], v[:, :, second], grad[:, :, second])
    torch.testing.assert_close(out[:, :, second], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq[:, :, second], alone[1], rtol=1e-5, atol=1e-5)

    first = slice(0, half)
    q_nan, grad_nan = q.clone(), grad.clone()
    q_nan[:, :, half:] = grad_nan[:, :, half:] = float("nan")   # the second document's queries
    _, _, dk, dv = attend(q_nan, k, v, grad_nan, document_ids=ids)
    alone = attend(q[:, :, first], k[:, :, first], v[:, :, first], grad[:, :, first])
    torch.testing.assert_close(dk[:, :, first], alone[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv[:, :, first], alone[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_the_model_gives_a_document_in_a_window_what_it_gets_alone(device, backend):
    """The model's attention (Triton: packed, reading the fused projection) keeps each document
    of a window to itself: with the loader's ids and positions, a document's logits and the
    gradient of its loss equal what it gets as a sequence of its own."""
    from megagpt.config import KernelsConfig, ModelConfig
    from megagpt.data.documents import document_ids, document_positions
    from megagpt.model.gpt import GPTStage, StageSpec, init_weights

    eod, lengths = 5, (7, 1, 30, 12)          # the last one is cut by the window (no end token)
    m = ModelConfig(vocab_size=64, d_model=64, n_heads=2, n_layers=2, seq_length=sum(lengths),
                    dropout=0.0)
    kernels = KernelsConfig(attention=backend, layernorm="torch", softmax="torch",
                            bias_gelu="torch", cross_entropy="torch")
    stage = GPTStage(m, kernels, StageSpec(0, 2, True, True), device=device)
    init_weights(stage, m, seed=0)
    assert (stage.layers["0"].attn.ops.attention_qkvpacked is not None) == (backend == "triton")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(6, 64, (n,), generator=g).to(device) for n in lengths]
    for d in docs[:-1]:
        d[-1] = eod
    window = torch.cat(docs)[None]
    ids = document_ids(window, eod)
    packed = stage(window, positions=document_positions(ids), document_ids=ids)[0]
    third = slice(lengths[0] + lengths[1], lengths[0] + lengths[1] + lengths[2])
    packed[third].square().sum().backward()
    packed_grad = stage.layers["1"].attn.qkv.weight.grad.clone()
    stage.zero_grad()
    start = 0
    for d in docs:
        alone = stage(d[None])[0]
        torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-4, atol=1e-4)
        if len(d) == lengths[2]:
            alone.square().sum().backward()
        start += len(d)
    torch.testing.assert_close(packed_grad, stage.layers["1"].attn.qkv.weight.grad,
                               rtol=1e-4, atol=1e-4)

"""Document boundaries in a window (data.reset_attention_mask, reset_position_ids,
eod_mask_loss): the ids and positions against Megatron's rule, the loader's collation, and the
model: a window of documents gives each document what it gets alone."""
import pytest
import torch

from megagpt.config import ConfigError, parse_overrides
from megagpt.data.documents import (DocumentCollate, document_collate, document_ids,
                                    document_positions)
from megagpt.model.gpt import build_stage, init_weights
from megagpt.testing import TINY_EOD, TINY_VOCAB, tiny_config

EOD = TINY_EOD


def megatron_masks_and_positions(tokens, eod):
    """Megatron-LM's get_ltor_masks_and_position_ids (reset_position_ids and
    reset_attention_mask both on), written as its loops: (b, s, s) bool mask, True where a
    query may attend a key, and (b, s) positions."""
    b, s = tokens.shape
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).repeat(b, 1, 1)
    positions = torch.arange(s).repeat(b, 1)
    for row in range(b):
        prev = 0
        for i in (tokens[row] == eod).nonzero().flatten().tolist():
            mask[row, i + 1:, :i + 1] = False
            positions[row, i + 1:] -= i + 1 - prev
            prev = i + 1
    return mask, positions


def test_ids_and_positions_follow_megatrons_rule():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (6, 37), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.2] = EOD
    tokens[0, 0] = tokens[0, -1] = tokens[1, 5] = tokens[1, 6] = EOD   # at the ends, twice in a row
    tokens[2] = 3                                                     # no end of document at all
    docs = document_ids(tokens, EOD)
    mask, positions = megatron_masks_and_positions(tokens, EOD)
    same = docs[:, :, None] == docs[:, None, :]
    assert torch.equal(same & torch.tril(torch.ones(37, 37, dtype=torch.bool)), mask)
    assert torch.equal(document_positions(docs), positions)
    assert docs.dtype == torch.int32 and positions.dtype == torch.int64
    assert (docs[:, 1:] >= docs[:, :-1]).all() and (docs[2] == 0).all()


def test_a_small_window_by_hand():
    tokens = torch.tensor([[5, EOD, 6, 8, EOD, EOD, 9]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    assert document_positions(document_ids(tokens, EOD)).tolist() == [[0, 1, 0, 1, 2, 0, 0]]


def _samples():
    rows = [[5, EOD, 6, 8, EOD], [1, 2, 3, 4, 5]]
    return [{"tokens": torch.tensor(r), "labels": torch.tensor(r[1:] + [0]),
             "loss_mask": torch.ones(5)} for r in rows]


def test_the_collation_adds_what_each_setting_asks_for():
    both = DocumentCollate(EOD, reset_attention_mask=True, reset_position_ids=True,
                           eod_mask_loss=True)(_samples())
    assert both["document_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert both["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert both["loss_mask"].tolist() == [[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]
    masks_only = DocumentCollate(EOD, reset_attention_mask=True, reset_position_ids=False,
                                 eod_mask_loss=False)(_samples())
    assert "position_ids" not in masks_only and masks_only["loss_mask"].eq(1).all()
    positions_only = DocumentCollate(EOD, reset_attention_mask=False, reset_position_ids=True,
                                     eod_mask_loss=False)(_samples())
    assert "document_ids" not in positions_only and "position_ids" in positions_only


def test_loader_workers_collate_the_documents():
    loader = torch.utils.data.DataLoader(_samples(), batch_size=2, num_workers=1,
                                         collate_fn=document_collate(
                                             tiny_config(data__reset_attention_mask=True).data, EOD))
    batch = next(iter(loader))
    assert batch["document_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]


def test_no_setting_keeps_the_default_collation():
    assert document_collate(tiny_config().data, EOD) is None
    collate = document_collate(tiny_config(data__eod_mask_loss=True).data, EOD)
    assert isinstance(collate, DocumentCollate) and collate.eod_mask_loss


def _model(attention):
    cfg = tiny_config(kernels__attention=attention)
    stage = build_stage(cfg)
    init_weights(stage, cfg.model, seed=3)
    return stage.eval()


def _documents():
    g = torch.Generator().manual_seed(1)
    lengths = (5, 1, 7, 3)          # the last one is cut by the window: no end-of-document token
    docs = [torch.randint(10, TINY_VOCAB, (n,), generator=g) for n in lengths]
    for d in docs[:-1]:
        d[-1] = EOD
    return docs


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_window_of_documents_gives_each_what_it_gets_alone(attention):
    model = _model(attention)
    docs = _documents()
    window = torch.cat(docs)[None]
    ids = document_ids(window, EOD)
    with torch.no_grad():
        packed = model(window, positions=document_positions(ids), document_ids=ids)[0]
        plain = model(window)[0]
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)
    assert not torch.allclose(plain[5:], packed[5:], atol=1e-3)    # the masks change the others


def test_the_selective_recompute_path_takes_the_masks():
    cfg = tiny_config(training__recompute="selective")
    model = build_stage(cfg)
    init_weights(model, cfg.model, seed=3)
    window = torch.cat(_documents())[None]
    ids = document_ids(window, EOD)
    labels = torch.roll(window, -1, 1)
    model.eval()
    with torch.no_grad():
        expected = model(window, labels, document_ids=ids)[0]
    model.train()        # no dropout in tiny_config: the same loss, through the checkpoint
    got = model(window, labels, document_ids=ids)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bad_document_ids_are_named(attention):
    model = _model(attention)
    window = torch.cat(_documents())[None]
    with pytest.raises(ValueError, match="document_ids"):
        model(window, document_ids=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="document_ids"):
        model(window, document_ids=torch.zeros(window.shape))


def test_cuda_graphs_which_cannot_take_document_masks_are_refused():
    with pytest.raises(ConfigError, match="cuda_graphs.*reset_attention_mask"):
        tiny_config(training__cuda_graphs=True, data__reset_attention_mask=True)
    tiny_config(training__cuda_graphs=True, data__reset_position_ids=True,
                data__eod_mask_loss=True)      # positions and the loss mask are graph inputs


@pytest.mark.parametrize("argument", ["--reset-attention-mask", "--reset-position-ids",
                                      "--eod-mask-loss"])
def test_megatrons_arguments_are_answered(argument):
    field = argument[2:].replace("-", "_")
    with pytest.raises(ConfigError, match=f"here it is data.{field}=true"):
        parse_overrides([argument])


def test_mock_documents_end_with_the_end_of_document_id():
    from megagpt.data.mock import MockGPTDataset, mock_eod_id

    data = MockGPTDataset(20, 64, 100, seed=3, eod_id=99)
    for i in range(20):
        tokens = torch.cat([data[i]["tokens"], data[i]["labels"][-1:]])
        ends = (tokens == 99).nonzero().flatten()
        assert len(ends) >= 2 and torch.diff(torch.cat([torch.tensor([-1]), ends])).max() <= 32
        assert torch.equal(data[i]["tokens"], MockGPTDataset(20, 64, 100, 3, 99)[i]["tokens"])
    assert mock_eod_id(50256, 50257) == 50256 and mock_eod_id(50256, 1000) == 999
    with pytest.raises(ValueError, match="eod_id=100 must be a token id below vocab_size=100"):
        MockGPTDataset(2, 8, 100, eod_id=100)


def test_the_benchmarks_mock_batches_carry_documents_when_asked():
    from megagpt.data.mock import mock_microbatches

    g = torch.Generator().manual_seed(0)
    plain = mock_microbatches(tiny_config(), g)
    assert set(plain[0]) == {"tokens", "labels"} and len(plain) == 4
    cfg = tiny_config(data__reset_attention_mask=True, data__eod_mask_loss=True)
    batches = mock_microbatches(cfg, g)
    assert len(batches) == 4
    for mb in batches:
        eod = TINY_VOCAB - 1                  # GPT-2's end-of-document id is beyond the vocabulary
        assert torch.equal(mb["document_ids"], document_ids(mb["tokens"], eod))
        assert mb["tokens"].shape == (2, 16) and not mb["loss_mask"][mb["tokens"] == eod].any()


def test_the_memory_estimate_counts_the_document_mask_sdpa_and_eager_keep():
    from megagpt.estimate import activation_bytes_per_layer, kept_bytes

    def per_layer(attention, documents, recompute="none"):
        cfg = tiny_config(kernels__attention=attention, data__reset_attention_mask=documents,
                          model__n_heads=1)                     # head_dim 32 for Triton
        kept = kept_bytes(cfg, "cuda")
        return activation_bytes_per_layer(cfg.model, 2, 1, False, recompute, kept)
    b, s = 2, 16
    assert per_layer("sdpa", True) - per_layer("sdpa", False) == 4 * b * s * s   # fp32 mask
    assert per_layer("eager", True) - per_layer("eager", False) == b * s * s     # bool
    assert per_layer("eager", True, "selective") == per_layer("eager", False, "selective")
    assert per_layer("triton", True) == per_layer("triton", False)


def test_the_estimate_resolves_auto_attention_as_the_model_does():
    """auto is SDPA for a head size the Triton kernels lack (80 here), which keeps the mask;
    SDPA's CPU path with dropout (math) keeps none."""
    from megagpt.estimate import kept_bytes
    from megagpt.model.gpt import Ops

    cfg = tiny_config(data__reset_attention_mask=True, kernels__attention="auto",
                      model__d_model=160, model__n_heads=2)
    assert Ops(cfg.kernels, "cuda", 0.0, 80).attention_backend == "sdpa"
    assert kept_bytes(cfg, "cuda").document_mask == 4
    with_dropout = tiny_config(data__reset_attention_mask=True, kernels__attention="sdpa",
                               model__dropout=0.1)
    assert kept_bytes(with_dropout, "cpu").attention == "math"
    assert kept_bytes(with_dropout, "cpu").document_mask == 0


def test_generation_with_document_ids_is_refused():
    from megagpt.model.gpt import KVCache

    model = _model("sdpa")
    window = torch.cat(_documents())[None]
    cache = KVCache(torch.ones(1, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="document_ids: not with cache="):
        model(window, cache=cache, document_ids=document_ids(window, EOD))

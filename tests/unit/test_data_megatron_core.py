"""The data against Megatron's own code (megatron-core, installed with the test extras on Linux
x86-64): .bin/.idx files both ways, byte for byte; the GPT sample index arrays of its GPTDataset
and of its split builder; blending within one sample of its greedy order (docs/data.md says why
the order itself differs). The other data tests check ports of Megatron's loops; these run them."""
import gzip
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.data.blend import blending_indices
from megagpt.data.documents import DocumentCollate
from megagpt.data.gpt_dataset import GPTDataset, build_gpt_datasets
from megagpt.data.indexed import (IndexedDataset, IndexedDatasetWriter, best_dtype, merge_datasets,
                                  write_documents)
from megagpt.data.preprocess import preprocess_jsonl
from megagpt.data.tokenizer import load_tokenizer

pytest.importorskip("megatron.core", reason="megatron-core is a test extra on Linux x86-64 only")
from megatron.core.datasets import helpers_cpp  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder)
from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from megatron.core.datasets.utils import Split  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # megatron-core's NumPy use

CORPUS = Path(__file__).resolve().parents[2] / "megagpt/data/assets/shakespeare.jsonl.gz"
DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]
# what Megatron's GPTDataset reads of a tokenizer (its cache description and end of document)
TOKENIZER = types.SimpleNamespace(vocab_size=1000, eod=999, unique_identifiers={"name": "stub"})


def megatron_merge(output, dtype, *prefixes):
    builder = IndexedDatasetBuilder(f"{output}.bin", dtype=dtype)
    for prefix in prefixes:
        builder.add_index(str(prefix))
    builder.finalize(f"{output}.idx")


def megatron_config(seed, seq_length, **fields):
    return GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, tokenizer=TOKENIZER,
                            eod_mask_loss=False, reset_position_ids=False,
                            reset_attention_mask=False, **fields)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_our_files_are_megatrons_to_read(tmp_path, dtype):
    """Documents of 0 to 3 sequences of 0 to 6 tokens, in each of the format's dtypes."""
    rng = np.random.default_rng(0)
    sequences, boundaries = [], [0]
    with IndexedDatasetWriter(tmp_path / "d", dtype) as writer:
        for _ in range(12):
            lengths = rng.integers(0, 7, size=int(rng.integers(0, 4)))
            tokens = rng.integers(0, 120, size=int(lengths.sum())).astype(dtype)
            writer.add_sequences(tokens, lengths)
            writer.end_documents([writer.num_sequences])
            sequences += np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
            boundaries.append(writer.num_sequences)
        writer.finalize()
    theirs = MegatronIndexed(str(tmp_path / "d"))
    assert theirs.index.dtype == dtype and list(theirs.document_indices) == boundaries
    assert len(theirs) == len(sequences)
    assert all(np.array_equal(theirs[i], s) for i, s in enumerate(sequences))


def test_our_writer_and_merge_write_megatrons_bytes(tmp_path):
    rng = np.random.default_rng(1)
    documents = [rng.integers(0, 50000, size=int(rng.integers(1, 30))) for _ in range(40)]
    write_documents(tmp_path / "ours", documents, np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for document in documents:
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    megatron_merge(tmp_path / "theirs_merged", np.uint16, tmp_path / "theirs", tmp_path / "ours")
    merge_datasets([tmp_path / "theirs", tmp_path / "ours"], tmp_path / "ours_merged")
    for ours, theirs in (("ours", "theirs"), ("ours_merged", "theirs_merged")):
        for ext in (".bin", ".idx"):
            assert (tmp_path / (ours + ext)).read_bytes() == \
                (tmp_path / (theirs + ext)).read_bytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_megatrons_files_are_ours_to_read(tmp_path, dtype):
    """Its builder's two ways of writing documents (items then end_document; add_document with
    several, maybe empty, sequences) and its merge (add_index)."""
    rng = np.random.default_rng(2)
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=dtype)
    sequences, boundaries = [], [0]
    for k in range(12):
        if k % 2:
            for _ in range(k % 3):
                sequences.append(rng.integers(0, 120, size=int(rng.integers(0, 6))))
                builder.add_item(torch.tensor(sequences[-1]))
            builder.end_document()
        else:
            lengths = [int(x) for x in rng.integers(0, 6, size=int(rng.integers(0, 4)))]
            tokens = rng.integers(0, 120, size=sum(lengths))
            builder.add_document(torch.tensor(tokens), lengths)
            sequences += np.split(tokens, np.cumsum(lengths)[:-1]) if lengths else []
        boundaries.append(len(sequences))
    builder.finalize(str(tmp_path / "d.idx"))
    megatron_merge(tmp_path / "m", dtype, tmp_path / "d", tmp_path / "d")
    ours, merged = IndexedDataset(tmp_path / "d"), IndexedDataset(tmp_path / "m")
    assert ours.dtype == np.dtype(dtype) and list(ours.doc_idx) == boundaries
    assert all(np.array_equal(ours[i], s.astype(dtype)) for i, s in enumerate(sequences))
    assert list(merged.doc_idx) == boundaries + [b + len(sequences) for b in boundaries[1:]]
    assert all(np.array_equal(merged[i], sequences[i % len(sequences)].astype(dtype))
               for i in range(len(merged)))


def test_preprocessed_files_are_megatrons_to_read(tmp_path):
    """Two keys a line, each document ending in the end-of-document id; the dtype rule too."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [json.loads(next(f)) for _ in range(4)]
    lines = [dict(line, text=line["text"][:2000]) for line in lines]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    preprocess_jsonl(tmp_path / "in.jsonl", tmp_path / "p", "gpt2", ("text", "title"),
                     append_eod=True, progress=False)
    tokenizer = load_tokenizer("gpt2")
    assert all(best_dtype(v) == DType.optimal_dtype(v) for v in (1, 50257, 65499, 65500, 10**6))
    for key in ("text", "title"):
        theirs = MegatronIndexed(str(tmp_path / f"p_{key}_document"))
        assert theirs.index.dtype == np.uint16
        assert list(theirs.document_indices) == list(range(len(lines) + 1))
        for i, line in enumerate(lines):
            assert theirs[i].tolist() == tokenizer.encode(line[key]) + [tokenizer.eod_id]


# one epoch (seed 5 puts an empty document first), a separate last epoch (21, 60 and 40
# samples), epochs mixed (35, 123, 200), one sample
@pytest.mark.parametrize("seq_length,num_samples,seed", [
    (8, None, 5), (8, 5, 1), (8, 21, 1), (8, 35, 1), (7, 60, 1), (16, 40, 2), (5, 123, 3),
    (3, 200, 4)])
def test_the_sample_index_is_megatrons_gpt_datasets(tmp_path, seq_length, num_samples, seed):
    sizes = [3, 0, 17, 5, 9, 1, 0, 12, 30, 4, 7, 2, 25, 6, 8, 11, 0, 19, 3, 14]
    rng = np.random.default_rng(3)
    write_documents(tmp_path / "d", [rng.integers(0, 999, size=s) for s in sizes], np.uint16)
    documents = np.arange(1, 18, dtype=np.int32)
    theirs = MegatronGPTDataset(
        MegatronIndexed(str(tmp_path / "d")), str(tmp_path / "d"), documents, num_samples,
        Split.train, megatron_config(seed, seq_length, split="1,0,0",
                                     path_to_cache=str(tmp_path / "theirs")))
    ours = GPTDataset(IndexedDataset(tmp_path / "d"), documents.astype(np.int64), seq_length,
                      num_samples, seed, cache_dir=tmp_path / "ours")
    for a, b in ((theirs.document_index, ours.doc_idx), (theirs.sample_index, ours.sample_idx),
                 (theirs.shuffle_index, ours.shuffle_idx)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert len(theirs) == len(ours)
    for i in range(len(theirs)):
        assert torch.equal(theirs[i]["tokens"], ours[i]["tokens"])
        assert torch.equal(theirs[i]["labels"], ours[i]["labels"])


def test_the_splits_are_megatrons_builders(tmp_path):
    rng = np.random.default_rng(4)
    write_documents(tmp_path / "d", [rng.integers(0, 999, size=int(rng.integers(1, 60)))
                                     for _ in range(100)], np.uint16)
    sizes = [300, 20, 10]
    config = megatron_config(7, 32, blend=([str(tmp_path / "d")], None), split="80,15,5",
                             path_to_cache=str(tmp_path / "theirs"))
    theirs = BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()
    ours = build_gpt_datasets(str(tmp_path / "d"), split="80,15,5", seq_length=32,
                              num_samples=tuple(sizes), seed=7, cache_dir=tmp_path / "ours")
    assert len(theirs) == len(ours) == 3
    for t, o in zip(theirs, ours):
        for a, b in ((t.document_index, o.doc_idx), (t.sample_index, o.sample_idx),
                     (t.shuffle_index, o.shuffle_idx)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.3], [0.2, 0.3, 0.5], [5, 3, 1, 1]])
def test_blending_counts_are_within_one_of_megatrons(weights):
    """Not Megatron's order (docs/data.md, Blending), but at every prefix each dataset's count
    within one sample of its greedy choice's."""
    w = np.asarray(weights, float) / sum(weights)
    theirs, their_sample = np.zeros(1000, np.int16), np.zeros(1000, np.int64)
    helpers_cpp.build_blending_indices(theirs, their_sample, w, len(w), 1000, False)
    ours, _ = blending_indices(weights, 1000)
    one_hot = np.eye(len(w), dtype=np.int64)
    counts = np.cumsum(one_hot[ours.astype(int)], 0), np.cumsum(one_hot[theirs], 0)
    assert np.abs(counts[0] - counts[1]).max() <= 1


@pytest.mark.parametrize("reset_mask,reset_positions,eod_mask_loss", [
    (True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_the_document_settings_are_megatrons_masks_and_positions(reset_mask, reset_positions,
                                                                 eod_mask_loss):
    """data.reset_attention_mask, reset_position_ids and eod_mask_loss against Megatron's
    _get_ltor_masks_and_position_ids on random windows (end of document 3 of 6 ids, so windows
    start, end and run with ends of documents)."""
    generator, eod = torch.Generator().manual_seed(0), 3
    collate = DocumentCollate(eod, reset_attention_mask=reset_mask,
                              reset_position_ids=reset_positions, eod_mask_loss=eod_mask_loss)
    for _ in range(100):
        s = int(torch.randint(1, 40, (1,), generator=generator))
        tokens = torch.randint(0, 6, (s,), generator=generator)
        masked, loss_mask, positions = _get_ltor_masks_and_position_ids(
            tokens, eod, reset_positions, reset_mask, eod_mask_loss, True)
        batch = collate([{"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(s)}])
        documents = batch.get("document_ids", torch.zeros(1, s, dtype=torch.long))[0]
        visible = (documents[:, None] == documents[None, :]) & torch.ones(s, s).tril().bool()
        assert torch.equal(~visible, masked[0])               # Megatron's True: not attended
        assert torch.equal(batch.get("position_ids", torch.arange(s)[None])[0], positions)
        assert torch.equal(batch["loss_mask"][0], loss_mask)

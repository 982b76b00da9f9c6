"""GPT samples: Megatron's index arrays (checked against a port of its loop), epochs, splits,
caching, blending proportions, and the builder the trainer calls."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from megagpt.data.blend import BlendedDataset, DataPathError, blending_indices, parse_data_path
from megagpt.data.gpt_dataset import (DatasetBuildError, GPTDataset, build_gpt_datasets, build_sample_index,
                                      gather_sample, parse_split, split_ranges)
from megagpt.data.indexed import IndexedDataset, write_documents
from megagpt.data.mock import MockGPTDataset, build_mock_datasets


def megatron_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """Megatron-LM's build_sample_idx (helpers.cpp), line for line in Python."""
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_idx_index, doc_offset = 0, 0
    for i in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                if doc_idx_index == len(doc_idx) - 1:
                    doc_offset = sizes[doc_idx[doc_idx_index]] - 1
                    break
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[i] = doc_idx_index, doc_offset
    return sample_idx


def megatron_greedy_blend(weights, size):
    """Megatron-LM's build_blending_indices (helpers.cpp), in Python."""
    w = np.asarray(weights, float) / np.sum(weights)
    counts = np.zeros(len(w), np.int64)
    out = np.zeros(size, np.int64)
    for n in range(size):
        i = int(np.argmax(w * max(n, 1) - counts))
        out[n] = i
        counts[i] += 1
    return out


def max_deviation(dataset_index, weights):
    """Largest |count of dataset i among the first n samples - w_i * n| over every n and i."""
    w = np.asarray(weights, float) / np.sum(weights)
    onehot = np.eye(len(w))[dataset_index]
    n = np.arange(1, len(dataset_index) + 1)[:, None]
    return np.abs(np.cumsum(onehot, axis=0) - w * n).max()


def stream_of(sizes, doc_idx):
    """Each document's tokens are (doc id * 1000 + position), concatenated in doc_idx order."""
    return np.concatenate([np.arange(sizes[d]) + 1000 * d for d in doc_idx])


def test_sample_index_equals_megatron(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = rng.integers(1, 60, rng.integers(1, 30)).astype(np.int32)
        seq_length, num_samples = int(rng.integers(2, 50)), int(rng.integers(1, 100))
        doc_idx, sample_idx, shuffle_idx = build_sample_index(sizes, np.arange(len(sizes)), seq_length,
                                                              num_samples, seed=3)
        ref = megatron_sample_idx(sizes, doc_idx, seq_length, len(sample_idx) - 1)
        assert np.array_equal(sample_idx, ref)
        assert len(shuffle_idx) >= num_samples


def test_samples_are_consecutive_windows_even_with_empty_documents():
    rng = np.random.default_rng(1)
    for _ in range(30):
        sizes = rng.integers(0, 40, rng.integers(2, 30)).astype(np.int32)
        sizes[0] = 5
        seq_length = int(rng.integers(2, 30))
        doc_idx, sample_idx, _ = build_sample_index(sizes, np.arange(len(sizes)), seq_length, 50, seed=0)
        stream = stream_of(sizes, doc_idx)

        def get(d, offset, length):
            doc = np.arange(sizes[d]) + 1000 * d
            return doc[offset:] if length is None else doc[offset:offset + length]
        for j in range(len(sample_idx) - 1):
            window = stream[j * seq_length: j * seq_length + seq_length + 1]
            assert np.array_equal(gather_sample(get, doc_idx, sample_idx, j), window)


def megatron_indices(sizes, documents, seq_length, num_samples, seed):
    """Megatron-core's GPTDataset._build_document_sample_shuffle_indices (megatron/core/datasets/
    gpt_dataset.py, with helpers.cpp's build_sample_idx), transcribed loop by loop: the reference
    our vectorised build must equal, array for array."""
    tokens_per_epoch = int(sizes[documents].sum())
    num_epochs, num_tokens = 1, tokens_per_epoch
    while num_samples is not None and num_tokens < num_samples * seq_length + 1:
        num_epochs, num_tokens = num_epochs + 1, num_tokens + tokens_per_epoch
    separate, sans_final = False, None
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - sans_final < int(0.80 * per_epoch)
    random_state = np.random.RandomState(seed)

    def document_index(epochs, separate_final):
        if not separate_final or epochs == 1:
            index = np.mgrid[0:epochs, 0:len(documents)][1]
            index[:] = documents
            index = index.reshape(-1).astype(np.int32)
            random_state.shuffle(index)
            return index
        return np.concatenate((document_index(epochs - 1, False), document_index(1, False)))
    doc_idx = document_index(num_epochs, separate)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((total + 1, 2), dtype=np.int64)
    d, offset = 0, 0
    for sample in range(1, total + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[d]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                d, offset = d + 1, 0
        sample_idx[sample] = (d, offset)

    def shuffle_index(first, size):
        head = np.arange(first, dtype=np.uint32)
        random_state.shuffle(head)
        if first == size:
            return head
        tail = np.arange(first, size, dtype=np.uint32)
        random_state.shuffle(tail)
        return np.concatenate((head, tail))
    return doc_idx, sample_idx, shuffle_index(sans_final if separate else total, total)


@pytest.mark.parametrize("num_samples", [None, 5, 26, 30, 45, 46, 52, 70, 78, 139])
@pytest.mark.parametrize("seed", [0, 1234])
def test_the_index_arrays_are_megatrons_for_the_same_seed(num_samples, seed):
    """doc_idx, sample_idx and shuffle_idx equal Megatron's, dtypes too. The split holds 106
    tokens, 26 samples of 4 an epoch; the last epoch is served apart when fewer than
    int(0.8 x 26) = 20 of its samples are used: one epoch (None, 5, 26); the last epoch apart (30,
    45: 4 and 19 of it, 70 and 139); mixed with the others (46: 20, 52: exactly two epochs, 78:
    three). Documents of length 0 and 1 among them."""
    sizes = np.random.default_rng(3).integers(0, 25, 40).astype(np.int32)
    sizes[[4, 9]] = 0, 1
    documents = np.arange(5, 15)                        # a split's range
    ours = build_sample_index(sizes, documents, 4, num_samples, seed)
    theirs = megatron_indices(sizes, documents, 4, num_samples, seed)
    for name, a, b in zip(("doc_idx", "sample_idx", "shuffle_idx"), ours, theirs):
        assert np.array_equal(a, b), name
    assert (ours[0].dtype, ours[2].dtype) == (theirs[0].dtype, theirs[2].dtype)
    if num_samples == 30:      # the full epochs' samples come first, then the last one's
        full = int(((2 * sizes[documents].sum()) - 1) // 4)
        assert sorted(ours[2][:full]) == list(range(full))


def test_billion_token_index_is_vectorised():
    # 1e9 tokens in 1M documents; a loop over samples or tokens would take minutes
    sizes = np.random.default_rng(0).integers(1, 2000, 1_000_000).astype(np.int32)
    doc_idx, sample_idx, shuffle_idx = build_sample_index(sizes, np.arange(len(sizes)), 2048, None, 1)
    assert len(doc_idx) == 1_000_000
    assert len(shuffle_idx) == (int(sizes.sum(dtype=np.int64)) - 1) // 2048 == len(sample_idx) - 1


def test_split_ranges_and_errors():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("98/2/0", 50) == [(0, 49), (49, 50), (50, 50)]
    # Megatron-core rounds the cumulative bookends (the old rounding put 48 in train here)
    assert split_ranges("969,30,1", 49) == [(0, 47), (47, 49), (49, 49)]
    assert split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    assert np.allclose(parse_split("949,50,1"), [0.949, 0.05, 0.001])
    for bad in ("a,b,c", "-1,1,1", "0,0,0", "1,2,3,4", ""):
        with pytest.raises(DatasetBuildError, match=r"data.split=.*must be up to three non-negative"):
            parse_split(bad)


def test_parse_data_path_forms_and_errors():
    assert parse_data_path("p") == [(None, "p")]
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_path([2, "a", 1, "b"]) == [(2.0, "a"), (1.0, "b")]
    assert parse_data_path(["a", "b"]) == [(None, "a"), (None, "b")]
    assert parse_data_path([]) == []
    for bad, message in ((["0.7", "a", "0.3"], "odd number"), (["-1", "a"], "positive weight"),
                         ([0.5, 3], "positive weight"), (["a", 3], "must be dataset prefixes")):
        with pytest.raises(DataPathError, match=message):
            parse_data_path(bad, "data.train_data_path")


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [3, 1]])
def test_blend_stays_within_one_sample_of_the_weights(weights):
    dataset_index, sample_index = blending_indices(weights, 5000)
    assert max_deviation(dataset_index, weights) <= 1.0
    assert max_deviation(dataset_index, weights) <= max_deviation(megatron_greedy_blend(weights, 5000), weights)
    for i in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert np.array_equal(sample_index[dataset_index == i], np.arange(np.sum(dataset_index == i)))


def test_the_blend_of_fewer_samples_is_a_prefix_of_the_blend_of_more():
    """What BlendedDataset.same_order relies on: a blend's order does not depend on its size."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        weights = rng.random(int(rng.integers(2, 6))) + 0.01
        n = int(rng.integers(1, 2000))
        more = int(n + rng.integers(1, 2000))
        fewer, longer = blending_indices(weights, n), blending_indices(weights, more)
        assert np.array_equal(fewer[0], longer[0][:n]) and np.array_equal(fewer[1], longer[1][:n])


def test_blend_no_worse_than_megatron_for_five_datasets():
    weights = [0.05, 0.15, 0.2, 0.25, 0.35]
    ours = max_deviation(blending_indices(weights, 3000)[0], weights)
    assert ours <= max_deviation(megatron_greedy_blend(weights, 3000), weights)


@pytest.fixture()
def corpus(tmp_path):
    """100 documents of 5..24 tokens; document d holds d * 1000 + position (< 65500 fits uint16:
    tokens are taken modulo 60000)."""
    rng = np.random.default_rng(0)
    docs = [(np.arange(int(rng.integers(5, 25))) + 1000 * d) % 60000 for d in range(100)]
    write_documents(tmp_path / "c", docs)
    return str(tmp_path / "c"), docs


def test_items_are_shifted_windows(corpus, tmp_path):
    prefix, _ = corpus
    train, valid, test = build_gpt_datasets(prefix, split="80,20,0", seq_length=16,
                                            num_samples=(50, 5, 0), seed=1, cache_dir=tmp_path / "cache")
    assert test is None and len(train) >= 50 and len(valid) >= 5
    item = train[3]
    assert set(item) == {"tokens", "labels", "loss_mask"}
    assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (16,)
    assert item["tokens"].dtype == item["labels"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32 and bool((item["loss_mask"] == 1).all())
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    full = train.tokens(3)
    assert torch.equal(item["labels"], torch.from_numpy(full[1:].astype(np.int64)))


def test_split_documents_are_disjoint(corpus, tmp_path):
    prefix, _ = corpus
    train, valid, test = build_gpt_datasets(prefix, split="70,20,10", seq_length=8,
                                            num_samples=(10, 10, 10), seed=1, cache_dir=tmp_path / "k")
    used = [set(np.unique(ds.doc_idx).tolist()) for ds in (train, valid, test)]
    assert used == [set(range(70)), set(range(70, 90)), set(range(90, 100))]


def test_separate_validation_and_test_prefixes(corpus, tmp_path):
    prefix, _ = corpus
    other = write_documents(tmp_path / "v", [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 4).prefix
    train, valid, test = build_gpt_datasets([prefix], [other], [], split="1,1,1", seq_length=8,
                                            num_samples=(10, 3, 4), seed=1, cache_dir=tmp_path / "k")
    assert set(np.unique(train.doc_idx)) == set(range(100)) and test is None
    assert valid.indexed.prefix == other


def test_same_seed_same_order_other_seed_other_order(corpus, tmp_path):
    prefix, _ = corpus
    def first_tokens(seed, cache):
        ds = build_gpt_datasets(prefix, split="1,0,0", seq_length=8, num_samples=(20, 0, 0), seed=seed,
                                cache_dir=tmp_path / cache)[0]
        return [ds[i]["tokens"].tolist() for i in range(20)]
    assert first_tokens(1, "a") == first_tokens(1, "b")
    assert first_tokens(1, "a") != first_tokens(2, "a")


def test_index_cache_is_hashed_atomic_and_reused(corpus, tmp_path):
    prefix, _ = corpus
    cache = tmp_path / "cache"
    ds = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 40, seed=7, cache_dir=cache)
    names = sorted(p.name for p in cache.iterdir())
    digest = names[0].split("_")[2]
    assert len(digest) == 16
    assert names == [f"c_train_{digest}_{kind}" for kind in
                     ("desc.json", "doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy")]
    again = GPTDataset(ds.indexed, np.arange(100), 16, 40, seed=7, cache_dir=cache)
    assert isinstance(again.sample_idx, np.memmap)  # loaded, not rebuilt
    assert np.array_equal(again.shuffle_idx, ds.shuffle_idx)
    GPTDataset(ds.indexed, np.arange(100), 16, 40, seed=8, cache_dir=cache)
    assert len(list(cache.iterdir())) == 8  # another seed, other files
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary file left
    # readable as a plain open() would leave them (others may share the corpus and its cache)
    mask = os.umask(0o022)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in cache.iterdir()} == {0o666 & ~mask}


def test_the_data_digest_follows_the_documents_lengths_and_the_blend(tmp_path):
    """What a checkpoint records of its training data: the same for the same documents (any
    seed or sample count), another when a document's length or the split's documents differ;
    a blend's, from its datasets'."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, n).tolist() for n in (30, 41, 17, 25)]
    a = IndexedDataset(write_documents(tmp_path / "a", docs).prefix)
    b = IndexedDataset(write_documents(tmp_path / "b", docs[:3] + [docs[3][:-1]]).prefix)
    digest = GPTDataset(a, np.arange(4), 8, 10, seed=1, cache_dir=tmp_path).data_digest
    assert GPTDataset(a, np.arange(4), 8, 30, seed=2, cache_dir=tmp_path).data_digest == digest
    assert GPTDataset(b, np.arange(4), 8, 10, seed=1, cache_dir=tmp_path).data_digest != digest
    assert GPTDataset(a, np.arange(3), 8, 10, seed=1, cache_dir=tmp_path).data_digest != digest
    swapped = IndexedDataset(write_documents(tmp_path / "s", [docs[1], docs[0]] + docs[2:]).prefix)
    assert GPTDataset(swapped, np.arange(4), 8, 10, seed=1,          # the same lengths in
                      cache_dir=tmp_path).data_digest != digest      # another order
    parts = [GPTDataset(x, np.arange(4), 8, 10, seed=1, cache_dir=tmp_path) for x in (a, b)]
    index, sample = blending_indices([0.5, 0.5], 10)
    blend = BlendedDataset(parts, [0.5, 0.5], index, sample).data_digest
    assert BlendedDataset([parts[0], parts[0]], [0.5, 0.5], index, sample).data_digest != blend
    parts.reverse()
    assert BlendedDataset(parts, [0.5, 0.5], index, sample).data_digest != blend
    mock = MockGPTDataset(10, 8, 100, seed=1)
    assert BlendedDataset([parts[0], mock], [0.5, 0.5], index, sample).data_digest is None


def test_default_cache_next_to_data_and_unwritable_cache(corpus, tmp_path):
    prefix, _ = corpus
    build_gpt_datasets(prefix, split="1,0,0", seq_length=8, num_samples=(5, 0, 0))
    assert len(list((tmp_path / "index-cache").iterdir())) == 4
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetBuildError, match="cannot write the index cache .*data.cache_dir"):
        build_gpt_datasets(prefix, split="1,0,0", seq_length=8, num_samples=(5, 0, 0),
                           cache_dir=tmp_path / "file" / "sub")


def test_builder_errors(corpus, tmp_path):
    prefix, _ = corpus
    with pytest.raises(DatasetBuildError, match="data.train_data_path is empty"):
        build_gpt_datasets([], seq_length=8, num_samples=(1, 0, 0))
    with pytest.raises(DatasetBuildError, match=r"data.split='100,0,0' leaves the valid split .*no documents"):
        build_gpt_datasets(prefix, split="100,0,0", seq_length=8, num_samples=(1, 1, 0), cache_dir=tmp_path)
    with pytest.raises(DatasetBuildError, match="three non-negative counts"):
        build_gpt_datasets(prefix, seq_length=8, num_samples=(1, 0))
    with pytest.raises(DataPathError, match="data.train_data_path"):
        build_gpt_datasets(["0.5", prefix, "0.5"], seq_length=8, num_samples=(1, 0, 0))
    with pytest.raises(DatasetBuildError, match=r"^data.train_data_path: indexed dataset .*nope\.idx "
                                                r"does not exist.*fix: run tools/preprocess_data.py"):
        build_gpt_datasets(str(tmp_path / "nope"), seq_length=8, num_samples=(1, 0, 0))
    with pytest.raises(DatasetBuildError, match=r"^data.val_data_path: .*fix: drop the \.bin: '.*c' "
                                                r"names both files"):
        build_gpt_datasets(prefix, prefix + ".bin", seq_length=8, num_samples=(1, 1, 0))
    empty = write_documents(tmp_path / "empty_docs", [[], []])
    with pytest.raises(DatasetBuildError, match=r"'.*empty_docs' \(train split\): the 2 documents "
                                                r"selected hold no token"):
        GPTDataset(empty, np.arange(2), 8, 1, seed=1, cache_dir=tmp_path)


def test_blended_builder_realises_the_weights(tmp_path):
    a = write_documents(tmp_path / "a", [np.full(50, 1)] * 20).prefix       # tokens all 1
    b = write_documents(tmp_path / "b", [np.full(50, 2)] * 20).prefix       # tokens all 2
    train, _, _ = build_gpt_datasets(["0.7", a, "0.3", b], split="1,0,0", seq_length=10,
                                     num_samples=(1000, 0, 0), seed=3, cache_dir=tmp_path / "k")
    assert isinstance(train, BlendedDataset) and len(train) == 1000
    sources = np.array([int(train[i]["tokens"][0]) for i in range(1000)])
    assert abs(np.sum(sources == 1) - 700) <= 1 and abs(np.sum(sources == 2) - 300) <= 1
    unweighted, _, _ = build_gpt_datasets([a, b], split="1,0,0", seq_length=10, num_samples=(100, 0, 0),
                                          cache_dir=tmp_path / "k")
    assert np.allclose(unweighted.weights, [0.5, 0.5])  # equal token counts
    short = write_documents(tmp_path / "s", [np.full(10, 3)] * 20).prefix   # as many documents
    by_tokens, _, _ = build_gpt_datasets([a, short], split="1,0,0", seq_length=10,
                                         num_samples=(100, 0, 0), cache_dir=tmp_path / "k")
    assert np.allclose(by_tokens.weights, [5 / 6, 1 / 6])  # tokens, not documents, as Megatron


def _first_samples(ds, n):
    return [ds[i]["tokens"].tolist() for i in range(n)]


def test_same_order_says_whether_another_sample_count_keeps_the_order(corpus, tmp_path):
    """A resume that changes the training samples' count (max_steps, the global batch) keeps
    their order unless a dataset's epochs, or how its last epoch is shuffled, change: same_order
    answers that without building the other index, and agrees with building it. The corpus's
    70 training documents make 65 samples of 16 an epoch."""
    prefix, _ = corpus
    def train(n, cache):
        return build_gpt_datasets(prefix, split="70,30,0", seq_length=16, num_samples=(n, 0, 0),
                                  seed=4, cache_dir=tmp_path / cache)[0]
    ds = train(100, "a")          # 2 epochs, the second on its own (100 - 64 < 80% of 65)
    for n, kept in [(100, True), (70, True), (80, True), (60, False), (120, False), (138, False),
                    (300, False)]:
        assert ds.same_order(n) is kept, n
        other = train(n, f"n{n}")
        common = min(n, 100)
        assert (_first_samples(other, common) == _first_samples(ds, common)) is kept, n
    blend = build_gpt_datasets(["0.6", prefix, "0.4", prefix], split="70,30,0", seq_length=16,
                               num_samples=(150, 0, 0), seed=4, cache_dir=tmp_path / "b")[0]
    assert isinstance(blend, BlendedDataset)
    assert blend.same_order(150) and not blend.same_order(400)
    assert MockGPTDataset(10, 8, 50).same_order(1000)


def test_data_made_with_another_tokenizer_is_refused_by_name(tmp_path):
    """Ids of one tokenizer read as another's train on garbled text without a word when both
    have as many ids; the record preprocess_data.py writes beside the data (P.meta.json) names
    the tokenizer, and the one in data.tokenizer_path must be it."""
    from megagpt.data.indexed import IndexedDatasetWriter, tokenizer_record
    from megagpt.data.tokenizer import load_tokenizer
    gpt2 = load_tokenizer("gpt2")
    other = dict(tokenizer_record(gpt2), tokenizer="runs/tok", vocab_sha256="0" * 64)
    for name, record in (("mine", tokenizer_record(gpt2)), ("theirs", other), ("megatron", None)):
        with IndexedDatasetWriter(tmp_path / name, np.uint16, record) as w:
            for _ in range(10):
                w.add_document(np.arange(30))
            w.finalize()
    build = functools.partial(build_gpt_datasets, split="1,0,0", seq_length=8,
                              num_samples=(10, 0, 0), cache_dir=tmp_path / "k", tokenizer=gpt2)
    assert build([str(tmp_path / "mine"), str(tmp_path / "megatron")])[0] is not None
    with pytest.raises(DatasetBuildError, match=rf"data.train_data_path: '{tmp_path}/theirs' "
                                                rf"holds the ids of the tokenizer runs/tok \(50257 "
                                                rf"ids, fingerprint 000000000000, as "
                                                rf"{tmp_path}/theirs.meta.json records\), but "
                                                rf"data.tokenizer_path=gpt2 is another \(50257 "
                                                rf"ids, fingerprint {gpt2.fingerprint[:12]}\); "
                                                rf"fix: set data.tokenizer_path to the tokenizer "
                                                rf"the data was made with"):
        build([str(tmp_path / "mine"), str(tmp_path / "theirs")])


def test_a_tokenizer_that_only_adds_tokens_reads_the_data_of_its_base(tmp_path):
    """GPT-2 with a padding token added after its ids gives GPT-2's data the same meaning: its
    record's fingerprint and size tell it without the vocabulary. The other way round (data of
    the larger tokenizer, trained with GPT-2) and a base that splits text otherwise are
    refused."""
    import tokenizers

    from megagpt.data.indexed import IndexedDatasetWriter, tokenizer_record
    from megagpt.data.tokenizer import Tokenizer, load_tokenizer
    gpt2 = load_tokenizer("gpt2")

    def added(spec: str, source: str) -> Tokenizer:
        backend = tokenizers.Tokenizer.from_str(spec)
        backend.add_special_tokens(["<|pad|>"])
        return Tokenizer(backend, source)
    padded = added(gpt2.backend.to_str(), "padded")
    lowercase = tokenizers.Tokenizer.from_str(gpt2.backend.to_str())
    lowercase.normalizer = tokenizers.normalizers.Lowercase()
    lowercase_padded = added(lowercase.to_str(), "lowercase-padded")
    for name, tok in (("gpt2", gpt2), ("padded", padded)):
        with IndexedDatasetWriter(tmp_path / name, np.uint16, tokenizer_record(tok)) as w:
            for _ in range(10):
                w.add_document(np.arange(30))
            w.finalize()
    build = functools.partial(build_gpt_datasets, split="1,0,0", seq_length=8,
                              num_samples=(10, 0, 0), cache_dir=tmp_path / "k")
    assert padded.vocab_size == gpt2.vocab_size + 1
    assert build(str(tmp_path / "gpt2"), tokenizer=padded)[0] is not None
    with pytest.raises(DatasetBuildError, match="holds the ids of the tokenizer padded"):
        build(str(tmp_path / "padded"), tokenizer=gpt2)
    with pytest.raises(DatasetBuildError, match="holds the ids of the tokenizer gpt2"):
        build(str(tmp_path / "gpt2"), tokenizer=lowercase_padded)
    # a base whose end-of-document token is "</s>", extended with "<|endoftext|>", which then
    # ends documents instead: the data's document ends would go unseen by the document masks
    spec = json.loads(gpt2.backend.to_str())
    spec["added_tokens"][0]["content"] = "</s>"
    spec["model"]["vocab"]["</s>"] = spec["model"]["vocab"].pop("<|endoftext|>")
    base = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), "base")
    other_end = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), "other-end")
    other_end.backend.add_special_tokens(["<|endoftext|>"])
    other_end = Tokenizer(other_end.backend, "other-end")
    assert (base.eod_id, other_end.eod_id) == (50256, 50257)
    assert other_end.prefix_fingerprint(base.vocab_size) == base.fingerprint
    with IndexedDatasetWriter(tmp_path / "base", np.uint16, tokenizer_record(base)) as w:
        w.add_document(np.arange(30))
        w.finalize()
    with pytest.raises(DatasetBuildError, match=rf"'{tmp_path}/base' was made with the tokenizer "
                                                rf"base, whose documents end with id 50256 .*"
                                                rf"ends documents with id 50257"):
        build(str(tmp_path / "base"), tokenizer=other_end)


def test_the_fingerprint_hashes_every_id_of_a_vocabulary_with_gaps():
    import tokenizers

    from megagpt.data import gpt_dataset
    from megagpt.data.indexed import tokenizer_record
    from megagpt.data.tokenizer import Tokenizer

    def word_level(extra):
        vocab = {f"w{i}": i for i in range(10)} | {"<|endoftext|>": 20} | extra
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
        return Tokenizer(backend, "words")
    plain, more = word_level({}), word_level({"zzz": 30})
    assert plain.vocab_size == 11 and plain.fingerprint != more.fingerprint
    assert plain.fingerprint != plain.prefix_fingerprint(11)      # the end-of-document id counts
    # `more` only adds a token after plain's ids: the record's id bound, not its size, tells it
    assert plain.ids_below == 21 and tokenizer_record(plain)["ids_below"] == 21
    assert gpt_dataset._extends_record(more, tokenizer_record(plain))
    assert not gpt_dataset._extends_record(plain, tokenizer_record(more))


def test_ids_beyond_the_model_vocabulary_are_refused_when_read(tmp_path):
    # Tokenized with a 300-id vocabulary, trained with 256: refused by name, on every path to it.
    low = write_documents(tmp_path / "low", [np.arange(40) % 256] * 4).prefix
    high = write_documents(tmp_path / "high", [np.arange(40) % 256] * 3 + [np.full(40, 299)]).prefix
    edge = write_documents(tmp_path / "edge", [np.arange(40) % 256] * 3 + [np.full(40, 256)]).prefix
    common = dict(split="1,0,0", seq_length=8, num_samples=(20, 0, 0), cache_dir=tmp_path / "k",
                  vocab_size=256)
    train, _, _ = build_gpt_datasets(low, **common)
    assert all(int(train[i]["tokens"].max()) < 256 for i in range(len(train)))
    for path in (high, [low, high]):
        train, _, _ = build_gpt_datasets(path, **common)
        with pytest.raises(DatasetBuildError, match=r"train sample \d+ of '.*high' holds token id "
                           r"299, but model.vocab_size=256: .*fix: preprocess it with"):
            [train[i] for i in range(len(train))]
    train, _, _ = build_gpt_datasets(edge, **common)            # the first id past the last
    with pytest.raises(DatasetBuildError, match=r"holds token id 256, but model.vocab_size=256"):
        [train[i] for i in range(len(train))]
    unchecked, _, _ = build_gpt_datasets(high, **{**common, "vocab_size": None})
    assert max(int(unchecked[i]["labels"].max()) for i in range(len(unchecked))) == 299


def test_mock_dataset_is_deterministic_and_shaped():
    ds = MockGPTDataset(10, seq_length=12, vocab_size=50, seed=4)
    item = ds[3]
    assert item["tokens"].shape == (12,) and item["tokens"].dtype == torch.int64
    assert int(item["tokens"].max()) < 50 and bool((item["loss_mask"] == 1).all())
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert torch.equal(MockGPTDataset(10, 12, 50, seed=4)[3]["tokens"], item["tokens"])
    assert not torch.equal(ds[4]["tokens"], item["tokens"])
    with pytest.raises(IndexError):
        ds[10]
    train, valid, test = build_mock_datasets(12, 50, (5, 2, 0))
    assert len(train) == 5 and len(valid) == 2 and test is None
    assert not torch.equal(train[0]["tokens"], valid[0]["tokens"])

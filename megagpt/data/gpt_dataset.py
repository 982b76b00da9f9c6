"""GPT pretraining samples over indexed datasets: splits, epochs, shuffling, caching, blending.

The design is Megatron-LM's: a sample is `seq_length + 1` consecutive tokens of one long stream
formed by concatenating documents, so samples cross document boundaries; consecutive samples share
one token (the last input token of sample i is the first of sample i + 1). Three index arrays
define the samples:
- `doc_idx`: the order of documents in the stream: the split's documents repeated for as many
  epochs as `num_samples` needs, shuffled together (the last epoch apart when less than 80% of
  it is used: Megatron-core's rule);
- `sample_idx` (samples + 1, 2): where sample i starts, as (position in doc_idx, token offset);
  sample i runs from entry i to entry i + 1 inclusive;
- `shuffle_idx`: the order samples are served in: shuffled together, or, when the last epoch is
  apart, the full epochs' samples shuffled and served first, then the last epoch's.
The arrays equal Megatron-core's for the same seed, value for value (its RandomState draws, in
its order; tests/unit/test_data_gpt_dataset.py transcribes its loops as the reference).

All three are built with vectorised numpy (cumsum + searchsorted, no loop over tokens or samples:
an index over a billion tokens takes a few seconds) and cached as `.npy` files under a name
hashed from everything that determines them (the document sizes, the split range, seq_length,
num_samples, seed), written under a temporary name and renamed, so ranks may build them at once.

A "document" here is a sequence of the indexed dataset (tools/preprocess_data.py writes one per
document), as in Megatron.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from megagpt.data.blend import BlendedDataset, blending_indices, parse_data_path
from megagpt.data.indexed import IndexedDataset, IndexedDatasetError, meta_path, read_meta
from megagpt.fsutil import write_file_atomically

INDEX_VERSION = 2  # bump when the index arrays' construction changes (2: Megatron's exact draws)


class DatasetBuildError(ValueError):
    """Datasets cannot be built from the given paths and settings; says what and how to fix."""


def parse_split(split: str) -> np.ndarray:
    """Train/valid/test fractions from a string of weights such as "969,30,1" (or "98/2/0").

    Fewer than three weights are padded with zeros, as in Megatron.
    """
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DatasetBuildError(f"data.split={split!r}: must be up to three non-negative weights "
                                f"train,valid,test with a positive sum, e.g. \"969,30,1\"")
    weights += [0.0] * (3 - len(weights))
    return np.array(weights) / sum(weights)


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges [start, stop) of train, valid and test: Megatron-core's rounding of the
    cumulative fractions (`round(bookend * n)` for each end), so a split holds the same
    documents as there."""
    bookends = [0.0]
    for f in parse_split(split):
        bookends.append(bookends[-1] + float(f))
    bounds = [int(round(b * float(num_documents))) for b in bookends]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def epoch_plan(tokens_per_epoch: int, seq_length: int,
               num_samples: int | None) -> tuple[int, bool]:
    """(epochs, whether the last is shuffled on its own) for `num_samples` samples of documents
    holding `tokens_per_epoch` tokens: with the documents and the seed, all the sample order of
    `build_sample_index` depends on. Megatron's rule: the last epoch is served on its own when
    less than 80% of it is used (every document of the full epochs then comes before it);
    otherwise all epochs mix."""
    if num_samples is None or tokens_per_epoch <= 0:
        return 1, False
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    per_epoch = (tokens_per_epoch - 1) // seq_length
    sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    return num_epochs, num_epochs > 1 and num_samples - sans_final < int(0.80 * per_epoch)


def build_sample_index(sizes: np.ndarray, documents: np.ndarray, seq_length: int,
                       num_samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Megatron's (doc_idx, sample_idx, shuffle_idx) for `documents`, vectorised.

    Args:
        sizes: (sequences,) tokens of every document of the dataset.
        documents: (n,) the ids of the documents to use (a split).
        seq_length: tokens a sample feeds the model; a sample holds seq_length + 1.
        num_samples: samples needed (epochs are added until there are enough); None: one epoch.
        seed: the shuffle seed.
    Returns:
        doc_idx (epochs * n,), sample_idx (samples + 1, 2), shuffle_idx (samples,).
    """
    documents = np.asarray(documents, dtype=np.int64)
    lengths_per_doc = np.asarray(sizes[documents], dtype=np.int64)
    tokens_per_epoch = int(lengths_per_doc.sum())
    if tokens_per_epoch == 0:
        raise DatasetBuildError(f"the {len(documents)} documents selected hold no token")
    num_epochs, separate_final = epoch_plan(tokens_per_epoch, seq_length, num_samples)
    if (num_epochs * tokens_per_epoch - 1) // seq_length < 1:
        raise DatasetBuildError(f"the {len(documents)} documents hold {tokens_per_epoch} tokens, "
                                f"fewer than one sample of seq_length + 1 = {seq_length + 1}")
    sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    rng = np.random.RandomState(seed)   # Megatron's generator and draws: the same samples
    doc_dtype = np.int32 if len(sizes) < 2**31 else np.int64

    def shuffled_epochs(epochs: int) -> np.ndarray:
        order = np.tile(documents, epochs).astype(doc_dtype)
        rng.shuffle(order)
        return order
    doc_idx = (np.concatenate([shuffled_epochs(num_epochs - 1), shuffled_epochs(1)])
               if separate_final else shuffled_epochs(num_epochs))

    lengths = np.asarray(sizes[doc_idx], dtype=np.int64)  # (epochs * n,)
    ends = np.cumsum(lengths)  # stream position just past each document
    total_samples = (int(ends[-1]) - 1) // seq_length
    starts = np.arange(total_samples + 1, dtype=np.int64) * seq_length  # first token of each sample
    which = np.searchsorted(ends, starts, side="right")  # the document holding that token
    which[0] = 0          # Megatron starts at (0, 0), even when the first documents are empty
    offsets = starts - (ends[which] - lengths[which])
    sample_dtype = np.int32 if max(len(doc_idx), int(lengths.max())) < 2**31 else np.int64
    sample_idx = np.stack([which, offsets], axis=1).astype(sample_dtype)

    shuffle_dtype = np.uint32 if total_samples < 2**32 - 2 else np.int64   # Megatron's switch
    first = sans_final if separate_final else total_samples
    shuffle_idx = np.arange(total_samples, dtype=shuffle_dtype)
    rng.shuffle(shuffle_idx[:first])
    if first < total_samples:
        rng.shuffle(shuffle_idx[first:])
    return doc_idx, sample_idx, shuffle_idx


def content_digest(*arrays: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the arrays' bytes: a dataset's `data_digest`, which a
    checkpoint records so that a resume on other data (files made again with other documents,
    the same paths and settings) is told the samples' order changed."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def cached_sample_index(indexed: IndexedDataset, documents: np.ndarray, seq_length: int,
                        num_samples: int | None, seed: int, cache_dir: str | os.PathLike | None,
                        name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`build_sample_index` through an on-disk cache (memory-mapped when read back).

    Files: `<cache_dir>/<dataset name>_<name>_<hash>_{doc,sample,shuffle}_idx.npy` plus a
    `_desc.json` written last, whose presence marks the set complete. cache_dir None: an
    `index-cache` folder next to the dataset.
    """
    documents = np.asarray(documents, dtype=np.int64)
    start, stop = int(documents[0]), int(documents[-1]) + 1
    is_range = stop - start == len(documents) and bool(np.all(np.diff(documents) == 1))
    desc = {"version": INDEX_VERSION, "dataset": os.path.basename(indexed.prefix), "split": name,
            "documents": [start, stop] if is_range else f"{len(documents)} listed",
            "seq_length": int(seq_length), "num_samples": num_samples, "seed": int(seed)}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
    if is_range:
        digest.update(np.ascontiguousarray(indexed.sizes[start:stop]).tobytes())
    else:
        digest.update(documents.tobytes())
        digest.update(np.asarray(indexed.sizes)[documents].tobytes())
    folder = Path(cache_dir) if cache_dir is not None else Path(indexed.prefix).parent / "index-cache"
    stem = f"{os.path.basename(indexed.prefix)}_{name}_{digest.hexdigest()[:16]}"
    paths = [folder / f"{stem}_{kind}_idx.npy" for kind in ("doc", "sample", "shuffle")]
    desc_path = folder / f"{stem}_desc.json"
    if desc_path.is_file() and all(p.is_file() for p in paths):
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    try:
        arrays = build_sample_index(indexed.sizes, documents, seq_length, num_samples, seed)
    except DatasetBuildError as e:
        raise DatasetBuildError(f"{indexed.prefix!r} ({name} split): {e}") from e
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, array in zip(paths, arrays):
            with write_file_atomically(path) as f:
                np.save(f, array)
        with write_file_atomically(desc_path, "w") as f:
            json.dump(desc, f, indent=2)
    except OSError as e:
        raise DatasetBuildError(f"cannot write the index cache in {str(folder)!r} ({e.strerror}); "
                                f"fix: set data.cache_dir to a writable folder") from e
    return arrays


def make_item(tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The dict every dataset returns, from seq_length + 1 tokens (and optional mask of them).

    tokens: (seq_length,) int64 inputs; labels: (seq_length,) int64, the tokens shifted by one;
    loss_mask: (seq_length,) float32, the mask of each label (all ones when none is given).
    """
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    if loss_mask is None:
        mask = torch.ones(len(t) - 1, dtype=torch.float32)
    else:
        mask = torch.from_numpy(np.asarray(loss_mask[1:], dtype=np.float32))
    return {"tokens": t[:-1].contiguous(), "labels": t[1:].contiguous(), "loss_mask": mask}


def gather_sample(get_doc, doc_idx: np.ndarray, sample_idx: np.ndarray, j: int) -> np.ndarray:
    """Tokens of sample j (`seq_length + 1`), from `get_doc(doc, offset, length)` slices."""
    (d0, o0), (d1, o1) = sample_idx[j], sample_idx[j + 1]
    d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
    if d0 == d1:
        return np.asarray(get_doc(int(doc_idx[d0]), o0, o1 - o0 + 1))
    parts = [get_doc(int(doc_idx[d0]), o0, None)]
    parts += [get_doc(int(doc_idx[d]), 0, None) for d in range(d0 + 1, d1)]
    parts.append(get_doc(int(doc_idx[d1]), 0, o1 + 1))
    return np.concatenate(parts)


class GPTDataset(torch.utils.data.Dataset):
    """Pretraining samples of one indexed dataset's document range.

    Args:
        indexed: the dataset.
        documents: (n,) document ids to draw from (a split).
        seq_length: tokens per sample fed to the model.
        num_samples: samples needed (None: one epoch); `len()` is at least this.
        seed: shuffle seed.
        cache_dir: where the index arrays are cached (None: next to the data).
        name: split name, part of the cache file names.
        vocab_size: when given, a sample holding an id >= vocab_size is refused when read (data
            tokenized with a larger vocabulary than the model's: one process would fail on an
            index error or a device assert, a vocab-parallel embedding would read zeros).
    `ds[i]` is `{"tokens", "labels", "loss_mask"}`, each (seq_length,).
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, seq_length: int,
                 num_samples: int | None, seed: int, cache_dir=None, name: str = "train",
                 vocab_size: int | None = None):
        if seq_length < 1:
            raise DatasetBuildError(f"model.seq_length={seq_length} must be positive")
        if len(documents) == 0:
            raise DatasetBuildError(f"{name} split of {indexed.prefix!r}: no documents given")
        self.indexed = indexed
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.name = name
        self.num_samples = num_samples
        lengths = np.asarray(indexed.sizes)[np.asarray(documents)]
        self.tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        self.data_digest = content_digest(lengths.astype(np.int64))   # what a resume compares
        self.doc_idx, self.sample_idx, self.shuffle_idx = cached_sample_index(
            indexed, np.asarray(documents), seq_length, num_samples, seed, cache_dir, name)

    def same_order(self, num_samples: int | None) -> bool:
        """Whether this dataset, built for `num_samples` samples instead, would serve its
        samples in the same order (up to the shorter of the two): the same epoch plan."""
        return (epoch_plan(self.tokens_per_epoch, self.seq_length, num_samples)
                == epoch_plan(self.tokens_per_epoch, self.seq_length, self.num_samples))

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i."""
        return gather_sample(self.indexed.get, self.doc_idx, self.sample_idx, int(self.shuffle_idx[i]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens(i)
        if self.vocab_size is not None and len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise DatasetBuildError(
                f"{self.name} sample {i} of {self.indexed.prefix!r} holds token id "
                f"{int(tokens.max())}, but model.vocab_size={self.vocab_size}: the data was "
                f"tokenized with a larger vocabulary than the model's; fix: preprocess it with "
                f"data.tokenizer_path's tokenizer, or set model.vocab_size above that id")
        return make_item(tokens)


def _extends_record(tokenizer, record: dict) -> bool:
    """Whether `tokenizer` is the one `record` (a `P.meta.json`) names with tokens added after
    its ids (a padding or chat token, say): the data's ids mean the same to it. (Records before
    `ids_below` was kept give the vocabulary's size, the same but for ids with gaps.)"""
    size = record.get("ids_below", record.get("vocab_size"))
    return isinstance(size, int) and size > 0 \
        and tokenizer.prefix_fingerprint(size) == record["vocab_sha256"]


def _open(prefix: str, opened: dict, where: str, tokenizer=None) -> IndexedDataset:
    """The dataset at `prefix` (opened once); refused when its record (`P.meta.json`) names
    another tokenizer than `tokenizer`'s (when given), unless `tokenizer` is that one with
    tokens added after its ids."""
    if prefix not in opened:
        try:
            opened[prefix] = IndexedDataset(prefix)
        except IndexedDatasetError as e:
            raise DatasetBuildError(f"{where}: {e}") from e
        record = read_meta(prefix) if tokenizer is not None else None
        if record is None or record.get("vocab_sha256") in (None, tokenizer.fingerprint):
            return opened[prefix]
        if _extends_record(tokenizer, record):
            if record.get("eod_id", tokenizer.eod_id) == tokenizer.eod_id:
                return opened[prefix]
            raise DatasetBuildError(
                f"{where}: {prefix!r} was made with the tokenizer {record.get('tokenizer')}, "
                f"whose documents end with id {record['eod_id']} (as {meta_path(prefix)} "
                f"records); data.tokenizer_path={tokenizer.source} gives its ids the same "
                f"meaning but ends documents with id {tokenizer.eod_id}, so the data's "
                f"document ends would go unseen (data.reset_attention_mask and its kin look "
                f"for the tokenizer's); fix: set data.tokenizer_path to the tokenizer the data "
                f"was made with, or preprocess the data again with data.tokenizer_path's")
        changed = (f" ({tokenizer.source} has changed since the data was made)"
                   if record.get("tokenizer") == tokenizer.source else "")
        raise DatasetBuildError(
            f"{where}: {prefix!r} holds the ids of the tokenizer {record.get('tokenizer')} "
            f"({record.get('vocab_size')} ids, fingerprint {record['vocab_sha256'][:12]}, as "
            f"{meta_path(prefix)} records), but data.tokenizer_path={tokenizer.source} is "
            f"another ({tokenizer.vocab_size} ids, fingerprint {tokenizer.fingerprint[:12]})"
            f"{changed}; fix: set data.tokenizer_path to the tokenizer the data was made "
            f"with, or preprocess the data again with data.tokenizer_path's (or, if you know "
            f"the two give the same ids, remove the record)")
    return opened[prefix]


def _build_split(blend: list[tuple[float | None, str]], part: int | None, split: str,
                 seq_length: int, num_samples: int, seed: int, cache_dir, name: str,
                 opened: dict, vocab_size: int | None, where: str,
                 optional: bool = False, tokenizer=None) -> torch.utils.data.Dataset | None:
    """One split's dataset (blended when several prefixes), or None when it needs no sample.
    `optional`: a prefix whose part of the split has no document is left out (None when every
    one is), instead of an error."""
    if not num_samples or not blend:
        return None
    parts = []
    for weight, prefix in blend:
        ds = _open(prefix, opened, where, tokenizer)
        start, stop = (0, len(ds)) if part is None else split_ranges(split, len(ds))[part]
        if stop <= start and optional:
            continue
        if stop <= start:
            raise DatasetBuildError(
                f"data.split={split!r} leaves the {name} split of {prefix!r} no documents (it has "
                f"{len(ds)}); fix: give the {name} split more weight, or set data.val_data_path")
        documents = np.arange(start, stop)
        if weight is None:  # unweighted list: blend in proportion to tokens
            weight = float(ds.sizes[start:stop].sum(dtype=np.int64))
        parts.append((weight, ds, documents))
    if not parts:
        return None
    if len(parts) == 1:
        _, ds, documents = parts[0]
        return GPTDataset(ds, documents, seq_length, num_samples, seed, cache_dir, name, vocab_size)
    weights = [w for w, _, _ in parts]
    dataset_index, sample_index = blending_indices(weights, num_samples)
    needed = np.bincount(dataset_index, minlength=len(parts))
    datasets = [GPTDataset(ds, documents, seq_length, max(int(n), 1), seed, cache_dir, name,
                           vocab_size)        # one seed for all, as Megatron's blends
                for (_, ds, documents), n in zip(parts, needed)]
    return BlendedDataset(datasets, weights, dataset_index, sample_index)


def build_gpt_datasets(train_data_path, val_data_path=(), test_data_path=(), *,
                       split: str = "969,30,1", seq_length: int, num_samples: tuple[int, int, int],
                       seed: int = 1234, cache_dir: str | os.PathLike | None = None,
                       vocab_size: int | None = None, tokenizer=None):
    """Train, validation and test datasets for pretraining (each None when it needs no sample).

    Args:
        train_data_path: `data.train_data_path`: a prefix, a list of prefixes (blended in
            proportion to their tokens), or `[weight, prefix, weight, prefix, ...]`.
        val_data_path: `data.val_data_path`; empty: validation (and test) documents are carved out
            of each training prefix by `split`. Otherwise the training prefixes are used whole.
        test_data_path: `data.test_data_path`; empty: the test part of `split` when
            val_data_path is empty (a prefix whose test part has no document is left out of it,
            and the test set is None when every one's is empty), else no test set.
        split: `data.split`, train,valid,test document weights such as "969,30,1".
        seq_length: `model.seq_length`; every item is (seq_length,).
        num_samples: (train, valid, test) samples needed, e.g. max_steps * global batch for
            train; a zero gives None for that split.
        seed: `training.seed`; same seed, same sample order.
        cache_dir: `data.cache_dir`; None caches the index arrays next to each dataset.
        vocab_size: `model.vocab_size`; a sample holding a larger id is refused when read.
        tokenizer: `data.tokenizer_path`'s `Tokenizer`; a dataset whose record (`P.meta.json`,
            written by tools/preprocess_data.py) names another is refused. None: not checked.
    Returns:
        (train, valid, test): datasets whose items are dicts of `tokens` and `labels` (int64) and
        `loss_mask` (float32, all ones), each (seq_length,); len() >= the requested samples.
    """
    if len(num_samples) != 3 or any(n is None or n < 0 for n in num_samples):
        raise DatasetBuildError(f"num_samples={num_samples!r} must be three non-negative counts "
                                f"(train, valid, test)")
    train = parse_data_path(train_data_path, "data.train_data_path")
    valid = parse_data_path(val_data_path, "data.val_data_path")
    test = parse_data_path(test_data_path, "data.test_data_path")
    if not train:
        raise DatasetBuildError("data.train_data_path is empty; fix: run tools/preprocess_data.py "
                                "and name its output prefix (<prefix>_text_document)")
    if not valid:
        parse_split(split)
    opened: dict[str, IndexedDataset] = {}
    common = dict(split=split, seq_length=seq_length, seed=seed, cache_dir=cache_dir, opened=opened,
                  vocab_size=vocab_size, tokenizer=tokenizer)
    carve = not valid
    train_ds = _build_split(train, 0 if carve else None, num_samples=num_samples[0], name="train",
                            where="data.train_data_path", **common)
    valid_ds = _build_split(valid or train, 1 if carve else None, num_samples=num_samples[1],
                            name="valid", where=f"data.{'val' if valid else 'train'}_data_path",
                            **common)
    test_blend, test_part = (test, None) if test else ((train, 2) if carve else ([], None))
    test_ds = _build_split(test_blend, test_part, num_samples=num_samples[2], name="test",
                           where=f"data.{'test' if test else 'train'}_data_path",
                           optional=test_part is not None, **common)
    return train_ds, valid_ds, test_ds

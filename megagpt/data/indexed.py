"""Megatron-LM's indexed dataset (`MMapIndexedDataset`, version 1): reader, writer and merge.

A dataset is a prefix `P` naming two files (DESIGN.md, "Indexed dataset"):
- `P.bin`: the token ids of every sequence, concatenated, no header;
- `P.idx`, little-endian: magic `MMIDIDX\\x00\\x00`, version u64 = 1, dtype code u8, sequence count
  S u64, document count D u64 (documents + 1), then S int32 sequence lengths, S int64 byte offsets
  into `.bin`, and D int64 document indices (sequence boundaries, first 0, last S).

`IndexedDataset(prefix)` memory-maps both files (no copy) after checking the header, the sizes of
both files and the document indices, and says which file is wrong. `IndexedDatasetWriter` streams
sequences to temporary files (memory stays flat however many) and renames both files into place
only when complete. `merge_datasets` concatenates several prefixes into one.

Ours beside Megatron's format: `P.meta.json`, which the tools that write a dataset add, records
the tokenizer the ids come from (its source, size, end-of-document id and
`Tokenizer.fingerprint`) and the pair's sizes; training refuses a dataset whose record names
another tokenizer than `data.tokenizer_path`. A dataset without one (Megatron's own), or whose
record describes other files (written over by a tool that keeps none), is read as before.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megagpt.fsutil import fsync_dir, fsync_file, why_not_a_folder, write_json

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 sequences + 8 documents
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
COPY_CHUNK = 1 << 22  # elements streamed at a time when writing the index


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that cannot be read; the message names the file and the reason."""


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 when the vocabulary has fewer than 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.meta.json")


def read_meta(prefix: str | os.PathLike) -> dict | None:
    """The dataset's record of how it was made (`P.meta.json`), or None when there is none, it
    does not read as a JSON object, or it describes other files than the pair there now (a
    warning says so): no record, nothing is checked against it."""
    try:
        meta = json.loads(meta_path(prefix).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    try:
        current = pair_identity(prefix)
    except OSError:
        return None
    if any(meta.get(k) != v for k, v in current.items()):
        log.warning("%s describes other files than %s.bin/.idx now hold (written over by a tool "
                    "that keeps no record); it is ignored: remove it", meta_path(prefix),
                    os.fspath(prefix))
        return None
    return meta


def pair_identity(prefix: str | os.PathLike) -> dict:
    """What a record keeps of the pair it describes, to be told from another pair written over
    it by a tool that writes no record (Megatron's, a copy): the files' sizes."""
    return {"bin_bytes": bin_path(prefix).stat().st_size,
            "idx_bytes": idx_path(prefix).stat().st_size}


# `tokenizer_record`'s keys, which a merged dataset's record carries over
TOKENIZER_RECORD_FIELDS = ("tokenizer", "vocab_size", "ids_below", "eod_id", "vocab_sha256")


def tokenizer_record(tokenizer) -> dict:
    """What `P.meta.json` records of the tokenizer a dataset's ids come from
    (TOKENIZER_RECORD_FIELDS)."""
    return {"tokenizer": tokenizer.source, "vocab_size": tokenizer.vocab_size,
            "ids_below": tokenizer.ids_below, "eod_id": tokenizer.eod_id,
            "vocab_sha256": tokenizer.fingerprint}


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def pack_header(dtype: np.dtype, num_sequences: int, num_doc_indices: int) -> bytes:
    """The 34 bytes that open an `.idx` file."""
    return (MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
            + struct.pack("<Q", num_sequences) + struct.pack("<Q", num_doc_indices))


class IndexedDataset:
    """A memory-mapped `.bin`/`.idx` pair.

    Attributes:
        sizes: int32 (S,) tokens in each sequence (a view into `.idx`).
        pointers: int64 (S,) byte offset of each sequence in `.bin`.
        doc_idx: int64 (D,) sequence boundaries of the documents; doc_idx[0] = 0, doc_idx[-1] = S.
        dtype: the token dtype.
    `ds[i]` is sequence i as a read-only array view of `.bin` (no copy).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        try:
            self._open(idx_path(prefix), bin_path(prefix))
        except OSError as e:
            raise IndexedDatasetError(
                f"indexed dataset {self.prefix!r}: {e.filename or 'its .bin or .idx'} cannot be "
                f"read ({e.strerror}); "
                f"fix: check its permissions") from e

    def _open(self, idx: Path, bin_: Path) -> None:
        for path in (idx, bin_):
            if not path.is_file():
                suffix = Path(self.prefix).suffix
                hint = (f"; fix: drop the {suffix}: {self.prefix[:-len(suffix)]!r} names both "
                        f"files" if suffix in (".bin", ".idx") else
                        "; fix: run tools/preprocess_data.py first, or correct the path")
                where = "" if Path(self.prefix).is_absolute() else \
                    f" (a relative path is read from the current directory, {os.getcwd()})"
                raise IndexedDatasetError(
                    f"indexed dataset {self.prefix!r}: {path} does not exist{where}; a dataset "
                    f"prefix P names P.bin and P.idx (tools/preprocess_data.py writes "
                    f"<output-prefix>_text_document.bin/.idx, so P ends in _text_document){hint}")
        self.dtype, num_sequences, num_docs = self._read_header(idx)
        expected = HEADER_SIZE + num_sequences * (4 + 8) + num_docs * 8
        actual = idx.stat().st_size
        if num_sequences and actual == expected + num_sequences:
            raise IndexedDatasetError(
                f"{idx} is a Megatron multimodal index (one mode byte a sequence after the "
                f"document indices), which text training does not read; fix: preprocess the text "
                f"without the multimodal option")
        if actual != expected:
            state = "is truncated" if actual < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{idx} {state}: its header announces {num_sequences} sequences and {num_docs} "
                f"document indices, which take {expected} bytes, but the file has {actual}; fix: "
                f"write the dataset again")
        index = np.memmap(idx, dtype=np.uint8, mode="r") if expected > HEADER_SIZE else np.zeros(0, np.uint8)
        start = HEADER_SIZE
        self.sizes = index[start:start + 4 * num_sequences].view(np.int32)
        start += 4 * num_sequences
        self.pointers = index[start:start + 8 * num_sequences].view(np.int64)
        start += 8 * num_sequences
        self.doc_idx = index[start:start + 8 * num_docs].view(np.int64)
        if num_docs == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] != num_sequences:
            raise IndexedDatasetError(
                f"{idx}: document indices must run from 0 to the sequence count {num_sequences}, "
                f"found {self.doc_idx[:1].tolist()}...{self.doc_idx[-1:].tolist()}; the file is "
                f"damaged or not written by a Megatron-compatible tool")
        itemsize = self.dtype.itemsize
        bin_bytes = bin_.stat().st_size
        needed = int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize if num_sequences else 0
        if bin_bytes != needed:
            raise IndexedDatasetError(
                f"{bin_} has {bin_bytes} bytes but {idx} describes {needed} "
                f"({'truncated' if bin_bytes < needed else 'the files do not belong together'}); "
                f"fix: write the dataset again")
        self._bin = (np.memmap(bin_, dtype=self.dtype, mode="r") if bin_bytes
                     else np.zeros(0, self.dtype))

    @staticmethod
    def _read_header(idx: Path) -> tuple[np.dtype, int, int]:
        with open(idx, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{idx} is not a Megatron indexed dataset index: it starts with "
                f"{header[:len(MAGIC)]!r}, expected the magic {MAGIC!r}")
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{idx} is truncated: {len(header)} bytes, shorter than the "
                                      f"{HEADER_SIZE}-byte header")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx} has index version {version}; only version {VERSION} "
                                      f"(Megatron-LM's MMapIndexedDataset) is supported")
        code = header[17]
        if code not in DTYPES:
            raise IndexedDatasetError(f"{idx} has an unknown dtype code {code}; known codes: "
                                      f"{sorted(DTYPES)}")
        num_sequences, num_docs = struct.unpack("<QQ", header[18:34])
        return np.dtype(DTYPES[code]), num_sequences, num_docs

    def __getstate__(self) -> dict:
        """Pickle the prefix only: DataLoader workers started by spawn re-map the files."""
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence i (to its end when length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


TEMPORARY_KINDS = ("bin", "sizes", "docs", "idx")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # another user's: alive
        return True
    return True


def remove_leftovers(prefix: str) -> list[str]:
    """Remove the temporary files a writer to `prefix` on this host left when it was killed
    outright (SIGKILL, the out-of-memory killer: no chance to clean up), and return their
    paths. Their names carry the host and the process id; a process that still runs (a run
    writing the same prefix now, or the id taken by another program since) keeps its files,
    and so do other hosts' (on a shared file system their processes cannot be seen from here)."""
    host, removed = socket.gethostname(), []
    for kind in TEMPORARY_KINDS:
        start = f"{prefix}.{kind}.tmp-{host}-"
        for path in sorted(glob.glob(glob.escape(start) + "*")):
            pid = path[len(start):]         # host "node" also matches host "node-2"'s files
            if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
                continue
            try:
                os.unlink(path)
            except OSError:     # removed by another run meanwhile, or not ours to remove
                continue
            removed.append(path)
    return removed


class IndexedDatasetWriter:
    """Writes a `.bin`/`.idx` pair by streaming; the files appear only when `finalize` completes.

    Use as a context manager: leaving the block with an exception removes every temporary file.
    Sequence lengths and document boundaries are spooled to temporary files, so memory does not
    grow with the number of sequences. The temporary files that an earlier writer to the same
    prefix left when it was killed outright are removed first (`remove_leftovers`; the paths
    are in `removed_leftovers`).

    Args:
        prefix: writes `prefix.bin` and `prefix.idx`.
        dtype: token dtype (see `best_dtype`).
        meta: written as `prefix.meta.json` once both are in place (None: no record; a record
            of a dataset replaced at the prefix is removed first, so none describes other ids).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type, meta: dict | None = None):
        self.prefix = os.fspath(prefix)
        self.meta = meta
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no code in the index format; use one of "
                             f"{sorted(str(np.dtype(d)) for d in DTYPES.values())}")
        self.removed_leftovers = remove_leftovers(self.prefix)
        suffix = f".tmp-{socket.gethostname()}-{os.getpid()}"
        self._tmp_bin, self._tmp_sizes, self._tmp_docs, self._tmp_idx = (
            Path(f"{self.prefix}.{kind}{suffix}") for kind in TEMPORARY_KINDS)
        self._files = [open(p, "wb") for p in (self._tmp_bin, self._tmp_sizes, self._tmp_docs)]
        self._bin, self._sizes, self._docs = self._files
        self.num_sequences = 0
        self.num_tokens = 0
        self._docs.write(np.zeros(1, np.int64).tobytes())
        self.num_doc_indices = 1

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append sequences given as one flat token array and their lengths (no document end)."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence lengths must fit in int32 and be non-negative")
        if tokens.dtype != self.dtype and tokens.size:   # a cast must not wrap an id around
            info = np.iinfo(self.dtype)
            low, high = int(tokens.min()), int(tokens.max())
            if low < info.min or high > info.max:
                raise ValueError(f"token ids {low}..{high} do not fit the dataset's dtype "
                                 f"{self.dtype} ({info.min}..{info.max}); fix: write it as int32 "
                                 f"(a vocabulary of 65,500 ids or more)")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(lengths.astype(np.int32).tobytes())
        self.num_sequences += len(lengths)
        self.num_tokens += len(tokens)

    def end_documents(self, boundaries: np.ndarray) -> None:
        """Mark document ends at the given absolute sequence counts (ascending)."""
        self._docs.write(np.asarray(boundaries, dtype=np.int64).tobytes())
        self.num_doc_indices += len(boundaries)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents of one sequence each: flat tokens and the length of each document."""
        first = self.num_sequences
        self.add_sequences(tokens, lengths)
        self.end_documents(np.arange(first + 1, self.num_sequences + 1, dtype=np.int64))

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([len(tokens)]))

    def add_dataset(self, ds: IndexedDataset) -> None:
        """Append every sequence and document of `ds` (same dtype), streaming in chunks."""
        if ds.dtype != self.dtype:
            raise IndexedDatasetError(f"cannot append {ds.prefix!r} (dtype {ds.dtype}) to a "
                                      f"dataset of dtype {self.dtype}")
        base = self.num_sequences
        with open(bin_path(ds.prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 1 << 24)
        for start in range(0, len(ds), COPY_CHUNK):
            sizes = np.asarray(ds.sizes[start:start + COPY_CHUNK])
            self._sizes.write(sizes.astype(np.int32).tobytes())
            self.num_sequences += len(sizes)
            self.num_tokens += int(sizes.sum(dtype=np.int64))
        for start in range(1, len(ds.doc_idx), COPY_CHUNK):
            self.end_documents(np.asarray(ds.doc_idx[start:start + COPY_CHUNK]) + base)

    def finalize(self) -> None:
        """Write the index and rename both files into place."""
        self.write_index()
        self.commit()

    def write_index(self) -> None:
        """Close the data and write the index, both still under their temporary names and
        flushed to disk (so that the rename of `commit` never publishes an empty file)."""
        fsync_file(self._bin)
        for f in self._files:
            f.close()
        with open(self._tmp_idx, "wb") as out:
            out.write(pack_header(self.dtype, self.num_sequences, self.num_doc_indices))
            with open(self._tmp_sizes, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            itemsize = self.dtype.itemsize
            offset = 0
            sizes = np.memmap(self._tmp_sizes, dtype=np.int32, mode="r") if self.num_sequences else []
            for start in range(0, self.num_sequences, COPY_CHUNK):
                chunk = np.asarray(sizes[start:start + COPY_CHUNK], dtype=np.int64) * itemsize
                ends = np.cumsum(chunk) + offset
                out.write((ends - chunk).tobytes())
                offset = int(ends[-1])
            del sizes
            with open(self._tmp_docs, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            fsync_file(out)

    def commit(self) -> None:
        """Rename the files `write_index` finished into place (replacing a dataset there), then
        write the record."""
        meta_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        fsync_dir(idx_path(self.prefix).parent)
        for p in (self._tmp_sizes, self._tmp_docs):
            p.unlink()
        if self.meta is not None:     # with what identifies this pair: a record outliving it
            write_json(meta_path(self.prefix), dict(self.meta, **pair_identity(self.prefix)))

    def abort(self) -> None:
        """Close and remove every temporary file."""
        for f in self._files:
            try:
                f.close()
            except OSError:     # a full disk fails the buffered bytes' flush: remove them anyway
                pass
        for p in (self._tmp_bin, self._tmp_sizes, self._tmp_docs, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_documents(prefix: str | os.PathLike, documents: Sequence, dtype=np.uint16) -> IndexedDataset:
    """Write a small dataset from a list of token lists (one sequence a document) and open it."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
        writer.finalize()
    return IndexedDataset(prefix)


def merge_datasets(prefixes: Sequence[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (same dtype) into `output_prefix`, keeping every document boundary.

    Streams `.bin` bytes and index arrays in chunks, so memory stays flat.
    """
    if not prefixes:
        raise ValueError("--inputs is empty; fix: name at least one dataset prefix to merge")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtype = datasets[0].dtype
    for ds in datasets[1:]:
        if ds.dtype != dtype:
            raise IndexedDatasetError(
                f"cannot merge {ds.prefix!r} (dtype {ds.dtype}) with {datasets[0].prefix!r} "
                f"(dtype {dtype}); fix: merge datasets written with the same tokenizer")
    records = [read_meta(ds.prefix) for ds in datasets]
    tokenizers = {r.get("vocab_sha256") for r in records if r is not None}
    if len(tokenizers) > 1:
        named = "; ".join(f"{ds.prefix!r}: {r.get('tokenizer')}"
                          for ds, r in zip(datasets, records) if r is not None)
        raise IndexedDatasetError(f"cannot merge datasets made with different tokenizers "
                                  f"({named}); fix: preprocess them all with one tokenizer")
    # the record carries over when every input has one (of the one tokenizer)
    meta = ({k: records[0][k] for k in TOKENIZER_RECORD_FIELDS if k in records[0]}
            if tokenizers and None not in records else None)
    out = os.fspath(output_prefix)
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        raise ValueError(f"--output-prefix {out!r} names a folder, so the files would be named "
                         f"{os.path.join(out, '')}.bin and .idx; fix: end it with a name, e.g. "
                         f"{os.path.join(out, 'merged')!r}")
    if any(Path(ds.prefix).resolve() == Path(out).resolve() for ds in datasets):
        raise ValueError(f"--output-prefix {out!r} is also an input; fix: choose a new prefix")
    reason = why_not_a_folder(Path(out).parent)
    if reason:
        raise ValueError(f"--output-prefix {out!r}: cannot write there ({reason}); fix: choose "
                         f"another location")
    check_replaceable(out, "--output-prefix")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        with IndexedDatasetWriter(out, dtype, meta) as writer:
            for ds in datasets:
                writer.add_dataset(ds)
            writer.finalize()
    except OSError as e:     # a full disk, a quota
        raise ValueError(f"--output-prefix {out!r}: cannot write ({e.strerror or e}); fix: free "
                         f"space or choose another location") from e
    return IndexedDataset(out)


def check_replaceable(prefix: str | os.PathLike, flag: str) -> None:
    """Refuse an output prefix whose .bin or .idx exists as something other than a file (a
    folder): renaming the new file over it fails only after the whole write."""
    for path in (bin_path(prefix), idx_path(prefix), meta_path(prefix)):
        if path.exists() and not path.is_file():
            raise ValueError(f"{flag} {os.fspath(prefix)!r}: {path} exists and is not a file; "
                             f"fix: remove it or choose another prefix")

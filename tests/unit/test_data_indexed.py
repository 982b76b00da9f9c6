"""The .bin/.idx format byte for byte (DESIGN.md's table), round trips, refusals, and merging."""
import errno
import os
import pickle
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import (IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, best_dtype,
                                  bin_path, merge_datasets, write_documents)

MERGE_TOOL = Path(__file__).resolve().parents[2] / "tools" / "merge_datasets.py"


def hand_built_idx(code: int, lengths: list[int], pointers: list[int], doc_idx: list[int]) -> bytes:
    """An .idx laid out from the format table, field by field."""
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
            + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
            + struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def test_writer_bytes_follow_the_table(tmp_path):
    write_documents(tmp_path / "d", [[1, 2, 3], [4], [65535, 6]], np.uint16)
    assert (tmp_path / "d.idx").read_bytes() == hand_built_idx(8, [3, 1, 2], [0, 6, 8], [0, 1, 2, 3])
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 65535, 6)
    header = (tmp_path / "d.idx").read_bytes()[:34]
    assert header[:9] == b"MMIDIDX\x00\x00" and header[17] == 8  # offsets 0 and 17 of the table


def test_int32_dataset_bytes(tmp_path):
    write_documents(tmp_path / "d", [[70000, 1], [2]], best_dtype(100_000))
    assert (tmp_path / "d.idx").read_bytes() == hand_built_idx(4, [2, 1], [0, 8], [0, 1, 2])
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<3i", 70000, 1, 2)


def test_best_dtype_follows_megatron():
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32


def test_reads_a_megatron_file_with_several_sequences_per_document(tmp_path):
    # the layout Megatron-LM writes with sentence splitting: 2 documents of 2 and 1 sequences
    (tmp_path / "m.idx").write_bytes(hand_built_idx(8, [2, 3, 1], [0, 4, 10], [0, 2, 3]))
    (tmp_path / "m.bin").write_bytes(struct.pack("<6H", 10, 11, 20, 21, 22, 30))
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 6
    assert [ds[i].tolist() for i in range(3)] == [[10, 11], [20, 21, 22], [30]]
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.get(1, offset=1, length=2).tolist() == [21, 22]


def test_round_trip_random_documents_without_copy(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50257, rng.integers(0, 50)) for _ in range(200)]
    ds = write_documents(tmp_path / "r", docs)
    assert len(ds) == 200 and ds.dtype == np.uint16
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.pointers.tolist() == (np.cumsum([0] + [2 * len(d) for d in docs])[:-1]).tolist()
    assert ds.doc_idx.tolist() == list(range(201))
    item = ds[5]
    assert isinstance(ds._bin, np.memmap) and not item.flags.owndata and not item.flags.writeable


def test_pickles_by_prefix_for_dataloader_workers(tmp_path):
    ds = write_documents(tmp_path / "p", [list(range(5000))] * 20)
    data = pickle.dumps(ds)
    assert len(data) < 500  # the prefix, not the tokens
    assert np.array_equal(pickle.loads(data)[19], ds[19])


def test_multi_sequence_documents_round_trip(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        w.add_sequences(np.array([1, 2, 3, 4, 5]), np.array([2, 3]))
        w.end_documents(np.array([2]))
        w.add_sequences(np.array([6]), np.array([1]))
        w.end_documents(np.array([3]))
        w.finalize()
    assert (tmp_path / "s.idx").read_bytes() == hand_built_idx(8, [2, 3, 1], [0, 4, 10], [0, 2, 3])


def test_writer_leaves_nothing_until_finalize_and_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([1, 2, 3])
            assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="lengths sum to 4 but 3 tokens"):
        with IndexedDatasetWriter(tmp_path / "y", np.uint16) as w:
            w.add_sequences(np.array([1, 2, 3]), np.array([4]))
    assert list(tmp_path.iterdir()) == []
    # an id past uint16 would be written modulo 65536 by the cast
    with pytest.raises(ValueError, match=r"token ids 1\.\.70000 do not fit the dataset's dtype "
                                         r"uint16 \(0\.\.65535\); fix: write it as int32"):
        write_documents(tmp_path / "z", [[1, 70000]])
    assert list(tmp_path.iterdir()) == []
    assert write_documents(tmp_path / "w", [[1, 70000]], np.int32)[0].tolist() == [1, 70000]


def corrupt(tmp_path, case: str) -> Path:
    prefix = tmp_path / "c"
    write_documents(prefix, [[1, 2, 3], [4, 5]])
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    data = bytearray(idx.read_bytes())
    if case == "foreign":
        idx.write_bytes(b'{"this": "is json"}')
    elif case == "version":
        data[9:17] = struct.pack("<Q", 2)
        idx.write_bytes(bytes(data))
    elif case == "dtype":
        data[17] = 9
        idx.write_bytes(bytes(data))
    elif case == "short_header":
        idx.write_bytes(bytes(data[:20]))
    elif case == "truncated_idx":
        idx.write_bytes(bytes(data[:-4]))
    elif case == "trailing_idx":
        idx.write_bytes(bytes(data) + b"\x00")
    elif case == "multimodal":     # Megatron's multimodal index: a mode byte per sequence
        idx.write_bytes(bytes(data) + b"\x00\x01")
    elif case == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif case == "doc_idx":
        data[-8:] = struct.pack("<q", 7)
        idx.write_bytes(bytes(data))
    elif case == "missing_idx":
        idx.unlink()
    return prefix


@pytest.mark.parametrize("case, message", [
    ("foreign", r"c\.idx is not a Megatron indexed dataset index.*expected the magic"),
    ("version", r"c\.idx has index version 2; only version 1"),
    ("dtype", r"c\.idx has an unknown dtype code 9"),
    ("short_header", r"c\.idx is truncated: 20 bytes"),
    ("truncated_idx", r"c\.idx is truncated: its header announces 2 sequences"),
    ("trailing_idx", r"c\.idx has trailing bytes"),
    ("multimodal", r"c\.idx is a Megatron multimodal index .*fix: preprocess the text without "
                   r"the multimodal option"),
    ("truncated_bin", r"c\.bin has 8 bytes but .*c\.idx describes 10 \(truncated\)"),
    ("doc_idx", r"c\.idx: document indices must run from 0 to the sequence count 2"),
    ("missing_idx", r"c\.idx does not exist; a dataset prefix P names P\.bin and P\.idx"),
])
def test_refuses_damaged_or_foreign_files(tmp_path, case, message):
    prefix = corrupt(tmp_path, case)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    import megagpt.data.indexed as indexed

    prefix = corrupt(tmp_path, "none")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(indexed, "open", denied, raising=False)
    with pytest.raises(IndexedDatasetError, match=r"indexed dataset '.*c': .*c\.idx cannot be read "
                                                  r"\(Permission denied\); fix: check its permissions"):
        IndexedDataset(prefix)


def test_empty_dataset_reads(tmp_path):
    ds = write_documents(tmp_path / "e", [])
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_merge_keeps_documents_and_order(tmp_path):
    a = write_documents(tmp_path / "a", [[1, 2], [3]])
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:  # a 2-sequence document
        w.add_sequences(np.array([4, 5, 6]), np.array([1, 2]))
        w.end_documents(np.array([2]))
        w.finalize()
    merged = merge_datasets([a.prefix, tmp_path / "b"], tmp_path / "m")
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4], [5, 6]]
    assert merged.doc_idx.tolist() == [0, 1, 2, 4]
    assert merged.pointers.tolist() == [0, 4, 6, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx", "b.bin", "b.idx", "m.bin", "m.idx"]


def test_indexes_written_in_several_chunks_equal_one_chunks(tmp_path, monkeypatch):
    """The writer and the merge stream sizes, pointers and document indices COPY_CHUNK
    (4,194,304) elements at a time: a corpus of more documents than that (most real ones) goes
    through the later chunks, which only a small chunk reaches in a test."""
    import megagpt.data.indexed as indexed
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, n) for n in rng.integers(1, 9, 10)]
    whole = [write_documents(tmp_path / f"whole_{k}", docs[k::2]) for k in (0, 1)]
    whole.append(merge_datasets([d.prefix for d in whole], tmp_path / "whole_m"))
    monkeypatch.setattr(indexed, "COPY_CHUNK", 3)
    chunked = [write_documents(tmp_path / f"chunked_{k}", docs[k::2]) for k in (0, 1)]
    chunked.append(merge_datasets([d.prefix for d in chunked], tmp_path / "chunked_m"))
    for a, b in zip(whole, chunked):
        assert Path(f"{a.prefix}.idx").read_bytes() == Path(f"{b.prefix}.idx").read_bytes()
        assert [b[i].tolist() for i in range(len(b))] == [a[i].tolist() for i in range(len(a))]
    assert [chunked[2][i].tolist() for i in range(10)] == [d.tolist() for d in docs[0::2]
                                                           + docs[1::2]]


def test_the_tokenizer_record_is_kept_by_a_merge_and_mixed_tokenizers_are_refused(tmp_path):
    """P.meta.json names the tokenizer a dataset's ids come from: a merge of datasets of one
    tokenizer keeps it, of several is refused (their ids mean different text), and a dataset
    written over one with a record loses it unless it brings its own."""
    from megagpt.data.indexed import meta_path, read_meta
    gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257, "ids_below": 50257, "eod_id": 50256,
            "vocab_sha256": "g"}
    other = dict(gpt2, tokenizer="runs/tok", vocab_sha256="o")

    def written(name, record):
        with IndexedDatasetWriter(tmp_path / name, np.uint16, record) as w:
            w.add_document(np.array([1, 2, 3]))
            w.finalize()
        return str(tmp_path / name)
    a, b, c, plain = written("a", dict(gpt2, json_key="text")), written("b", gpt2), \
        written("c", other), written("plain", None)
    merged = merge_datasets([a, b], tmp_path / "ab").prefix
    assert read_meta(merged) == dict(gpt2, bin_bytes=bin_path(merged).stat().st_size,
                                     idx_bytes=(tmp_path / "ab.idx").stat().st_size)
    assert read_meta(merge_datasets([a, plain], tmp_path / "ap").prefix) is None
    with pytest.raises(IndexedDatasetError, match=r"cannot merge datasets made with different "
                                                  r"tokenizers \('.*/a': gpt2; '.*/c': runs/tok\); "
                                                  r"fix: preprocess them all with one tokenizer"):
        merge_datasets([a, c], tmp_path / "ac")
    assert not bin_path(tmp_path / "ac").exists()
    written("a", None)                                  # another dataset at a's prefix
    assert not meta_path(a).exists()
    meta_path(plain).write_text("not json")             # a damaged record checks nothing
    assert read_meta(plain) is None


def test_a_record_outlived_by_its_files_is_ignored(tmp_path, caplog):
    """Megatron's preprocess (or a copy) writing another pair over a recorded one leaves the
    record behind: it describes other files, and is ignored with a warning (it was believed, so
    the right tokenizer was refused and a wrong one accepted)."""
    from megagpt.data.indexed import meta_path, read_meta
    with IndexedDatasetWriter(tmp_path / "a", np.uint16, {"tokenizer": "gpt2"}) as w:
        w.add_document(np.array([1, 2, 3]))
        w.finalize()
    assert read_meta(tmp_path / "a")["tokenizer"] == "gpt2"
    other = write_documents(tmp_path / "b", [[4, 5, 6, 7]])
    for suffix in (".bin", ".idx"):
        (tmp_path / f"a{suffix}").write_bytes((tmp_path / f"b{suffix}").read_bytes())
    assert read_meta(tmp_path / "a") is None and len(other) == 1
    assert f"{meta_path(tmp_path / 'a')} describes other files than" in caplog.text


def test_a_folder_where_the_record_goes_is_refused_before_the_work(tmp_path):
    (tmp_path / "d.meta.json").mkdir()
    with pytest.raises(ValueError, match=r"--output-prefix '.*d': .*d\.meta\.json exists and is "
                                         r"not a file"):
        merge_datasets([write_documents(tmp_path / "a", [[1]]).prefix], tmp_path / "d")


def test_merge_refusals(tmp_path):
    a = write_documents(tmp_path / "a", [[1, 2]])
    b = write_documents(tmp_path / "b", [[1, 2]], np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype int32.*same tokenizer"):
        merge_datasets([a.prefix, b.prefix], tmp_path / "m")
    with pytest.raises(ValueError, match="--output-prefix .* is also an input"):
        merge_datasets([a.prefix], a.prefix)
    with pytest.raises(ValueError, match="--inputs is empty"):
        merge_datasets([], tmp_path / "m")
    with pytest.raises(ValueError, match=r"--output-prefix '.*/' names a folder, so the files would "
                                         r"be named .*/\.bin and \.idx; fix: end it with a name, "
                                         r"e\.g\. '.*/merged'"):
        merge_datasets([a.prefix], f"{tmp_path}/")
    assert not list(tmp_path.glob("m*")) and not list(tmp_path.glob(".*"))
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match=f"--output-prefix '{tmp_path / 'f' / 'm'}': cannot write "
                                         f"there \\({tmp_path / 'f'} is a file\\); fix: choose"):
        merge_datasets([a.prefix], tmp_path / "f" / "m")
    (tmp_path / "d.bin").mkdir()      # renaming over it failed only after the whole write
    with pytest.raises(ValueError, match=r"d.bin exists and is not a file; fix: remove it"):
        merge_datasets([a.prefix], tmp_path / "d")


def test_a_merge_on_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    a = write_documents(tmp_path / "a", [[1, 2]])

    def no_space(self, ds):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(IndexedDatasetWriter, "add_dataset", no_space)
    with pytest.raises(ValueError, match=r"--output-prefix '.*m': cannot write \(No space left on "
                                         r"device\); fix: free space"):
        merge_datasets([a.prefix], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx"]


def test_a_sigterm_during_the_merge_tool_leaves_only_its_inputs(tmp_path, monkeypatch):
    """The tool turns SIGTERM (a scheduler, `timeout`) into SystemExit(143), so the writer
    removes its temporary files, as on Ctrl-C."""
    import signal
    import time
    main = runpy.run_path(str(MERGE_TOOL))["main"]
    write_documents(tmp_path / "a", [[1, 2], [3]])
    copy = IndexedDatasetWriter.add_dataset

    def terminated(self, ds):
        copy(self, ds)                       # something written under the temporary names
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)                        # the handler raises before this ends
    monkeypatch.setattr(IndexedDatasetWriter, "add_dataset", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            main(["--inputs", str(tmp_path / "a"), "--output-prefix", str(tmp_path / "m")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx"]


def test_merge_tool(tmp_path, capsys):
    main = runpy.run_path(str(MERGE_TOOL))["main"]
    write_documents(tmp_path / "a", [[1, 2], [3]])
    write_documents(tmp_path / "b", [[4]])
    assert main(["--inputs", str(tmp_path / "a"), str(tmp_path / "b"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert "3 sequences, 3 documents, 4 tokens" in capsys.readouterr().out
    assert main(["--inputs", str(tmp_path / "zz"), "--output-prefix", str(tmp_path / "n")]) == 2
    assert "zz.idx does not exist" in capsys.readouterr().err
    # an output folder that does not exist yet is created
    assert main(["--inputs", str(tmp_path / "a"), "--output-prefix", str(tmp_path / "new" / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["m.bin", "m.idx"]


def test_a_missing_relative_prefix_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """Paths in a config are read from the current directory; a run started elsewhere was told
    only that runs/data/... does not exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexedDatasetError, match=rf"runs/data/x_text_document\.idx does not "
                                                  rf"exist \(a relative path is read from the "
                                                  rf"current directory, {tmp_path}\)"):
        IndexedDataset("runs/data/x_text_document")


def test_a_killed_writers_temporary_files_are_removed_by_the_next_one(tmp_path,
                                                                     monkeypatch):
    """Named by host and process: a dead process's on this host are removed; a live one's (a
    run writing the same prefix now) and another host's (unseen processes) are kept."""
    import socket
    import subprocess
    import sys
    from megagpt.data.indexed import IndexedDatasetWriter
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host, prefix = socket.gethostname(), tmp_path / "d"
    dead = [tmp_path / f"d.{kind}.tmp-{host}-{ended.pid}" for kind in ("bin", "sizes", "idx")]
    kept = [tmp_path / f"d.bin.tmp-{host}-{os.getppid()}",
            tmp_path / f"d.bin.tmp-other-host-{ended.pid}",
            tmp_path / f"d.bin.tmp-{host}-2-{ended.pid}",       # host "vm-2" when this is "vm"
            tmp_path / f"e.bin.tmp-{host}-{ended.pid}"]          # another prefix's
    for path in dead + kept:
        path.write_bytes(b"partial")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        assert sorted(writer.removed_leftovers) == sorted(str(p) for p in dead)
        writer.add_document(np.arange(3))
        writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["d.bin", "d.idx"] + [p.name for p in kept])
    # one it may not remove (another user's, in a shared folder) is left, and the writer writes
    dead[0].write_bytes(b"partial")
    real_unlink = os.unlink

    def refused(path, *args, **kwargs):
        if str(path) == str(dead[0]):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", refused)
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        assert writer.removed_leftovers == []
        writer.add_document(np.arange(3))
        writer.finalize()
    assert dead[0].exists()

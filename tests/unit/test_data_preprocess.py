"""preprocess_jsonl and tools/preprocess_data.py: output, worker independence, bad input, errors."""
import errno
import gzip
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.data import jsonl
from megagpt.data.jsonl import InputError
from megagpt.data.preprocess import PreprocessError, preprocess_jsonl
from megagpt.data.tokenizer import TokenizerError, load_tokenizer
from megagpt.testing import sigterm_when_ready

REPO = Path(__file__).resolve().parents[2]
DOCS = [f"Document {i}: " + "to be or not to be " * (i % 7 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def write_lines(path: Path, lines: list) -> Path:
    """One line an item: dicts become JSON, bytes are written as they are."""
    with open(path, "wb") as f:
        for item in lines:
            f.write((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n")
    return path


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_writes_megatron_named_pair_with_eod(tmp_path, gpt2):
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    summary = preprocess_jsonl(src, tmp_path / "out" / "c", append_eod=True, progress=False)
    ds = IndexedDataset(tmp_path / "out" / "c_text_document")
    assert len(ds) == len(DOCS) == summary.documents
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == gpt2.encode(text) + [gpt2.eod_id]
    assert summary.tokens == ds.num_tokens and summary.skipped.total == 0
    assert summary.input_bytes == src.stat().st_size
    assert files(tmp_path / "out") == ["c_text_document.bin", "c_text_document.idx",
                                       "c_text_document.meta.json"]
    assert "documents: 40" in summary.format() and "skipped 0 lines" in summary.format()
    record = json.loads((tmp_path / "out" / "c_text_document.meta.json").read_text())
    prefix = tmp_path / "out" / "c_text_document"
    assert record == {"tokenizer": gpt2.source, "vocab_size": 50257, "ids_below": 50257,
                      "eod_id": 50256, "vocab_sha256": gpt2.fingerprint, "json_key": "text",
                      "append_eod": True, "made_by": "tools/preprocess_data.py",
                      "bin_bytes": os.path.getsize(f"{prefix}.bin"),
                      "idx_bytes": os.path.getsize(f"{prefix}.idx")}


def test_a_literal_end_of_document_string_is_text(tmp_path, gpt2):
    # Web text quoting "<|endoftext|>" must not split its document: only --append-eod adds the id.
    src = write_lines(tmp_path / "in.jsonl", [{"text": "before <|endoftext|> after"}])
    preprocess_jsonl(src, tmp_path / "c", append_eod=True, workers=2, progress=False)
    ids = IndexedDataset(tmp_path / "c_text_document")[0].tolist()
    assert ids.count(gpt2.eod_id) == 1 and ids[-1] == gpt2.eod_id
    assert gpt2.decode(ids) == "before <|endoftext|> after<|endoftext|>"


def test_output_identical_for_any_worker_count_and_gzip(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS] + [b"{bad"])
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    unnamed = tmp_path / "compressed.jsonl"        # gzip is known by its bytes, not its name
    unnamed.write_bytes(gz.read_bytes())
    outputs = []
    for name, path, workers in (("w1", src, 1), ("w2", src, 2), ("gz", gz, 2),
                                ("unnamed", unnamed, 1)):
        preprocess_jsonl(path, tmp_path / name, append_eod=True, workers=workers, chunk_bytes=200,
                         progress=False)
        outputs.append([(tmp_path / f"{name}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_every_bad_line_class_is_counted_and_skipped(tmp_path, gpt2):
    lines = [
        {"text": "good one"},                  # 1
        b"",                                   # 2 blank line
        b'{"text": "caf\xe9"}',                # 3 invalid UTF-8 (latin-1 byte)
        b'{"text": "unterminated',             # 4 malformed JSON
        b'["a", "list"]',                      # 5 not a JSON object
        {"body": "no text key"},               # 6 missing key
        {"text": 42},                          # 7 non-string value
        {"text": ""},                          # 8 empty document
        b'{"text": "lone \\ud800 surrogate"}',  # 9 valid JSON, not encodable as UTF-8
        {"text": "good two"},                  # 10
        b'{"text": "bad',                      # 11 malformed JSON again
    ]
    src = write_lines(tmp_path / "in.jsonl", lines)
    summary = preprocess_jsonl(src, tmp_path / "o", workers=2, chunk_bytes=30, progress=False)
    assert summary.documents == 2
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[0].tolist(), ds[1].tolist()] == [gpt2.encode("good one"), gpt2.encode("good two")]
    assert summary.skipped.counts == {"blank line": 1, "invalid UTF-8": 2, "malformed JSON": 2,
                                      "not a JSON object": 1, "missing key 'text'": 1,
                                      "non-string value for 'text'": 1, "empty document": 1}
    assert summary.skipped.first_lines["invalid UTF-8"] == [3, 9]
    assert summary.skipped.first_lines["malformed JSON"] == [4, 11]
    report = summary.format()
    assert "skipped 9 line(s):" in report and "malformed JSON: 2 (lines 4, 11)" in report


def test_several_keys_stay_aligned(tmp_path, gpt2):
    src = write_lines(tmp_path / "in.jsonl", [{"title": "A", "text": "alpha"}, {"title": "B"},
                                             {"title": "C", "text": "gamma"}])
    summary = preprocess_jsonl(src, tmp_path / "o", json_keys=["title", "text"], progress=False)
    titles, texts = IndexedDataset(tmp_path / "o_title_document"), IndexedDataset(tmp_path / "o_text_document")
    assert [titles[i].tolist() for i in range(2)] == [gpt2.encode("A"), gpt2.encode("C")]
    assert [texts[i].tolist() for i in range(2)] == [gpt2.encode("alpha"), gpt2.encode("gamma")]
    assert summary.skipped.first_lines == {"missing key 'text'": [2]}


@pytest.mark.parametrize("case, error, message", [
    ("missing_input", InputError, "--input '.*nope.jsonl' does not exist"),
    ("empty_input", InputError, "--input '.*empty.jsonl' is empty"),
    ("folder_input", InputError, "is not a file"),
    ("unreadable_input", InputError, r"--input '.*in.jsonl' cannot be read \(Permission denied\); "
                                     r"fix: check its permissions"),
    ("all_bad", PreprocessError, "(?s)has no usable document for --json-keys text;.*malformed JSON: 2"),
    ("unwritable_output", PreprocessError, "--output-prefix .*cannot create the folder"),
    ("bad_tokenizer", TokenizerError, "--tokenizer '.*no_such_tok' does not exist; fix: give"),
    ("damaged_gzip", InputError, "--input '.*in.jsonl.gz': cannot read past line .*gzip -t"),
    ("corrupt_gzip", InputError, "--input '.*in.jsonl.gz': cannot read past line .*gzip -t"),
    ("disk_full", PreprocessError, "--output-prefix .*cannot write .*No space left.*free space"),
    ("zero_workers", PreprocessError, "--workers 0 must be a positive integer"),
    ("no_keys", PreprocessError, r"--json-keys \[\]: give one or more"),
    ("repeated_key", PreprocessError, "repeats a key"),
    ("zero_chunk_bytes", PreprocessError, "--chunk-bytes 0 must be a positive number of bytes"),
    ("folder_in_the_way", PreprocessError, r"--output-prefix '.*o_title_document': .*"
                                           r"o_title_document.bin exists and is not a file; fix: "
                                           r"remove it or choose another prefix"),
    ("folder_prefix", PreprocessError, "--output-prefix '.*out/' names a folder, so the files "
                                       "would be named .*out/_text_document.bin; fix: end it with "
                                       "a name, e.g. '.*out/corpus'"),
])
def test_unusable_input_or_output_fails_cleanly(tmp_path, monkeypatch, case, error, message):
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 200])
    kwargs = dict(input_path=src, output_prefix=tmp_path / "out" / "o", progress=False)
    if case == "missing_input":
        kwargs["input_path"] = tmp_path / "nope.jsonl"
    elif case == "empty_input":
        kwargs["input_path"] = tmp_path / "empty.jsonl"
        kwargs["input_path"].write_bytes(b"")
    elif case == "folder_input":
        kwargs["input_path"] = tmp_path
    elif case == "unreadable_input":     # as a user who may not read it (the tests run as root)
        def denied(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        monkeypatch.setattr(jsonl, "open", denied, raising=False)
    elif case == "all_bad":
        kwargs["input_path"] = write_lines(tmp_path / "bad.jsonl", [b"{x", b"{y"])
    elif case == "unwritable_output":
        (tmp_path / "out").write_text("a file where the folder should be")
        kwargs["output_prefix"] = tmp_path / "out" / "sub" / "o"
    elif case == "bad_tokenizer":
        kwargs["tokenizer"] = tmp_path / "no_such_tok"
    elif case == "damaged_gzip":
        data = gzip.compress(src.read_bytes())
        kwargs["input_path"] = tmp_path / "in.jsonl.gz"
        kwargs["input_path"].write_bytes(data[: len(data) // 2])
        kwargs["chunk_bytes"] = 4096
    elif case == "corrupt_gzip":   # bytes flipped mid-stream: zlib's error, not gzip's
        data = bytearray(gzip.compress(src.read_bytes(), mtime=0))
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        kwargs["input_path"] = tmp_path / "in.jsonl.gz"
        kwargs["input_path"].write_bytes(bytes(data))
        kwargs["chunk_bytes"] = 4096
    elif case == "disk_full":      # the write fails, and so does each file's flush at close

        class Full:
            def __init__(self, f):
                self.f = f

            def close(self):
                self.f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def no_space(self, tokens, lengths):
            self._files = [Full(f) for f in self._files]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(IndexedDatasetWriter, "add_documents", no_space)
    elif case == "zero_workers":
        kwargs["workers"] = 0
    elif case == "no_keys":
        kwargs["json_keys"] = []
    elif case == "repeated_key":
        kwargs["json_keys"] = ["text", "text"]
    elif case == "zero_chunk_bytes":
        kwargs["chunk_bytes"] = 0
    elif case == "folder_prefix":
        kwargs["output_prefix"] = f"{tmp_path / 'out'}/"
    elif case == "folder_in_the_way":      # the second key's .bin is a folder: nothing is written
        kwargs["json_keys"] = ["text", "title"]
        kwargs["input_path"] = write_lines(tmp_path / "t.jsonl", [{"text": "a b", "title": "c"}])
        (tmp_path / "out" / "o_title_document.bin").mkdir(parents=True)
    before = files(tmp_path)
    with pytest.raises(error, match=message):
        preprocess_jsonl(**kwargs)
    assert files(tmp_path) == before  # no partial output, no temporary file


def _die(first_line, lines):
    os._exit(9)   # as the kernel's out-of-memory killer would end a worker


def test_a_worker_that_dies_fails_the_run_instead_of_hanging(tmp_path, monkeypatch):
    import megagpt.data.preprocess as preprocess
    monkeypatch.setattr(preprocess, "encode_chunk", _die)   # forked workers see it
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    with pytest.raises(PreprocessError, match="an encoding worker process died .*fewer --workers"):
        preprocess_jsonl(src, tmp_path / "o", workers=2, progress=False)
    assert files(tmp_path) == ["in.jsonl"]


def test_an_encoding_worker_ignores_ctrl_c_and_ends_at_sigterm_without_unwinding():
    """As the pool starts one (forked): Ctrl-C, which reaches the whole group, is the parent's
    to handle; SIGTERM's default action ends it at once (a SystemExit raised inside the pool's
    queue code could leave a lock taken and hang the run)."""
    import megagpt.data.preprocess as preprocess
    pid = os.fork()
    if pid == 0:
        try:     # the parent's handlers, inherited by the fork: a stop signal raises
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            signal.signal(signal.SIGINT, signal.default_int_handler)
            preprocess._init_worker("gpt2", ("text",), False, "uint16")
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os._exit(0)               # reached only when a signal did not end it
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


def test_a_stop_signal_stops_reading_the_input_at_the_next_chunk(tmp_path, monkeypatch):
    """Noted while the pool runs, a stop signal is acted on before the next chunk is sent: the
    run read on to the end of the input before (nothing was left behind, but a large corpus
    kept a stopped run going for as long as a whole one)."""
    import megagpt.data.preprocess as preprocess
    chunks, read = preprocess._chunks, []

    def chunks_then_sigterm(stream, chunk_bytes):
        for chunk in chunks(stream, chunk_bytes):
            read.append(chunk)
            if len(read) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield chunk
    monkeypatch.setattr(preprocess, "_chunks", chunks_then_sigterm)
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 200])
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # as run_main's tools
    try:
        with pytest.raises(SystemExit) as info:
            preprocess_jsonl(src, tmp_path / "o", workers=1, chunk_bytes=256, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 143 and len(read) == 3      # of 2,800 chunks
    assert files(tmp_path) == ["in.jsonl"]


def test_a_dataset_already_there_survives_a_failed_run(tmp_path, monkeypatch):
    """Two keys: the second key's index fails to write, so neither output replaces the pair a
    previous run left (before, the first key's new pair had replaced it and was then deleted)."""
    src = write_lines(tmp_path / "in.jsonl", [{"title": "t", "text": t} for t in DOCS])
    preprocess_jsonl(src, tmp_path / "o", json_keys=["title", "text"], progress=False)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path) if name.startswith("o_")}
    write_index = IndexedDatasetWriter.write_index

    def fail_for_text(self):
        if self.prefix.endswith("_text_document"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        write_index(self)

    monkeypatch.setattr(IndexedDatasetWriter, "write_index", fail_for_text)
    other = write_lines(tmp_path / "other.jsonl", [{"title": "x", "text": "y"}])
    with pytest.raises(PreprocessError, match="--output-prefix .*cannot write the index"):
        preprocess_jsonl(other, tmp_path / "o", json_keys=["title", "text"], progress=False)
    after = {name: (tmp_path / name).read_bytes() for name in files(tmp_path) if name.startswith("o_")}
    assert after == before and len(before) == 6      # .bin, .idx and .meta.json of each key


def test_byte_order_mark_and_lone_surrogate_escapes(tmp_path, gpt2):
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode(),   # a BOM: still read
             b'{"text": "half a pair \\ud83d here"}',                     # skipped, counted
             b'{"text": "a whole pair \\ud83d\\ude00"}']                  # kept
    src = write_lines(tmp_path / "in.jsonl", lines)
    summary = preprocess_jsonl(src, tmp_path / "o", progress=False)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [gpt2.encode("first"),
                                                        gpt2.encode("a whole pair \U0001f600")]
    assert summary.skipped.first_lines == {"invalid UTF-8": [2]}


def test_progress_bar_shows_rates(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    preprocess_jsonl(src, tmp_path / "o", chunk_bytes=100)
    err = capsys.readouterr().err
    assert "preprocess" in err and "B/s" in err and "docs_per_s" in err


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_command_line(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"text": "hello"}, b"{oops", {"text": "world"}])
    ok = run_tool("--input", str(src), "--output-prefix", "d/c", "--tokenizer", "gpt2",
                  "--json-keys", "text", "--append-eod", "--workers", "2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "documents: 2" in ok.stdout and "malformed JSON: 1 (line 2)" in ok.stdout
    assert np.array_equal(IndexedDataset(tmp_path / "d" / "c_text_document")[1], [6894, 50256])
    cpus = len(os.sched_getaffinity(0))
    many = run_tool("--input", str(src), "--output-prefix", "d/m", "--workers", str(cpus + 1),
                    cwd=tmp_path)
    assert many.returncode == 0 and (f"note: --workers {cpus + 1} is more than the {cpus} CPUs "
                                     f"this process may use") in many.stderr, many.stderr
    assert cpus < 2 or "note:" not in ok.stderr       # --workers 2 fits



@pytest.mark.slow
@pytest.mark.parametrize("to_group, signum, status", [
    (False, signal.SIGTERM, 143), (True, signal.SIGTERM, 143), (True, signal.SIGINT, 130),
    (False, signal.SIGKILL, -signal.SIGKILL)],
    ids=["sigterm-the-tool", "sigterm-its-process-group", "ctrl-c", "sigkill-the-tool"])
def test_a_stop_signal_mid_run_leaves_nothing_behind(tmp_path, to_group, signum, status):
    """SIGTERM (from kill, timeout, a scheduler) unwinds like Ctrl-C: the temporary files are
    removed, no dataset is left half-written and the worker processes end too. Ctrl-C, which a
    terminal sends to the whole group, is one line: no worker prints a traceback. SIGKILL
    cannot be handled: its temporary files stay, but no dataset, and the workers end too."""
    src = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 20000])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                             "--input", str(src), "--output-prefix", str(out / "c"),
                             "--workers", "2", "--chunk-bytes", "4096", "--no-progress"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = sigterm_when_ready(
        proc, lambda: out.is_dir() and any(".tmp" in f.name for f in out.iterdir()),
        to_group=to_group, signum=signum)
    assert "documents:" not in output, "the run ended before it could be interrupted"
    assert proc.returncode == status, output
    assert "Traceback" not in output, output
    left = sorted(f.name for f in out.iterdir())
    if signum == signal.SIGKILL:
        assert left and all(".tmp-" in name for name in left), output
    else:
        assert left == [], output
    deadline = time.time() + 10
    while time.time() < deadline:    # the workers follow their parent out
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the interrupted run")
    if signum == signal.SIGKILL:     # the next run to the same output removes what it left
        small = write_lines(tmp_path / "small.jsonl", [{"text": "hello"}])
        again = run_tool("--input", str(small), "--output-prefix", str(out / "c"), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        said = again.stdout.split(f"removed {len(left)} temporary file(s) that a run killed "
                                  f"outright had left: ")[1].splitlines()[0]
        assert sorted(said.split(", ")) == left, again.stdout
        assert sorted(f.name for f in out.iterdir()) == [
            "c_text_document.bin", "c_text_document.idx", "c_text_document.meta.json"]


def test_command_line_errors_exit_2(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "preprocess_data.py"))["main"]
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "error: --input" in capsys.readouterr().err
    src = write_lines(tmp_path / "in.jsonl", [{"text": "hello"}])
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer", "nope"]) == 2
    assert "error: --tokenizer 'nope' does not exist; fix: give" in capsys.readouterr().err
    assert files(tmp_path) == ["in.jsonl"]

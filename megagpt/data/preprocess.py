"""Preprocessing: jsonl (or .jsonl.gz) documents -> Megatron `.bin`/`.idx` pairs, streamed.

`preprocess_jsonl` is what `tools/preprocess_data.py` runs. The main process reads raw lines in
chunks of about `chunk_bytes`, hands each chunk to a pool of `workers` processes (each parses JSON
and encodes the whole chunk with one `encode_batch` call), and writes the results in input order.
At most `2 * workers + 2` chunks are in flight, so memory stays flat for any input size, and the
output bytes are the same for any worker count (chunks are cut the same way and written in order).

Bad lines are skipped and counted by reason (blank, invalid UTF-8, malformed JSON, not an object,
missing key, non-string value, empty document), keeping the first line numbers of each. With
several `json_keys`, a line is kept only when every key is valid, so the documents of all outputs
stay aligned. Unusable input or output raises `PreprocessError` (or `InputError`/`TokenizerError`)
and leaves no file behind: outputs are written under temporary names and renamed at the end.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megagpt import fsutil
from megagpt.data import jsonl
from megagpt.data.indexed import (IndexedDatasetWriter, best_dtype, bin_path, check_replaceable,
                                  idx_path, tokenizer_record)
from megagpt.data.tokenizer import load_tokenizer


class PreprocessError(ValueError):
    """Preprocessing cannot run or produced nothing; the message names the argument and a fix."""


def output_prefix_for(output_prefix: str | os.PathLike, key: str) -> str:
    """Megatron's naming: `<output_prefix>_<key>_document`."""
    return f"{os.fspath(output_prefix)}_{key}_document"


@dataclass
class PreprocessSummary:
    """What a preprocessing run did."""
    input: str
    outputs: list[str]
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    skipped: jsonl.SkipLog = field(default_factory=jsonl.SkipLog)
    removed_leftovers: list[str] = field(default_factory=list)   # a killed run's temporary files

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def format(self) -> str:
        lines = [f"documents: {self.documents:,}  tokens: {self.tokens:,}  input: "
                 f"{self.input_bytes / 1e6:,.1f} MB  output: {self.output_bytes / 1e6:,.1f} MB  "
                 f"time: {self.seconds:.1f} s  {self.mb_per_s:,.2f} MB/s  "
                 f"{self.tokens_per_s:,.0f} tokens/s"]
        lines += [f"wrote {p}.bin, {p}.idx and {p}.meta.json" for p in self.outputs]
        if self.removed_leftovers:
            lines.append(f"removed {len(self.removed_leftovers)} temporary file(s) that a run "
                         f"killed outright had left: "
                         f"{', '.join(os.path.basename(p) for p in self.removed_leftovers)}")
        if self.skipped.total:
            lines.append(f"skipped {self.skipped.total:,} line(s):")
            lines += self.skipped.lines()
        else:
            lines.append("skipped 0 lines")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side: parse and encode one chunk of lines

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, json_keys: tuple[str, ...], append_eod: bool,
                 dtype: str) -> None:
    # A terminal's Ctrl-C reaches the whole group: the parent stops the pool, the workers ignore
    # it. SIGTERM ends a worker at once, without unwinding: a SystemExit raised inside the pool's
    # queue code could leave the queue's lock taken, and the other workers and the pool's
    # shutdown would wait for it forever. The parent reports a worker's end (a broken pool),
    # when the signal reached only this worker.
    try:
        fsutil.exit_with_parent()                       # a parent killed outright leaves none
        fsutil.stop_signals_restored_in_child()         # forked while stop signals were deferred
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the count
        tok = load_tokenizer(tokenizer_path)
    except (SystemExit, KeyboardInterrupt):
        os._exit(1)
    _WORKER.update(tokenizer=tok, keys=json_keys, eod=tok.eod_id if append_eod else None,
                   dtype=np.dtype(dtype))


def _encode_texts(texts: list[str], line_nos: list[int]) -> tuple[dict[int, list[int]], set[int]]:
    """Token ids of each text by line number, and the lines whose text cannot be encoded.

    One `encode_batch` call; when it fails (a lone surrogate from a JSON escape cannot become
    UTF-8), the texts are encoded one by one so only the bad ones are lost.
    """
    tok = _WORKER["tokenizer"]
    try:
        return dict(zip(line_nos, tok.encode_batch(texts))), set()
    except Exception:
        encoded, failed = {}, set()
        for text, line_no in zip(texts, line_nos):
            try:
                encoded[line_no] = tok.encode(text)
            except Exception:
                failed.add(line_no)
        return encoded, failed


def _flatten(id_lists: list[list[int]], eod: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One flat token array (end-of-document ids appended when eod is set) and the lengths."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    if eod is None:
        flat = itertools.chain.from_iterable(id_lists)
    else:
        lengths += 1
        flat = itertools.chain.from_iterable(itertools.chain(ids, (eod,)) for ids in id_lists)
    return np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths


def encode_chunk(first_line: int, lines: list[bytes]) -> tuple[list, list[tuple[str, int]]]:
    """Parse and encode a chunk of lines (in a worker).

    Returns, for each key in order, (flat tokens, document lengths), and the skipped lines as
    (reason, line number) records.
    """
    keys, eod, dtype = _WORKER["keys"], _WORKER["eod"], _WORKER["dtype"]
    skips: list[tuple[str, int]] = []
    texts: dict[str, list[str]] = {k: [] for k in keys}
    line_nos: list[int] = []
    for line_no, raw in enumerate(lines, start=first_line):
        obj, reason = jsonl.parse_line(raw)
        values = []
        for key in keys if obj is not None else ():
            value, reason = jsonl.text_field(obj, key)
            if reason:
                break
            values.append(value)
        if reason:
            skips.append((reason, line_no))
            continue
        line_nos.append(line_no)
        for key, value in zip(keys, values):
            texts[key].append(value)
    encoded, failed = [], set()
    for key in keys:
        ids, bad = _encode_texts(texts[key], line_nos)
        encoded.append(ids)
        failed |= bad
    kept = []
    for line_no in line_nos:
        if line_no in failed:
            skips.append((jsonl.INVALID_UTF8, line_no))
        elif any(not ids[line_no] for ids in encoded):  # a normalizer may leave no token
            skips.append((jsonl.EMPTY, line_no))
        else:
            kept.append(line_no)
    skips.sort(key=lambda record: record[1])
    return [_flatten([ids[n] for n in kept], eod, dtype) for ids in encoded], skips


# ---------------------------------------------------------------------------------------------
# Main side: read chunks, keep a bounded window in flight, write in order


def _chunks(stream, chunk_bytes: int) -> Iterator[tuple[int, list[bytes], int]]:
    """(first line number, lines, raw bytes) chunks of about `chunk_bytes` each."""
    lines: list[bytes] = []
    size, first = 0, 1
    for line_no, raw in jsonl.iter_lines(stream):
        if not lines:
            first = line_no
        lines.append(raw)
        size += len(raw) + 1
        if size >= chunk_bytes:
            yield first, lines, size
            lines, size = [], 0
    if lines:
        yield first, lines, size


def _check_output(output_prefix: str | os.PathLike) -> None:
    text = os.fspath(output_prefix)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise PreprocessError(f"--output-prefix {text!r} names a folder, so the files would be "
                              f"named {output_prefix_for(text.rstrip('/' + os.sep) + os.sep, 'text')}"
                              f".bin; fix: end it with a name, e.g. "
                              f"{os.path.join(text, 'corpus')!r}")
    parent = Path(text).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r}: cannot create the "
                              f"folder {str(parent)!r} ({e.strerror}); fix: choose a writable "
                              f"location") from e
    if not os.access(parent, os.W_OK):
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r}: folder "
                              f"{str(parent)!r} is not writable; fix: choose a writable location")


def _encode_in_order(stream, pool, writers: list[IndexedDatasetWriter], summary: PreprocessSummary,
                     chunk_bytes: int, max_in_flight: int, progress: bool,
                     output_prefix: str) -> None:
    """Feed chunks to the pool, at most `max_in_flight` at a time, and write results in order."""
    raw_file = getattr(stream, "fileobj", stream)  # the file on disk, under a GzipFile
    start = time.perf_counter()
    pending: deque = deque()
    with tqdm(total=os.fstat(raw_file.fileno()).st_size, unit="B", unit_scale=True,
              desc="preprocess", disable=not progress, dynamic_ncols=True) as bar:

        def write_oldest() -> None:
            chunk_size, result = pending.popleft()
            try:
                encoded, skips = result.result()
            except BrokenProcessPool as e:   # multiprocessing.Pool would wait for it forever
                fsutil.stop_if_noted()       # ended by the signal that stops this run too
                raise PreprocessError(f"--input {summary.input!r}: an encoding worker process "
                                      f"died (killed, or out of memory) after "
                                      f"{summary.documents:,} documents; fix: fewer --workers, "
                                      f"or more memory (a very long line is held whole)") from e
            try:
                for writer, (tokens, lengths) in zip(writers, encoded):
                    writer.add_documents(tokens, lengths)
            except OSError as e:  # a full disk, a quota: the output's problem, not the input's
                raise PreprocessError(f"--output-prefix {output_prefix!r}: cannot write "
                                      f"({e.strerror or e}) after {summary.documents:,} documents; "
                                      f"fix: free space or choose another location") from e
            summary.documents += len(encoded[0][1])
            summary.tokens += sum(len(tokens) for tokens, _ in encoded)
            summary.input_bytes += chunk_size
            summary.skipped.merge(skips)
            bar.update(raw_file.tell() - bar.n)
            bar.set_postfix(docs_per_s=f"{summary.documents / (time.perf_counter() - start):,.0f}",
                            refresh=False)

        # a damaged gzip stream or an unreadable file raises InputError from jsonl.iter_lines
        for first, lines, size in _chunks(stream, chunk_bytes):
            fsutil.stop_if_noted()
            pending.append((size, pool.submit(encode_chunk, first, lines)))
            if len(pending) >= max_in_flight:
                write_oldest()
        while pending:
            fsutil.stop_if_noted()
            write_oldest()


def _open_writer(prefix: str, dtype: np.dtype, meta: dict,
                 output_prefix: str | os.PathLike) -> IndexedDatasetWriter:
    try:
        return IndexedDatasetWriter(prefix, dtype, meta)
    except OSError as e:
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r}: cannot write "
                              f"{prefix}.bin ({e.strerror}); fix: choose a writable "
                              f"location") from e


def _complete(writers: list[IndexedDatasetWriter], summary: PreprocessSummary,
              keys: tuple[str, ...], output_prefix: str | os.PathLike) -> None:
    """Write every key's index, then put every key's pair in place: a dataset already there is
    replaced only when all the new ones are complete."""
    if summary.documents == 0:
        skipped = "\n".join(summary.skipped.lines())
        raise PreprocessError(f"--input {summary.input!r} has no usable document for --json-keys "
                              f"{' '.join(keys)}; skipped lines:\n{skipped}")
    try:
        for writer in writers:
            writer.write_index()
    except OSError as e:
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r}: cannot write the "
                              f"index ({e.strerror or e}); fix: free space or choose another "
                              f"location") from e
    for writer in writers:
        writer.commit()


def preprocess_jsonl(input_path: str | os.PathLike, output_prefix: str | os.PathLike,
                     tokenizer: str | os.PathLike = "gpt2", json_keys: Sequence[str] = ("text",),
                     append_eod: bool = False, workers: int = 1, chunk_bytes: int = 1 << 18,
                     progress: bool = True) -> PreprocessSummary:
    """Tokenize a jsonl file into `<output_prefix>_<key>_document.bin/.idx`, one pair a key.

    Args:
        input_path: .jsonl or .jsonl.gz (gzip is detected from the content), one object a line.
        output_prefix: path prefix of the outputs; its folder is created if needed.
        tokenizer: anything `load_tokenizer` accepts ("gpt2", a tokenizer.json, a folder).
        json_keys: the string fields to tokenize; each gets its own output pair.
        append_eod: append the tokenizer's end-of-document id to every document.
        workers: encoding processes (>= 1).
        chunk_bytes: approximate raw bytes of input per chunk handed to a worker.
        progress: show a tqdm bar (bytes of the input file, MB/s, documents/s) on stderr.
    Raises:
        InputError, TokenizerError, PreprocessError: with no output left behind, and any
        dataset already at the outputs untouched (they are replaced only once every key's new
        pair is complete).
    """
    keys = tuple(json_keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise PreprocessError(f"--json-keys {list(keys)!r}: give one or more non-empty key names, "
                              f"e.g. --json-keys text")
    if len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys {list(keys)!r} repeats a key; fix: name each once")
    if not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"--workers {workers!r} must be a positive integer; fix: e.g. "
                              f"--workers {os.cpu_count() or 1}")
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
        raise PreprocessError(f"--chunk-bytes {chunk_bytes!r} must be a positive number of bytes; "
                              f"fix: leave the default ({1 << 18})")
    tok = load_tokenizer(tokenizer, "--tokenizer")
    dtype = best_dtype(tok.vocab_size)
    prefixes = [output_prefix_for(output_prefix, k) for k in keys]
    summary = PreprocessSummary(input=os.fspath(input_path), outputs=prefixes)
    start = time.perf_counter()
    with jsonl.open_input(input_path) as stream:
        _check_output(output_prefix)
        for prefix in prefixes:
            try:
                check_replaceable(prefix, "--output-prefix")
            except ValueError as e:
                raise PreprocessError(str(e)) from None
        writers: list[IndexedDatasetWriter] = []
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                          else "spawn")
        # A stop signal (Ctrl-C, SIGTERM) is only noted while the pool runs, and acted on between
        # chunks: raised inside the pool's own code (forking the workers, submitting, waiting
        # for a result), it could leave one of the pool's locks taken and the run hung.
        with fsutil.stop_signals_deferred():
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(os.fspath(tokenizer), keys, append_eod, dtype.str))
            try:
                pool.submit(int)           # the first task forks every worker
                for p, key in zip(prefixes, keys):
                    writers.append(_open_writer(p, dtype, dict(
                        tokenizer_record(tok), json_key=key, append_eod=append_eod,
                        made_by="tools/preprocess_data.py"), output_prefix))
                    summary.removed_leftovers += writers[-1].removed_leftovers
                _encode_in_order(stream, pool, writers, summary, chunk_bytes, 2 * workers + 2,
                                 progress, os.fspath(output_prefix))
                _complete(writers, summary, keys, output_prefix)
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            finally:   # on an error, chunks not started are dropped and the running ones end
                pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    summary.output_bytes = sum(bin_path(p).stat().st_size + idx_path(p).stat().st_size
                               for p in prefixes)
    return summary

"""Reading jsonl input line by line: plain or gzip, bad lines classified and counted, never fatal.

Shared by preprocessing, tokenizer training and the fine-tuning dataset. A line is read as bytes;
`parse_line` decodes and parses it and returns the object or the reason it is skipped. `SkipLog`
counts skipped lines by reason and keeps the line numbers of the first few of each.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
BOM = "\ufeff"
# A JSON escape of a UTF-16 surrogate: a string holding one alone cannot be encoded in UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

BLANK = "blank line"
INVALID_UTF8 = "invalid UTF-8"
MALFORMED_JSON = "malformed JSON"
NOT_OBJECT = "not a JSON object"
MISSING_KEY = "missing key"
NOT_STRING = "non-string value"
EMPTY = "empty document"


class InputError(ValueError):
    """An input file that cannot be used at all (missing, empty, unreadable)."""


class SkipLog:
    """Skipped lines by reason, with the line numbers of the first `keep` of each."""

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.first_lines: dict[str, list[int]] = {}

    def add(self, reason: str, line_no: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < self.keep:
            lines.append(line_no)

    def merge(self, records: list[tuple[str, int]]) -> None:
        for reason, line_no in records:
            self.add(reason, line_no)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One line of text a reason: `  malformed JSON: 3 (lines 4, 9, 12)`."""
        out = []
        for reason in sorted(self.counts):
            first = ", ".join(str(n) for n in self.first_lines[reason])
            more = ", ..." if self.counts[reason] > len(self.first_lines[reason]) else ""
            out.append(f"  {reason}: {self.counts[reason]} (line{'s' if self.counts[reason] > 1 else ''} "
                       f"{first}{more})")
        return out


def open_input(path: str | os.PathLike, what: str = "--input") -> BinaryIO:
    """Open a jsonl file for binary reading, gunzipping when it starts with the gzip magic.

    Raises InputError naming `what` and the path when it is missing, not a file, empty or
    cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist; fix: give a .jsonl or .jsonl.gz file")
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a file; fix: give a .jsonl or .jsonl.gz file")
    try:
        if p.stat().st_size == 0:
            raise InputError(f"{what} {str(p)!r} is empty; fix: give a file with one JSON object "
                             f"a line")
        with open(p, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
        return gzip.open(p, "rb") if gzipped else open(p, "rb")
    except OSError as e:
        raise InputError(f"{what} {str(p)!r} cannot be read ({e.strerror}); fix: check its "
                         f"permissions") from e


def iter_lines(stream: BinaryIO, what: str = "--input") -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its newline) for every line.

    A file that cannot be read to its end (a damaged or truncated gzip stream, an I/O error)
    raises InputError naming `what`, the file and the last line read.
    """
    line_no = 0
    lines = iter(stream)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{what} {getattr(stream, 'name', '?')!r}: cannot read past line "
                             f"{line_no:,} ({type(e).__name__}: {e}); fix: check or replace the "
                             f"file (for gzip: gzip -t)") from e
        line_no += 1
        yield line_no, line.rstrip(b"\r\n")


def _has_lone_surrogate(value) -> bool:
    """True when a string inside `value` (nested dicts and lists) holds an unpaired surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """The JSON object on a line, or None and the reason it is skipped.

    A byte-order mark before the object (a file saved by some Windows editors) is ignored. An
    escape of half a UTF-16 surrogate pair (`"\\ud83d"` alone) counts as invalid UTF-8: no
    tokenizer can encode the string.
    """
    if not raw.strip():
        return None, BLANK
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, INVALID_UTF8
    if text.startswith(BOM):
        text = text[len(BOM):]
    try:
        obj = json.loads(text)
    except ValueError:
        return None, MALFORMED_JSON
    if not isinstance(obj, dict):
        return None, NOT_OBJECT
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        return None, INVALID_UTF8
    return obj, None


def text_field(obj: dict, key: str) -> tuple[str | None, str | None]:
    """`obj[key]` when it is a non-empty string, else None and the reason."""
    if key not in obj:
        return None, f"{MISSING_KEY} {key!r}"
    value = obj[key]
    if not isinstance(value, str):
        return None, f"{NOT_STRING} for {key!r}"
    if not value:
        return None, EMPTY
    return value, None

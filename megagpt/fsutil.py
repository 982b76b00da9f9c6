"""File-system helpers shared by the writers of whole folders (the converter, tokenizer training).

Checkpoints have their own atomic protocol (megagpt.training.checkpoint: a fixed `step_<N>.tmp/`
that every rank writes into, hashes, then one rename); this module is for a folder that one
process writes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replace_folder_atomically(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside `dest` to write into; when the block ends
    normally, rename it to `dest` in one step, so that `dest` is either absent (or the empty folder
    it was) or complete.

    The temporary folder is `.<dest name>.tmp-XXXXXXXX` in dest's parent (created if missing).
    `dest` must be absent or an empty folder when the block ends (callers check that before doing
    the work, with their own message); otherwise, or if the block raises (KeyboardInterrupt
    included), the temporary folder is removed and the exception propagates.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

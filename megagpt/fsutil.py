"""File-system helpers: a folder (the converter, tokenizer training) or a file (the dataset index
cache) that one process writes, renamed into place whole.

Checkpoints have their own atomic protocol (megagpt.training.checkpoint: a fixed `step_<N>.tmp/`
that every rank writes into, hashes, then one rename).

`tempfile` creates its files 0600 and folders 0700 whatever the umask, and a rename keeps the
mode: an index cache beside a shared corpus, or a trained tokenizer, would be readable by its
creator only. Both helpers give the result the mode a plain `open` or `mkdir` would have
(`give_default_mode` does it for a file a library wrote).

The tools that write outputs call `clean_up_on_sigterm` first: SIGTERM then unwinds like Ctrl-C,
so the temporary files and folders are removed instead of left behind.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot sync a
    folder (some network ones refuse) is left to its own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_file(f) -> None:
    """Flush an open file's buffers and then its data to disk."""
    f.flush()
    os.fsync(f.fileno())


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths (folders included) in one atomic step, with Linux's
    renameat2(RENAME_EXCHANGE); False where the system or file system cannot (nothing changed)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def _umask() -> int:
    """The process's umask (read by setting it and back: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def why_not_a_folder(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (or become, with its missing parents) a folder to write in: the
    nearest existing path on the way is a file, or a folder this process may not write; None
    when it can."""
    for at in (Path(path).absolute(), *Path(path).absolute().parents):
        if at.exists():
            if not at.is_dir():
                return f"{at} is a file"
            if not os.access(at, os.W_OK | os.X_OK):
                return f"{at} is not writable"
            return None
    return None


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open`` would have (what a library wrote 0600 included)."""
    os.chmod(path, 0o666 & ~_umask())


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def clean_up_on_sigterm() -> None:
    """Make SIGTERM (from `kill`, `timeout`, a scheduler) raise SystemExit(143) in this process,
    as Ctrl-C raises KeyboardInterrupt: the writers here remove their temporary files on the way
    out, and a tool's worker pool is shut down, where the signal's default would end the process
    on the spot and leave both behind."""
    signal.signal(signal.SIGTERM, _exit)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_noted: list[int] = []      # stop signals that arrived while `stop_signals_deferred`
_deferred_from: dict = {}   # the handlers a deferral replaced (a child forked inside restores them)


def _note(signum, frame):
    _noted.append(signum)


if hasattr(os, "register_at_fork"):   # a child raises only what it received itself
    os.register_at_fork(after_in_child=_noted.clear)


def _raise_noted() -> None:
    """Deliver the noted stop signals again, now, to the handlers in place (which raise,
    ignore or end the process as they would have)."""
    noted = list(dict.fromkeys(_noted))
    _noted.clear()
    for signum in noted:
        signal.raise_signal(signum)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT are only noted; on leaving, the handlers in place before are
    restored and each noted signal is delivered to them again. For work that must not be cut
    mid-way: forking worker processes, where an exception raised inside fork's own hooks is
    swallowed ("Exception ignored in ...": the tool would run on to the end), and a process
    pool's own code, where an exception raised between taking a lock and releasing it leaves
    the lock taken and the pool hung; long work inside checks `stop_if_noted` where it may
    stop. A signal ignored when it starts stays ignored. A process forked inside inherits the
    noting handlers: it calls `stop_signals_restored_in_child` first. Off the main thread, where
    Python cannot set handlers (and signals are not delivered), it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _noted.clear()
    _deferred_from.update({s: signal.signal(s, _note) for s in _STOP_SIGNALS
                           if signal.getsignal(s) is not signal.SIG_IGN})   # ignored stays so
    try:
        yield
    finally:
        for s, handler in _deferred_from.items():
            signal.signal(s, handler)
        _deferred_from.clear()
        _raise_noted()


class StopNoted(BaseException):
    """Raised by `stop_if_noted` inside `stop_signals_deferred` once a stop signal has arrived:
    the work unwinds from a point of its choosing, and on leaving the deferral the signal is
    delivered, its handler's exception (SystemExit, KeyboardInterrupt) taking this one's place."""


def stop_if_noted() -> None:
    """Inside `stop_signals_deferred`: raise `StopNoted` if a stop signal has arrived."""
    if _noted:
        raise StopNoted(_noted[0])


def stop_signals_restored_in_child() -> None:
    """In a worker forked inside `stop_signals_deferred`: the handlers its parent had before the
    deferral are back, and a stop signal this worker received while being forked is delivered
    to them. Elsewhere (a worker started otherwise) it changes nothing."""
    for s, handler in _deferred_from.items():
        signal.signal(s, handler)
    _deferred_from.clear()
    _raise_noted()


def exit_with_parent(interval: float = 1.0) -> None:
    """In a worker process: end it (exit status 1) within `interval` seconds of its parent's
    end, however the parent ended. A parent killed with SIGKILL cannot stop its workers, and a
    worker blocked on a pipe nobody reads would otherwise live on, an orphan holding its core."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextmanager
def write_file_atomically(dest: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Yield a file object open (``mode``) on a new temporary file beside `dest`; when the block
    ends normally, flush it to disk and rename it to `dest` in one step (replacing a file there),
    with the mode a plain ``open`` would give it, so that a crash leaves the old file or the new
    one, never an empty one. If the block raises, the temporary file is removed."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            fsync_file(f)
        give_default_mode(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path` (a folder there, or a parent that cannot be a
    folder), or None: for a tool to check its output before the work, not after."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    return why_not_a_folder(path.absolute().parent)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically (parent folders created)."""
    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    with write_file_atomically(path, "w") as f:
        json.dump(obj, f, indent=2)


def dataset_exists(prefix: str) -> bool:
    """A dataset (`prefix`.idx or .bin) or a file of that name exists."""
    return any(os.path.exists(prefix + suffix) for suffix in ("", ".idx", ".bin"))


class FolderLock:
    """An exclusive advisory lock on `<folder>/.lock`, recording its holder (host, pid, start) in
    the file. The kernel releases it when the holder's process ends, however it ends.

    A POSIX record lock (`fcntl.lockf`), not `flock`: it belongs to the process, so the children
    it forks (data-loader workers) do not hold it on, and NFS carries it between machines.

    `take()` returns None once held, or what the holder recorded while another process holds it.
    On a file system without locks it holds nothing and returns None: `held` says which."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None
        self.held = False

    def take(self) -> str | None:
        import fcntl
        import socket
        import time

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError:                    # not a folder, not writable: the first save says so
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                return holder or "a process that has not written its name yet"
            os.close(fd)                   # ENOLCK, EOPNOTSUPP, ...: no locks here
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode(), 0)
        self.fd, self.held = fd, True
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)              # closing drops the lock; the file stays
            self.fd, self.held = None, False

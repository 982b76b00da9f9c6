"""Atomic writes: the data reaches the disk before the rename publishes it."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from megagpt import fsutil
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter


@pytest.fixture()
def disk_log(monkeypatch):
    """Every fsync (by the path it flushed) and every rename, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_write_file_atomically_flushes_before_and_after_the_rename(tmp_path, disk_log):
    dest = tmp_path / "cache.npy"
    with fsutil.write_file_atomically(dest) as f:
        f.write(b"x" * 1000)
    (rename,) = [e for e in disk_log if e[0] == "rename"]
    tmp = rename[1]
    assert disk_log == [("fsync", tmp), rename, ("fsync", str(tmp_path))]
    assert dest.read_bytes() == b"x" * 1000


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, OSError])
def test_write_file_atomically_leaves_nothing_when_the_block_is_stopped(tmp_path, stop):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit in the tools) while an index cache is
    written removes the temporary file beside a corpus others may share, as an error does."""
    with pytest.raises(stop):
        with fsutil.write_file_atomically(tmp_path / "cache.npy") as f:
            f.write(b"x" * 1000)
            raise stop()
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_is_on_disk_before_it_is_renamed_into_place(tmp_path, disk_log):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_document([1, 2, 3])
        w.finalize()
    renames = [i for i, e in enumerate(disk_log) if e[0] == "rename"]
    synced = {e[1] for e in disk_log[:renames[0]] if e[0] == "fsync"}
    assert {disk_log[i][1] for i in renames} <= synced          # both files flushed first
    assert disk_log[-1] == ("fsync", str(tmp_path))             # and the renames themselves
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [1, 2, 3]


def test_fsync_dir_flushes_a_folder(tmp_path, disk_log):
    fsutil.fsync_dir(tmp_path)
    assert disk_log == [("fsync", str(Path(tmp_path)))]


def test_a_folder_the_file_system_cannot_sync_is_left_to_it(tmp_path, monkeypatch):
    import errno

    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync
    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    fsutil.fsync_dir(tmp_path)                      # some network file systems: not an error
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError):
        fsutil.fsync_dir(tmp_path)                  # a failing disk is


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_signal_while_deferred_is_raised_on_leaving(signum, raised):
    previous = signal.getsignal(signal.SIGTERM)
    fsutil.clean_up_on_sigterm()
    try:
        with pytest.raises(raised):
            with fsutil.stop_signals_deferred():
                os.kill(os.getpid(), signum)
                time.sleep(0.05)        # the handler has run by now, and only noted it
                reached = True
        assert reached
        assert signal.getsignal(signal.SIGTERM) is fsutil._exit
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_deferred_signal_reaches_the_handler_that_was_in_place():
    """A custom handler is called, an ignored signal stays ignored: the deferral only delays."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with fsutil.stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert received == []
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def test_work_inside_a_deferral_stops_where_it_checks():
    """stop_if_noted: the work stops at its next check after the signal, and the signal's own
    exception (SIGTERM's SystemExit(143)) is what leaves the deferral; an ignored one is not
    noted."""
    previous = signal.getsignal(signal.SIGTERM)
    fsutil.clean_up_on_sigterm()
    done = []
    try:
        with pytest.raises(SystemExit) as info:
            with fsutil.stop_signals_deferred():
                for i in range(3):
                    fsutil.stop_if_noted()
                    done.append(i)
                    if i == 1:
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.05)
        assert done == [0, 1] and info.value.code == 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with fsutil.stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            fsutil.stop_if_noted()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_deferring_off_the_main_thread_changes_nothing():
    errors = []

    def work():
        try:
            with fsutil.stop_signals_deferred():
                pass
        except Exception as e:   # noqa: BLE001 - the test reports it
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []


def _child_restores(conn):
    try:
        fsutil.stop_signals_restored_in_child()
        conn.send(("ran on", signal.getsignal(signal.SIGTERM) is fsutil._exit))
    except SystemExit as e:
        conn.send(("raised", e.code))


def test_a_child_forked_while_deferred_gets_its_parents_handlers_and_not_its_signals():
    previous = signal.getsignal(signal.SIGTERM)
    fsutil.clean_up_on_sigterm()
    try:
        with pytest.raises(SystemExit):
            with fsutil.stop_signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)      # the parent's, before the fork
                time.sleep(0.05)
                ours, theirs = multiprocessing.get_context("fork").Pipe()
                child = multiprocessing.get_context("fork").Process(target=_child_restores,
                                                                     args=(theirs,))
                child.start()
                result = ours.recv()
                child.join()
        assert result == ("ran on", True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_while_the_preprocess_workers_fork_stops_the_tool(tmp_path):
    """Deterministically what a scheduler's SIGTERM can hit: the signal lands inside fork's
    after-fork hook in the parent, where a raised SystemExit is swallowed ("Exception ignored")
    and the tool used to run on to the end and exit 0."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    code = ("import os, signal, sys; from megagpt import fsutil; "
            "from megagpt.data.preprocess import preprocess_jsonl; fsutil.clean_up_on_sigterm(); "
            "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM)); "
            f"preprocess_jsonl({str(src)!r}, {str(tmp_path / 'out' / 'c')!r}, workers=2, "
            "progress=False); print('finished')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 143, result.stdout + result.stderr
    assert "finished" not in result.stdout and "Exception ignored" not in result.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _try_lock(folder, results):
    lock = fsutil.FolderLock(folder)
    results.put((lock.take(), lock.held))


def test_a_folder_lock_is_held_by_one_process_until_it_lets_go(tmp_path):
    lock = fsutil.FolderLock(tmp_path / "ckpt")          # the folder is created
    assert lock.take() is None and lock.held
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_try_lock, args=(tmp_path / "ckpt", results))
    child.start()
    holder, held = results.get(timeout=60)
    child.join(timeout=60)
    assert not held and holder.startswith(f"pid {os.getpid()} on host ")
    lock.release()
    child = ctx.Process(target=_try_lock, args=(tmp_path / "ckpt", results))
    child.start()
    assert results.get(timeout=60) == (None, True)
    child.join(timeout=60)
    assert (tmp_path / "ckpt" / ".lock").is_file()        # the file stays; the lock does not


def test_a_folder_that_cannot_hold_a_lock_is_not_locked(tmp_path):
    (tmp_path / "afile").write_text("x")
    lock = fsutil.FolderLock(tmp_path / "afile")
    assert lock.take() is None and not lock.held


def _ended(pid: int) -> bool:
    """Whether process pid has ended (gone, or a zombie its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _parent_of_a_worker(conn):
    worker = os.fork()
    if worker == 0:
        fsutil.exit_with_parent(interval=0.05)
        conn.send(os.getpid())
        time.sleep(60)          # a worker that would never end by itself
        os._exit(0)
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_ends_when_its_parent_is_killed_outright():
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    parent = ctx.Process(target=_parent_of_a_worker, args=(send,))
    parent.start()
    assert receive.poll(30)
    worker = receive.recv()
    assert not _ended(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    deadline = time.monotonic() + 10
    while not _ended(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(worker)

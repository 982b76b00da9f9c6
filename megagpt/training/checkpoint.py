"""Checkpoints: the on-disk layout, atomic saving, verified loading, and compatibility checks.

A checkpoint is one folder, `<save_dir>/step_<NNNNNNN>/` (the step zero-padded to 7 digits):

    model_tp{t}_pp{p}.pt      one per (tensor, pipeline) rank, written by its data-parallel rank 0
    optim_rank{r:05d}.pt      one per global rank: optimizer state (it may be sharded by ZeRO-1)
                              and the loss-scaler state, as the trainer packs them (with the
                              `optimizer_layout`, [name, size] of each piece the optimizer
                              steps, in its order, checked on resume by
                              `check_optimizer_layout`, and the skipped-step count)
    rng_rank{r:05d}.pt        one per global rank: `capture_rng_state(...)`
    meta.json                 config, step, consumed_samples, parallel sizes, world size, the
                              megagpt version, a timestamp, and `files`: name -> SHA-256 (plus
                              `file_sizes`: name -> bytes)
    deepspeed/, ...           what an engine writes itself (`write_extra`: DeepSpeed's own
                              checkpoint files); listed in `files` by path, hashed by rank 0

Saving is atomic. Every rank writes its files into `step_<N>.tmp/` and records each file's hash
beside it; once every rank has reported success, rank 0 checks that every expected file is
there, writes meta.json, renames the folder to `step_<N>/` (the atomic step; a `step_<N>/` saved before, by a run
that resumed from an earlier step, is swapped with the new one in one renameat2 exchange on
Linux, so that the step is never missing), replaces `<save_dir>/latest` (a one-line
file naming the folder) with write-then-`os.replace`, removes stale `*.tmp` folders and prunes the
earlier steps to `keep_last` complete checkpoints (later steps, left by a run this one resumed
before, are kept); every rank then learns whether rank 0 succeeded. The ranks agree at each of
these points through an all-reduce (`all_min`), not a barrier: a rank that fails to create the
folder, write its files or finalize raises a CheckpointError naming its cause, and every other
rank raises one saying that another rank failed, instead of waiting for it in a barrier. Once
the new step is `latest`, failing to remove a stale folder or prune an old step is a warning, not a
failed save. A process killed at any point leaves either the previous checkpoint as the newest
complete one, or the new one complete.

`start_checkpoint_save` is the same save in the background (`checkpoint.async_save`): the state
is copied to host memory, a thread writes this rank's files, and `PendingSave.complete` (a
collective, once every rank's thread is done) checks they all succeeded and finalizes as above.

A folder is complete when its meta.json exists and lists files that all exist with their recorded
sizes (`is_complete`); `load_checkpoint` also checks each SHA-256 it reads. Files are written with
`torch.save` and read with `torch.load(weights_only=True)`: their contents must be tensors,
numbers, strings, lists, tuples and dicts (optimizer and model state dicts are).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import megagpt
from megagpt.fsutil import exchange_paths, fsync_dir, fsync_file
from megagpt.parallel.state import RankLayout

LATEST_FILE = "latest"
META_FILE = "meta.json"
HASH_SUFFIX = ".sha256"
STEP_RE = re.compile(r"step_(\d{7})")
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_heads", "n_layers", "seq_length",
                       "ffn_hidden_size", "activation", "make_vocab_size_divisible_by")
# the value of a field a checkpoint's config lacks (it was saved before the field existed)
ARCHITECTURE_DEFAULTS = {"activation": "gelu_tanh"}
PARALLEL_KEYS = ("tp", "pp", "dp", "vp")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit the config."""


# ---------------------------------------------------------------------------------------------
# Names

def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def expected_files(tp: int, pp: int, world_size: int) -> list[str]:
    """Every file a checkpoint of this layout holds besides meta.json."""
    return ([model_file(t, p) for p in range(pp) for t in range(tp)]
            + [optim_file(r) for r in range(world_size)] + [rng_file(r) for r in range(world_size)])


# ---------------------------------------------------------------------------------------------
# Writing

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        fsync_file(f)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_hashed(path: Path, obj) -> None:
    """torch.save `obj` to `path`, flush it to disk, and write its SHA-256 to `path.sha256`."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        fsync_file(f)
    path.with_name(path.name + HASH_SUFFIX).write_text(sha256_file(path), encoding="utf-8")


def _check_save_args(step: int, meta: dict, keep_last: int, ranks: dict) -> RankLayout:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step={step!r} must be an integer >= 0")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"checkpoint.keep_last={keep_last!r}: must be an integer >= 1, or 0 to "
                         f"keep every checkpoint")
    missing = [k for k in ("config", "consumed_samples", "parallel") if k not in meta]
    if missing:
        raise ValueError(f"save_checkpoint: meta lacks {', '.join(missing)}; it needs config (the "
                         f"config dict), consumed_samples, and parallel ({{tp, pp, dp, vp}})")
    parallel = meta["parallel"]
    absent = [k for k in PARALLEL_KEYS if k not in parallel]
    if absent:
        raise ValueError(f"save_checkpoint: meta['parallel']={parallel} lacks "
                         f"{', '.join(absent)}; it needs tp, pp, dp and vp")
    layout = RankLayout(parallel["tp"] * parallel["pp"] * parallel["dp"],
                        parallel["tp"], parallel["pp"])
    if not 0 <= ranks["rank"] < layout.world_size:
        raise ValueError(f"save_checkpoint: rank={ranks['rank']} is outside the world of size "
                         f"{layout.world_size} = tp x pp x dp given in meta['parallel']={parallel}")
    if layout.coords(ranks["rank"]) != (ranks["tp_rank"], ranks["dp_rank"], ranks["pp_rank"]):
        raise ValueError(f"save_checkpoint: rank={ranks['rank']} is (tp, dp, pp) = "
                         f"{layout.coords(ranks['rank'])} in the layout {parallel}, but "
                         f"tp_rank={ranks['tp_rank']}, dp_rank={ranks['dp_rank']}, "
                         f"pp_rank={ranks['pp_rank']} were given")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_checkpoint: meta must be JSON-serialisable: {e}") from e
    return layout


def save_checkpoint(save_dir: str | Path, step: int, *, rank: int, tp_rank: int, pp_rank: int,
                    dp_rank: int, model_state, optim_state, rng_state, meta: dict,
                    keep_last: int, all_min: Callable[[int], int],
                    write_extra: Callable[[Path], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> Path:
    """Write this rank's part of the checkpoint of `step`; collective over every rank.

    Args:
        save_dir: `checkpoint.save_dir`; created if missing.
        step: optimizer steps completed.
        rank, tp_rank, pp_rank, dp_rank: this process's global rank and its coordinates.
        model_state: the state of the model chunk(s) of this (tp, pp) rank; written by dp_rank 0.
        optim_state: this rank's optimizer state, plus what else the trainer keeps with it (e.g.
            `{"optimizer": opt.state_dict(), "scaler": scaler.state_dict()}`).
        rng_state: `capture_rng_state(tracker_states)`.
        meta: JSON-serialisable dict with at least `config` (the config dict),
            `consumed_samples`, and `parallel` = {tp, pp, dp, vp} (add `zero_stage` when the
            optimizer state is sharded); other keys are kept. Read on rank 0 only, checked on all.
            `step`, `world_size`, `megagpt_version`, `timestamp`, `files` and `file_sizes` are
            added.
        keep_last: complete checkpoints kept after this one is written (0 keeps all). The one just
            written is always kept; the others are the highest steps before it. Steps after it
            (a run resumed from an earlier checkpoint leaves the later ones of its first
            attempt) are never pruned: they are another run's. A step folder that is a link is
            pruned by removing the link; what it points to is left.
        all_min: the minimum of an integer over every rank (an all-reduce of MIN; `lambda v: v`
            for one process). The ranks agree through it after each stage of the save (the
            folder created, every rank's files written, rank 0's rename and `latest`), so a
            failure on any rank raises on every rank: a CheckpointError, the failing rank's
            naming its cause, the others' saying that another rank failed.
        write_extra: called on every rank with the temporary folder, before this rank's own
            files are written: an engine that saves its own files (DeepSpeed's
            `save_checkpoint`, a collective) writes them there. Its failure raises at once on
            that rank (the others then fail in the engine's own collective). Every file it
            leaves, at any depth, is hashed and listed in meta.json like the others, so it is
            part of the atomic rename, the completeness check and pruning.
        warn: told (on rank 0) of what went wrong after the checkpoint became `latest`: removing
            leftover `*.tmp` folders or pruning old steps. The save stands; the default prints
            to stderr.

    Returns the final folder `<save_dir>/step_<NNNNNNN>`.
    """
    layout = _check_save_args(step, meta, keep_last, dict(rank=rank, tp_rank=tp_rank,
                                                          pp_rank=pp_rank, dp_rank=dp_rank))
    save_dir = Path(save_dir)
    tmp = _prepare_tmp(save_dir, step, rank, all_min)
    if write_extra is not None:
        try:
            write_extra(tmp)
        except Exception as e:   # raised at once: the engine's own collective is broken already,
            # and the other ranks, waiting in it, fail there instead of in our agreement
            raise _save_error(save_dir, step, "the engine's files were not written", e) from e
    error = None
    try:
        _write_rank_files(tmp, rank, tp_rank, pp_rank, dp_rank, model_state, optim_state,
                          rng_state)
    except Exception as e:     # a full disk (torch.save reports it as a RuntimeError), ...
        error = _save_error(save_dir, step, "this rank's files were not written", e)
    _agree(all_min, error, save_dir, step, "another rank's files were not written")
    return _end_save(save_dir, step, tmp, rank, meta, layout, keep_last, all_min, warn)


def _save_error(save_dir: Path, step: int, what: str, e: BaseException) -> CheckpointError:
    """A CheckpointError for a save that failed with `e`, with the fix its cause calls for."""
    if isinstance(e, CheckpointError):
        return e
    cause = next((c for c in (e, e.__cause__, e.__context__) if isinstance(c, OSError)), e)
    code = getattr(cause, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"fix: make checkpoint.save_dir={save_dir} writable, or choose another"
    elif code in (None, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        # a full disk or quota, also as torch.save reports it (a RuntimeError without an errno)
        fix = f"fix: free space in checkpoint.save_dir={save_dir} or choose another"
    elif code in (errno.EEXIST, errno.ENOTDIR):     # a file where a folder goes
        fix = (f"fix: checkpoint.save_dir={save_dir} or a folder above it is now a file: move "
               f"it away, or choose another save_dir")
    else:   # an I/O error, ...
        fix = f"fix: see to checkpoint.save_dir={save_dir} as the cause says, or choose another"
    error = CheckpointError(f"saving {save_dir / step_dir_name(step)}: {what} "
                            f"({getattr(cause, 'strerror', None) or cause}); {fix} (the previous "
                            f"checkpoint is still `latest`)")
    error.__cause__ = e
    return error


def _agree(all_min: Callable[[int], int], error: CheckpointError | None, save_dir: Path,
           step: int, others: str) -> None:
    """Collective: raise on every rank when any rank has an error (its own, or `others`)."""
    if all_min(0 if error else 1):
        return
    if error is not None:
        raise error
    raise CheckpointError(f"saving {save_dir / step_dir_name(step)}: {others} (its own message "
                          f"says why); the previous checkpoint is still `latest`")


@dataclasses.dataclass
class PendingSave:
    """A checkpoint being written by this rank's thread (`start_checkpoint_save`)."""
    step: int
    final: Path
    thread: threading.Thread
    errors: list
    end: Callable[[], Path]
    states: tuple          # the host copy being written (`reuse` it for the next save)

    def written(self) -> bool:
        """This rank's files are written (or failed): no wait."""
        return not self.thread.is_alive()

    def complete(self, all_min: Callable[[int], int]) -> Path:
        """Collective over every rank: wait for this rank's thread, check that every rank wrote
        its files, and finalize the checkpoint (meta.json, rename, `latest`, pruning).

        all_min: the minimum of an integer over every rank (an all-reduce; identity alone).
        A rank that failed raises its error, the others a CheckpointError saying a rank failed;
        the folder stays `step_<N>.tmp/`, removed by the next save."""
        self.thread.join()
        error = None
        if self.errors:
            error = _save_error(self.final.parent, self.step,
                                "this rank's files were not written in the background",
                                self.errors[0])
        _agree(all_min, error, self.final.parent, self.step,
               "another rank's files were not written in the background")
        return self.end()


def start_checkpoint_save(save_dir: str | Path, step: int, *, rank: int, tp_rank: int,
                          pp_rank: int, dp_rank: int, model_state, optim_state, rng_state,
                          meta: dict, keep_last: int, all_min: Callable[[int], int],
                          reuse: tuple | None = None,
                          warn: Callable[[str], None] | None = None) -> PendingSave:
    """`save_checkpoint` in the background: collective (every rank calls it at the same step).

    The states are copied to host memory before this returns, so training may change the
    originals at once; a thread then writes this rank's files into `step_<N>.tmp/`. Call
    `PendingSave.complete` on every rank (it waits for the thread) to make the checkpoint the
    latest; until then the previous one is. Arguments as for `save_checkpoint` (no
    `write_extra`: an engine that writes its own files saves in the foreground), and `reuse`:
    the `states` of a completed earlier save, whose tensors of the same shape and dtype are
    copied into instead of allocated again (fresh host memory costs more than the copy)."""
    layout = _check_save_args(step, meta, keep_last, dict(rank=rank, tp_rank=tp_rank,
                                                          pp_rank=pp_rank, dp_rank=dp_rank))
    save_dir = Path(save_dir)
    states = _host_copy((model_state if dp_rank == 0 else None, optim_state, rng_state), reuse)
    tmp = _prepare_tmp(save_dir, step, rank, all_min)
    errors: list = []

    def write():
        try:
            _write_rank_files(tmp, rank, tp_rank, pp_rank, dp_rank, *states)
        except Exception as e:            # told to every rank by PendingSave.complete
            errors.append(e)

    thread = threading.Thread(target=write, name=f"checkpoint-step-{step}")
    thread.start()
    return PendingSave(step, save_dir / step_dir_name(step), thread, errors,
                       lambda: _end_save(save_dir, step, tmp, rank, meta, layout, keep_last,
                                         all_min, warn), states)


def _host_copy(obj, into=None):
    """obj with every tensor copied to host memory (containers rebuilt, so nothing is shared
    with the live training state), into the tensors at the same place in `into` where their
    shape and dtype match."""
    if isinstance(obj, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into.shape == obj.shape
                and into.dtype == obj.dtype):
            return into.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _host_copy(v, into.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(_host_copy(v, i) for v, i in zip(obj, into))
    return obj


# what a rank that does not see rank 0's save dir is told (several nodes, no shared folder)
SHARED_SAVE_DIR_FIX = ("must be one folder every node shares; fix: put it on a file system "
                       "mounted on every node, at the same path")


def _prepare_tmp(save_dir: Path, step: int, rank: int, all_min: Callable[[int], int]) -> Path:
    """Collective: rank 0 creates an empty `step_<N>.tmp/`; every rank returns it, or raises
    when rank 0 could not create it or a rank does not see it (a save dir not shared by every
    node)."""
    tmp = save_dir / f"{step_dir_name(step)}.tmp"
    error = None
    if rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists() or tmp.is_symlink():
                _remove_folder(tmp)
            tmp.mkdir()
        except OSError as e:
            error = _save_error(save_dir, step, f"its folder {tmp} could not be created", e)
    _agree(all_min, error, save_dir, step, "rank 0 could not create its folder")
    if rank != 0 and not tmp.is_dir():
        error = CheckpointError(
            f"saving {save_dir / step_dir_name(step)}: rank {rank} (host "
            f"{socket.gethostname()}) does not see the folder {tmp} rank 0 created: "
            f"checkpoint.save_dir {SHARED_SAVE_DIR_FIX} (the previous checkpoint is still "
            f"`latest`)")
    _agree(all_min, error, save_dir, step, "a rank does not see the folder rank 0 created")
    return tmp


def _remove_folder(path: Path) -> None:
    """Remove a step folder: a link itself (never what it points to), else the whole tree."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def _write_rank_files(tmp: Path, rank: int, tp_rank: int, pp_rank: int, dp_rank: int,
                      model_state, optim_state, rng_state) -> None:
    if dp_rank == 0:
        _write_hashed(tmp / model_file(tp_rank, pp_rank), model_state)
    _write_hashed(tmp / optim_file(rank), optim_state)
    _write_hashed(tmp / rng_file(rank), rng_state)


def _end_save(save_dir: Path, step: int, tmp: Path, rank: int, meta: dict, layout: RankLayout,
              keep_last: int, all_min: Callable[[int], int],
              warn: Callable[[str], None] | None) -> Path:
    """Collective, after every rank wrote its files: rank 0 finalizes; every rank returns the
    folder, or raises when rank 0 could not make it `latest`."""
    error = None
    if rank == 0:
        try:
            _finalize(save_dir, step, tmp, meta, layout, keep_last, warn)
        except (OSError, CheckpointError) as e:     # meta.json, the rename, `latest`
            error = _save_error(save_dir, step, "it could not be completed", e)
    _agree(all_min, error, save_dir, step, "rank 0 could not complete it")
    return save_dir / step_dir_name(step)


def write_checkpoint_offline(save_dir: str | Path, step: int,
                             model_states: dict[tuple[int, int], dict], meta: dict,
                             warn: Callable[[str], None] | None = None) -> Path:
    """Write a whole weights-only checkpoint of a tp x pp layout (dp = 1) from one process.

    The folder is the one `save_checkpoint` writes for that world (tp x pp ranks), saved the
    same atomic way (`step_<N>.tmp/`, meta.json with hashes, rename, `latest`), with empty
    optimizer and RNG files (`{}`) and `meta["weights_only"] = True`: the trainer resumes its
    weights, step and consumed samples and starts the optimizer state fresh. Conversion
    (megagpt/convert.py) writes with it. Nothing in `save_dir` is pruned.

    Args:
        save_dir: the save dir to write `step_<N>/` into; created if missing.
        step: the step the weights were saved at.
        model_states: {(tp_rank, pp_rank): {"chunk<c>": state_dict}} for every rank of the layout
            (`megagpt.model.reshard.shard_full_state` gives it).
        meta: as for `save_checkpoint`, with `parallel` = {tp, pp, dp: 1, vp}.
        warn: as for `save_checkpoint` (a leftover `*.tmp` folder that could not be removed).

    Returns the final folder `<save_dir>/step_<NNNNNNN>`.
    """
    meta = dict(meta, weights_only=True)
    layout = _check_save_args(step, meta, 0, dict(rank=0, tp_rank=0, pp_rank=0, dp_rank=0))
    if layout.dp != 1:
        raise ValueError(f"write_checkpoint_offline: meta['parallel']={meta['parallel']} has "
                         f"dp={layout.dp}; an offline checkpoint holds one replica (dp=1)")
    ranks = {(t, p) for p in range(layout.pp) for t in range(layout.tp)}
    if set(model_states) != ranks:
        raise ValueError(f"write_checkpoint_offline: model_states has the (tp_rank, pp_rank) keys "
                         f"{sorted(model_states)}, the layout tp={layout.tp} x pp={layout.pp} "
                         f"needs {sorted(ranks)}")
    save_dir = Path(save_dir)
    tmp = save_dir / f"{step_dir_name(step)}.tmp"
    save_dir.mkdir(parents=True, exist_ok=True)
    if tmp.exists() or tmp.is_symlink():
        _remove_folder(tmp)
    tmp.mkdir()
    for (tp_rank, pp_rank), state in model_states.items():
        _write_hashed(tmp / model_file(tp_rank, pp_rank), state)
    for rank in range(layout.world_size):
        _write_hashed(tmp / optim_file(rank), {})
        _write_hashed(tmp / rng_file(rank), {})
    _finalize(save_dir, step, tmp, meta, layout, 0, warn)
    return save_dir / step_dir_name(step)


def _finalize(save_dir: Path, step: int, tmp: Path, meta: dict, layout: RankLayout,
              keep_last: int, warn: Callable[[str], None] | None) -> None:
    """Rank 0: meta.json, the rename, `latest`, stale-folder cleanup and pruning. What fails
    once the checkpoint is `latest` (cleanup, pruning) is told to `warn`: the save stands."""
    files, sizes = {}, {}
    for fname in expected_files(layout.tp, layout.pp, layout.world_size):
        hash_path = tmp / (fname + HASH_SUFFIX)
        if not (tmp / fname).is_file() or not hash_path.is_file():
            raise CheckpointError(f"saving {tmp}: {fname} was not written (every rank writes its "
                                  f"files before rank 0 finalizes; did a rank save elsewhere?)")
        files[fname] = hash_path.read_text(encoding="utf-8").strip()
        sizes[fname] = (tmp / fname).stat().st_size
        hash_path.unlink()
    for extra in sorted(p for p in tmp.rglob("*") if p.is_file()):   # an engine's own files
        fname = extra.relative_to(tmp).as_posix()
        if fname not in files and fname != META_FILE and not fname.endswith(HASH_SUFFIX):
            files[fname], sizes[fname] = sha256_file(extra), extra.stat().st_size
    full_meta = dict(meta, step=step, world_size=layout.world_size,
                     megagpt_version=megagpt.__version__,
                     timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), files=files, file_sizes=sizes)
    _write_atomic_text(tmp / META_FILE, json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    final = save_dir / step_dir_name(step)
    if final.is_symlink() and not final.exists():     # a link to nothing: the rename fails on it
        final.unlink()
    if not final.exists():
        tmp.rename(final)
    elif not exchange_paths(tmp, final):   # a checkpoint of this step from an earlier attempt
        # no atomic swap here: set the old one aside, then rename (a crash between the two
        # leaves it as step_<N>.replaced.tmp, which the next save removes)
        final.rename(save_dir / f"{final.name}.replaced.tmp")
        tmp.rename(final)
    fsync_dir(save_dir)
    _write_atomic_text(save_dir / LATEST_FILE, final.name + "\n")
    warn = warn or _warn_stderr
    try:
        stale = [p for p in save_dir.glob("*.tmp") if p.is_dir()]
        if keep_last:   # among the earlier steps: a later one is another run's (this run
            # resumed from before it) and stays; `latest` names this one
            others = [p for p in complete_checkpoints(save_dir) if p.name < final.name]
            stale += others[:max(0, len(others) - (keep_last - 1))]
    except OSError as e:
        warn(f"{final} is saved and `latest`, but {save_dir} could not be listed to remove "
             f"stale folders and prune old steps ({e.strerror or e})")
        return
    for old in stale:
        try:
            _remove_folder(old)
        except OSError as e:
            warn(f"{final} is saved and `latest`, but {old} could not be removed "
                 f"({e.strerror or e}); remove it by hand to free its space")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Finding

def read_meta(path: str | Path) -> dict:
    """meta.json of a step folder; a CheckpointError naming the folder when absent or unreadable."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        if (Path(path) / LATEST_FILE).is_file() or any(Path(path).glob("step_*")):
            raise CheckpointError(f"{path} is a save dir, not one of its checkpoints; fix: give "
                                  f"a step folder of it ({Path(path) / 'step_NNNNNNN'}), or read "
                                  f"its latest with megagpt.convert.load_source")
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {META_FILE} (a save "
                              f"that did not finish, or not a step_NNNNNNN folder)")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} cannot be read: {e}") from e


def _incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a sentence naming it), or None when it is."""
    if path.name.endswith(".tmp"):
        return f"{path} is a save that did not finish (a .tmp folder)"
    if not STEP_RE.fullmatch(path.name):
        return f"{path} is not a checkpoint folder (those are named step_NNNNNNN)"
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e)
    if not isinstance(meta.get("files"), dict) or not meta["files"]:
        return f"{path / META_FILE} lists no files"
    sizes = meta.get("file_sizes", {})
    for fname in meta["files"]:
        f = path / fname
        if not f.is_file():
            return f"{path} is not a complete checkpoint: {fname} is missing"
        if fname in sizes and f.stat().st_size != sizes[fname]:
            return (f"{path} is not a complete checkpoint: {fname} has {f.stat().st_size} bytes, "
                    f"meta.json records {sizes[fname]}")
    return None


def is_complete(path: str | Path) -> bool:
    """A step folder with meta.json whose files all exist at their recorded sizes (no hashing)."""
    return _incomplete_reason(Path(path)) is None


def _step_folders(save_dir: Path) -> list[Path]:
    """Every step_NNNNNNN folder of `save_dir`, complete or not, oldest step first."""
    if not save_dir.is_dir():
        return []
    return sorted((p for p in save_dir.iterdir() if p.is_dir() and STEP_RE.fullmatch(p.name)),
                  key=lambda p: p.name)


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """The complete step folders of `save_dir`, oldest step first."""
    return [p for p in _step_folders(Path(save_dir)) if is_complete(p)]


def damaged_checkpoints(save_dir: str | Path, after_step: int = -1) -> list[tuple[Path, str]]:
    """The step folders of `save_dir` past `after_step` that are not complete checkpoints (a
    file missing or of another size than meta.json records, or no meta.json: saves are renamed
    into place whole, so these were damaged afterwards), each with why, oldest step first."""
    later = (p for p in _step_folders(Path(save_dir))
             if int(STEP_RE.fullmatch(p.name).group(1)) > after_step)
    found = ((p, _incomplete_reason(p)) for p in later)
    return [(p, reason) for p, reason in found if reason is not None]


def find_latest(save_dir: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from in `save_dir`, or None when it holds none.

    The folder named by `<save_dir>/latest` when it is complete; otherwise (no `latest`, or it
    names a missing or incomplete folder) the highest complete step, and `warn` (when given) is
    told why the one `latest` names was passed over. Never a `.tmp` folder.
    """
    save_dir = Path(save_dir)
    latest = save_dir / LATEST_FILE
    passed_over = None
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not STEP_RE.fullmatch(name):    # damaged: no step's name
            passed_over = (f"it does not hold a step_NNNNNNN name but "
                           f"{'bytes that are not text' if name is None else repr(name[:40])}"
                           f"{'...' if name and len(name) > 40 else ''}")
        else:
            named = save_dir / name
            if is_complete(named):
                return named
            passed_over = _incomplete_reason(named) if named.exists() else f"{named} does not exist"
    complete = complete_checkpoints(save_dir)
    if passed_over and warn is not None:
        instead = f"using {complete[-1].name}, the latest complete one" if complete else \
            "no other checkpoint is complete"
        warn(f"{latest} names a checkpoint that cannot be used ({passed_over}); {instead}")
    return complete[-1] if complete else None


def resolve_load_path(load: str | None, save_dir: str | Path | None,
                      warn: Callable[[str], None] | None = None) -> Path | None:
    """The step folder `checkpoint.load` asks for, or None to start from scratch.

    Args:
        load: "auto" (the latest complete checkpoint in `save_dir`, or None when there is none),
            "none" (or None: start fresh), or a path to a step folder or to a save dir (its
            latest complete checkpoint).
        save_dir: `checkpoint.save_dir`, used by "auto".
        warn: told when a save dir's `latest` names a checkpoint that cannot be used.

    A path that does not exist or holds no complete checkpoint is a CheckpointError naming it.
    """
    if load is None or load == "none":
        return None
    if load == "auto":
        return find_latest(save_dir, warn) if save_dir is not None else None
    path = Path(load)
    fix = ("fix: give a step_NNNNNNN folder or a save dir holding one, or set checkpoint.load=auto "
           "(resume from checkpoint.save_dir if it has a checkpoint) or none (start fresh)")
    if not path.exists():
        raise CheckpointError(f"checkpoint.load={load}: {path} does not exist; {fix}")
    if STEP_RE.fullmatch(path.name) or path.name.endswith(".tmp") or (path / META_FILE).exists():
        reason = _incomplete_reason(path)
        if reason:
            raise CheckpointError(f"checkpoint.load={load}: {reason}; {fix}")
        return path
    latest = find_latest(path, warn)
    kind = ("a Hugging Face model folder" if (path / "config.json").is_file() else
            "a Megatron-LM checkpoint" if (path / "latest_checkpointed_iteration.txt").is_file()
            or re.fullmatch(r"iter_\d{7,}|release", path.name) else None)
    if latest is None and kind:
        raise CheckpointError(f"checkpoint.load={load}: {path} is {kind}, not a checkpoint of "
                              f"ours; fix: start from its weights with "
                              f"checkpoint.pretrained={load} (and checkpoint.load=auto), or "
                              f"convert it with tools/convert_checkpoint.py --input {load} "
                              f"--output DIR --to megagpt (which keeps its step) and load DIR")
    if latest is None:
        raise CheckpointError(f"checkpoint.load={load}: {path} holds no complete checkpoint (a "
                              f"step_NNNNNNN folder with {META_FILE}); {fix}")
    return latest


# ---------------------------------------------------------------------------------------------
# Loading

def _read_verified(path: Path, fname: str, meta: dict, verify: bool):
    f = path / fname
    if fname not in meta["files"] or not f.is_file():
        p = meta.get("parallel", {})
        raise CheckpointError(f"{path} has no {fname}: it was saved with tp={p.get('tp')}, "
                              f"pp={p.get('pp')}, world size {meta.get('world_size')}; call "
                              f"check_compatible first, and convert other layouts with "
                              f"tools/convert_checkpoint.py")
    if verify:
        actual = sha256_file(f)
        if actual != meta["files"][fname]:
            raise CheckpointError(f"{f} is corrupt: its SHA-256 is {actual}, meta.json records "
                                  f"{meta['files'][fname]}; resume from an earlier checkpoint "
                                  f"(checkpoint.load=<save_dir>/step_NNNNNNN)")
    return torch.load(f, map_location="cpu", weights_only=True)


def load_model_states(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(meta, {(tp_rank, pp_rank): model state}) of every model file in step folder `path`,
    for tools that gather the whole model (conversion, fine-tuning from another layout)."""
    path = Path(path)
    meta = read_meta(path)
    p = meta["parallel"]
    states = {(t, q): _read_verified(path, model_file(t, q), meta, verify)
              for q in range(p["pp"]) for t in range(p["tp"])}
    return meta, states


def load_checkpoint(path: str | Path, *, tp_rank: int, pp_rank: int, dp_rank: int,
                    verify: bool = True) -> tuple[dict, object, object, dict]:
    """Read this rank's part of the checkpoint in step folder `path`.

    Args:
        path: a complete step folder (`resolve_load_path` gives one).
        tp_rank, pp_rank, dp_rank: this process's coordinates in the current layout.
        verify: check the SHA-256 of every file read against meta.json.

    Returns (meta, model_state, optim_state, rng_state), tensors on the CPU. The files read are
    those of the saved rank with the same (tp, dp, pp) coordinates; when the data-parallel size
    changed (allowed only without sharded optimizer state, see `check_compatible`), ranks beyond
    the saved one read the files of data-parallel rank 0.
    """
    path = Path(path)
    meta = read_meta(path)
    p = meta["parallel"]
    layout = RankLayout(meta["world_size"], p["tp"], p["pp"])
    source = layout.rank(tp_rank, dp_rank if dp_rank < layout.dp else 0, pp_rank)
    model_state = _read_verified(path, model_file(tp_rank, pp_rank), meta, verify)
    optim_state = _read_verified(path, optim_file(source), meta, verify)
    rng_state = _read_verified(path, rng_file(source), meta, verify)
    return meta, model_state, optim_state, rng_state


def check_compatible(meta: dict, model_cfg, parallel_sizes: dict, *,
                     where: str | Path = "the checkpoint", with_optimizer: bool = True) -> None:
    """Refuse a checkpoint that does not fit this run, listing every difference.

    Args:
        meta: the checkpoint's meta.json (`read_meta` or `load_checkpoint` gives it).
        model_cfg: this run's model config (a ModelConfig or its dict).
        parallel_sizes: this run's {tp, pp, dp, vp}, and `zero_stage` (default 0) and
            `engine` ("native", the default, or "deepspeed"; with it, `precision`).
        where: the checkpoint's path, for the messages.
        with_optimizer: False when only the model is loaded (fine-tuning from the weights): the
            data-parallel size and zero_stage are then free.

    Architecture fields must be equal (`ffn_hidden_size` compared as the width it implies). The
    tensor, pipeline and virtual pipeline sizes must be equal: convert the checkpoint otherwise.
    The data-parallel size may change when neither run shards optimizer state (zero_stage 0);
    zero_stage itself must not change, nor the engine that saved the optimizer state.
    """
    absent = [k for k in PARALLEL_KEYS if k not in parallel_sizes]
    if absent:
        raise ValueError(f"check_compatible: parallel_sizes={parallel_sizes} lacks "
                         f"{', '.join(absent)}; it needs tp, pp, dp and vp (and zero_stage)")
    if dataclasses.is_dataclass(model_cfg):
        model_cfg = dataclasses.asdict(model_cfg)
    saved_model = meta["config"]["model"]
    problems = []
    for name in ARCHITECTURE_FIELDS:
        saved = saved_model.get(name, ARCHITECTURE_DEFAULTS.get(name))
        wanted = model_cfg.get(name, ARCHITECTURE_DEFAULTS.get(name))
        if name == "ffn_hidden_size":
            saved = saved or 4 * saved_model["d_model"]
            wanted = wanted or 4 * model_cfg["d_model"]
        if saved != wanted:
            problems.append(f"checkpoint has model.{name}={saved}, the config says {wanted}")
    if problems:
        problems.append("it is another model: give checkpoint.load a checkpoint of this one (or "
                        "a new checkpoint.save_dir to start fresh), or give the config the "
                        "checkpoint's architecture")
    saved_par = meta["parallel"]
    layout_fields = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size",
                     "vp": "virtual_pipeline_size"}
    differ = [k for k in layout_fields if saved_par[k] != parallel_sizes[k]]
    for k in differ:
        problems.append(f"checkpoint has parallel.{layout_fields[k]}={saved_par[k]}, the config "
                        f"says {parallel_sizes[k]}")
    if differ:
        problems.append(f"the model is split differently: convert the checkpoint with `python "
                        f"tools/convert_checkpoint.py --input {where} --output NEW_DIR --to "
                        f"megagpt --tensor-parallel-size {parallel_sizes['tp']} "
                        f"--pipeline-parallel-size {parallel_sizes['pp']} "
                        f"--virtual-pipeline-size {parallel_sizes['vp']}` and set "
                        f"checkpoint.load=NEW_DIR, or set the config's parallel sizes to the "
                        f"checkpoint's")
    saved_engine = saved_par.get("engine", "native")
    engine = parallel_sizes.get("engine", "native")
    if with_optimizer and saved_engine != engine:
        how = {"deepspeed": "set parallel.deepspeed_config (a DeepSpeed JSON) to resume it",
               "native": "drop parallel.deepspeed_config to resume it"}.get(saved_engine, "")
        problems.append(f"checkpoint was saved by the {saved_engine} engine, this run trains "
                        f"through the {engine} engine: the optimizer state is not "
                        f"interchangeable; {how}, or start from its weights with "
                        f"checkpoint.pretrained={where} (with checkpoint.load=none and a new "
                        f"checkpoint.save_dir)")
    saved_zero, zero = saved_par.get("zero_stage", 0), parallel_sizes.get("zero_stage", 0)
    weights_only = (f"convert it to a weights-only checkpoint (`python tools/convert_checkpoint.py "
                    f"--input {where} --output NEW_DIR --to megagpt`) and set "
                    f"checkpoint.load=NEW_DIR, which resumes its step with a fresh optimizer "
                    f"state")
    saved_precision = meta["config"].get("training", {}).get("precision")
    precision = parallel_sizes.get("precision")
    if (with_optimizer and saved_engine == engine == "deepspeed"
            and None not in (saved_precision, precision) and saved_precision != precision):
        problems.append(f"checkpoint was trained through DeepSpeed in {saved_precision}, this run "
                        f"in {precision}: DeepSpeed keeps each precision's optimizer state in "
                        f"files of their own; fix: training.precision={saved_precision} to "
                        f"resume, or {weights_only}")
    if with_optimizer and saved_engine == engine == "deepspeed" and saved_zero != zero:
        # the stage is the DeepSpeed file's unless parallel.zero_stage overrides it
        shipped = (f"configs/deepspeed/zero{saved_zero}.json, or " if saved_zero else "")
        override = (f" and parallel.zero_stage 0 or {saved_zero}" if saved_zero else
                    " and parallel.zero_stage 0")
        problems.append(f"checkpoint was saved at DeepSpeed ZeRO stage {saved_zero}, this run's "
                        f"DeepSpeed config has stage {zero}: the optimizer state is not "
                        f"interchangeable; fix: resume with a DeepSpeed file of stage {saved_zero} "
                        f"({shipped}zero_optimization.stage={saved_zero}){override}, or "
                        f"{weights_only}")
    elif with_optimizer and saved_engine == engine and saved_zero != zero:
        form = "sharded over" if saved_zero else "whole on each of"
        problems.append(f"checkpoint has parallel.zero_stage={saved_zero}, the config says "
                        f"{zero}: its optimizer state was saved {form} the data-parallel ranks; "
                        f"fix: set parallel.zero_stage={saved_zero} to resume, or {weights_only}")
    elif (with_optimizer and saved_engine == engine and saved_par["dp"] != parallel_sizes["dp"]
          and zero):
        saved_world = saved_par["tp"] * saved_par["pp"] * saved_par["dp"]
        why = ("its optimizer state is sharded over its data-parallel ranks" if saved_par["dp"] > 1
               else f"this run shards the optimizer state over {parallel_sizes['dp']} ranks")
        stage = (f"DeepSpeed ZeRO stage {zero}" if engine == "deepspeed" else
                 f"parallel.zero_stage={zero}")
        problems.append(f"checkpoint has data-parallel size {saved_par['dp']}, this run has "
                        f"{parallel_sizes['dp']} with {stage}: {why}; fix: "
                        f"resume with world size {saved_world}, or {weights_only}")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CheckpointError(f"{where} does not fit this config:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Random state

def capture_rng_state(tracker_states: dict) -> dict:
    """Every random stream of this process, in a form `torch.load(weights_only=True)` accepts.

    Args:
        tracker_states: the tensor-parallel tracker's states
            (`megagpt.parallel.random.get_rng_tracker().get_states()`).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in tracker_states.items()},
    }


def restore_rng_state(state: dict) -> dict:
    """Restore the streams `capture_rng_state` saved; returns the tracker states to set.

    The CUDA state is restored when it was saved and CUDA is available, and skipped otherwise
    (a GPU checkpoint resumed on a CPU).
    """
    missing = [k for k in ("python", "numpy", "torch", "cuda", "tracker") if k not in state]
    if missing:
        raise CheckpointError(f"restore_rng_state: the saved RNG state lacks {', '.join(missing)}; "
                              f"it was not written by capture_rng_state")
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state["tracker"]


def check_optimizer_layout(saved: list | None, current: list, *, sharded_by_tp_layout: bool,
                           where: str | Path = "the checkpoint") -> None:
    """Refuse optimizer state saved for other parameters than this rank's optimizer steps.

    Args:
        saved: the checkpoint's `[name, numel]` of each parameter the optimizer stepped, in the
            optimizer's order (the trainer saves it beside the state); None for a checkpoint
            written before megagpt recorded it.
        current: the same list for this run.
        sharded_by_tp_layout: the state is ZeRO-1-sharded with tensor parallelism, whose order
            changed when tensor-parallel replicas moved to buckets of their own; a checkpoint
            without `saved` then cannot be matched.
        where: the checkpoint's path, for the messages.

    torch's optimizers load their state by position: a different order would apply each
    parameter's moments to another one, silently when the sizes happen to agree.
    """
    if saved is None:
        if sharded_by_tp_layout:
            raise CheckpointError(
                f"{where} holds ZeRO-1 optimizer state saved with tensor parallelism by an older "
                f"megagpt, whose order of the sharded pieces differs from this version's (the "
                f"tensor-parallel replicas now sit in buckets of their own); its moments cannot be "
                f"matched to the parameters. Keep its weights and start the optimizer state fresh: "
                f"`tools/convert_checkpoint.py --input {where} --output NEW --to megagpt` (the "
                f"same layout, weights only), then resume from NEW")
        return
    saved = [tuple(entry) for entry in saved]
    current = [tuple(entry) for entry in current]
    if saved == current:
        return
    first = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b),
                 min(len(saved), len(current)))

    def at(entries):
        return f"{entries[first][0]} ({entries[first][1]} values)" if first < len(entries) \
            else "nothing"

    raise CheckpointError(
        f"{where}: its optimizer state is for {len(saved)} parameter pieces, this run's optimizer "
        f"steps {len(current)}, and they differ first at position {first}: the checkpoint has "
        f"{at(saved)}, this run {at(current)}. The model or the layout (parallel sizes, ZeRO "
        f"stage, bucket size) differs from the run that saved it; resume with the same settings, "
        f"or keep only its weights: `tools/convert_checkpoint.py --input {where} --output NEW "
        f"--to megagpt`, then resume from NEW")

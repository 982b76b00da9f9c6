"""The training loop: data, steps, evaluation, metrics, checkpoints and faults.

`Trainer(cfg, state, device).train()` runs `training.max_steps` optimizer steps on this rank's
share of the model (`Engine`), resuming from a checkpoint when `checkpoint.load` finds one:

    for each step: this rank's micro-batches -> engine.train_step -> skip accounting
                   -> metrics every log_interval -> validation every eval_interval
                   -> checkpoint every save_interval, at the end, and on SIGTERM or when
                      training.exit_duration_minutes have passed

A resumed run continues exactly: the data order is a function of the consumed samples, and the
model, optimizer, loss scaler and every random stream come back from the checkpoint.

With `parallel.deepspeed_config` the engine is `DeepSpeedEngine` (ds_engine.py), the same loop:
its weights are loaded (pretrained or a weights-only checkpoint) before `deepspeed.initialize`,
and its checkpoints are our step folders with DeepSpeed's own files inside.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib.util
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megagpt import __version__
from megagpt.config import Config, ModelConfig
from megagpt.convert import ConversionError, load_source, tokenizer_mismatch
from megagpt.data.blend import parse_data_path
from megagpt.data.documents import asks_for_documents, document_collate
from megagpt.data.gpt_dataset import (INDEX_VERSION, DatasetBuildError, build_gpt_datasets,
                                      parse_split)
from megagpt.data.indexed import read_meta as read_dataset_meta
from megagpt.data.mock import build_mock_datasets, mock_eod_id
from megagpt.data.sampler import MegatronPretrainingSampler
from megagpt.data.sft_dataset import build_sft_datasets
from megagpt.data.tokenizer import load_tokenizer
from megagpt.fsutil import FolderLock, why_not_a_folder
from megagpt.model.gpt import load_full_state_dict
from megagpt.parallel.random import get_rng_tracker, seed_everything
from megagpt.parallel.state import AnotherRankFailed, ParallelState, run_agreed
from megagpt.training.checkpoint import (ARCHITECTURE_FIELDS, SHARED_SAVE_DIR_FIX,
                                         CheckpointError, capture_rng_state, check_compatible,
                                         check_optimizer_layout, complete_checkpoints,
                                         damaged_checkpoints,
                                         find_latest, load_checkpoint, read_meta,
                                         resolve_load_path, restore_rng_state, save_checkpoint,
                                         start_checkpoint_save)
from megagpt.training.engine import Engine
from megagpt.training.metrics import (MetricsWriter, StepTimer, WandbError, flops_per_token,
                                      format_console_line, memory_gb, peak_flops, perplexity,
                                      start_wandb, throughput)
from megagpt.training.optim import lr_at, set_hyperparameters


SAVE_DIR_LOCK_WAIT_S = 120.0   # how long a run waits for another run's lock on its save dir


class TrainingAborted(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# Linux: loader workers take SIGTERM on a thread of their own (macOS has no sigwaitinfo)
WORKERS_SHIELDED = hasattr(signal, "sigwaitinfo")


def loader_worker_options(num_workers: int) -> dict:
    """The DataLoader arguments that let its workers outlive a scheduler's SIGTERM.

    A scheduler stops a job by sending SIGTERM to every process in it (SLURM's scancel, `timeout`,
    a process-group kill), and a worker killed so fails the loader before the trainer's own
    handler can save. Where `sigwaitinfo` exists (Linux), each worker takes SIGTERM on a thread of
    its own (`shield_worker_from_stray_sigterm`) and ends on it only when the trainer sent it;
    workers are forked, since the shield needs to block SIGTERM before any other thread of the
    worker exists (a spawned worker has library threads from its imports; Python 3.14 makes
    forkserver the default). Elsewhere (macOS) workers keep torch's defaults."""
    if num_workers == 0 or not WORKERS_SHIELDED:
        return {}
    _end_loader_workers_at_exit_once()
    return {"worker_init_fn": functools.partial(shield_worker_from_stray_sigterm, os.getpid()),
            "multiprocessing_context": "fork"}


def start_loader(loader: torch.utils.data.DataLoader):
    """`iter(loader)`, its shielded workers forked with SIGTERM blocked: they inherit the block,
    so a scheduler's SIGTERM arriving before a worker's shield is up waits for the shield's
    thread instead of meeting torch's worker handler, which would end the worker. The trainer's
    own SIGTERM waits the few milliseconds the forks take."""
    if loader.num_workers == 0 or not WORKERS_SHIELDED:
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker_from_stray_sigterm(trainer_pid: int, worker_id: int) -> None:
    """A forked loader worker's start (`worker_init_fn`, with the trainer's pid bound): a SIGTERM
    from the trainer (the loader ending its workers: `terminate()` at its shutdown or at exit,
    where torch's own worker handler would `_exit(0)` too) ends the worker; one from anyone else
    leaves it serving until the loader ends it as usual, after the trainer has saved. If the
    trainer dies, torch's worker watchdog ends the worker."""
    # blocked (already, when `start_loader` forked it) before the waiting thread starts: every
    # thread started later inherits the block, so each SIGTERM waits for `sigwaitinfo` below
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_the_trainers_sigterm, args=(trainer_pid,), daemon=True,
                     name="megagpt-sigterm").start()


def _end_on_the_trainers_sigterm(trainer_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer_pid:
        pass
    os._exit(0)


def end_daemonic_children(grace_s: float = 10.0) -> None:
    """Terminate this process's daemonic children (loader workers still alive), wait for them at
    most `grace_s` seconds in all, and kill those left. At exit multiprocessing terminates them
    and joins them without a time limit; a shielded worker ends on that SIGTERM only once its
    thread gets the GIL, so one stuck holding it (a long C call) would hang the exit."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for p in children:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


@functools.cache
def _end_loader_workers_at_exit_once() -> None:
    # registered after multiprocessing's own exit function (imported with torch), so it runs first
    atexit.register(end_daemonic_children)


def output_problems(cfg) -> list[str]:
    """The output folders of a run (the checkpoints', the metrics file's) that cannot be written,
    each naming its setting and the fix: checked before training starts, not at the first save."""
    run_dir = Path(cfg.run_dir)
    folders = [("checkpoint.save_dir", cfg.checkpoint.save_dir, run_dir / "checkpoints"),
               ("logging.metrics_file", cfg.logging.metrics_file,
                run_dir / "metrics.jsonl")]
    problems = []
    for name, value, default in folders:
        path = Path(value) if value else default
        folder = path.parent if name == "logging.metrics_file" else path
        reason = why_not_a_folder(folder)
        if reason:
            where = f"{name}={value}" if value else f"{name} (default {default}, under " \
                                                     f"logging.run_dir={cfg.run_dir})"
            problems.append(f"{where}: cannot write there ({reason}); fix: choose another path")
    missing = _wandb_missing(cfg)
    if missing:
        problems.append(missing)
    return problems


def _wandb_missing(cfg) -> str | None:
    """What to do when logging.wandb_project is set where wandb is not installed, or does not
    import (a broken install: a conflicting protobuf, say)."""
    if not cfg.logging.wandb_project:
        return None
    fix = "pip install wandb (or pip install -e '.[wandb]'), or logging.wandb_project=null"
    if importlib.util.find_spec("wandb") is None:
        return (f"logging.wandb_project={cfg.logging.wandb_project}: the wandb package is not "
                f"installed; fix: {fix}")
    try:
        import wandb  # noqa: F401
    except Exception as e:   # anything its own imports raise
        return (f"logging.wandb_project={cfg.logging.wandb_project}: the wandb package is "
                f"installed but does not import ({type(e).__name__}: {e}); fix: repair it ({fix})")
    return None


class Trainer:
    """Pretraining or fine-tuning of one config on this rank. See the module docstring."""

    def __init__(self, cfg: Config, state: ParallelState, device: torch.device | str = "cpu",
                 log=print):
        self.started = time.monotonic()   # training.exit_duration_minutes counts from here
        missing = _wandb_missing(cfg)       # on every rank, before any collective
        if missing:
            raise ValueError(missing)
        self.cfg, self.state, self.device = cfg, state, torch.device(device)
        self.is_rank0 = state.rank == 0
        self.log = log if self.is_rank0 else (lambda *a, **k: None)
        if not self.is_rank0:   # every rank reads the same data: its warnings once, from rank 0
            logging.getLogger("megagpt").setLevel(logging.ERROR)
        t = cfg.training
        self.micro_batches = t.grad_accumulation_steps
        self.global_batch = t.batch_size * t.grad_accumulation_steps * state.dp_world_size
        self.run_dir = Path(cfg.run_dir)
        self.save_dir = Path(cfg.save_dir)
        seed_everything(t.seed, state.tp_rank, state.pp_rank, self.device)
        self.deepspeed = bool(cfg.parallel.deepspeed_config)
        if self.deepspeed:
            from megagpt.training.ds_engine import DeepSpeedEngine
            self.engine = DeepSpeedEngine(cfg, state, self.device)
        else:
            self.engine = Engine(cfg, state, self.device)
        self.step, self.consumed_samples, self.skipped_total, self.consecutive_skips = 0, 0, 0, 0
        self._stop_requested = False
        self.saved_step = None        # the step last written to the save dir, if any
        self.pending = None           # a background save (checkpoint.async_save)
        self._host_states = None      # the last one's host copy, reused by the next
        # a run still saving into the save dir (a requeued job's predecessor ending) is waited
        # for before choosing the checkpoint to resume, so this run resumes from its last save;
        # train() holds the lock itself
        self._lock_save_dir(note_unlocked=False).release()
        self._check_save_dir_shared()
        self._resumed = None          # (path, consumed, its sample count, data changes, digest)
        self.tokenizer_fingerprint = None     # data.tokenizer_path's, once loaded (meta.json)
        self.eod_id = None                    # its end-of-document id, once loaded
        self._resume()
        self.train_ds, self.valid_ds, self.test_ds = self._datasets()
        if self._resumed is not None and self.is_rank0:
            self._warn_data_order()
        if self.is_rank0:
            self._warn_documents_without_ends()

    # ---- data ---------------------------------------------------------------------------

    def _warn_documents_without_ends(self) -> None:
        """Under the document settings, name the indexed datasets whose record says they were
        made without end-of-document tokens (`--append-eod` off): their documents run together
        in a window and the settings cannot tell them apart."""
        d = self.cfg.data
        if d.mock or d.format != "indexed" or not asks_for_documents(d):
            return
        prefixes = {prefix for where in ("train_data_path", "val_data_path", "test_data_path")
                    for _, prefix in parse_data_path(getattr(d, where), f"data.{where}")}
        for prefix in sorted(prefixes):
            record = read_dataset_meta(prefix)
            if record is not None and record.get("append_eod") is False:
                self.log(f"warning: {prefix} was made without end-of-document tokens (its "
                         f"record: append_eod false), so data.reset_attention_mask, "
                         f"reset_position_ids and eod_mask_loss find no document in it: its "
                         f"documents run together in a window; fix: preprocess it again with "
                         f"--append-eod")

    def _datasets(self):
        """Build the datasets on rank 0 first (it writes the index caches), then on the rest. A
        rank that fails raises its error; the others then raise AnotherRankFailed."""
        t = self.cfg.training
        self.train_samples = self._train_samples(self.step, self.consumed_samples)
        num_samples = (self.train_samples,
                       t.eval_iters * self.global_batch if t.eval_interval else 0,
                       t.eval_iters * self.global_batch if self._has_test_data() else 0)
        failure = datasets = None
        for builds in (self.is_rank0, not self.is_rank0):
            if builds:
                try:
                    datasets = self._build_datasets(num_samples)
                except Exception as e:      # the others are told, and stop without a word
                    failure = e
            if not self._all_min(0 if failure else 1):
                if failure is not None:
                    raise failure
                raise AnotherRankFailed("another rank could not build the datasets")
        if num_samples[2] and datasets[2] is None:
            self.log(f"no test evaluation: data.split={self.cfg.data.split!r} leaves the test "
                     f"split without a document (fine-tuning: an example); fix: a larger test "
                     f"share, or data.test_data_path")
        return datasets

    def _has_test_data(self) -> bool:
        """data.test_data_path is set, or a test share of data.split is carved out of the
        training data: the run ends with an evaluation on it, as Megatron's does."""
        d = self.cfg.data
        if d.mock or not self.cfg.training.eval_iters:
            return False
        if parse_data_path(d.test_data_path, "data.test_data_path"):
            return True
        return not parse_data_path(d.val_data_path, "data.val_data_path") and \
            parse_split(d.split)[2] > 0

    def _train_samples(self, step: int, consumed: int) -> int:
        """The training samples a run at `step` with `consumed` samples behind it goes through
        by max_steps: max_steps x global batch, unless a resume changed the global batch."""
        return consumed + max(0, self.cfg.training.max_steps - step) * self.global_batch

    def _build_datasets(self, num_samples):
        m, d, t = self.cfg.model, self.cfg.data, self.cfg.training
        if d.mock:
            if asks_for_documents(d):      # windows of documents, with their ids
                self.eod_id = mock_eod_id(
                    load_tokenizer(d.tokenizer_path, "data.tokenizer_path").eod_id, m.vocab_size)
            return build_mock_datasets(m.seq_length, m.vocab_size, num_samples, t.seed,
                                       self.eod_id)
        tokenizer = load_tokenizer(d.tokenizer_path, "data.tokenizer_path")
        self.tokenizer_fingerprint, self.eod_id = tokenizer.fingerprint, tokenizer.eod_id
        if tokenizer.vocab_size > m.vocab_size:
            raise DatasetBuildError(f"data.tokenizer_path={d.tokenizer_path} has {tokenizer.vocab_size} "
                             f"tokens but model.vocab_size={m.vocab_size}; fix: set "
                             f"model.vocab_size to at least {tokenizer.vocab_size}")
        if d.format == "sft":
            return build_sft_datasets(d.train_data_path, d.val_data_path, d.test_data_path,
                                      split=d.split, tokenizer=tokenizer, seq_length=m.seq_length,
                                      num_samples=num_samples, packing=d.sft_packing, seed=t.seed)
        return build_gpt_datasets(d.train_data_path, d.val_data_path, d.test_data_path,
                                  split=d.split, seq_length=m.seq_length, num_samples=num_samples,
                                  seed=t.seed, cache_dir=d.cache_dir, vocab_size=m.vocab_size,
                                  tokenizer=tokenizer)

    def _batches(self, dataset, consumed: int):
        """This rank's micro-batches from sample `consumed` on, grouped into steps of m micro-batches."""
        if self.pending is not None and self.cfg.data.num_workers:
            self.pending.thread.join()      # no fork of loader workers while a thread writes
        sampler = MegatronPretrainingSampler(len(dataset), consumed, self.cfg.training.batch_size,
                                             self.state.dp_rank, self.state.dp_world_size)
        # A generator of its own: without one, each loader takes a draw from torch's global
        # generator (its workers' base seed), which shifts every later CPU dropout mask: a
        # resume (a new loader) or an evaluation (another loader) would change the training.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
            persistent_workers=False, **loader_worker_options(self.cfg.data.num_workers),
            pin_memory=self.device.type == "cuda",      # copied to the GPU without a wait
            collate_fn=document_collate(self.cfg.data, self.eod_id),
            generator=torch.Generator().manual_seed(self.cfg.training.seed))
        step = []
        try:
            for micro_batch in start_loader(loader):
                step.append(micro_batch)
                if len(step) == self.micro_batches:
                    yield step
                    step = []
        except DatasetBuildError as e:
            # raised in a loader worker, it arrives wrapped in that worker's traceback: keep the
            # message, which names the dataset, the sample and the fix
            message = str(e)
            if "Original Traceback" in message:
                message = message.rsplit("DatasetBuildError: ", 1)[-1].strip()
            raise DatasetBuildError(message) from None

    # ---- the loop -----------------------------------------------------------------------

    def train(self, until: int | None = None) -> dict:
        """Run to training.max_steps, or to step `until` when given (the learning-rate schedule
        still follows max_steps), or to a SIGTERM; saves a checkpoint at the end. Returns the
        last metrics record. checkpoint.save_dir is locked meanwhile (`_lock_save_dir`)."""
        lock = self._lock_save_dir()
        try:
            return self._train(until)
        finally:
            lock.release()

    def _lock_save_dir(self, note_unlocked: bool = True) -> FolderLock:
        """Rank 0 locks checkpoint.save_dir for this run: two runs saving into one folder (a job
        submitted twice) overwrite each other's checkpoints and `latest`. A held lock is waited
        for up to SAVE_DIR_LOCK_WAIT_S (a requeued job's predecessor may still be ending), then
        refused on every rank. Called before resuming (to wait, then let go) and by train()."""
        lock, holder = FolderLock(self.save_dir), None
        if self.is_rank0:
            deadline, said = time.monotonic() + SAVE_DIR_LOCK_WAIT_S, False
            while (holder := lock.take()) is not None and time.monotonic() < deadline:
                if not said:
                    self.log(f"checkpoint.save_dir={self.save_dir} is locked by another run "
                             f"({holder}); waiting up to {SAVE_DIR_LOCK_WAIT_S:.0f} s for it to end")
                    said = True
                time.sleep(min(5.0, SAVE_DIR_LOCK_WAIT_S))
        if not self._all_min(0 if holder else 1):
            if holder is not None:
                raise CheckpointError(
                    f"checkpoint.save_dir={self.save_dir} is in use by another run ({holder}): "
                    f"two runs saving into one folder overwrite each other's checkpoints; fix: "
                    f"stop that run, or give this one another checkpoint.save_dir (or --name)")
            raise AnotherRankFailed("rank 0 could not lock checkpoint.save_dir")
        if self.is_rank0 and not lock.held and note_unlocked:
            self.log(f"note: checkpoint.save_dir={self.save_dir} cannot be locked (no file locks "
                     f"there): nothing stops another run from saving into it meanwhile")
        return lock

    def _train(self, until: int | None) -> dict:
        t = self.cfg.training
        end = t.max_steps if until is None else min(until, t.max_steps)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        wandb_run = failure = None
        if self.cfg.logging.wandb_project:      # rank 0's start, agreed on: no rank waits alone
            if self.is_rank0:
                try:
                    wandb_run = start_wandb(self.cfg.logging.wandb_project, self.cfg.name,
                                            self.cfg.to_dict(), self.run_dir,
                                            resuming=self.step > 0)
                except WandbError as e:
                    failure = e
            if not self._all_min(0 if failure else 1):
                if failure is not None:
                    raise failure
                raise AnotherRankFailed("rank 0 could not start its Weights & Biases run")
        writer = MetricsWriter(self.cfg.logging.metrics_file or self.run_dir / "metrics.jsonl",
                               self.run_dir / "tensorboard" if self.cfg.logging.tensorboard else None,
                               enabled=self.is_rank0, resume_step=self.step or None,
                               fresh=self.step == 0, wandb_run=wandb_run)
        for old, kept in writer.set_aside:
            self.log(f"this run starts at step 0: moved the {old} already there to {kept}")
        timer = StepTimer(torch.cuda.synchronize if self.device.type == "cuda" else None)
        flops, peak = flops_per_token(self.cfg.model), peak_flops(self.device)
        bar = self._progress_bar()
        last = {}
        tokens_per_step = self.global_batch * self.cfg.model.seq_length
        self.log(f"training {self.cfg.name}: steps {self.step} -> {t.max_steps}, global batch "
                 f"{self.global_batch} x {self.cfg.model.seq_length} tokens, layout tp "
                 f"{self.state.tp_world_size} x pp {self.state.pp_world_size} x dp "
                 f"{self.state.dp_world_size}, {t.precision} on {self.device.type}"
                 + (f", {self.engine.description}" if self.deepspeed else ""))
        if self.step >= t.max_steps:
            self.log(f"nothing to train: the run resumed at step {self.step}, and "
                     f"training.max_steps={t.max_steps}; fix: raise training.max_steps to train "
                     f"on, or checkpoint.load=none (and another checkpoint.save_dir) to start over")
        failed = True                      # until the loop ends normally
        try:
            batches = self._batches(self.train_ds, self.consumed_samples)
            first_step = self.step
            while self.step < end:
                stop, written = self._agree_at_step(trained=self.step > first_step)
                if written or stop:   # a background save every rank has written, or a stop
                    with timer.paused():
                        self.complete_pending_save()
                if stop:
                    if self.saved_step == self.step:
                        self.log(f"{stop}: step {self.step} is saved; stopping")
                    else:
                        self.log(f"{stop}: saving step {self.step} and stopping")
                        self.save()
                    break
                microbatches = next(batches)
                # the schedule counts updates made, as Megatron's: a skipped step does not advance it
                lr = lr_at(self.step - self.skipped_total, t)
                result = self.engine.train_step(microbatches, lr)
                self.step += 1
                self.consumed_samples += self.global_batch
                # every token processed, masked from the loss or not; none for a step skipped
                # before its forward (no token counted in the loss)
                timer.step(tokens_per_step if result.tokens or not result.skipped else 0)
                aborting = False               # max_skipped_steps faults in a row
                if result.skipped and not result.tokens:   # not a fault: no streak, no abort
                    self.skipped_total += 1
                    self.log(f"step {self.step}: no token of the global batch counts in the loss "
                             f"(every loss_mask is 0, as in fine-tuning examples whose prompt "
                             f"fills the window); update skipped")
                elif result.skipped and result.overflow:     # nor is an fp16 overflow
                    self.skipped_total += 1
                    self.log(f"step {self.step}: the fp16 gradients overflowed at this loss "
                             f"scale; update skipped (the scaler lowers the scale once its "
                             f"hysteresis is used up)")
                elif result.skipped:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                    self.log(f"step {self.step}: non-finite loss or gradient (loss {result.loss}); "
                             f"update skipped ({self.consecutive_skips} in a row)")
                    aborting = bool(t.max_skipped_steps
                                    and self.consecutive_skips >= t.max_skipped_steps)
                else:
                    self.consecutive_skips = 0
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_interval == 0 or self.step == end or aborting:
                    _, tokens_per_s = timer.lap()
                    tflops, mfu = throughput(tokens_per_s, flops, self.state.layout.world_size, peak)
                    last = {"step": self.step, "loss": result.loss,
                            "lr": lr, "grad_norm": result.grad_norm,
                            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": mfu,
                            "mem_gb": self._peak_memory_gb(), "skipped": self.skipped_total}
                    writer.write(last)
                    self._console(format_console_line(last, t.max_steps), bar)
                if aborting:                   # its record written: every rank stops here
                    self.complete_pending_save()
                    raise TrainingAborted(
                        f"{self.consecutive_skips} consecutive steps had a non-finite loss or "
                        f"gradient (training.max_skipped_steps={t.max_skipped_steps}); "
                        f"stopping. Lower training.learning_rate, check the data, or resume "
                        f"from an earlier checkpoint")
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == end):
                    with timer.paused():
                        last.update(self._evaluate_and_record("val", writer, bar))
                save_every = self.cfg.checkpoint.save_interval
                if self.step == end or (save_every and self.step % save_every == 0):
                    with timer.paused():   # the last one in the foreground
                        self.save(background=self.cfg.checkpoint.async_save and self.step < end)
            if self.step == t.max_steps and self.test_ds is not None:
                # also when a finished run is launched again: its test may not have run
                last.update(self._evaluate_and_record("test", writer, bar))
            failed = False
        finally:
            if self.pending is not None:   # an error stopped the run: no collective to finish it
                self.pending.thread.join()
                self.log(f"the background save of {self.pending.final} was not completed")
                self.pending = None
            self._host_states = None
            signal.signal(signal.SIGTERM, previous)
            writer.close(failed=failed)
            if bar is not None:
                bar.close()
        return last

    def _peak_memory_gb(self) -> float | None:
        """The largest peak memory of any rank, in GB (`memory_gb`; None on CPUs): rank 0 is
        pipeline stage 0, while the last stage (the logits and the loss) usually holds the most.
        A collective over the world when it has more than one rank: called at every log step,
        which every rank reaches. The value travels as a CPU tensor on the default group, which
        gloo and "cpu:gloo,cuda:nccl" both reduce."""
        mem = memory_gb(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            peak = torch.tensor([-1.0 if mem is None else mem], dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mem = None if peak.item() < 0 else peak.item()
        return mem

    def _progress_bar(self):
        if not (self.is_rank0 and self.cfg.logging.progress_bar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.training.max_steps, initial=self.step, unit="step",
                    dynamic_ncols=True)

    def _console(self, line: str, bar) -> None:
        if bar is not None:
            bar.write(line)
        else:
            self.log(line)

    def _evaluate_and_record(self, split: str, writer, bar) -> dict:
        """Evaluate on the validation ("val") or test ("test") data; write and show the record."""
        loss = self.evaluate(self.valid_ds if split == "val" else self.test_ds)
        record = {"step": self.step, f"{split}_loss": loss, f"{split}_ppl": perplexity(loss)}
        writer.write(record)
        name = "validation" if split == "val" else "test"
        self._console(f"step {self.step}: {name} loss {loss:.4f}, perplexity "
                      f"{record[f'{split}_ppl']:.2f}", bar)
        return record

    @torch.no_grad()
    def evaluate(self, dataset=None) -> float:
        """Mean loss on `dataset` (default: the validation data) over the same
        training.eval_iters steps' worth of its samples each time, so values are comparable
        across the run and across a resume: the mean over every token counted in the loss
        (batches with more such tokens, as fine-tuning batches can have, weigh more), as the
        training loss is."""
        dataset = self.valid_ds if dataset is None else dataset
        if dataset is None:
            raise ValueError("training.eval_interval is set but there is no validation data; "
                             "fix: set data.val_data_path, give data.split a validation weight, "
                             "or set training.eval_interval=0")
        batches = self._batches(dataset, 0)
        total, tokens = 0.0, 0
        for _ in range(self.cfg.training.eval_iters):
            batch = next(batches)
            count = self.engine.global_tokens(batch)
            loss = self.engine.eval_step(batch)
            if count:
                total += loss * count
                tokens += count
        return total / tokens if tokens else math.nan

    # ---- faults -------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):
        self._stop_requested = True

    def _agree_at_step(self, trained: bool) -> tuple[str | None, bool]:
        """One collective a step, the same on every rank: (why to stop, if any rank has received
        SIGTERM or, once this launch has `trained` a step, any rank's clock has passed
        training.exit_duration_minutes, else None; every rank has written its files of the
        background save in progress). Every launch makes a step, as Megatron's: one whose
        start-up alone took longer than the limit would otherwise stop at once, time after time."""
        writing = self.pending is not None and not self.pending.written()
        limit = self.cfg.training.exit_duration_minutes
        out_of_time = trained and limit is not None and \
            time.monotonic() - self.started >= 60 * limit
        flags = torch.tensor([float(self._stop_requested), float(writing), float(out_of_time)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop = ("SIGTERM" if flags[0] else
                f"training.exit_duration_minutes={limit:g} has passed" if flags[2] else None)
        return stop, self.pending is not None and not flags[1]

    def _all_min(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return int(flag.item())

    def _warn(self, message: str) -> None:
        self.log(f"warning: {message}")

    # ---- checkpoints --------------------------------------------------------------------

    def _parallel_sizes(self) -> dict:
        par = self.cfg.parallel
        if self.deepspeed:
            return {"tp": 1, "pp": 1, "dp": self.state.dp_world_size, "vp": 1,
                    "zero_stage": self.engine.zero_stage, "engine": "deepspeed",
                    "precision": self.cfg.training.precision}
        return {"tp": self.state.tp_world_size, "pp": self.state.pp_world_size,
                "dp": self.state.dp_world_size, "vp": par.virtual_pipeline_size,
                "zero_stage": par.zero_stage}

    def save(self, background: bool = False) -> Path:
        """Write a checkpoint of the current step on every rank (collective), after completing
        a background save still pending. `background`: copy the state to host memory and let a
        thread write it (`self.pending`, completed at a later step once every rank has written
        its files, or by the next save); DeepSpeed's engine always saves in the foreground."""
        self.complete_pending_save()
        if not background:
            self._host_states = None        # a foreground save needs no host copy
        if self.deepspeed:
            return self._save_deepspeed()
        e, s = self.engine, self.state
        optim_state = {"optimizer": e.optimizer.state_dict(), "scaler": e.scaler.state_dict(),
                       "optimizer_layout": e.optimizer_layout, "skipped_total": self.skipped_total,
                       "consecutive_skips": self.consecutive_skips}
        meta = self._meta()
        # the float32 weights, also when training in 16 bits; written by data-parallel rank 0
        with e.master_weights(first_replica_reads=True):
            model_state = {f"chunk{c}": chunk.state_dict() for c, chunk in enumerate(e.chunks)}
            args = dict(rank=s.rank, tp_rank=s.tp_rank, pp_rank=s.pp_rank, dp_rank=s.dp_rank,
                        model_state=model_state, optim_state=optim_state,
                        rng_state=capture_rng_state(get_rng_tracker().get_states()), meta=meta,
                        keep_last=self.cfg.checkpoint.keep_last, all_min=self._all_min,
                        warn=self._warn)
            if background:
                self.pending = start_checkpoint_save(self.save_dir, self.step, **args,
                                                     reuse=self._host_states)
                self.log(f"saving checkpoint {self.pending.final} in the background")
                return self.pending.final
            path = save_checkpoint(self.save_dir, self.step, **args)
        self.saved_step = self.step
        self.log(f"saved checkpoint {path}")
        return path

    def complete_pending_save(self) -> None:
        """Collective: finish the background save, if any (waits for this rank's thread)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        path = pending.complete(self._all_min)
        self.saved_step, self._host_states = pending.step, pending.states
        self.log(f"saved checkpoint {path}")

    def _check_save_dir_shared(self) -> None:
        """Every rank sees the save dir rank 0 writes: rank 0 leaves a marker there, the others
        look for it. Ranks on nodes that do not share the folder would otherwise train until
        the first save fails (or, with a checkpoint there, resume different steps)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        token = torch.zeros(1, dtype=torch.int64)
        if self.is_rank0:
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                token[0] = int.from_bytes(os.urandom(6), "big") + 1
                (self.save_dir / f".shared-{int(token[0])}").touch()
            except OSError:        # not writable: the first save says so, with its fix
                token[0] = 0
        dist.all_reduce(token, op=dist.ReduceOp.MAX)
        marker = self.save_dir / f".shared-{int(token[0])}"
        seen = not token[0] or marker.exists()
        try:
            if self._all_min(1 if seen else 0):
                return
        finally:
            if self.is_rank0 and token[0]:
                marker.unlink(missing_ok=True)
        if not seen:
            raise CheckpointError(
                f"checkpoint.save_dir={self.save_dir}: rank {self.state.rank} (host "
                f"{socket.gethostname()}) does not see the folder rank 0 writes; it "
                f"{SHARED_SAVE_DIR_FIX}")
        raise AnotherRankFailed("another rank does not see checkpoint.save_dir")

    def _agree_on_resume(self) -> Path | None:
        """checkpoint.load's checkpoint, the same step on every rank: each rank reads `latest`
        (or the path) in its own view of the file system, and one that sees another save dir
        (not shared by every node, or a stale cache of it) would resume another step silently."""
        failure = path = None
        try:
            path = resolve_load_path(self.cfg.checkpoint.load, self.save_dir, warn=self._warn)
            step = read_meta(path)["step"] if path is not None else -1
        except (CheckpointError, OSError) as e:     # an unreadable save dir on one node too
            failure, step = e, -1
        # one all-reduce: every rank found one, and the smallest and largest step chosen
        agreed = torch.tensor([0 if failure else 1, step, -step], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if failure is not None:
            raise failure
        if not agreed[0]:
            raise AnotherRankFailed("another rank could not find the checkpoint to resume")
        low, high = int(agreed[1]), -int(agreed[2])
        if low != high:
            def named(s):
                return "none (a fresh start)" if s < 0 else f"step {s}"
            raise CheckpointError(
                f"the ranks would resume different checkpoints from checkpoint.save_dir="
                f"{self.save_dir}: from {named(low)} to {named(high)} (rank {self.state.rank} on "
                f"host {socket.gethostname()}: {named(step)}); it {SHARED_SAVE_DIR_FIX}")
        return path

    def _resume(self) -> None:
        """Continue from checkpoint.load's checkpoint, or start from checkpoint.pretrained's weights."""
        path = self._agree_on_resume()
        # a step folder of the save dir (the link itself, if it is one) continues its run
        if path is not None and path.absolute().parent.resolve() == self.save_dir.resolve():
            latest = find_latest(self.save_dir)
            if latest is not None and latest.name == path.name:   # not when going back
                self.saved_step = read_meta(path)["step"]
        else:
            self._read_agreed(lambda: self._refuse_replacing_another_run(path),
                              "start without replacing the checkpoints of checkpoint.save_dir")
        if self.deepspeed:
            return self._resume_deepspeed(path)
        if path is None:
            if self.cfg.checkpoint.pretrained:
                self._load_pretrained(self.cfg.checkpoint.pretrained)
            return
        s, e = self.state, self.engine
        meta = self._compatible_agreed(path)
        weights_only = meta.get("weights_only", False)
        self._warn_setting_changes(meta, path)

        def read():
            part = load_checkpoint(path, tp_rank=s.tp_rank, pp_rank=s.pp_rank, dp_rank=s.dp_rank)
            if not weights_only:
                zero_with_tp = s.tp_world_size > 1 and any(w.zero for w in e.wrappers)
                check_optimizer_layout(part[2].get("optimizer_layout"), e.optimizer_layout,
                                       sharded_by_tp_layout=zero_with_tp, where=path)
            return part
        meta, model_state, optim_state, rng_state = self._read_agreed(
            read, f"read its part of {path}")

        def load_weights():
            for c, chunk in enumerate(e.chunks):
                chunk.load_state_dict(model_state[f"chunk{c}"])
        with torch.no_grad(), e.master_weights():       # every replica enters: no agreement inside
            self._load_agreed(load_weights, f"load its weights from {path}")
        self.step, self.consumed_samples = meta["step"], meta["consumed_samples"]
        if weights_only:
            self.skipped_total = meta.get("skipped_total", 0)    # the schedule's position
            self.log(f"resumed the weights of {path} (a converted checkpoint) at step {self.step}; "
                     f"optimizer state starts fresh")
            return

        def load_state():
            e.optimizer.load_state_dict(optim_state["optimizer"])
            e.scaler.load_state_dict(optim_state["scaler"])
            return restore_rng_state(rng_state)
        rng = self._load_agreed(load_state, f"load its optimizer state from {path}")
        set_hyperparameters(e.optimizer, self.cfg.training)   # the saved ones came with the state
        get_rng_tracker().set_states(rng)
        self.skipped_total = optim_state.get("skipped_total", 0)
        self.consecutive_skips = optim_state.get("consecutive_skips", 0)
        self.log(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples consumed)")

    SCHEDULE_FIELDS = ("learning_rate", "min_lr", "lr_schedule", "warmup_steps", "lr_decay_steps",
                       "max_steps")
    OPTIMIZER_FIELDS = ("weight_decay", "adam_beta1", "adam_beta2", "adam_eps")
    DOCUMENT_FIELDS = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")

    def _warn_setting_changes(self, meta: dict, path) -> None:
        """Log the settings that differ from the checkpoint's run and what that does: the
        learning-rate schedule's and the optimizer's apply from the resume on (allowed:
        extending max_steps is a common reason), so the rate may jump; the data settings the
        training samples' order is built from (and their count, max_steps x global batch)
        reorder the samples not yet consumed."""
        if not meta.get("step") and not meta.get("consumed_samples"):
            return    # nothing trained yet (a converted Hugging Face model): no run to differ from
        config = meta.get("config", {})
        saved = config.get("training", {})
        now = self.cfg.training

        def changed(fields):
            return [f"training.{k} {saved[k]} -> {getattr(now, k)}" for k in fields
                    if k in saved and saved[k] != getattr(now, k)]
        if saved.get("mode", now.mode) != now.mode:
            self.log(f"warning: resuming {path}, a training.mode={saved['mode']} run, with "
                     f"training.mode={now.mode}: its step, optimizer state and schedule go on; "
                     f"to start a {now.mode} run from its weights instead, set "
                     f"checkpoint.pretrained={path} and a new checkpoint.save_dir")
        if changed(self.SCHEDULE_FIELDS):
            jump = self._first_rate_change(saved, meta.get("step", 0),
                                           meta.get("skipped_total", 0))
            if jump is not None:
                self.log(f"warning: resuming {path} with another learning-rate schedule ("
                         f"{', '.join(changed(self.SCHEDULE_FIELDS))}); {jump}")
        if changed(self.OPTIMIZER_FIELDS):
            self.log(f"warning: resuming {path} with other optimizer settings ("
                     f"{', '.join(changed(self.OPTIMIZER_FIELDS))}); they apply from step "
                     f"{meta.get('step')} on")
        saved_data = config.get("data", {})    # the fields' default before they existed: false
        documents = [f"data.{k} {str(saved_data.get(k, False)).lower()} -> "
                     f"{str(getattr(self.cfg.data, k)).lower()}" for k in self.DOCUMENT_FIELDS
                     if saved_data.get(k, False) != getattr(self.cfg.data, k)]
        if documents:
            self.log(f"warning: resuming {path} with other document settings ("
                     f"{', '.join(documents)}); from step {meta.get('step')} on, what a token "
                     f"attends to, its position or what counts in the loss change")
        saved_batch = None
        if all(k in saved for k in ("batch_size", "grad_accumulation_steps")) \
                and "dp" in meta.get("parallel", {}):
            saved_batch = saved["batch_size"] * saved["grad_accumulation_steps"] \
                * meta["parallel"]["dp"]
            if saved_batch != self.global_batch:
                change = self._global_batch_change(path, saved, meta["parallel"]["dp"])
                self.log(f"warning: {change}")
        data = data_order_changes(config, self.cfg)
        saved_version = meta.get("data_index_version", 1)   # 1: checkpoints before it was kept
        if saved_version != INDEX_VERSION and not self.cfg.data.mock:
            data.append(f"the samples' order itself (data index version {saved_version} -> "
                        f"{INDEX_VERSION}: Megatron-core's order since 2026-11-29)")
        samples = meta.get("train_samples")   # absent before it was kept: the saved run's count
        if samples is None and saved_batch is not None and "max_steps" in saved:
            samples = saved["max_steps"] * saved_batch
        self._resumed = (path, meta.get("consumed_samples"), samples, data,
                         meta.get("train_data_digest"))

    def _first_rate_change(self, saved: dict, step: int, skipped: int) -> str | None:
        """Where the rates of the steps from `step` to max_steps first differ from those the
        saved run's schedule settings would give, or None when none does (raising max_steps
        with lr_decay_steps set, say)."""
        now = self.cfg.training
        try:
            then = dataclasses.replace(now, **{k: saved[k] for k in self.SCHEDULE_FIELDS
                                                if k in saved})
            for k in range(step - skipped, now.max_steps - skipped):   # the updates to make
                rates = lr_at(k, then), lr_at(k, now)
                if not math.isclose(*rates, rel_tol=1e-9, abs_tol=0.0):
                    return (f"the rate departs from the saved run's schedule at step "
                            f"{k + skipped + 1}: {rates[0]:.4g} -> {rates[1]:.4g}")
        except (TypeError, ValueError):     # the saved settings do not make a schedule here
            return f"the rates from step {step + 1} on follow this run's schedule"
        return None

    def _global_batch_change(self, path, saved: dict, saved_dp: int) -> str:
        t, dp = self.cfg.training, self.state.dp_world_size
        before = saved["batch_size"] * saved["grad_accumulation_steps"] * saved_dp
        pp = self.cfg.parallel.pipeline_parallel_size
        multiple = pp if self.cfg.parallel.virtual_pipeline_size > 1 else 1   # interleaved
        splits = [(b, before // (b * dp)) for b in range(1, before // dp + 1)
                  if before % (b * dp) == 0 and (before // (b * dp)) % multiple == 0]
        if not splits:
            fix = (f"no micro-batch size and count keep it at data-parallel size {dp}"
                   + (f" (the interleaved schedule needs a multiple of {pp} micro-batches)"
                      if multiple > 1 else ""))
        else:
            size, count = min(splits, key=lambda s: abs(s[0] - t.batch_size))
            fix = "to keep it, set " + (f"training.batch_size={size} and " if size != t.batch_size
                                        else "") + f"training.grad_accumulation_steps={count}"
        return (f"resuming {path} with another global batch: {before} -> {self.global_batch} "
                f"sequences a step (training.batch_size x grad_accumulation_steps x data-parallel "
                f"size: {saved['batch_size']} x {saved['grad_accumulation_steps']} x "
                f"{saved_dp} -> {t.batch_size} x {t.grad_accumulation_steps} x "
                f"{dp}); the steps from here on take the new one, at the same learning rates; "
                f"{fix}")

    def _warn_data_order(self) -> None:
        """After a resume, once the datasets are built: warn when the training samples not yet
        consumed come in another order than the saved run's (its data settings differ, or its
        sample count does in a way that changes the order: the epochs of a dataset, or how its
        last epoch is shuffled)."""
        path, consumed, samples, data, digest = self._resumed
        if samples is not None and samples != self.train_samples and self.train_ds is not None \
                and not self.train_ds.same_order(samples):
            data.append(f"training samples {samples} -> {self.train_samples} (consumed + steps "
                        f"to go x global batch), which changes a dataset's epochs or how its "
                        f"last epoch is shuffled")
        now = self._train_data_digest()
        if digest is not None and now is not None and digest != now and not any(
                change.startswith(DATA_CONTENT_FIELDS) for change in data):
            what = ("the examples' tokens" if self.cfg.data.format == "sft"
                    else "the documents' count or lengths")
            data.append(f"the training data itself ({what} differ from the saved run's: the "
                        f"files at data.train_data_path were made again or replaced; digest "
                        f"{digest} -> {now})")
        if data:
            self.log(f"warning: resuming {path} with other data settings ({', '.join(data)}); "
                     f"the training samples' order is built from them, so after the "
                     f"{consumed} samples consumed the run may see again samples the saved run "
                     f"trained on and miss others")

    def _meta(self) -> dict:
        """meta.json's fields of this run's checkpoint (the skipped steps too: a weights-only
        copy made from it keeps the learning-rate schedule where it was)."""
        meta = {"config": self.cfg.to_dict(), "consumed_samples": self.consumed_samples,
                "train_samples": self.train_samples, "data_index_version": INDEX_VERSION,
                "parallel": self._parallel_sizes(), "skipped_total": self.skipped_total,
                "megagpt_version": __version__}
        if self.tokenizer_fingerprint is not None:   # checkpoint.pretrained checks it
            meta["tokenizer_fingerprint"] = self.tokenizer_fingerprint
        if self._train_data_digest() is not None:     # a resume on other data is told
            meta["train_data_digest"] = self._train_data_digest()
        return meta

    def _train_data_digest(self) -> str | None:
        """The training dataset's `data_digest` (its documents' lengths, or a fine-tuning set's
        tokens), or None (mock data, or a rank without the data)."""
        return getattr(getattr(self, "train_ds", None), "data_digest", None)

    def _save_deepspeed(self) -> Path:
        path = self.engine.save(self.save_dir, self.step, meta=self._meta(),
                                extra_state={"engine": "deepspeed",
                                             "skipped_total": self.skipped_total,
                                             "consecutive_skips": self.consecutive_skips},
                                rng_state=capture_rng_state(get_rng_tracker().get_states()),
                                keep_last=self.cfg.checkpoint.keep_last, all_min=self._all_min,
                                warn=self._warn)
        self.saved_step = self.step
        self.log(f"saved checkpoint {path}")
        return path

    def _resume_deepspeed(self, path: Path | None) -> None:
        """As _resume, through DeepSpeedEngine: weights go into the model before
        deepspeed.initialize (engine.start), DeepSpeed's own state after it."""
        e = self.engine
        if path is None:
            if self.cfg.checkpoint.pretrained:
                self._load_pretrained(self.cfg.checkpoint.pretrained)
            e.start()
            return
        meta = self._compatible_agreed(path)      # before deepspeed.initialize, a collective
        weights_only = meta.get("weights_only", False)
        self._warn_setting_changes(meta, path)
        self.step, self.consumed_samples = meta["step"], meta["consumed_samples"]
        if weights_only:
            self.skipped_total = meta.get("skipped_total", 0)
            _, model_state, _, _ = self._read_agreed(
                lambda: load_checkpoint(path, tp_rank=0, pp_rank=0, dp_rank=0),
                f"read its part of {path}")
            with torch.no_grad():
                self._load_agreed(lambda: e.chunks[0].load_state_dict(model_state["chunk0"]),
                                  f"load its weights from {path}")
            e.start()
            self.log(f"resumed the weights of {path} (a converted checkpoint) at step {self.step}; "
                     f"optimizer state starts fresh")
            return
        e.start()
        extra_state, rng_state = e.load(path)
        get_rng_tracker().set_states(restore_rng_state(rng_state))
        self.skipped_total = extra_state.get("skipped_total", 0)
        self.consecutive_skips = extra_state.get("consecutive_skips", 0)
        self.log(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples consumed)")

    def _refuse_replacing_another_run(self, path: Path | None) -> None:
        """A run that does not continue from its save dir's checkpoints (checkpoint.load=none, or
        a checkpoint elsewhere) and starts before the last of them would replace them step by
        step: refused. One that starts at or after it (a converted copy of the latest, say) only
        adds later steps."""
        held = complete_checkpoints(self.save_dir)
        start = read_meta(path)["step"] if path is not None else 0
        how = f"continues from {path}" if path is not None else "starts fresh"
        where = ("checkpoint.save_dir" if self.cfg.checkpoint.save_dir else
                 "checkpoint.save_dir (or logging.run_dir, under which it is by default)"
                 if self.cfg.logging.run_dir else
                 "checkpoint.save_dir (or --name, the run dir runs/<name> holding it by default)")
        damaged = damaged_checkpoints(self.save_dir, after_step=start)
        if not held and damaged:     # every checkpoint of a run damaged: not a reason to start over
            raise CheckpointError(
                f"checkpoint.save_dir={self.save_dir} holds no complete checkpoint, only damaged "
                f"ones ({', '.join(p.name for p, _ in damaged)}; {damaged[-1][1]}), and this run "
                f"{how} at step {start} (checkpoint.load={self.cfg.checkpoint.load}): its saves "
                f"would replace them; fix: restore the missing or damaged files (meta.json lists "
                f"them with their sizes), or choose a new {where} to start over")
        if not held or start >= read_meta(held[-1])["step"]:
            return
        raise CheckpointError(
            f"checkpoint.save_dir={self.save_dir} already holds checkpoints up to "
            f"{held[-1].name}, and this run {how} at step {start} "
            f"(checkpoint.load={self.cfg.checkpoint.load}): its saves would replace them; fix: "
            f"choose a new {where}, or set checkpoint.load=auto to continue the run saved there")

    @staticmethod
    def _read_agreed(read, what: str):
        """read(), on every rank, stopping every rank at once when one cannot (a file missing
        or damaged on its node), not at the first collective's timeout (`run_agreed`)."""
        return run_agreed(read, what, (CheckpointError, ConversionError, OSError))

    @staticmethod
    def _load_agreed(load, what: str):
        """load() (states read into the model, optimizer or RNG), stopping every rank together
        when one cannot (a state that does not fit, from a node's stale copy of a checkpoint)."""
        return run_agreed(load, what, (RuntimeError, ValueError, KeyError))

    def _compatible_agreed(self, path: Path) -> dict:
        """meta.json of `path`, checked against this run on every rank (`check_compatible`), every
        rank stopping when one's copy does not fit or cannot be read."""
        def check():
            meta = read_meta(path)
            check_compatible(meta, self.cfg.model, self._parallel_sizes(), where=path,
                             with_optimizer=not meta.get("weights_only", False))
            return meta
        return self._read_agreed(check, f"use {path}")

    def _load_pretrained(self, source: str) -> None:
        full = self._read_agreed(
            lambda: pretrained_state(source, self.cfg.model,
                                     None if self.cfg.data.mock else self.cfg.data.tokenizer_path),
            f"read checkpoint.pretrained={source}")
        with self.engine.master_weights():
            for chunk in self.engine.chunks:
                load_full_state_dict(chunk, full)
        self.log(f"initialised the weights from {source}")


DATA_ORDER_FIELDS = (("training", "seed"), ("data", "train_data_path"), ("data", "mock"),
                     ("data", "format"), ("data", "sft_packing"))
# changes that explain other training data by themselves (no digest line beside them)
DATA_CONTENT_FIELDS = ("data.train_data_path", "data.mock", "data.format", "data.split",
                       "data.val_data_path", "data.tokenizer_path")


def data_order_changes(saved: dict, cfg: Config) -> list[str]:
    """The settings the training samples' order is built from that differ between a saved
    run's config (`saved`, meta.json's) and `cfg`: `DATA_ORDER_FIELDS`; `data.split` while
    validation is carved out of the training data (no `data.val_data_path`), and whether it is
    (the training split then takes its share of each dataset, else the whole); the tokenizer,
    which fine-tuning applies while loading. One "field old -> new" line each."""
    d = cfg.data
    fields = list(DATA_ORDER_FIELDS)
    saved_data = saved.get("data", {})
    carved_then, carved_now = not saved_data.get("val_data_path"), not d.val_data_path
    if carved_then and carved_now:
        fields.append(("data", "split"))
    if d.format == "sft" and saved_data.get("format") == "sft":
        fields.append(("data", "tokenizer_path"))
    changes = [f"{section}.{k} {saved[section][k]} -> {getattr(getattr(cfg, section), k)}"
               for section, k in fields
               if k in saved.get(section, {})
               and saved[section][k] != getattr(getattr(cfg, section), k)]
    if "val_data_path" in saved_data and carved_then != carved_now:
        share = ("its share of data.split of each dataset" if carved_now
                 else "whole datasets, no longer their share of data.split")
        changes.append(f"data.val_data_path {saved_data['val_data_path']} -> {d.val_data_path} "
                       f"(training now takes {share})")
    return changes


def run_banner(cfg: Config, state: ParallelState) -> str:
    return (f"megagpt {__version__}: {cfg.source or cfg.name}, world {state.layout.world_size} "
            f"(tp {state.tp_world_size}, pp {state.pp_world_size}, dp {state.dp_world_size}), "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S')}")


# OpenAI's GPT-2 sizes on the Hugging Face hub, by (vocabulary, width, layers, heads)
GPT2_SIZES = {(50257, 768, 12, 12): "gpt2", (50257, 1024, 24, 16): "gpt2-medium",
              (50257, 1280, 36, 20): "gpt2-large", (50257, 1600, 48, 25): "gpt2-xl"}


def pretrained_state(source: str, m: ModelConfig,
                     tokenizer_path: str | None = None) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint of ours (any layout) or a Hugging Face GPT-2 folder,
    checked against the architecture `m` and, when given, the tokenizer of `tokenizer_path`
    (data.tokenizer_path: the one the source was trained with, when that can be known); for
    `checkpoint.pretrained`."""
    if not Path(source).exists():
        hub = GPT2_SIZES.get((m.vocab_size, m.d_model, m.n_layers, m.n_heads))
        where = (f"a Hugging Face GPT-2 folder (config.json + model.safetensors, e.g. from "
                 f"`hf download {hub} config.json model.safetensors --local-dir {source}` on a "
                 f"machine with internet; huggingface_hub before 1.0: `huggingface-cli "
                 f"download`)" if hub else
                 "a checkpoint of ours of this architecture: train it first (`make demo` writes "
                 "the tiny model's to runs/tiny_model/checkpoints)")
        raise ConversionError(
            f"checkpoint.pretrained={source} does not exist; fix: point it at {where}, or set "
            f"checkpoint.pretrained=null to start from random weights")
    src = load_source(source, "checkpoint.pretrained")
    saved = dataclasses.asdict(src.model)
    if saved["seq_length"] >= m.seq_length:        # a model may use fewer learned positions
        saved["seq_length"] = m.seq_length
    problems = _architecture_problems(saved, m, source)
    mismatch = tokenizer_path is not None and tokenizer_mismatch(
        src, load_tokenizer(tokenizer_path, "data.tokenizer_path"), "data.tokenizer_path")
    listed = "".join(f"\n  - {p}" for p in problems)
    fix = ("give the config the checkpoint's architecture (its model section or "
           "model.config_file)")
    if mismatch:     # first (another vocabulary's size is its symptom), but with every fix
        raise CheckpointError(f"checkpoint.pretrained: {mismatch}" + (
            f"\nand its architecture is not the config's (fix: {fix}):{listed}" if problems else ""))
    if problems:
        raise CheckpointError(f"checkpoint.pretrained does not fit this config:{listed}\nfix: "
                              f"{fix}, or choose a checkpoint of this one")
    full = dict(src.full_state)
    full["embedding.wpe.weight"] = full["embedding.wpe.weight"][:m.seq_length]
    return full


def _architecture_problems(saved: dict, m: ModelConfig, source: str) -> list[str]:
    wanted = dataclasses.asdict(m)
    problems = []
    for name in ARCHITECTURE_FIELDS:
        a, b = saved.get(name), wanted.get(name)
        if name == "ffn_hidden_size":
            a, b = a or 4 * saved["d_model"], b or 4 * m.d_model
        if name != "make_vocab_size_divisible_by" and a != b:
            problems.append(f"{source} has model.{name}={a}, the config says {b}")
    return problems

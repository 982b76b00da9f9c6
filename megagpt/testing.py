"""Run a function on N gloo processes on one machine: the CPU stand-in for a multi-GPU launch.

    results = run_distributed(fn, world_size=4, *args)   # fn(rank, world_size, *args) on each

Each process initialises the default gloo process group on a free local port, runs `fn`, and
sends its return value back (serialised with torch.save, so tensors travel safely). A rank that
raises fails the call with its traceback, one that dies fails it with its exit code, and ranks
that do not finish within `timeout` seconds are killed and named, so a hang becomes an error.

`tiny_config`, `fixed_batches` and `split_microbatches` give the equivalence tests one tiny
model and the same global batches for every layout.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(fn, rank, world_size, port, results, timeout, args, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except dist.DistNetworkError as e:
            if "EADDRINUSE" in str(e):   # another program took the port after free_port chose it
                results.put((rank, PORT_TAKEN, str(e)))
                return
            raise
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, _dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megagpt.parallel.state import destroy_parallel
        destroy_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


class _PortTaken(Exception):
    """Rank 0 could not listen on the chosen port: start again on another."""


PORT_TAKEN = "port taken"


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) on `world_size` forked gloo processes.

    Returns the list of return values in rank order. Raises RuntimeError with the failing rank's
    traceback, or TimeoutError naming the ranks that did not finish. A port that another program
    takes between its choice and rank 0's listen is replaced (three tries) before `fn` runs.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, kwargs, timeout)
        except _PortTaken:
            if attempt == 2:
                raise RuntimeError("run_distributed: three free ports were taken by other "
                                   "programs before rank 0 could listen on them") from None


def _run_once(fn, world_size: int, args, kwargs, timeout: float) -> list:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, rank, world_size, port, results, timeout, args, kwargs))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    values, deadline = {}, time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(values))
                dead = [r for r in missing if procs[r].exitcode is not None]
                if dead:
                    raise RuntimeError(f"run_distributed: rank {dead[0]} exited with code "
                                       f"{procs[dead[0]].exitcode} without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: ranks {missing} did not finish within "
                                       f"{timeout:.0f} s") from None
                continue
            if ok == PORT_TAKEN:
                raise _PortTaken(payload)
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]


TINY_VOCAB, TINY_SEQ, TINY_GLOBAL_BATCH = 1001, 16, 8
TINY_EOD = 7         # the end-of-document id of fixed_batches(documents=True)


def sigterm_when_ready(proc, ready, *, to_group: bool, wait: float = 60.0,
                      timeout: float = 120.0, signum: int = signal.SIGTERM) -> str:
    """Wait until `ready()` holds (at most `wait` seconds, or until the process ends), send
    SIGTERM (or `signum`: SIGINT is a terminal's Ctrl-C) to `proc` (a `subprocess.Popen` with its
    output piped), or to its whole process group with `to_group` (start it with
    start_new_session=True), and return its output."""
    deadline = time.time() + wait
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    return proc.communicate(timeout=timeout)[0]


def tiny_config(tp=1, pp=1, dp=1, vp=1, zero=0, micro=2, steps=5, **overrides):
    """A validated config of a 4-layer, width-32 model (vocabulary 1001, sequence 16) on mock data,
    fp32, no dropout, plain-torch kernels, global batch 8 for any layout. `overrides` are
    `section__field=value` pairs."""
    from megagpt.config import load_config

    raw = {
        "model": {"vocab_size": TINY_VOCAB, "d_model": 32, "n_heads": 4, "n_layers": 4,
                  "seq_length": TINY_SEQ, "dropout": 0.0},
        "training": {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": steps,
                     "batch_size": micro, "grad_accumulation_steps": TINY_GLOBAL_BATCH // (micro * dp),
                     "precision": "fp32", "grad_clip": 0.5, "seed": 11},
        "data": {"train_data_path": [], "val_data_path": [], "tokenizer_path": "gpt2", "mock": True},
        "parallel": {"world_size": tp * pp * dp, "tensor_parallel_size": tp,
                     "pipeline_parallel_size": pp, "virtual_pipeline_size": vp, "zero_stage": zero},
        "kernels": {"attention": "eager", "layernorm": "torch", "softmax": "torch",
                    "bias_gelu": "torch", "cross_entropy": "torch"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return load_config(raw=raw)


def fixed_batches(steps=5, seed=5, documents: bool = False) -> torch.Tensor:
    """The same global batches for every layout: (steps, global batch, seq + 1) token ids;
    `documents`: about one token in four is the end-of-document id TINY_EOD."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_VOCAB, (steps, TINY_GLOBAL_BATCH, TINY_SEQ + 1), generator=g)
    if documents:
        tokens[torch.rand(tokens.shape, generator=g) < 0.25] = TINY_EOD
    return tokens


def split_microbatches(tokens: torch.Tensor, dp_rank: int, dp: int, micro: int,
                       documents: bool = False) -> list[dict]:
    """This data-parallel rank's slice of a global batch, as micro-batches of `micro` sequences;
    `documents`: with the document ids and positions of TINY_EOD's documents, as the loader
    adds them under data.reset_attention_mask and reset_position_ids."""
    from megagpt.data.documents import document_ids, document_positions

    mine = tokens.chunk(dp)[dp_rank]
    mbs = [{"tokens": mb[:, :-1], "labels": mb[:, 1:],
            "loss_mask": torch.ones(mb.shape[0], mb.shape[1] - 1)} for mb in mine.split(micro)]
    for mb in mbs if documents else ():
        mb["document_ids"] = document_ids(mb["tokens"], TINY_EOD)
        mb["position_ids"] = document_positions(mb["document_ids"])
    return mbs


def check_a_damaged_file_stops_every_rank(run_dir, start, timeout: float = 60.0) -> None:
    """Damage data-parallel rank 1's optimizer file in run_dir's checkpoint of step 2, then run
    `start(rank, world, run_dir)` (a trainer's start, returning (error kind, message) or
    ("built", "")) on 2 ranks: rank 1 names the damaged file, rank 0 stops at once, told why."""
    from pathlib import Path

    step = Path(run_dir) / "ckpt" / "step_0000002"
    damaged = step / "optim_rank00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"damaged!")
    out = run_distributed(start, 2, str(run_dir), timeout=timeout)
    assert out[1][0] == "CheckpointError" and "optim_rank00001.pt is corrupt" in out[1][1], out
    assert out[0] == ("AnotherRankFailed", f"another rank could not read its part of {step}"), out

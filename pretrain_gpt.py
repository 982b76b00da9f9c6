#!/usr/bin/env python
"""Pretrain (or fine-tune) a GPT: `torchrun --nproc_per_node N pretrain_gpt.py --config FILE
[--section.field=value ...]`, or `python pretrain_gpt.py --config FILE` for one process.

Load the config, join the process group torchrun describes, build this rank's share of the
model and data, train, and tear down whatever happens.
"""
import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megagpt.config import OVERRIDES_HELP, ConfigError, ConfigFileError, load_config
from megagpt.convert import ConversionError
from megagpt.data.blend import DataPathError
from megagpt.data.gpt_dataset import DatasetBuildError
from megagpt.data.indexed import IndexedDatasetError
from megagpt.data.jsonl import InputError
from megagpt.data.tokenizer import TokenizerError
from megagpt.kernels import BackendUnavailable
from megagpt.parallel.pipeline import PipelineNeighbourError
from megagpt.parallel.state import destroy_parallel, initialize_parallel
from megagpt.testing import free_port
from megagpt.training.checkpoint import CheckpointError, find_latest
from megagpt.training.ds_engine import DeepSpeedError
from megagpt.training.metrics import WandbError
from megagpt.training.precision import gpu_problems
from megagpt.training.trainer import (AnotherRankFailed, Trainer, TrainingAborted, output_problems,
                                      run_banner)

# What a user's input or run can raise after the config loads: each message names the setting
# and the fix, so it is printed as it is, without a traceback.
USER_ERRORS = (BackendUnavailable, CheckpointError, ConfigError, ConversionError, DataPathError,
               DatasetBuildError, DeepSpeedError, IndexedDatasetError, InputError,
               PipelineNeighbourError, TokenizerError, TrainingAborted, WandbError)


def print_once(message: str) -> None:
    """Print to stderr on each node's first rank only (LOCAL_RANK 0, SLURM_LOCALID 0 under srun
    without torchrun, or one process): before the process group exists, every rank finds the
    same config problem and would print it, and a node whose ranks fail alone must still say
    why (the others wait for it to join).
    The other ranks wait a moment first, to exit after it: torchrun stops every rank of a node
    as soon as one fails, and one stopped before printing would leave the node failed without a
    word."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", os.environ.get("RANK")))
    if local in (None, "0"):
        print(message, file=sys.stderr)
    else:
        time.sleep(5)


ERROR_KEY, ACKS_KEY = "megagpt/error/rank0", "megagpt/error/heard"


def _store():
    """The process group's key-value store (hosted by rank 0's process), or None."""
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except (RuntimeError, ValueError):
        return None


def report_error(message: str | None, wait_s: float = 5.0) -> None:
    """Print a user error raised after the process group started, once for every rank that hit
    the same one. Rank 0 prints its message (None: it has none of its own, as when another rank
    failed first) and posts it in the group's store, then waits up to `wait_s` for every other
    rank to have read it, so that torchrun, which stops every rank once one exits, stops none
    before it has spoken. Another rank prints its own message unless it is word for word rank
    0's; without word from rank 0 within `wait_s` (a failure of this rank alone), it prints."""
    rank, store = int(os.environ.get("RANK", "0")), _store()
    if rank == 0:
        if message is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)
        if store is None or dist.get_world_size() == 1:
            return
        try:
            store.set(ERROR_KEY, message or "")
            deadline = time.monotonic() + wait_s
            while (int(store.add(ACKS_KEY, 0)) < dist.get_world_size() - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        except RuntimeError:
            pass
        return
    said = None
    try:
        store.wait([ERROR_KEY], datetime.timedelta(seconds=wait_s))
        said = store.get(ERROR_KEY).decode()
    except (AttributeError, RuntimeError):   # no store, no word from rank 0 in time, or it ended
        pass
    if message is not None and message != said:
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    if said is not None:                     # printed first: rank 0 may end once all have read
        try:
            store.add(ACKS_KEY, 1)
        except RuntimeError:
            pass


GLOO_LOCATION = re.compile(r"^\[[^\]]*\] ")     # "[.../gloo/transport/tcp/pair.cc:553] "


def outside_failure(error: RuntimeError, cfg) -> str | None:
    """What a failure from outside this rank's own code means, in one line, or None for another
    error: on the CPU (gloo), another rank ended while this one waited for it in a collective
    (its log says why; this one's traceback would only show where it waited) or sent nothing for
    the collectives' timeout; a data loader worker killed (most often by the out-of-memory
    killer)."""
    text = GLOO_LOCATION.sub("", (str(error).strip().splitlines() or [""])[0])
    if "closed by peer" in text or "reset by peer" in text:
        return (f"another rank ended while this one waited for it in a collective "
                f"({text.split('. ')[0]}); the first rank to fail says why in its log")
    if "Timed out waiting" in text:
        return (f"another rank sent nothing for parallel.distributed_timeout_minutes="
                f"{cfg.parallel.distributed_timeout_minutes:g} ({text}): it froze, or works far "
                f"longer than this one between collectives; the ranks' logs say which; fix: if "
                f"it was only slow (a save to a slow disk, say), raise the timeout")
    if text.startswith("DataLoader worker"):
        return (f"{text.rstrip('. ')} (the out-of-memory killer, most often: `dmesg` says); fix: "
                f"fewer loader processes (data.num_workers={cfg.data.num_workers}), or more "
                f"memory")
    return None


def tensor_parallel_across_nodes(cfg, per_node: int) -> str | None:
    """Why tensor-parallel groups would span nodes (ranks are consecutive in a group, and
    torchrun numbers a node's processes consecutively), or None."""
    tp = cfg.parallel.tensor_parallel_size
    if per_node % tp == 0:
        return None
    return (f"parallel.tensor_parallel_size={tp} does not divide the {per_node} processes a node "
            f"runs: tensor-parallel groups span nodes, and the all-reduces of every layer cross "
            f"the network; fix: a tensor-parallel size that divides --nproc_per_node (use "
            f"pipeline parallelism across nodes)")


def kept_checkpoint(cfg) -> str:
    """What a run stopped now leaves to resume from, and how."""
    latest = find_latest(Path(cfg.save_dir))
    if latest is None:
        return f"no checkpoint in {cfg.save_dir} yet"
    how = ("the same command resumes from it" if cfg.checkpoint.load == "auto" else
           f"to resume from it, set checkpoint.load=auto (it is {cfg.checkpoint.load})")
    return f"the last checkpoint is {latest}; {how}"


def init_distributed(cfg) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); one process without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.parallel.world_size:
        par = cfg.parallel
        model_parallel = par.tensor_parallel_size * par.pipeline_parallel_size
        other = (f"--parallel.world_size={world}" if world % model_parallel == 0 else
                 f"--parallel.world_size={world} with tensor x pipeline parallel sizes whose "
                 f"product divides {world} (now {par.tensor_parallel_size} x "
                 f"{par.pipeline_parallel_size})")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            print_once(f"error: {os.environ['SLURM_NTASKS']} tasks were started without torchrun "
                       f"(srun python ...), each a run of its own; fix: start them through "
                       f"torchrun, srun torchrun ... as docs/distributed.md shows")
            sys.exit(1)
        if per_node < world:             # several nodes: the product of both torchrun counts
            launch = (f"torchrun --nnodes N --nproc_per_node M with N x M = {par.world_size} "
                      f"(now {world // per_node} x {per_node})")
        else:
            launch = f"torchrun --nproc_per_node {par.world_size} ..."
        print_once(f"error: parallel.world_size={par.world_size} but {world} processes were "
                   f"started; fix: {launch}, or {other}")
        sys.exit(1)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"   # the loss and token counts are reduced as CPU tensors
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world,
                            timeout=datetime.timedelta(
                                minutes=cfg.parallel.distributed_timeout_minutes))
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help="a training config (configs/training/*.json)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, ConfigFileError) as e:
        print_once(f"error: {e}")
        return 2 if isinstance(e, ConfigFileError) else 1
    problems = output_problems(cfg)
    if problems:
        print_once(f"error: {ConfigError(problems)}")
        return 1
    device = init_distributed(cfg)
    # DeepSpeed's CPU accelerator has its bf16 mode (and refuses fp16, saying so); the native
    # engine runs fp32 on a CPU
    if (device.type == "cpu" and cfg.training.precision != "fp32"
            and cfg.parallel.deepspeed_config is None):
        print(f"note: training.precision={cfg.training.precision} runs as fp32 on a CPU")
        cfg.training.precision = "fp32"
    if device.type == "cpu" and cfg.training.cuda_graphs:
        print("note: training.cuda_graphs=true needs CUDA; a CPU run launches the blocks as usual")
        cfg.training.cuda_graphs = False
    try:
        if device.type == "cuda":   # what this rank's GPU lacks (GPUs may differ between ranks)
            problems = gpu_problems(cfg, torch.cuda.get_device_capability(device),
                                    torch.cuda.get_device_name(device))
            if problems:
                raise ConfigError(problems)
        state = initialize_parallel(cfg.parallel.tensor_parallel_size,
                                    cfg.parallel.pipeline_parallel_size)
        if state.rank == 0:
            print(run_banner(cfg, state))
            warning = tensor_parallel_across_nodes(
                cfg, int(os.environ.get("LOCAL_WORLD_SIZE", state.layout.world_size)))
            if warning:
                print(f"warning: {warning}")
        Trainer(cfg, state, device).train()
    except AnotherRankFailed:      # the failing rank prints why; this one waits for it to
        report_error(None)        # (rank 0), or for word from rank 0, without a word of its own
        return 1
    except KeyboardInterrupt:   # Ctrl-C reaches every rank: rank 0 speaks for all
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted (Ctrl-C): stopped without saving; {kept_checkpoint(cfg)}; to stop "
                  f"with a checkpoint, send SIGTERM instead (kill -TERM, scancel)",
                  file=sys.stderr, flush=True)
        return 130
    except USER_ERRORS as e:
        cause = e.__cause__    # the library error underneath, unless the message quotes it
        cause = f" ({type(cause).__name__}: {cause})" if cause and str(cause) not in str(e) else ""
        report_error(f"{e}{cause}")
        return 1
    except RuntimeError as e:   # a collective that another rank left, a killed loader, ...
        failure = outside_failure(e, cfg)
        if failure is None:
            raise
        rank = os.environ.get("RANK", "0")
        print(f"{'error' if rank == '0' else f'error (rank {rank})'}: {failure}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

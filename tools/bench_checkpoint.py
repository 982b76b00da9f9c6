#!/usr/bin/env python
"""How long a checkpoint save holds training up: in the foreground, and with checkpoint.async_save.

    python tools/bench_checkpoint.py --config FILE [--repeats 3] [--json PATH] [--section.field=value ...]

One process (tp = pp = dp = 1, no DeepSpeed) builds the config's `Trainer` on mock data and trains
one step (so AdamW's moments exist; that step's own save at the end is the warm-up). Then it saves
the same step again and again into a temporary save dir, the two ways taking turns:
- foreground, `Trainer.save()`: the seconds until training could go on;
- background, `Trainer.save(background=True)`: the seconds until it returns (the copy of the state
  to host memory), then the seconds its thread takes to write the files (waited for here, so
  that the two ways never overlap; in training, the steps that follow run meanwhile), then
  completing it (meta.json, the rename, `latest`, pruning: a later step of training waits for
  this too). Training waits for the copy and the completing.
Prints medians with the range, and the checkpoint's size, as a table and as JSON (`--json`).
Overrides after the options apply to the config (e.g. `--training.precision=fp32`).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megagpt.cli import run_main  # noqa: E402
from megagpt.config import (OVERRIDES_HELP, ConfigError, ConfigFileError,  # noqa: E402
                            load_config)
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402
from megagpt.testing import free_port  # noqa: E402
from megagpt.training.trainer import Trainer  # noqa: E402

ONE_PROCESS = ["--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
               "--parallel.pipeline_parallel_size=1", "--parallel.virtual_pipeline_size=1",
               "--parallel.zero_stage=0", "--parallel.deepspeed_config=null", "--data.mock=true",
               "--data.num_workers=0", "--training.eval_interval=0", "--training.max_steps=1",
               "--training.warmup_steps=0",
               "--checkpoint.keep_last=1", "--checkpoint.load=none",
               "--logging.progress_bar=false", "--logging.tensorboard=false"]


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(cfg, device: torch.device, repeats: int) -> dict:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    state = initialize_parallel(1, 1)
    trainer = Trainer(cfg, state, device, log=lambda *a: None)
    trainer.train()                                   # one step, and its save: the warm-up
    times = {"foreground": [], "background_blocks": [], "background_writes": [],
             "background_completes": []}
    for _ in range(repeats):
        times["foreground"].append(timed(trainer.save, sync))
        times["background_blocks"].append(timed(lambda: trainer.save(background=True), sync))
        times["background_writes"].append(timed(trainer.pending.thread.join, sync))
        times["background_completes"].append(timed(trainer.complete_pending_save, sync))
    folder = trainer.save_dir / "step_0000001"
    size = sum(p.stat().st_size for p in folder.iterdir())
    destroy_parallel()
    return {"config": cfg.source, "device": str(device), "precision": cfg.training.precision,
            "checkpoint_bytes": size, "repeats": repeats,
            **{name: spread(values) for name, values in times.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help="a training config")
    parser.add_argument("--repeats", type=int, default=3, help="saves each way (at least 1)")
    parser.add_argument("--json", help="also write the result to this file")
    args, overrides = parser.parse_known_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: must be at least 1")
    if args.json and output_file_problem(args.json):
        parser.error(f"--json {args.json}: {output_file_problem(args.json)}; fix: another path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = load_config(args.config, ONE_PROCESS + [f"--logging.run_dir={tmp}",
                                                           f"--checkpoint.save_dir={tmp}/ckpt"]
                              + overrides)
        except (ConfigError, ConfigFileError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if device.type == "cpu":
            cfg.training.precision, cfg.training.cuda_graphs = "fp32", False   # as pretrain_gpt
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            result = measure(cfg, device, args.repeats)
        finally:
            dist.destroy_process_group()
    print(f"{result['config']}: {device}, {result['precision']}, checkpoint "
          f"{result['checkpoint_bytes'] / 2**20:,.1f} MiB, {args.repeats} saves each way")
    for name in ("foreground", "background_blocks", "background_writes", "background_completes"):
        s = result[name]
        print(f"  {name:<22} {s['median']:8.3f} s  ({s['min']:.3f}-{s['max']:.3f})")
    waits = result["background_blocks"]["median"] + result["background_completes"]["median"]
    print(f"  training waits {waits:.3f} s (the copy, then completing in a later step) instead of "
          f"{result['foreground']['median']:.3f} s per save with checkpoint.async_save")
    if args.json:
        write_json(args.json, {**result, "provenance": provenance()})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)

#!/usr/bin/env python
"""The validator's memory estimate beside the measured peak of a few training steps.

    python tools/bench_memory.py [--config FILE ...] [--steps 3] [--no-shrink] [--as-configured]
        [--json PATH] [--section.field=value ...]

For each training config (default: every configs/training/*.json) it trains a few steps of the
config's model on mock data with one process (tp = pp = dp = 1, no ZeRO, no DeepSpeed), the
trainer's own `Engine(cfg, state, device).train_step`, and prints the measured peak beside
`estimate_memory(cfg, device)` (megagpt/estimate.py, what tools/validate_config.py reports) for
the same layout, with their ratio, as a table, and as JSON with every estimate term (`--json`).
Overrides after the options apply to every config (e.g. `--training.precision=fp32`).
`--as-configured` runs each config's own layout instead (tensor, pipeline and data parallelism,
ZeRO-1, sequence parallelism) as `parallel.world_size` gloo processes on the CPU, and compares
the largest rank's peak with the estimate, which is for the pipeline rank that needs the most.

Sizes. On a GPU the configs run as shipped but for at most 2 micro-batches a step; on the CPU
they are shrunk to the tiny config's sizes (at most 4 layers, sequence 128, micro-batch 2, 2
micro-batches), keeping the width, vocabulary, precision, dropout, recompute and kernel choices;
the overrides applied are printed with each config (`--no-shrink` runs the configs as they are).
With one pipeline stage the peak is one micro-batch's activations on top of the states (the
gradients accumulate in place), so fewer micro-batches change the time, not the peak. Every step
after the first holds AdamW's moments, hence at least 2 steps.

What is measured: tensor memory, the bytes of every tensor allocated from just before the model is
built to the end of the last step, at its highest (peak) and at the end (held: parameters,
master weights, gradients, optimizer state, and on CUDA the cuBLAS workspaces), each config in a
fresh process so nothing of another run is counted or subtracted.
- On a GPU: `torch.cuda.max_memory_allocated` (the peak of the caching allocator's live blocks,
  as tools/bench_train.py reports it) less what was allocated before the model was built.
- On the CPU: every allocation and free of torch's CPU allocator, recorded by `torch.profiler`
  (profile_memory=True) and summed in order; the highest running sum is the peak (a block
  allocated before the profiler started is in neither sum, even if freed during the steps). With
  several processes each measures its own. The profiler records the frees of the profiled
  thread only: a tensor whose last reference another thread drops (gloo's
  threads complete the collectives and release their buffers) stays in the sum, more of them
  with every step. So at the end the bytes the sum still holds are compared with what the
  tensors Python can reach hold; the difference, "unseen", bounds the error: the true peak is
  between the measured peak less it and the measured peak.
Both count tensors (including the ones autograd and the optimizer make internally, and on CUDA
cuBLAS's workspaces, which torch allocates through its caching allocator) and nothing else: not
the CUDA context, the caching allocator's reserved but unused blocks, the Python heap, the
libraries' code, oneDNN/BLAS scratch buffers or glibc's fragmentation, which a process's resident
size (peak RSS) would mix in on the CPU at tens of MB, as much as the tiny config's activations.
That is the estimate's scope too (its docstring lists what it leaves out), so the two compare
term for term. On the CPU the model runs torch's kernels (the `auto` choices), which
`estimate_memory(cfg, "cpu")` models; with TRITON_INTERPRET=1 and the Triton kernels chosen
explicitly (`--kernels.attention=triton --kernels.cross_entropy=triton ...`) they run in
Triton's interpreter, whose launchers allocate their outputs from torch's allocator as on a GPU,
so the estimate's Triton terms can be checked on the CPU (slowly: minutes for the tiny config).
"""
import argparse
import gc
import glob
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megagpt.cli import run_main  # noqa: E402
from megagpt.config import (OVERRIDES_HELP, ConfigError, ConfigFileError,  # noqa: E402
                            load_config, split_config_args)
from megagpt.data.mock import mock_microbatches  # noqa: E402
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.estimate import MiB, estimate_memory  # noqa: E402
from megagpt.parallel.random import seed_everything  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402
from megagpt.training.precision import gpu_problems  # noqa: E402
from megagpt.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402
from megagpt.testing import free_port, run_distributed  # noqa: E402
from megagpt.training.engine import Engine  # noqa: E402

SINGLE_PROCESS = ["--data.mock=true", "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
                  "--parallel.pipeline_parallel_size=1", "--parallel.virtual_pipeline_size=1",
                  "--parallel.zero_stage=0", "--parallel.sequence_parallel=false",
                  "--parallel.deepspeed_config=null"]
# The most each size may be in a run: the tiny config's sizes on the CPU; on a GPU, the shipped
# sizes with at most 2 micro-batches a step.
CPU_SIZES = {"model.n_layers": 4, "model.seq_length": 128, "training.batch_size": 2,
             "training.grad_accumulation_steps": 2}
GPU_SIZES = {"training.grad_accumulation_steps": 2}
TERMS = ("weights", "master_weights", "gradients", "optimizer", "activations", "temporaries",
         "workspace", "first_step")


def shrink_overrides(cfg, sizes: dict) -> list[str]:
    """Overrides that bring each size of `cfg` above its limit in `sizes` down to the limit."""
    out = []
    for key, limit in sizes.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) > limit:
            out.append(f"--{key}={limit}")
    return out


def reachable_tensor_bytes() -> int:
    """The bytes of the distinct CPU storages of every tensor Python's garbage collector can
    reach (views counted once)."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":   # type(): no proxy
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def tensor_memory(run, device: torch.device):
    """Call `run()`; returns (peak, held, unseen, its result): the most bytes of tensors
    allocated during the call were at any time, what is still allocated after it, and (on the
    CPU) the bytes the profiler saw allocated but not freed that no tensor holds at the end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before,
                torch.cuda.memory_allocated(device) - before, 0, result)
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    reachable = reachable_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())   # allocations (+bytes) and frees (-bytes)
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    # the profiler records the frees of this thread only: a tensor whose last reference another
    # thread dropped (gloo's, which completes the collectives) stays in the sum
    gc.collect()
    unseen = max(0, live - (reachable_tensor_bytes() - reachable))
    return peak, live, unseen, result


def train(cfg, state, device: torch.device, steps: int) -> tuple[int, int, int, float]:
    """Build this rank's `Engine` and train `steps` steps on mock data: (peak, held, unseen,
    last loss), as `tensor_memory` measures them."""
    generator = torch.Generator().manual_seed(0)
    batches = [mock_microbatches(cfg, generator) for _ in range(steps)]

    def run():
        engine = Engine(cfg, state, device)
        return engine, [engine.train_step(batch, cfg.training.learning_rate).loss for batch in batches]

    peak, held, unseen, (_, losses) = tensor_memory(run, device)
    return peak, held, unseen, losses[-1]


def train_rank(rank: int, world_size: int, path: str, overrides: list[str], steps: int):
    """One CPU rank of the config's own layout, on the gloo group `run_distributed` set up."""
    cfg = load_config(path, overrides)
    state = initialize_parallel(cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size)
    seed_everything(cfg.training.seed, tp_rank=state.tp_rank, pp_rank=state.pp_rank)
    return train(cfg, state, torch.device("cpu"), steps)


def measure(path: str, overrides: list[str], steps: int, as_configured: bool = False) -> dict:
    """Train `steps` steps of one config and measure them (run in a fresh process): in one
    process, or with `as_configured` as the config's world_size gloo processes on the CPU, whose
    largest peak is the one the estimate (of the largest pipeline rank) is for."""
    cfg = load_config(path, overrides)
    if as_configured:
        device = torch.device("cpu")
        ranks = run_distributed(train_rank, cfg.parallel.world_size, path, overrides, steps,
                                timeout=3600)
        peak, held, unseen, loss = max(ranks)      # the rank with the largest peak
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            state = initialize_parallel(1, 1)
            seed_everything(cfg.training.seed, device=device)
            peak, held, unseen, loss = train(cfg, state, device, steps)
        finally:
            destroy_parallel()
            dist.destroy_process_group()
    est = estimate_memory(cfg, device.type)
    par = cfg.parallel
    return {
        "config": path, "precision": cfg.training.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores)",
        "layout": {"tp": par.tensor_parallel_size, "pp": par.pipeline_parallel_size,
                   "vp": par.virtual_pipeline_size, "dp": par.data_parallel_size,
                   "zero_stage": par.zero_stage, "sequence_parallel": par.sequence_parallel},
        "shape": {"n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
                  "seq_length": cfg.model.seq_length, "micro_batch": cfg.training.batch_size,
                  "micro_batches": cfg.training.grad_accumulation_steps},
        "parameters": est.params_per_gpu, "steps": steps, "last_loss": loss,
        "measured_peak_bytes": peak, "measured_held_bytes": held, "unseen_free_bytes": unseen,
        "estimate_bytes": est.total, "estimate_held_bytes": est.states + est.workspace,
        "estimate_terms_bytes": {term: getattr(est, term) for term in TERMS},
        "measured_over_estimate": peak / est.total,
    }


def run_fresh(path: str, overrides: list[str], steps: int, as_configured: bool) -> dict:
    """`measure` in a new process, so that nothing another run allocated is counted."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, path, overrides, steps, as_configured).result()


HEADER = (f"{'config':<20} {'precision':<9} {'tp x pp x dp':<12} {'layers x seq x batch':<21}"
          f"{'measured MiB':>12} {'estimate MiB':>12} {'meas/est':>8} {'held meas/est MiB':>19}"
          f"{'unseen MiB':>11}")
UNSEEN_NOTE = ("unseen: bytes the profiler saw allocated and never freed that no tensor holds at "
               "the end: frees on other threads (gloo's, which complete the collectives), which "
               "it does not record; the true peak lies between measured - unseen and measured")


def table_row(r: dict) -> str:
    shape, layout = r["shape"], r["layout"]
    grid = f"{layout['tp']} x {layout['pp']} x {layout['dp']}"
    size = f"{shape['n_layers']} x {shape['seq_length']} x {shape['micro_batch']}"
    held = f"{r['measured_held_bytes'] / MiB:,.1f}/{r['estimate_held_bytes'] / MiB:,.1f}"
    return (f"{os.path.basename(r['config']):<20} {r['precision']:<9} {grid:<12} {size:<21}"
            f"{r['measured_peak_bytes'] / MiB:>12,.1f} {r['estimate_bytes'] / MiB:>12,.1f} "
            f"{r['measured_over_estimate']:>8.3f} {held:>19}{r['unseen_free_bytes'] / MiB:>11,.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", nargs="+", help="training configs (default: configs/training/*.json)")
    parser.add_argument("--steps", type=int, default=3, help="training steps a config (at least 2)")
    parser.add_argument("--no-shrink", action="store_true",
                        help="run the configs at their sizes (default: shrunk, see the docstring)")
    parser.add_argument("--as-configured", action="store_true",
                        help="run each config's own parallel layout as parallel.world_size gloo "
                             "processes on the CPU (the native engine; not DeepSpeed configs)")
    parser.add_argument("--json", help="also write the rows, with every estimate term, to this file")
    args, overrides = parser.parse_known_args()
    if args.config:
        args.config, overrides = split_config_args(args.config, overrides)
    if args.json and output_file_problem(args.json):
        parser.error(f"--json {args.json}: {output_file_problem(args.json)}; fix: another path")
    if args.steps < 2:
        parser.error(f"--steps={args.steps}: must be at least 2 (AdamW's moments exist from the "
                     f"first step on, so the peak is reached in a later one)")
    configs = args.config or sorted(os.path.relpath(p) for p in
                                    glob.glob(os.path.join(ROOT, "configs", "training", "*.json")))
    on_cpu = args.as_configured or not torch.cuda.is_available()
    sizes = {} if args.no_shrink else (CPU_SIZES if on_cpu else GPU_SIZES)
    layout = ["--data.mock=true"] if args.as_configured else SINGLE_PROCESS
    rows, failed = [], []
    for path in configs:
        try:
            cfg = load_config(path, layout + overrides)
        except (ConfigError, ConfigFileError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
        if args.as_configured and cfg.parallel.deepspeed_config is not None:
            print(f"{path}: parallel.deepspeed_config={cfg.parallel.deepspeed_config}: "
                  f"--as-configured measures the native engine only; fix: leave this config out, "
                  f"or run it without --as-configured (one process, no DeepSpeed)", file=sys.stderr)
            failed.append(path)
            continue
        lacks = [] if on_cpu else gpu_problems(cfg, torch.cuda.get_device_capability(),
                                               torch.cuda.get_device_name())
        if lacks:
            print(f"{path}: {'; '.join(lacks)}", file=sys.stderr)
            failed.append(path)
            continue
        shrink = shrink_overrides(cfg, sizes)
        where = (f"{cfg.parallel.world_size} gloo processes" if args.as_configured
                 else "single process")
        print(f"{path}: {where}" + (f", {' '.join(shrink)}" if shrink else "")
              + (f", {' '.join(overrides)}" if overrides else ""), flush=True)
        try:
            row = run_fresh(path, layout + shrink + overrides, args.steps, args.as_configured)
        except Exception as e:    # one config's failure should not cost the others' measurements
            print(f"{path}: the run failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(path)
            continue
        if not math.isfinite(row["last_loss"]):
            print(f"{path}: the loss is {row['last_loss']} after {args.steps} steps; not "
                  f"recorded, the run is broken", file=sys.stderr)
            failed.append(path)
            continue
        rows.append({**row, "overrides": shrink + overrides})
        print(f"  measured {row['measured_peak_bytes'] / MiB:,.1f} MiB, estimate "
              f"{row['estimate_bytes'] / MiB:,.1f} MiB: measured / estimate = "
              f"{row['measured_over_estimate']:.3f}", flush=True)
        if args.json:
            # after each config, so a cut-off run keeps its rows
            write_json(args.json, {"device": rows[0]["device"], "steps": args.steps, "rows": rows,
                                    "provenance": provenance()})
    if rows:
        print(f"\n{rows[0]['device']}, {args.steps} steps a config, tensor memory from before the "
              f"model is built to the end of the last step")
        print(HEADER)
        print("\n".join(table_row(r) for r in rows))
        if any(r["unseen_free_bytes"] for r in rows):
            print(UNSEEN_NOTE)
    if args.json and rows:
        print(f"wrote {args.json}")
    if failed:
        print(f"not measured: {', '.join(failed)} (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)

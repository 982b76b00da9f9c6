#!/usr/bin/env python
"""Measure the pipeline bubble: the fraction of a training step each stage spends waiting.

    python tools/bench_pipeline.py [--pp 2] [--microbatches 2 4 8] [--vp 1 2] [--steps 3]
        [--json runs/bench/bench_pipeline.json]

For each schedule (1F1B, and interleaved for vp > 1) and micro-batch count m, runs a balanced
model (small vocabulary, so the ends cost about what a block costs) on pp gloo processes, times
each stage's waits for its neighbours' activations and gradients against its whole step, and
prints the measured idle fraction beside the formula: (p - 1) / (m + p - 1) for 1F1B and
(p - 1) / (v*m + p - 1) interleaved. On a CPU each stage is one process; give them a core each
(pp <= cores) or the timings mix in the scheduler's own waiting.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megagpt.cli import run_main  # noqa: E402
from megagpt.config import load_config  # noqa: E402
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.parallel import state  # noqa: E402
from megagpt.parallel.random import seed_everything  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402
from megagpt.testing import run_distributed  # noqa: E402
from megagpt.training.engine import Engine  # noqa: E402

SEQ, VOCAB, WIDTH = 64, 512, 128


def bench_config(pp: int, vp: int, m: int):
    layers = 4 * pp * vp
    return load_config(raw={
        "model": {"vocab_size": VOCAB, "d_model": WIDTH, "n_heads": 4, "n_layers": layers,
                  "seq_length": SEQ, "dropout": 0.0, "make_vocab_size_divisible_by": 64},
        "training": {"learning_rate": 1e-4, "max_steps": 100, "batch_size": 2,
                     "grad_accumulation_steps": m, "precision": "fp32"},
        "data": {"train_data_path": [], "val_data_path": [], "tokenizer_path": "gpt2", "mock": True},
        "parallel": {"world_size": pp, "pipeline_parallel_size": pp, "virtual_pipeline_size": vp},
        "kernels": {"attention": "sdpa", "layernorm": "torch", "softmax": "torch",
                    "bias_gelu": "torch", "cross_entropy": "torch"},
    })


def _stage(rank, world, vp, m, steps):
    cfg = bench_config(world, vp, m)
    ps = state.initialize_parallel(1, world)
    seed_everything(0, 0, ps.pp_rank)
    engine = Engine(cfg, ps, p2p_timeout_s=120)
    waited = [0.0]
    exchange = engine.p2p.exchange

    def timed_exchange(*args, **kwargs):
        start = time.perf_counter()
        try:
            return exchange(*args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - start

    engine.p2p.exchange = timed_exchange
    g = torch.Generator().manual_seed(0)
    batch = [{"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=g),
              "labels": torch.randint(0, VOCAB, (2, SEQ), generator=g)} for _ in range(m)]
    engine.train_step(batch, 1e-4)                       # warm-up
    fractions = []
    for _ in range(steps):
        waited[0] = 0.0
        torch.distributed.barrier()
        start = time.perf_counter()
        engine.train_step(batch, 1e-4)
        fractions.append(waited[0] / (time.perf_counter() - start))
    return statistics.median(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--vp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "runs/bench"),
                                                       "bench_pipeline.json"))
    args = parser.parse_args()
    for name in ("pp", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.microbatches + args.vp) < 1:
        parser.error("--microbatches and --vp take values of at least 1")
    if args.pp == 1 and max(args.vp) > 1:
        parser.error("--vp above 1 needs --pp 2 or more: interleaving cuts a pipeline into chunks")
    if not any(vp == 1 or m % args.pp == 0 for vp in args.vp for m in args.microbatches):
        parser.error(f"nothing to measure: interleaving (--vp > 1) needs --microbatches that are "
                     f"multiples of --pp {args.pp}")
    if output_file_problem(args.json):
        parser.error(f"--json {args.json}: {output_file_problem(args.json)}; fix: another path")
    torch.set_num_threads(1)
    rows = []
    print(f"pp={args.pp}, {os.cpu_count()} CPUs; idle = time waiting for neighbours / step time")
    print(f"{'schedule':<12} {'vp':>3} {'m':>4} {'formula':>9} " +
          " ".join(f"{'stage ' + str(r):>8}" for r in range(args.pp)) + f" {'mean':>7}")
    for vp in args.vp:
        for m in args.microbatches:
            if vp > 1 and m % args.pp:
                continue
            idle = run_distributed(_stage, args.pp, vp, m, args.steps, timeout=600)
            formula = (args.pp - 1) / (vp * m + args.pp - 1)
            mean = sum(idle) / len(idle)
            name = "interleaved" if vp > 1 else "1F1B"
            print(f"{name:<12} {vp:>3} {m:>4} {formula:>9.3f} " +
                  " ".join(f"{x:>8.3f}" for x in idle) + f" {mean:>7.3f}", flush=True)
            rows.append({"schedule": name, "pp": args.pp, "vp": vp, "microbatches": m,
                         "formula": formula, "idle_per_stage": idle, "idle_mean": mean})
    write_json(args.json, {"cpus": os.cpu_count(), "rows": rows, "provenance": provenance()})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)

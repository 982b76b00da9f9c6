#!/usr/bin/env python
"""Training throughput against the peer users would otherwise run, in one process.

    python tools/bench_train.py --config configs/training/small_model.json [--steps 10]
        [--warmup 3] [--no-peer] [--json PATH] [--section.field=value ...]

Trains the config's model on mock data (`data.mock`) with one process (tp = pp = dp = 1, the
native engine: a DeepSpeed config's file is left out) and,
alternating step by step, the same model as Hugging Face `GPT2LMHeadModel` in plain PyTorch
eager with the same batch, micro-batches, optimizer (AdamW, fused on CUDA), precision (autocast)
and clipping. After the warm-up it reports, per side, the median step time and its spread,
tokens/s, TFLOP/s per GPU and MFU (DESIGN.md's convention), peak memory on a GPU, and the ratio
of the two step times: on a CPU that is the framework's overhead, on a GPU the speed-up. With
the document settings (`data.reset_attention_mask` and its kin) the mock windows hold documents
and ours trains on them; the peer then gets the positions but no document masks (Hugging
Face's eager GPT-2 takes none), so under `reset_attention_mask` it is skipped.

Memory check: on a GPU each side's peak is the most allocated during its own steps less what the
other side holds between steps (the peer's parameters, gradients and optimizer state, counted
tensor by tensor), and ours is printed beside the validator's estimate (megagpt/estimate.py) for
the same single-GPU layout. With `training.cuda_graphs` the graphs' private memory pool is added:
a replay allocates nothing in the allocator's view, so the pool's blocks that were free when the
capture ended (the blocks' intermediates, reused on every replay) are not in the allocated peak.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megagpt.cli import run_main  # noqa: E402
from megagpt.config import (OVERRIDES_HELP, ConfigError, ConfigFileError,  # noqa: E402
                            load_config)
from megagpt.data.mock import mock_microbatches  # noqa: E402
from megagpt.estimate import GiB, estimate_memory  # noqa: E402
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.hf import hf_config_dict, to_hf  # noqa: E402
from megagpt.kernels._utils import interpreter_requested  # noqa: E402
from megagpt.parallel.random import seed_everything  # noqa: E402
from megagpt.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402
from megagpt.testing import free_port  # noqa: E402
from megagpt.training.engine import Engine  # noqa: E402
from megagpt.training.metrics import flops_per_token, peak_flops, throughput  # noqa: E402
from megagpt.training.optim import build_optimizer  # noqa: E402
from megagpt.training.precision import autocast_context, gpu_problems  # noqa: E402


class HFPeer:
    """GPT2LMHeadModel with the same weights, optimizer, precision, accumulation and clipping."""

    def __init__(self, cfg, engine, device):
        import transformers

        self.cfg, self.device = cfg, device
        hf_cfg = transformers.GPT2Config(**hf_config_dict(cfg.model))
        self.model = transformers.GPT2LMHeadModel(hf_cfg).to(device)
        with engine.master_weights():
            ours = dict(engine.chunks[0].state_dict())
        ours["embedding.wte.weight"] = ours["embedding.wte.weight"][:cfg.model.vocab_size]
        self.model.load_state_dict(to_hf(ours, cfg.model), strict=False)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.training, device)

    def train_step(self, microbatches, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        for mb in microbatches:
            with autocast_context(self.cfg.training.precision, self.device.type):
                positions = mb.get("position_ids")      # data.reset_position_ids
                logits = self.model(mb["tokens"].to(self.device), position_ids=None
                                    if positions is None else positions.to(self.device)).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     mb["labels"].to(self.device).flatten())
            (loss / len(microbatches)).backward()
        if self.cfg.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        self.optimizer.step()

    def held_bytes(self):
        """What the peer holds between steps: parameters, gradients, optimizer state."""
        tensors = [p for p in self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for st in self.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.device.type == "cuda"]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def profile_step(step, device):
    """One step under torch.profiler: the busiest kernels and ops, and device time against wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed(step, device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        busy = device_busy_us(prof.key_averages()) / 1e6
        print(f"profiled step: wall {wall:.4f} s, device busy {busy:.4f} s ({busy / wall:.0%})")


def device_busy_us(events) -> float:
    """Microseconds the device ran kernels: the kernels' own events only, as the profiler's table
    totals them (an operator's self device time repeats its kernels')."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))


def graph_pool_unallocated_bytes(segments) -> int:
    """Bytes of the allocator's private pools (the CUDA graphs') that the allocator counts as
    free, from `torch.cuda.memory_snapshot()`'s segments: replays use them without allocating, so
    they add to the allocated peak."""
    private = [seg for seg in segments if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(seg["total_size"] - seg["allocated_size"] for seg in private)


def summary(name, times, tokens, cfg, device, peak_mem):
    median = statistics.median(times)
    tokens_per_s = tokens / median
    tflops, mfu = throughput(tokens_per_s, flops_per_token(cfg.model), 1, peak_flops(device))
    return {"side": name, "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": mfu, "peak_mem_gib": peak_mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="time ours only")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one more step of ours and print where the time went")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "runs/bench"), "bench_train.json"))
    args, overrides = parser.parse_known_args()
    if output_file_problem(args.json):
        parser.error(f"--json {args.json}: {output_file_problem(args.json)}; fix: another path")
    if interpreter_requested():
        parser.error("TRITON_INTERPRET is set: the Triton interpreter's speed says nothing about "
                     "the kernels', and it is never timed; fix: unset TRITON_INTERPRET")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and "
                     f"{args.warmup}")
    # one process of the native engine: a config's DeepSpeed file is dropped, as bench_memory's
    # one-process runs drop it (else the estimate beside the peak would be DeepSpeed's)
    overrides += ["--data.mock=true", "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
                  "--parallel.pipeline_parallel_size=1", "--parallel.virtual_pipeline_size=1",
                  "--parallel.zero_stage=0", "--parallel.sequence_parallel=false",
                  "--parallel.deepspeed_config=null"]
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, ConfigFileError) as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lacks = [] if device.type == "cpu" else gpu_problems(
        cfg, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    if lacks:
        print(f"{args.config}: {'; '.join(lacks)}", file=sys.stderr)
        return 2
    if device.type == "cpu" and cfg.training.cuda_graphs:
        print(f"{args.config}: training.cuda_graphs=true needs a CUDA device and this machine has "
              f"none; fix: --training.cuda_graphs=false", file=sys.stderr)
        return 2
    if device.type == "cpu" and cfg.training.precision != "fp32":
        cfg.training.precision = "fp32"
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        state = initialize_parallel(1, 1)
        seed_everything(cfg.training.seed, device=device)
        engine = Engine(cfg, state, device)
        peer = None
        if not args.no_peer and cfg.data.reset_attention_mask:
            print("peer skipped: data.reset_attention_mask=true, and Hugging Face's GPT-2 in eager "
                  "mode takes no document masks (it would do other work); timing ours alone")
        elif not args.no_peer:
            try:
                peer = HFPeer(cfg, engine, device)
            except ImportError as e:      # our figures still count
                print(f"peer skipped: transformers does not import ({e}); timing ours alone")
        sides = {"megagpt": engine.train_step, "hf_eager": peer.train_step if peer else None}
        sides = {k: v for k, v in sides.items() if v is not None}
        times = {k: [] for k in sides}
        peak = {k: None for k in sides}
        generator = torch.Generator().manual_seed(0)
        lr = cfg.training.learning_rate
        for i in range(args.warmup + args.steps):
            batch = mock_microbatches(cfg, generator)
            took = []
            # the sides alternate, and so does which of them goes first
            for name, step in list(sides.items())[::1 if i % 2 == 0 else -1]:
                if device.type == "cuda":
                    # Subtract what the other side holds: the peer's tensors, or everything but them.
                    peer_held = peer.held_bytes() if peer else 0
                    other = peer_held if name == "megagpt" else torch.cuda.memory_allocated(device) - peer_held
                    torch.cuda.reset_peak_memory_stats(device)
                elapsed = timed(lambda: step(batch, lr), device)
                took.append(f"{name} {elapsed:.4f} s")
                if i >= args.warmup:
                    times[name].append(elapsed)
                    if device.type == "cuda":
                        used = (torch.cuda.max_memory_allocated(device) - other) / GiB
                        peak[name] = max(peak[name] or 0, used)
            # as it goes: a run cut off by a time limit still shows how far it got, and how fast
            print(f"step {i + 1}/{args.warmup + args.steps} "
                  f"({'warm-up' if i < args.warmup else 'timed'}): {', '.join(took)}", flush=True)
        graph_pool = 0
        if device.type == "cuda" and cfg.training.cuda_graphs and peak["megagpt"] is not None:
            graph_pool = graph_pool_unallocated_bytes(torch.cuda.memory_snapshot())
            peak["megagpt"] += graph_pool / GiB
        # The peaks above are of the steps after the warm-up (the first step's autotuning
        # buffer is not in them): the estimate of those steps.
        estimate = estimate_memory(cfg, device.type).later_steps / GiB
        tokens = cfg.training.batch_size * cfg.training.grad_accumulation_steps * cfg.model.seq_length
        rows = [summary(name, times[name], tokens, cfg, device, peak[name]) for name in sides]
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report(args, cfg, device_name, tokens, rows, estimate, graph_pool)
        if args.profile:   # after the report: a profiler that fails loses none of the figures
            try:
                profile_step(lambda: engine.train_step(mock_microbatches(cfg, generator), lr),
                             device)
            except Exception as e:
                print(f"profile failed ({type(e).__name__}: {e}); the figures above stand")
    finally:
        destroy_parallel()
        dist.destroy_process_group()
    return 0


def report(args, cfg, device_name, tokens, rows, estimate, graph_pool) -> None:
    """Print the table and write the JSON (atomically) of a finished benchmark."""
    print(f"{cfg.source}: {device_name}, {cfg.training.precision}, {tokens:,} tokens a step, "
          f"{args.steps} timed steps after {args.warmup} warm-up, sides alternating")
    print(f"{'side':<10} {'step s':>9} {'min':>8} {'max':>8} {'tokens/s':>11} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['side']:<10} {r['step_s_median']:>9.4f} {r['step_s_min']:>8.4f} "
              f"{r['step_s_max']:>8.4f} {r['tokens_per_s']:>11,.0f} {r['tflops_per_gpu']:>8.2f} "
              f"{mfu:>6} {mem:>8}")
    result = {"config": cfg.source, "device": device_name, "precision": cfg.training.precision,
              "tokens_per_step": tokens, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    result["memory_estimate_gib"] = estimate
    result["settings"] = cfg.to_dict()              # every field, with the overrides applied
    result["provenance"] = provenance()
    if graph_pool:
        result["cuda_graph_pool_unallocated_gib"] = graph_pool / GiB
        print(f"megagpt peak includes {graph_pool / GiB:.2f} GiB of the CUDA graphs' private pool "
              f"that replays use without allocating")
    ours_peak = rows[0]["peak_mem_gib"]
    if ours_peak is not None:
        result["measured_over_estimate"] = ours_peak / estimate
        print(f"megagpt peak {ours_peak:.2f} GiB, validator's estimate {estimate:.2f} GiB: "
              f"measured / estimate = {ours_peak / estimate:.3f}")
    else:
        print(f"validator's memory estimate {estimate:.2f} GiB (peak memory is measured on a GPU)")
    if len(rows) == 2:
        ratio = rows[0]["step_s_median"] / rows[1]["step_s_median"]
        result["megagpt_over_peer_step_time"] = ratio
        print(f"megagpt step time / peer step time = {ratio:.3f}")
    write_json(args.json, result)
    print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    run_main(main)

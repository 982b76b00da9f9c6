#!/usr/bin/env python3
"""The host cost of the kernels: the CPU time a call of each Triton op spends outside its kernels.

    python tools/bench_host_overhead.py [--calls N] [--rounds N] [--json PATH]

Why: a GPU runs a layer norm of the Small config's micro-batch (8 x 1024 x 768 bf16) in about
10 microseconds, less than the host needs to issue the call. At such sizes an op is as fast as
its Python: the argument checks, the autograd Function, the allocations, the autotuner's lookup
and the grid, then Triton's launcher. The kernel benchmark's one-call timings on the H200 showed
it (layer norm at half eager's speed), and so does training without CUDA graphs, which is bound
by the host (BENCHMARKS.md, run 3's profile).

How: it runs on a CPU with the kernels built for a GPU (``TRITON_INTERPRET`` unset).
``JITFunction.run``, the call every launch goes through (the autotuner's and ours), is replaced
by a counter that evaluates the grid and returns; the public functions are told the kernels run
on the CPU; ``MEGAGPT_AUTOTUNE=0`` gives every kernel its first config, so the first call goes
through Triton's autotuner as on a GPU and the later ones through `Autotuned`'s fast path;
cross_entropy's check of the targets' range, which it makes on the CPU only, is skipped. No
kernel runs and the outputs are uninitialised: only time is measured. Each op runs at a tiny
shape forward, and forward and backward, against its eager PyTorch counterpart (the sides of
`tools/bench_kernels.py`: F.layer_norm, F.gelu, F.cross_entropy, SDPA, a masked softmax) at the
same shape, whose own compute there is a few microseconds. Rounds alternate the sides; the
figure is the fastest round's mean time a call (as `timeit` advises: slower rounds measure other
processes and the CPU's clock, not the code), with the median beside it.

What it leaves out, so a GPU host pays more on both sides: Triton's launcher itself (binding the
arguments, the compiled kernel's lookup, the driver call; the "launches" column says how many a
call makes) and CUDA's launch cost of torch's kernels. It prints a table and writes JSON (--json,
default $OUT/bench_host_overhead.json when $OUT is set, else runs/bench_host_overhead.json).
"""
import argparse
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.cli import run_main  # noqa: E402
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402

KERNEL_MODULES = ("bias_gelu", "cross_entropy", "dispatch", "flash_attention", "layer_norm",
                  "softmax")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The model rows: the Small config's 12 blocks, embedding and loss at a width where the matrix
# products cost the CPU little, one micro-batch forward and backward.
MODEL_CONFIG = os.path.join(ROOT, "configs", "training", "small_model.json")
MODEL_OVERRIDES = ["--model.d_model=64", "--model.n_heads=2", "--model.seq_length=16",
                   "--model.vocab_size=256", "--model.estimated_parameters=null",
                   "--model.dropout=0", "--training.batch_size=1", "--training.precision=fp32",
                   "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
                   "--parallel.pipeline_parallel_size=1", "--parallel.zero_stage=0",
                   "--data.mock=true"]
LAUNCHES = [0]


def _count_launch(self, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: counts the launch and evaluates its grid."""
    LAUNCHES[0] += 1
    if callable(grid):
        grid(kwargs)


def _prepare():
    """Import the kernels built for a GPU and make their launches counters (see the docstring)."""
    os.environ["MEGAGPT_AUTOTUNE"] = "0"            # read when megagpt.kernels is imported
    from megagpt.kernels._utils import interpreter_requested
    if interpreter_requested():
        raise SystemExit("bench_host_overhead: unset TRITON_INTERPRET; this tool times the host "
                         "code of the kernels built for a GPU, with their launches stubbed")
    try:
        import triton.runtime.jit
    except ImportError:
        raise SystemExit("bench_host_overhead: needs the `triton` package (Linux)")
    triton.runtime.jit.JITFunction.run = _count_launch
    for name in KERNEL_MODULES:
        importlib.import_module(f"megagpt.kernels.{name}").triton_runs_on = lambda device: True
    # cross_entropy checks the targets' range on the CPU only (it would cost a GPU a sync)
    importlib.import_module("megagpt.kernels.cross_entropy")._check_target_range = \
        lambda target, ignore_index, n_classes: None


def build_cases():
    """{op: (ours, eager, make_inputs)}: each side a function of the inputs, tiny shapes."""
    import torch
    import torch.nn.functional as F

    from megagpt.kernels import (bias_gelu, cross_entropy, flash_attention,
                                 flash_attention_qkvpacked, layer_norm, scaled_masked_softmax)

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()

    def masked_softmax(x):
        above = torch.ones(x.shape[-2], x.shape[-1], dtype=torch.bool).triu(1)
        return torch.softmax((x * 0.125).masked_fill(above, float("-inf")), dim=-1)

    def sdpa_on_packed(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    return {
        "layer_norm": (layer_norm, lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
                       lambda: [leaf(4, 64), leaf(64), leaf(64)]),
        "scaled_masked_softmax": (lambda x: scaled_masked_softmax(x, 0.125, causal=True),
                                  masked_softmax, lambda: [leaf(1, 2, 16, 16)]),
        "bias_gelu": (bias_gelu, lambda x, b: F.gelu(x + b, approximate="tanh"),
                      lambda: [leaf(4, 64), leaf(64)]),
        "cross_entropy": (lambda x, t: cross_entropy(x, t, inplace_backward=True),
                          F.cross_entropy, lambda: [leaf(4, 64), torch.randint(0, 64, (4,))]),
        "attention": (flash_attention,
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      lambda: [leaf(1, 2, 16, 32) for _ in range(3)]),
        "attention_qkvpacked": (flash_attention_qkvpacked, sdpa_on_packed,
                                lambda: [leaf(1, 16, 3, 2, 32)]),
    }


def _call(fn, inputs, grad, backward):
    out = fn(*inputs)
    if backward:
        out.backward(grad if out.dim() else None)


def time_side(fn, make, backward, calls, rounds_out):
    """Append one round's mean microseconds a call of ``fn`` to ``rounds_out``; return the
    kernel launches a call made."""
    inputs = make()
    grad = None
    out = fn(*inputs)
    if out.dim():
        import torch
        grad = torch.randn_like(out)
    LAUNCHES[0] = 0
    start = time.perf_counter()
    for _ in range(calls):
        _call(fn, inputs, grad, backward)
    rounds_out.append((time.perf_counter() - start) / calls * 1e6)
    return LAUNCHES[0] / calls


def run(calls, rounds, warmup=20):
    import torch

    torch.manual_seed(0)
    rows = []
    for op, (ours, eager, make) in build_cases().items():
        sides = {"triton": ours, "torch": eager}
        for backward in (False, True):
            for fn in sides.values():
                inputs = make()
                out = fn(*inputs)
                grad = torch.randn_like(out) if out.dim() else None
                for _ in range(warmup):
                    _call(fn, inputs, grad, backward)
            times = {side: [] for side in sides}
            launches = {}
            for r in range(rounds):
                for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    launches[side] = time_side(sides[side], make, backward, calls, times[side])
            ours_us, torch_us = (min(times[side]) for side in sides)
            rows.append({"op": op, "pass": "fwd+bwd" if backward else "fwd",
                         "triton_us": ours_us, "torch_us": torch_us,
                         "triton_over_torch": ours_us / torch_us,
                         "triton_median_us": statistics.median(times["triton"]),
                         "torch_median_us": statistics.median(times["torch"]),
                         "triton_launches": launches["triton"]})
    return rows


def model_case(kernels: str):
    """(step, make_inputs) of one micro-batch through the shrunk Small model (MODEL_OVERRIDES)
    with every op on ``kernels`` ("triton" or "torch"; attention "sdpa" for torch)."""
    import torch

    from megagpt.config import load_config
    from megagpt.model.gpt import build_stage

    attention = "triton" if kernels == "triton" else "sdpa"
    cfg = load_config(MODEL_CONFIG, MODEL_OVERRIDES + [
        f"--kernels.attention={attention}", f"--kernels.layernorm={kernels}",
        f"--kernels.softmax={kernels}", f"--kernels.bias_gelu={kernels}",
        f"--kernels.cross_entropy={kernels}"])
    stage = build_stage(cfg)
    m = cfg.model

    def make():
        return [torch.randint(0, m.vocab_size, (1, m.seq_length)) for _ in range(2)]

    def step(tokens, labels):
        loss_sum, _ = stage(tokens, labels)
        return loss_sum

    return step, make, m.n_layers


def run_model(calls, rounds, warmup=5):
    """Host time of a micro-batch's forward and backward, Triton kernels against torch's ops."""
    sides = {kernels: model_case(kernels) for kernels in ("triton", "torch")}
    times = {side: [] for side in sides}
    launches = {}
    for step, make, _ in sides.values():
        inputs = make()
        for _ in range(warmup):
            _call(step, inputs, None, True)
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            step, make, _ = sides[side]
            launches[side] = time_side(step, make, True, calls, times[side])
    layers = sides["triton"][2]
    ours_us, torch_us = min(times["triton"]), min(times["torch"])
    return {"op": f"model ({layers} blocks, embedding, loss)", "pass": "fwd+bwd",
            "triton_us": ours_us, "torch_us": torch_us, "triton_over_torch": ours_us / torch_us,
            "triton_median_us": statistics.median(times["triton"]),
            "torch_median_us": statistics.median(times["torch"]),
            "triton_launches": launches["triton"], "per_block_extra_us": (ours_us - torch_us) / layers}


def _format_table(rows) -> str:
    header = ["op", "pass", "ours us", "eager us", "ours / eager", "medians us (ours, eager)",
              "ours' launches"]
    lines = [header] + [[r["op"], r["pass"], f"{r['triton_us']:.1f}", f"{r['torch_us']:.1f}",
                         f"{r['triton_over_torch']:.2f}",
                         f"{r['triton_median_us']:.1f}, {r['torch_median_us']:.1f}",
                         f"{r['triton_launches']:g}"] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls a side and round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds, the sides alternating")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default $OUT/bench_host_overhead.json "
                             "when $OUT is set, else runs/bench_host_overhead.json)")
    args = parser.parse_args(argv)
    for name in ("calls", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    json_path = args.json or os.path.join(os.environ.get("OUT") or "runs",
                                          "bench_host_overhead.json")
    if output_file_problem(json_path):
        parser.error(f"--json {json_path}: {output_file_problem(json_path)}; fix: another path")
    _prepare()
    import torch
    import triton

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)   # the stubs' outputs are uninitialised memory
    rows = run(args.calls, args.rounds)
    rows.append(run_model(max(1, args.calls // 20), args.rounds))
    report = {"torch": torch.__version__, "triton": triton.__version__, "calls": args.calls,
              "rounds": args.rounds, "unit": "microseconds a call, host only", "results": rows,
              "provenance": provenance()}
    write_json(json_path, report)
    print(_format_table(rows))
    print(f"\nhost time a call (kernels not run; Triton's launcher and CUDA's launch cost not "
          f"included), the fastest of {args.rounds} rounds of {args.calls} calls; wrote {json_path}")


if __name__ == "__main__":
    run_main(main)

#!/usr/bin/env python3
"""Benchmark megagpt's Triton kernels against PyTorch (and flash-attn when it imports).

    python tools/bench_kernels.py [--quick] [--json PATH] [--reps N]

On a CUDA GPU, in bfloat16 at the Small (d 768, 12 heads, seq 1024), Base (d 1024, 16 heads, seq
1024) and Large (d 2048, 16 heads, seq 2048) configs' shapes with 16k tokens a step, and for
causal attention at 1k-8k tokens a sequence (batch x seq = 16k; 16 heads of 128 and 32 of 64):
each op forward and forward+backward, against PyTorch (SDPA with its flash backend for
attention, eager ops for the rest) and flash-attn; and attention as the model runs it at the
configs' shapes, from the fused QKV projection's output to the output projection's input
(`flash_attention_qkvpacked`, reading q, k, v in place, against SDPA on the model's permuted
views with its output laid out again); and attention with dropout 0.1 on the probabilities at
the configs' shapes (ours regenerating its masks from a seed, SDPA's flash backend and
flash-attn with theirs: the outputs differ by their masks, so no difference is reported); and
attention within the documents of packed 4k windows (documents of 1-512 tokens; ours skipping
the blocks no document reaches, SDPA with the boolean mask the model's sdpa backend builds;
TFLOP/s of the documents' own attention). It reports the median ms over --reps runs after
warm-up (the sides alternate run by run; small inputs rotate among three copies so the L2 cache
does not serve them), a call timed as a user makes it (host code included) and its device work
alone (the call captured in a CUDA graph and replayed: at the Small config's shapes an
element-wise kernel is faster than its host code, so only this timing shows its bandwidth),
TFLOP/s for attention (4·B·H·S²·D forward, halved when causal; forward+backward 3.5× that) or
effective GB/s for the rest (the bytes the op must read and write; also as a fraction of the
card's measured copy bandwidth), the speedup over PyTorch, the largest output difference from
PyTorch; cross_entropy both on logits as wide as the vocabulary and on logits padded to a
multiple of 128 as the model's (F.cross_entropy on their slice), and its peak memory beside
F.cross_entropy (and with inplace_backward=True, as the model calls it); and the launch config
Triton's autotuner chose for each kernel and key. The autotuner times its configs at the first
call of each new shape, which the warm-up runs absorb: the timed runs only launch. It prints a
table and writes JSON (--json, default $OUT/bench_kernels.json when $OUT is set, else
runs/bench_kernels.json).

On a CPU it runs a smoke pass: every case at tiny shapes, each side forward and forward+backward
once, and the output differences; no timings (they need a GPU; the Triton interpreter, should
TRITON_INTERPRET=1 be set, is never timed).
"""
import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megagpt.cli import run_main  # noqa: E402
from megagpt.fsutil import output_file_problem, write_json  # noqa: E402
from megagpt.kernels import (bias_gelu, cross_entropy, flash_attention,  # noqa: E402
                             flash_attention_qkvpacked, layer_norm, scaled_masked_softmax)
from megagpt.kernels._utils import KERNELS_INTERPRETED, autotune_choices  # noqa: E402
from megagpt.kernels.dispatch import flash_attn_attention, sdpa_attention  # noqa: E402
from megagpt.provenance import provenance  # noqa: E402

TOKENS = 16384
VOCAB = 50257
CONFIGS = {  # name: (d_model, n_heads, seq)
    "small": (768, 12, 1024),
    "base": (1024, 16, 1024),
    "large": (2048, 16, 2048),
}
LONG_ATTENTION = [(16, 128, seq) for seq in (1024, 4096, 8192)] + \
                 [(32, 64, seq) for seq in (1024, 2048, 4096, 8192)]  # (heads, head_dim, seq)
SMOKE = dict(tokens=64, vocab=1000, configs={"tiny": (64, 2, 32)}, long_attention=[(2, 32, 64)])


@dataclass
class Case:
    op: str
    name: str
    shape: str
    make: Callable[[], list]  # fresh random inputs, float leaves requiring grad
    sides: Dict[str, Callable]  # side name -> fn(*inputs) -> output; "torch" is the baseline
    unit: str  # "TFLOP/s" or "GB/s"
    work: Dict[str, float]  # pass -> FLOPs or bytes
    random: bool = False  # the sides draw their own random numbers: outputs are not compared


def _leaf(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def _sdpa(on_gpu: bool, dropout_p: float = 0.0) -> Callable:
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    if not on_gpu:
        return sdpa
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    return sdpa_flash


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_case(name, batch, heads, seq, head_dim, device, dtype, on_gpu,
                   dropout_p=0.0) -> Case:
    """Causal attention; with dropout_p > 0 each side drops with its own random numbers."""
    sides = {"triton": lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=dropout_p),
             "torch": _sdpa(on_gpu, dropout_p)}
    if on_gpu and _has_flash_attn():
        sides["flash_attn"] = lambda q, k, v: flash_attn_attention(q, k, v, causal=True,
                                                                   dropout_p=dropout_p)
    flops = 4 * batch * heads * seq * seq * head_dim * 0.5
    shape = f"B{batch} H{heads} S{seq} D{head_dim} causal"
    return Case("attention_dropout" if dropout_p else "attention", name,
                shape + (f" dropout {dropout_p}" if dropout_p else ""),
                lambda: [_leaf(batch, heads, seq, head_dim, device=device, dtype=dtype)
                         for _ in range(3)],
                sides, "TFLOP/s", {"fwd": flops, "fwd+bwd": 3.5 * flops}, random=dropout_p > 0)


def attention_in_model_case(name, batch, heads, seq, head_dim, device, dtype, on_gpu) -> Case:
    """Attention as the model runs it, from the fused QKV projection's output (seq, batch,
    3 * heads * head_dim) to the output projection's input (seq, batch, heads * head_dim): ours
    reads q, k, v in place (flash_attention_qkvpacked); SDPA gets the model's permuted views and
    its output is laid out again, as the model's sdpa path does."""
    def split(x):
        return x.view(seq, batch, 3, heads, head_dim)

    def ours(x):
        out = flash_attention_qkvpacked(split(x).transpose(0, 1), causal=True)
        return out.transpose(0, 1).reshape(seq, batch, heads * head_dim)

    sdpa = _sdpa(on_gpu)

    def torch_side(x):
        q, k, v = split(x).permute(2, 1, 3, 0, 4)
        return sdpa(q, k, v).permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)

    flops = 4 * batch * heads * seq * seq * head_dim * 0.5
    return Case("attention_in_model", name, f"(S{seq}, B{batch}, 3 x H{heads} x D{head_dim})",
                lambda: [_leaf(seq, batch, 3 * heads * head_dim, device=device, dtype=dtype)],
                {"triton": ours, "torch": torch_side}, "TFLOP/s",
                {"fwd": flops, "fwd+bwd": 3.5 * flops})


def _elementwise_work(elements, dtype):
    size = torch.finfo(dtype).bits // 8
    return {"fwd": 2 * elements * size, "fwd+bwd": 5 * elements * size}


def layer_norm_case(name, tokens, d_model, device, dtype) -> Case:
    return Case("layer_norm", name, f"({tokens}, {d_model})",
                lambda: [_leaf(tokens, d_model, device=device, dtype=dtype),
                         _leaf(d_model, device=device, dtype=dtype),
                         _leaf(d_model, device=device, dtype=dtype)],
                {"triton": layer_norm,
                 "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)},
                "GB/s", _elementwise_work(tokens * d_model, dtype))


def softmax_case(name, tokens, n_heads, seq, device, dtype) -> Case:
    batch, scale = tokens // seq, 0.125

    def eager(x):
        above = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        return torch.softmax((x * scale).masked_fill(above, float("-inf")), dim=-1)

    return Case("scaled_masked_softmax", name, f"({batch}, {n_heads}, {seq}, {seq}) causal",
                lambda: [_leaf(batch, n_heads, seq, seq, device=device, dtype=dtype)],
                {"triton": lambda x: scaled_masked_softmax(x, scale, causal=True), "torch": eager},
                "GB/s", _elementwise_work(batch * n_heads * seq * seq, dtype))


def bias_gelu_case(name, tokens, d_model, device, dtype, approximate="tanh") -> Case:
    """GPT-2's tanh GeLU, or with approximate="none" the exact one (model.activation=gelu)."""
    width = 4 * d_model
    return Case("bias_gelu", name if approximate == "tanh" else f"{name}, exact (erf)",
                f"({tokens}, {width})",
                lambda: [_leaf(tokens, width, device=device, dtype=dtype),
                         _leaf(width, device=device, dtype=dtype)],
                {"triton": lambda x, b: bias_gelu(x, b, approximate),
                 "torch": lambda x, b: F.gelu(x + b, approximate=approximate)},
                "GB/s", _elementwise_work(tokens * width, dtype))


def cross_entropy_case(tokens, vocab, device, dtype, width=None) -> Case:
    """Logits `width` wide (default: vocab) of which the first `vocab` columns are classes: with
    padding, as the model's logits (its vocabulary padded to a multiple of 128) against
    F.cross_entropy on their slice."""
    size = torch.finfo(dtype).bits // 8
    width = width or vocab

    def make():
        target = torch.randint(0, vocab, (tokens,), device=device)
        return [_leaf(tokens, width, device=device, dtype=dtype, scale=2.0), target]

    if width == vocab:
        name, sides = f"vocab {vocab}", {"triton": cross_entropy, "torch": F.cross_entropy}
    else:
        name = f"vocab {vocab} padded to {width}"
        sides = {"triton": lambda x, t: cross_entropy(x, t, vocab_size=vocab),
                 "torch": lambda x, t: F.cross_entropy(x[:, :vocab], t)}
    return Case("cross_entropy", name, f"({tokens}, {width})", make, sides,
                # the forward reads the logits; the backward reads them again and writes the
                # gradient (over them, in place)
                "GB/s", {"fwd": tokens * vocab * size, "fwd+bwd": 3 * tokens * vocab * size})


def _document_ids(batch, seq, mean_length, device):
    """(batch, seq) ids of packed documents whose lengths are drawn uniformly from
    [1, 2 x mean_length] (a fixed draw), and each row's document lengths."""
    g = torch.Generator().manual_seed(0)
    ids, lengths = torch.empty(batch, seq, dtype=torch.int32), []
    for row in range(batch):
        start, doc, row_lengths = 0, 0, []
        while start < seq:
            n = min(seq - start, int(torch.randint(1, 2 * mean_length + 1, (1,), generator=g)))
            ids[row, start:start + n] = doc
            row_lengths.append(n)
            start, doc = start + n, doc + 1
        lengths.append(row_lengths)
    return ids.to(device), lengths


def attention_documents_case(name, batch, heads, seq, head_dim, device, dtype, on_gpu,
                             mean_length) -> Case:
    """Causal attention within the documents of packed windows (data.reset_attention_mask):
    ours skips the blocks no document reaches; SDPA takes the boolean mask, as the model's sdpa
    backend does. TFLOP/s count the documents' own attention, not the whole window's."""
    ids, lengths = _document_ids(batch, seq, mean_length, device)
    sides = {"triton": lambda q, k, v: flash_attention(q, k, v, causal=True, document_ids=ids),
             "torch": lambda q, k, v: sdpa_attention(q, k, v, causal=True, document_ids=ids)}
    flops = sum(4 * heads * n * n * head_dim * 0.5 for row in lengths for n in row)
    return Case("attention_documents", name,
                f"B{batch} H{heads} S{seq} D{head_dim} causal, documents of 1-{2 * mean_length}",
                lambda: [_leaf(batch, heads, seq, head_dim, device=device, dtype=dtype)
                         for _ in range(3)],
                sides, "TFLOP/s", {"fwd": flops, "fwd+bwd": 3.5 * flops})


def build_cases(quick, device, dtype, on_gpu) -> List[Case]:
    tokens, vocab = (TOKENS, VOCAB) if on_gpu else (SMOKE["tokens"], SMOKE["vocab"])
    configs = CONFIGS if on_gpu else SMOKE["configs"]
    long_attention = LONG_ATTENTION if on_gpu else SMOKE["long_attention"]
    if quick:
        configs = {name: configs[name] for name in list(configs)[:1]}
        long_attention = long_attention[:1]
    cases = []
    for name, (d_model, n_heads, seq) in configs.items():
        cases.append(attention_case(name, tokens // seq, n_heads, seq, d_model // n_heads, device,
                                    dtype, on_gpu))
    for heads, head_dim, seq in long_attention:
        cases.append(attention_case("long", max(1, tokens // seq), heads, seq, head_dim, device,
                                    dtype, on_gpu))
    for name, (d_model, n_heads, seq) in configs.items():
        cases.append(layer_norm_case(name, tokens, d_model, device, dtype))
        cases.append(softmax_case(name, tokens, n_heads, seq, device, dtype))
        cases.append(bias_gelu_case(name, tokens, d_model, device, dtype))
    cases.append(cross_entropy_case(tokens, vocab, device, dtype))
    cases.append(cross_entropy_case(tokens, vocab, device, dtype, width=-(-vocab // 128) * 128))
    for name, (d_model, n_heads, seq) in configs.items():   # last: the extras
        cases.append(bias_gelu_case(name, tokens, d_model, device, dtype, approximate="none"))
        cases.append(attention_in_model_case(name, tokens // seq, n_heads, seq, d_model // n_heads,
                                             device, dtype, on_gpu))
    for name, (d_model, n_heads, seq) in configs.items():
        cases.append(attention_case(name, tokens // seq, n_heads, seq, d_model // n_heads, device,
                                    dtype, on_gpu, dropout_p=0.1))
    windows = [case for case in long_attention if case[2] == 4096]    # packed 4k windows
    for heads, head_dim, seq in long_attention[:1] if quick or not windows else windows[:1]:
        cases.append(attention_documents_case("long", max(1, tokens // seq), heads, seq, head_dim,
                                              device, dtype, on_gpu, max(1, seq // 16)))
    return cases


def _step(fn, inputs, grads, backward):
    """One forward (and backward) of fn; grads caches the upstream gradient per output shape."""
    out = fn(*inputs)
    if backward:
        if out.dim() == 0:
            out.backward()
        else:
            grad = grads.get(tuple(out.shape))
            if grad is None:   # made once: a timed run must not draw it again
                grad = grads[tuple(out.shape)] = torch.randn_like(out)
            out.backward(grad)
    return out


def _clear_grads(inputs):
    for t in inputs:
        t.grad = None


def _input_sets(case: Case) -> List[list]:
    """Fresh inputs for the timed runs: three sets, rotated so that the L2 cache does not serve
    them from the run before, unless one set takes 256 MiB or more (then one)."""
    first = case.make()
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    return [first] + ([case.make() for _ in range(2)] if set_bytes < 256 * 2**20 else [])


def time_case(case: Case, backward: bool, reps: int, warmup: int = 3) -> Dict[str, float]:
    """Median ms of each side; the order of the sides alternates from run to run."""
    input_sets = _input_sets(case)
    grads: dict = {}
    names = list(case.sides)
    for name in names:
        for i in range(warmup):
            _clear_grads(input_sets[i % len(input_sets)])
            _step(case.sides[name], input_sets[i % len(input_sets)], grads, backward)
    times = {name: [] for name in names}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for rep in range(reps):
        inputs = input_sets[rep % len(input_sets)]
        for name in (names if rep % 2 == 0 else names[::-1]):
            _clear_grads(inputs)
            torch.cuda.synchronize()
            start.record()
            _step(case.sides[name], inputs, grads, backward)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def device_time_case(case: Case, backward: bool, reps: int) -> Dict[str, float]:
    """Median ms of each side's device work alone: one call (forward, or forward and backward)
    on each input set captured in a CUDA graph; a timed run replays the graphs of the sets in
    turn between two events, the sides alternating. `time_case` times a call as a user makes
    it, host code included; at the Small config's shapes an element-wise kernel takes less time
    than its host code, so that timing shows the host. This one shows the kernels, and so their
    bandwidth. Runs after `time_case`, whose warm-up has autotuned every kernel (a graph cannot
    capture the tuner's timing). A graph does not keep the tensors it reads alive: ``alive``
    holds every side's inputs and upstream gradients until the last replay."""
    graphs, alive = {}, []
    side_stream = torch.cuda.Stream()
    for name, fn in case.sides.items():
        graphs[name], grads = [], {}
        for inputs in _input_sets(case):
            alive.append((inputs, grads))
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):  # warm-up off the default stream, as capture wants
                for _ in range(2):
                    _clear_grads(inputs)
                    _step(fn, inputs, grads, backward)
            torch.cuda.current_stream().wait_stream(side_stream)
            _clear_grads(inputs)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    _step(fn, inputs, grads, backward)
            finally:   # a capture that raised may leave its stream current
                torch.cuda.set_stream(stream)
            graphs[name].append(graph)
    names = list(graphs)
    times = {name: [] for name in names}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for rep in range(reps + 1):
        for name in (names if rep % 2 == 0 else names[::-1]):
            torch.cuda.synchronize()
            start.record()
            for graph in graphs[name]:
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            if rep:  # the first round warms up
                times[name].append(start.elapsed_time(end) / len(graphs[name]))
    del graphs, alive
    torch.cuda.empty_cache()
    return {name: statistics.median(t) for name, t in times.items()}


def output_differences(case: Case) -> Dict[str, float]:
    """Largest |output - torch's output| of each side on one set of inputs (a sanity check; none
    for sides that draw their own random numbers)."""
    if case.random:
        return {}
    inputs = case.make()
    with torch.no_grad():
        outputs = {name: fn(*inputs).float() for name, fn in case.sides.items()}
    return {name: (out - outputs["torch"]).abs().max().item() for name, out in outputs.items()}


def smoke_case(case: Case):
    """Run every side forward and forward+backward once (the CPU pass)."""
    for backward in (False, True):
        for fn in case.sides.values():
            inputs = case.make()
            out = _step(fn, inputs, {}, backward)
            assert torch.isfinite(out.float()).all(), f"{case.op} {case.name}: non-finite output"


def copy_bandwidth_gbs(reps: int) -> float:
    """The card's device-to-device copy bandwidth (bytes read + written), GB/s."""
    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 0.5 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e6


def cross_entropy_memory(tokens, vocab, dtype) -> Dict[str, float]:
    """Peak CUDA memory (GiB) a forward+backward allocates beyond its inputs, per side."""
    logits = _leaf(tokens, vocab, device="cuda", dtype=dtype, scale=2.0)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    peaks = {}
    sides = (("triton", cross_entropy), ("torch", F.cross_entropy),
             # as the model calls it: the gradient written over logits nothing else reads (here
             # a copy made beforehand, which the gradient then overwrites)
             ("triton_inplace", lambda x, t: cross_entropy(x, t, inplace_backward=True)))
    for name, fn in sides:
        logits.grad = None
        x = logits.detach().clone().requires_grad_() if name == "triton_inplace" else logits
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x, target).backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
    peaks["logits_gib"] = logits.numel() * logits.element_size() / 2**30
    peaks["torch_over_triton"] = peaks["torch"] / peaks["triton"]
    return peaks


def _timing(case: Case, pass_name: str, ms: Dict[str, float], side: str, prefix: str = ""):
    """A side's ms, throughput and speed-up over torch, keys prefixed; None where not timed."""
    side_ms = ms.get(side)
    scale = 1e12 if case.unit == "TFLOP/s" else 1e9
    return {f"{prefix}ms": side_ms,
            f"{prefix}throughput": None if side_ms is None
            else case.work[pass_name] / (side_ms / 1e3) / scale,
            f"{prefix}speedup_vs_torch": None if side_ms is None else ms["torch"] / side_ms}


def _format_table(rows, copy_gbs) -> str:
    """One line a row: the one-call timing (host code included), then the device's alone."""
    header = ["op", "case", "shape", "pass", "side", "ms", "throughput", "% copy BW",
              "speedup vs torch", "device ms", "device throughput", "device % copy BW",
              "device speedup", "max |diff|"]
    lines = [header]
    for r in rows:
        cells = [r["op"], r["case"], r["shape"], r["pass"], r["side"]]
        for prefix in ("", "device_"):
            ms, throughput = r[f"{prefix}ms"], r[f"{prefix}throughput"]
            speedup = r[f"{prefix}speedup_vs_torch"]
            cells += ["-" if ms is None else f"{ms:.3f}",
                      "-" if throughput is None else f"{throughput:.1f} {r['unit']}",
                      "-" if r["unit"] != "GB/s" or throughput is None or not copy_gbs
                      else f"{100 * throughput / copy_gbs:.0f}%",
                      "-" if speedup is None else f"{speedup:.2f}x"]
        cells.append("-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def run(args, json_path) -> dict:
    """Every case; the JSON is rewritten after each, so a run cut short keeps what it measured."""
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    torch.manual_seed(0)
    cases = build_cases(args.quick, device, dtype, on_gpu)
    report = {"device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
              "timed": on_gpu, "quick": args.quick, "reps": args.reps, "complete": False,
              "results": [], "provenance": provenance()}
    report["triton"] = report["provenance"]["triton"]
    if on_gpu:
        report["copy_bandwidth_gbs"] = copy_bandwidth_gbs(args.reps)
    for case in cases:
        print(f"{case.op} {case.name} {case.shape} ...", file=sys.stderr, flush=True)
        if not on_gpu:
            smoke_case(case)
        diffs = output_differences(case)
        for pass_name in ("fwd", "fwd+bwd"):
            backward = pass_name == "fwd+bwd"
            ms = time_case(case, backward, args.reps) if on_gpu else {}
            device_ms, device_error = {}, None
            if on_gpu:
                try:
                    device_ms = device_time_case(case, backward, args.reps)
                except Exception as err:  # noqa: BLE001 - the row says why; a CUDA error that
                    # poisons the context ends the run at the next case (the JSON keeps the rest)
                    device_error = f"{type(err).__name__}: {err}"
                    print(f"  device timing failed: {device_error}", file=sys.stderr)
            for side in case.sides:
                report["results"].append({
                    "op": case.op, "case": case.name, "shape": case.shape, "pass": pass_name,
                    "side": side, "unit": case.unit, **_timing(case, pass_name, ms, side),
                    **_timing(case, pass_name, device_ms, side, prefix="device_"),
                    "device_error": device_error, "max_abs_diff": diffs.get(side)})
        write_json(json_path, report)
    if on_gpu:
        report["cross_entropy_peak_memory_gib"] = cross_entropy_memory(TOKENS, VOCAB, dtype)
        report["autotune_choices"] = autotune_choices()
    report["complete"] = True
    write_json(json_path, report)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the Small config and one long attention length only")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default $OUT/bench_kernels.json when $OUT "
                             "is set, else runs/bench_kernels.json)")
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each side")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    out_dir = os.environ.get("OUT")
    json_path = args.json or os.path.join(out_dir or "runs", "bench_kernels.json")
    if output_file_problem(json_path):
        parser.error(f"--json {json_path}: {output_file_problem(json_path)}; fix: another path")

    report = run(args, json_path)
    print(_format_table(report["results"], report.get("copy_bandwidth_gbs")))
    if report["timed"]:
        print(f"\ncopy bandwidth: {report['copy_bandwidth_gbs']:.0f} GB/s on {report['device']}")
        mem = report["cross_entropy_peak_memory_gib"]
        print(f"cross_entropy peak extra memory, fwd+bwd ({TOKENS} x {VOCAB}, logits "
              f"{mem['logits_gib']:.2f} GiB): triton {mem['triton']:.2f} GiB, torch "
              f"{mem['torch']:.2f} GiB ({mem['torch_over_triton']:.2f}x); triton with "
              f"inplace_backward (as the model's loss) {mem['triton_inplace']:.2f} GiB")
        print("\nlaunch configs the autotuner chose (kernel, key: config):")
        for kernel, choices in report["autotune_choices"].items():
            for key, config in choices.items():
                print(f"  {kernel} {key}: {config}")
    else:
        ran = ("the Triton kernels under the interpreter" if KERNELS_INTERPRETED else
               "the torch references on both sides (TRITON_INTERPRET=1 runs the Triton kernels "
               "under the interpreter)")
        print(f"\nsmoke pass on the CPU: every case ran forward and forward+backward at tiny "
              f"shapes, {ran}; timings need a CUDA GPU (the interpreter is never timed)")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    run_main(main)

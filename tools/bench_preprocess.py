"""Benchmark preprocessing: megagpt's pipeline against Megatron's approach, in the same run.

    python tools/bench_preprocess.py --workers 2 --repeats 3 --scales 1 4

- ours: `megagpt.data.preprocess.preprocess_jsonl` (what tools/preprocess_data.py runs): chunks of
  lines, one `encode_batch` per chunk in each worker, numpy arrays back, bounded in-flight window.
  For GPT-2's tokenizer that encodes with tiktoken (see megagpt/data/tokenizer.py).
- ours-tokenizers: the same with `MEGAGPT_FAST_BPE=0`, encoding with Hugging Face `tokenizers`
  (shows what the pipeline gains and what the BPE implementation gains).
- baseline: Megatron-LM's tools/preprocess_data.py approach: `multiprocessing.Pool.imap` over
  lines (chunksize 32), each worker `json.loads` and `encode`s one document with Hugging Face
  `tokenizers` (what Megatron's HuggingFaceTokenizer runs; its own GPT2BPETokenizer is pure
  Python and slower) and returns its id list, the parent converts it to numpy and writes it.
All use the same vocabulary and merges (--tokenizer) and worker count and write the same indexed
format (the outputs are checked byte-identical). Each run is a fresh process; runs alternate between
the two methods; the table shows medians. tokens/s is timed inside the process (imports
excluded); peak memory is the highest sum of PSS (proportional set size) over the process and
its workers, sampled every 100 ms. --scales repeats the input that many times, to show memory
staying flat as the input grows; --paragraphs makes one document of each paragraph (many small
documents, where per-document overhead matters most). Results go to --output as JSON.
"""
from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO / "megagpt" / "data" / "assets" / "shakespeare.jsonl.gz"
METHODS = ("ours", "ours-tokenizers", "baseline")


# ---------------------------------------------------------------------------------------------
# The measured work (runs in a child process: `--run ours|baseline`)

_BASELINE: dict = {}


def _baseline_init(tokenizer: str, append_eod: bool) -> None:
    from megagpt.data.tokenizer import load_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _BASELINE["tok"] = load_tokenizer(tokenizer)
    _BASELINE["eod"] = append_eod


def _baseline_encode(line: bytes):
    """Megatron's Encoder.encode: one document a call, ids returned as a Python list."""
    text = json.loads(line)["text"]
    ids = _BASELINE["tok"].backend.encode(text, add_special_tokens=False).ids
    if _BASELINE["eod"]:
        ids.append(_BASELINE["tok"].eod_id)
    return ids, len(line)


def run_baseline(input_path: str, prefix: str, tokenizer: str, workers: int, append_eod: bool) -> int:
    import numpy as np

    from megagpt.data.indexed import IndexedDatasetWriter, best_dtype
    from megagpt.data.tokenizer import load_tokenizer
    dtype = best_dtype(load_tokenizer(tokenizer).vocab_size)
    tokens = 0
    opener = gzip.open if input_path.endswith(".gz") else open
    with opener(input_path, "rb") as fin, IndexedDatasetWriter(prefix, dtype) as writer, \
            multiprocessing.Pool(workers, _baseline_init, (tokenizer, append_eod)) as pool:
        for ids, _ in pool.imap(_baseline_encode, fin, 32):
            writer.add_document(np.array(ids, dtype=dtype))
            tokens += len(ids)
        writer.finalize()
    return tokens


def run_ours(input_path: str, prefix: str, tokenizer: str, workers: int, append_eod: bool) -> int:
    from megagpt.data.preprocess import preprocess_jsonl
    summary = preprocess_jsonl(input_path, prefix, tokenizer=tokenizer, json_keys=["text"],
                               append_eod=append_eod, workers=workers, progress=False)
    os.replace(f"{prefix}_text_document.bin", f"{prefix}.bin")
    os.replace(f"{prefix}_text_document.idx", f"{prefix}.idx")
    return summary.tokens


# ---------------------------------------------------------------------------------------------
# The harness


def _tree_memory_mb(root: int) -> float:
    """Sum of PSS (RSS where PSS is unreadable) over `root` and its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        for path, field in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                with open(path) as f:
                    kb = next((int(line.split()[1]) for line in f if line.startswith(field)), None)
            except OSError:
                kb = None
            if kb is not None:
                total += kb
                break
    return total / 1024


def measure(method: str, input_path: str, prefix: str, args) -> dict:
    cmd = [sys.executable, __file__, "--run", method, "--input", input_path, "--prefix", prefix,
           "--tokenizer", args.tokenizer, "--workers", str(args.workers)]
    if not args.append_eod:
        cmd.append("--no-append-eod")
    env = dict(os.environ, MEGAGPT_FAST_BPE="0" if method == "ours-tokenizers" else "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_memory_mb(proc.pid))
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{method} run failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = peak
    return result


def make_input(src: Path, scale: int, paragraphs: bool, folder: Path) -> str:
    """The input repeated `scale` times, optionally one document per paragraph (blank-line split)."""
    if scale == 1 and not paragraphs:
        return str(src)
    with gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb") as f:
        lines = f.read().splitlines()
    if paragraphs:
        lines = [json.dumps({"text": p}).encode() for line in lines
                 for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    path = folder / f"input_x{scale}{'_paragraphs' if paragraphs else ''}.jsonl"
    with open(path, "wb") as f:
        for _ in range(scale):
            f.write(b"\n".join(lines) + b"\n")
    return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl(.gz) with a 'text' key")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method per scale")
    parser.add_argument("--scales", type=int, nargs="+", default=[1], help="input repetitions")
    parser.add_argument("--paragraphs", action="store_true",
                        help="one document per paragraph: many small documents, as in web text")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    parser.add_argument("--output", default="runs/bench/bench_preprocess.json")
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run:
        work = run_baseline if args.run == "baseline" else run_ours
        start = time.perf_counter()
        tokens = work(args.input, args.prefix, args.tokenizer, args.workers, args.append_eod)
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
        return 0
    for name in ("workers", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.scales) < 1:
        parser.error(f"--scales take values of at least 1, got {min(args.scales)}")
    if not Path(args.input).is_file():
        parser.error(f"--input {args.input}: not a file; fix: a .jsonl or .jsonl.gz file")
    sys.path.insert(0, str(REPO))
    from megagpt.fsutil import output_file_problem, write_json
    from megagpt.provenance import provenance
    if output_file_problem(args.output):
        parser.error(f"--output {args.output}: {output_file_problem(args.output)}; fix: another "
                     f"path")

    rows = []
    folder = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        for scale in args.scales:
            input_path = make_input(Path(args.input), scale, args.paragraphs, folder)
            results = {method: [] for method in METHODS}
            for rep in range(args.repeats):
                for method in METHODS[rep % 3:] + METHODS[:rep % 3]:   # each goes first in turn
                    results[method].append(measure(method, input_path, str(folder / method), args))
            for method in METHODS[1:]:
                if not all(filecmp.cmp(folder / f"ours{ext}", folder / f"{method}{ext}",
                                       shallow=False) for ext in (".bin", ".idx")):
                    raise SystemExit(f"ours and {method} wrote different outputs")
            input_mb = os.path.getsize(input_path) / 1e6
            for method, runs in results.items():
                tokens = runs[0]["tokens"]
                seconds = statistics.median(r["seconds"] for r in runs)
                rows.append({"method": method, "scale": scale, "input_mb_on_disk": round(input_mb, 2),
                             "tokens": tokens, "seconds_median": round(seconds, 3),
                             "tokens_per_s_median": round(tokens / seconds),
                             "peak_mb_median": round(statistics.median(r["peak_mb"] for r in runs), 1),
                             "runs": runs})
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"workers={args.workers} tokenizer={args.tokenizer} repeats={args.repeats} "
          f"cpus={os.cpu_count()}")
    print(f"{'scale':>5} {'method':>15} {'tokens':>11} {'s (median)':>10} {'tokens/s':>11} "
          f"{'peak MB':>8} {'speedup':>8}")
    for row in rows:
        base = next(r for r in rows if r["scale"] == row["scale"] and r["method"] == "baseline")
        speedup = row["tokens_per_s_median"] / base["tokens_per_s_median"]
        print(f"{row['scale']:>5} {row['method']:>15} {row['tokens']:>11,} {row['seconds_median']:>10.2f} "
              f"{row['tokens_per_s_median']:>11,} {row['peak_mb_median']:>8.0f} {speedup:>7.2f}x")
    config = {k: v for k, v in vars(args).items() if k not in ("run", "prefix")}
    write_json(args.output, {"config": config, "cpus": os.cpu_count(), "results": rows,
                             "provenance": provenance()})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from megagpt.cli import run_main
    run_main(main)

#!/usr/bin/env python
"""The README's main job (`make demo`): the toolkit's real command lines, run one after another.

1. validate every shipped training config (exact parameter counts, memory per GPU);
2. preprocess the bundled Shakespeare corpus into Megatron's .bin/.idx with the GPT-2 tokenizer;
3. train the tiny model as 4 gloo processes, tensor parallel 2 x pipeline parallel 2, showing
   the loss falling, the validation perplexity and the final test loss, and leaving a
   checkpoint;
4. sample a short text from that checkpoint (merged to one process) with tools/generate.py.

Each step prints the command it runs, so a reader can run it again by hand. A previous run's
checkpoints are moved aside (kept) so the demo always trains from scratch.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
from megagpt.cli import run_main  # noqa: E402

BIN = os.path.dirname(sys.executable)
RUN_DIR = "runs/tiny_model"
# the training configs the project ships; a user's own in configs/training/ is not the demo's
SHIPPED_CONFIGS = ("base_model", "finetune_small", "finetune_tiny", "large_model", "small_model",
                   "tiny_deepspeed", "tiny_model")


def run(title: str, argv: list[str]) -> None:
    print(f"\n== {title} ==\n$ {shlex.join(argv)}", flush=True)
    start = time.time()
    result = subprocess.run(argv, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: step failed with exit status {result.returncode}: {shlex.join(argv)}")
    print(f"({time.time() - start:.1f} s)", flush=True)


def keep_previous_run() -> None:
    run_dir = os.path.join(ROOT, RUN_DIR)
    if os.path.exists(run_dir):
        kept = f"{run_dir}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(run_dir, kept)
        print(f"(moved the previous demo run to {os.path.relpath(kept, ROOT)})")


def summarise() -> None:
    records = [json.loads(line) for line in open(os.path.join(ROOT, RUN_DIR, "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    print(f"\n== Result ==\ntraining loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
          f"{train[-1]['loss']:.3f} (step {train[-1]['step']})")
    for r in evals:
        print(f"validation at step {r['step']}: loss {r['val_loss']:.3f}, perplexity {r['val_ppl']:.1f}")
    for r in records:
        if "test_loss" in r:
            print(f"test (held-out documents) at step {r['step']}: loss {r['test_loss']:.3f}, "
                  f"perplexity {r['test_ppl']:.1f}")
    latest = open(os.path.join(ROOT, RUN_DIR, "checkpoints", "latest")).read().strip()
    print(f"checkpoint: {RUN_DIR}/checkpoints/{latest}; metrics: {RUN_DIR}/metrics.jsonl")


def main(argv=None) -> None:
    # no options: --help describes the demo, anything else is refused before it starts
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Takes no options; run it with `make demo`.").parse_args(argv)
    configs = [f"configs/training/{name}.json" for name in SHIPPED_CONFIGS]
    run("1. Validate the shipped configs: exact parameter counts, memory per GPU",
        [sys.executable, "tools/validate_config.py", "--config", *configs])
    run("2. Preprocess the bundled corpus into Megatron's indexed format",
        [sys.executable, "tools/preprocess_data.py", "--input",
         "megagpt/data/assets/shakespeare.jsonl.gz", "--output-prefix", "runs/data/shakespeare",
         "--tokenizer", "gpt2", "--json-keys", "text", "--append-eod", "--workers", "2"])
    keep_previous_run()
    torchrun = os.path.join(BIN, "torchrun") if os.path.exists(os.path.join(BIN, "torchrun")) \
        else shutil.which("torchrun")
    run("3. Train the tiny model on 4 CPU processes: tensor parallel 2 x pipeline parallel 2",
        [torchrun, "--nproc_per_node", "4", "pretrain_gpt.py", "--config",
         "configs/training/tiny_model.json", "--data.num_workers=0"])
    summarise()
    run("4. Sample from the trained model (the TP2 x PP2 checkpoint merged to one process)",
        [sys.executable, "tools/generate.py", "--checkpoint", f"{RUN_DIR}/checkpoints",
         "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "40",
         "--seed", "1"])
    print("\ndemo: done")


if __name__ == "__main__":
    run_main(main)

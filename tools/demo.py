#!/usr/bin/env python
"""The README's main job (`make demo`): the toolkit's real command lines, run one after another.

Today: validate every shipped training config, with its exact parameter count and its memory
estimate per GPU. Preprocessing the bundled corpus, training the tiny model on a parallel layout
and sampling from it join as those pieces land. Each step prints the command it runs, so a reader
can run it again by hand.
"""
import glob
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def run(title: str, argv: list[str]) -> None:
    print(f"\n== {title} ==\n$ {shlex.join(argv)}", flush=True)
    start = time.time()
    result = subprocess.run(argv, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: step failed with exit status {result.returncode}: {shlex.join(argv)}")
    print(f"({time.time() - start:.1f} s)")


def main() -> None:
    configs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/configs/training/*.json"))
    run("1. Validate the shipped configs: exact parameter counts, memory per GPU",
        [sys.executable, "tools/validate_config.py", "--config", *configs])
    print("\ndemo: done")


if __name__ == "__main__":
    main()

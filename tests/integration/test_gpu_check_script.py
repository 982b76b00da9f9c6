"""tools/gpu_check.sh's bookkeeping, with a stand-in interpreter (the steps themselves need a GPU):
every step runs even after one failed, each step's exit status and time against its cap are
recorded, the results are packed into $OUT, and the script's status says a step failed."""
import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
# `python -c ...` (the script's import probes) succeed; the training benchmark fails with 3.
[ "$1" = "-c" ] && exit 0
echo "fake python $*"
case "$*" in *bench_train.py*) exit 3;; esac
exit 0
"""


def test_every_step_runs_and_records_its_status_and_time(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), GPU_CHECK_DIR=str(results),
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    run = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0, run.stdout           # a step failed: so does the check
    assert "training benchmark exit 3" in run.stdout, run.stdout
    lines = (results / "environment.txt").read_text().splitlines()
    steps = [line.split(" exit ")[0] for line in lines if line.startswith("gpu_check: ")
             and " exit " in line]
    assert steps == ["gpu_check: train small_graphs", "gpu_check: train small_triton",
                     "gpu_check: train small_torch", "gpu_check: train small_torch_graphs",
                     "gpu_check: train small_graphs_mb32", "gpu_check: train base_graphs",
                     "gpu_check: train large_memory", "gpu_check: pretrain to 30",
                     "gpu_check: pretrain to 40", "gpu_check: kernel tests",
                     "gpu_check: kernel benchmark", "gpu_check: host overhead"], lines
    assert re.search(r"^gpu_check: train small_graphs exit 3 in \d+ s \(cap 60 s\)$", "\n".join(lines),
                     re.M), lines
    assert re.search(r"^gpu_check: kernel tests exit 0 in \d+ s \(cap 110 s\)$", "\n".join(lines),
                     re.M), lines
    with tarfile.open(out / "gpu_check.tgz") as packed:
        assert "./environment.txt" in packed.getnames()
    assert (out / "environment.txt").read_text() == (results / "environment.txt").read_text()
    assert not (ROOT / "megagpt" / "kernels").is_symlink()

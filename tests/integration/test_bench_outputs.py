"""Every benchmark tool checks its --json path before measuring (a folder there failed with a
traceback after the whole run and left a .tmp file beside it), and bench_pipeline refuses
arguments that leave nothing to measure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/training/tiny_model.json"


@pytest.mark.parametrize("tool, args", [
    ("bench_train.py", ["--config", TINY]),
    ("bench_pipeline.py", []),
    ("bench_memory.py", ["--config", TINY]),
    ("bench_host_overhead.py", []),
    ("bench_kernels.py", ["--quick"]),
    ("bench_checkpoint.py", ["--config", TINY]),
])
def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(tmp_path, tool, args):
    result = subprocess.run([sys.executable, f"tools/{tool}", *args, "--json", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--json {tmp_path}: {tmp_path} is a folder; fix: another path" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--pp", "0"], "--pp must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--vp", "2", "--microbatches", "3"], "nothing to measure: interleaving"),
    (["--pp", "1"], "--vp above 1 needs --pp 2 or more"),      # it crashed after measuring
])
def test_bench_pipeline_refuses_what_leaves_nothing_to_measure(args, message):
    result = subprocess.run([sys.executable, "tools/bench_pipeline.py", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--scales", "0"], "--scales take values of at least 1, got 0"),
    (["--input", "/nonexistent.jsonl"], "--input /nonexistent.jsonl: not a file"),
    (["--output", "/"], "--output /: / is a folder"),
])
def test_bench_preprocess_refuses_bad_arguments_before_measuring(args, message):
    """They failed with a child's traceback, or after the whole run."""
    result = subprocess.run([sys.executable, "tools/bench_preprocess.py", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr



def test_bench_pipeline_writes_its_rows_and_provenance(tmp_path):
    out = tmp_path / "pipeline.json"
    result = subprocess.run([sys.executable, "tools/bench_pipeline.py", "--pp", "2", "--vp", "1",
                             "--microbatches", "2", "--steps", "1", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    row, = report["rows"]
    assert (row["schedule"], row["pp"], row["microbatches"]) == ("1F1B", 2, 2)
    assert len(row["idle_per_stage"]) == 2 and row["formula"] == pytest.approx(1 / 3)
    assert "tools/bench_pipeline.py --pp 2" in report["provenance"]["command"]

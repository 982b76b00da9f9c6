"""tools/bench_checkpoint.py times saves both ways (a smoke run: the report's shape, no timing is
checked) and writes nothing outside its temporary folder."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_checkpoint_reports_both_ways(tmp_path):
    out = tmp_path / "checkpoint.json"
    runs = sorted((ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []
    result = subprocess.run(
        [sys.executable, "tools/bench_checkpoint.py", "--config", "configs/training/tiny_model.json",
         "--repeats", "1", "--json", str(out), "--model.n_layers=1", "--model.seq_length=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["repeats"] == 1 and report["checkpoint_bytes"] > 0
    assert "tools/bench_checkpoint.py" in report["provenance"]["command"]
    for way in ("foreground", "background_blocks", "background_writes", "background_completes"):
        assert report[way]["min"] <= report[way]["median"] <= report[way]["max"]
    assert "training waits" in result.stdout
    assert (sorted((ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []) == runs


def test_bench_checkpoint_refuses_a_bad_repeat_count():
    result = subprocess.run([sys.executable, "tools/bench_checkpoint.py", "--config",
                             "configs/training/tiny_model.json", "--repeats", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--repeats=0: must be at least 1" in result.stderr

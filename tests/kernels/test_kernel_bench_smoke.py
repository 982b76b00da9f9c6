"""tools/bench_kernels.py's CPU smoke pass: every case runs and the JSON holds every row."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark times; "
                                                      "tools/gpu_check.sh runs it")
def test_smoke_pass_writes_every_case(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out)])
    assert "timings need a CUDA GPU" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["timed"] is False and report["complete"] is True
    rows = report["results"]
    assert {r["op"] for r in rows} == {"attention", "attention_in_model", "layer_norm",
                                       "scaled_masked_softmax", "bias_gelu", "cross_entropy"}
    assert {(r["pass"], r["side"]) for r in rows} == {
        (p, s) for p in ("fwd", "fwd+bwd") for s in ("triton", "torch")}
    for row in rows:
        assert row["ms"] is None and row["throughput"] is None
        assert row["max_abs_diff"] < 1e-4, row

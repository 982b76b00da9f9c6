"""tools/bench_host_overhead.py: the kernels' host code timed with their launches counted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_host_overhead.py"
# Kernel launches a call makes: one kernel forward; the backward's kernels (attention: the
# row sums of dO * O, then dK/dV, then dQ). One more would be a launch to account for.
LAUNCHES = {"layer_norm": (1, 2), "scaled_masked_softmax": (1, 2), "bias_gelu": (1, 2),
            "cross_entropy": (1, 2), "attention": (1, 4), "attention_qkvpacked": (1, 4)}

pytest.importorskip("triton")


def _run(tmp_path, *args, interpret="0"):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    env.pop("MEGAGPT_AUTOTUNE", None)
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_op_is_timed_with_its_launch_count(tmp_path):
    out = tmp_path / "host.json"
    result = _run(tmp_path, "--calls", "3", "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "ours / eager" in result.stdout
    report = json.loads(out.read_text())
    assert report["provenance"]["triton"] == report["triton"]
    rows = {(r["op"], r["pass"]): r for r in report["results"]}
    model = rows.pop(("model (12 blocks, embedding, loss)", "fwd+bwd"))
    assert set(rows) == {(op, p) for op in LAUNCHES for p in ("fwd", "fwd+bwd")}
    # the Small config's micro-batch: a block's two layer norms, bias-GeLU and attention, then
    # the final layer norm and the loss, each forward and backward
    per_block = 2 * LAUNCHES["layer_norm"][1] + LAUNCHES["bias_gelu"][1] + \
        LAUNCHES["attention_qkvpacked"][1]
    assert model["triton_launches"] == 12 * per_block + LAUNCHES["layer_norm"][1] + \
        LAUNCHES["cross_entropy"][1]
    assert model["per_block_extra_us"] == pytest.approx(
        (model["triton_us"] - model["torch_us"]) / 12)
    for op, (fwd, fwd_bwd) in LAUNCHES.items():
        assert rows[op, "fwd"]["triton_launches"] == fwd, op
        assert rows[op, "fwd+bwd"]["triton_launches"] == fwd_bwd, op
    for row in rows.values():
        assert row["triton_us"] > 0 and row["torch_us"] > 0
        assert row["triton_over_torch"] == pytest.approx(row["triton_us"] / row["torch_us"])


def test_refuses_the_interpreter_and_bad_counts(tmp_path):
    result = _run(tmp_path, "--calls", "2", interpret="1")
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr
    result = _run(tmp_path, "--rounds", "0")
    assert result.returncode != 0 and "--rounds must be at least 1, got 0" in result.stderr

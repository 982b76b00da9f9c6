"""tools/validate_config.py: exit codes and output, and the memory estimate behind it."""
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.config import load_config
from megagpt.estimate import (GiB, activation_bytes_per_layer, estimate_memory, parse_memory,
                              stage_parameters, count_parameters)

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "validate_config.py"
TINY = ROOT / "configs" / "training" / "tiny_model.json"


def validate(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True)


def test_every_shipped_config_is_valid_from_any_directory(tmp_path):
    configs = sorted(str(p) for p in (ROOT / "configs" / "training").glob("*.json"))
    result = validate("--config", *configs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for count in ("124,439,808", "354,823,168", "1,315,723,264"):
        assert f"parameters  {count} (estimated_parameters {count}: ok)" in result.stdout
    assert result.stdout.count(": fits") == len(configs)


def test_invalid_config_exits_1_listing_every_problem():
    result = validate("--config", str(TINY), "--training.batch_size=0", "--parallel.world_size=6")
    assert result.returncode == 1
    assert "training.batch_size=0: must be positive" in result.stderr
    assert "parallel.world_size=6: must be a multiple of" in result.stderr


def test_wrong_estimated_parameters_exits_1_with_the_right_number():
    result = validate("--config", str(TINY), "--model.estimated_parameters=7000000")
    assert result.returncode == 1
    assert "model.estimated_parameters=7,000,000: differs from the exact count by 3.3% (more than 1%); " \
           "fix: set it to 7,242,624" in result.stderr


def test_not_fitting_exits_1_with_fixes():
    result = validate("--config", str(ROOT / "configs/training/small_model.json"), "--gpu-memory", "2GB")
    assert result.returncode == 1
    assert "does NOT fit" in result.stdout
    assert "exceeds --gpu-memory 2.00 GB; fix:" in result.stderr


def test_unreadable_or_bad_json_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"d_model": 1}\n "x": 2}')
    result = validate("--config", str(bad))
    assert result.returncode == 2 and "bad.json:2:2: invalid JSON" in result.stderr
    result = validate("--config", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_bad_gpu_memory_argument():
    result = validate("--config", str(TINY), "--gpu-memory", "lots")
    assert result.returncode == 2 and "--gpu-memory='lots': not a size" in result.stderr


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80") == parse_memory("80GiB") == 80 * GiB
    assert parse_memory("512MB") == 0.5 * GiB
    with pytest.raises(ValueError, match="must be positive"):
        parse_memory("0GB")


def test_stage_parameters_sum_to_the_total_plus_padding_and_the_output_copy():
    cfg = load_config(ROOT / "configs/training/large_model.json")
    m = cfg.model
    tp, pp = 2, 2
    held = sum(stage_parameters(m, tp, pp, r) for r in range(pp))
    layer_norms_and_row_biases = m.n_layers * 4 * m.d_model + m.n_layers * 2 * m.d_model
    padding = (m.padded_vocab_size(tp) - m.vocab_size) * m.d_model
    output_copy = m.padded_vocab_size(tp) * m.d_model
    # tp ranks hold 1/tp of the sharded weights and a full copy of the replicated ones
    replicated = layer_norms_and_row_biases + m.seq_length * m.d_model + 2 * m.d_model
    assert held * tp == count_parameters(m) + padding + output_copy + (tp - 1) * replicated


def test_memory_estimate_responds_to_zero_sequence_parallel_and_recompute():
    base = load_config(ROOT / "configs/training/large_model.json")
    est = estimate_memory(base)
    no_zero = estimate_memory(load_config(ROOT / "configs/training/large_model.json",
                                          ["--parallel.zero_stage=0"]))
    assert no_zero.optimizer == pytest.approx(est.optimizer * 8)          # dp = 8
    acts = est.activations_by_setting
    assert acts[("none", True)] < acts[("none", False)]
    assert acts[("full", True)] < acts[("selective", True)] <= acts[("none", True)]


def test_activation_formula_matches_the_paper():
    cfg = load_config(ROOT / "configs/training/small_model.json")
    m = cfg.model
    s, b, h, a = m.seq_length, 1, m.d_model, m.n_heads
    eager = activation_bytes_per_layer(m, b, 1, False, "none", flash=False)
    assert eager == s * b * h * (34 + 5 * a * s / h)
    tp4 = activation_bytes_per_layer(m, b, 4, False, "none", flash=False)
    assert tp4 == pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    tp4_sp_selective = activation_bytes_per_layer(m, b, 4, True, "selective", flash=False)
    assert tp4_sp_selective == pytest.approx(s * b * h * 34 / 4)

"""tools/validate_config.py: exit codes and output, and the memory estimate behind it."""
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.config import load_config
from megagpt.estimate import (CUBLAS_WORKSPACE_BYTES, CUBLASLT_WORKSPACE_BYTES, GiB,
                              TRITON_BENCH_FLUSH_BYTES, activation_bytes_per_layer, count_parameters,
                              estimate_memory, kept_bytes, micro_batches_in_flight, parse_memory,
                              stage_parameters)

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


def test_every_config_is_reported_when_an_earlier_one_is_invalid(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(TINY.read_text().replace('"batch_size": 2', '"batch_size": 0'))
    result = validate("--config", str(bad), str(TINY))
    assert result.returncode == 1
    assert f"{bad}: invalid" in result.stderr + result.stdout
    assert f"{TINY}: valid" in result.stdout


def test_an_override_whose_value_has_a_space_is_an_override():
    """argparse put '--data.train_data_path=0.3 a 0.7' among the config files: the config was
    reported valid without it, and the override as an unreadable file."""
    result = validate("--config", str(TINY), "--data.train_data_path=0.3 runs/a 0.7")
    assert result.returncode == 1, result.stdout
    assert "odd number (3) of entries" in result.stderr and "unreadable" not in result.stderr
    assert validate("--data.train_data_path=x", "--config").returncode == 2


def test_wrong_estimated_parameters_exits_1_with_the_right_number(tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(TINY.read_text().replace('"estimated_parameters": 7242624',
                                              '"estimated_parameters": 7000000'))
    result = validate("--config", str(wrong))
    assert result.returncode == 1
    assert result.stderr.strip() == "- model.estimated_parameters=7,000,000: differs from the " \
        "exact count by 3.3% (more than 1%); fix: set it to 7,242,624"


def test_a_size_changed_on_the_command_line_is_told_the_command_lines_fix():
    """The file's estimate was stale for the overridden size, and the fix named the file only."""
    result = validate("--config", str(TINY), "--model.d_model=256")
    assert result.returncode == 1
    assert "model.estimated_parameters=7,242,624: differs from the exact count by 54.9% (more " \
           "than 1%); fix: set it to 16,058,112 (on the command line: " \
           "--model.estimated_parameters=16058112, or =null to skip the check)" in result.stderr
    for fix in ("16058112", "null"):
        result = validate("--config", str(TINY), "--model.d_model=256",
                          f"--model.estimated_parameters={fix}")
        assert result.returncode == 0, result.stderr


def test_not_fitting_exits_1_with_fixes():
    result = validate("--config", str(ROOT / "configs/training/small_model.json"), "--gpu-memory", "2GB")
    assert result.returncode == 1
    assert "does NOT fit" in result.stdout
    assert "exceeds --gpu-memory 2.00 GB; fix:" in result.stderr
    assert "zero_stage" not in result.stderr          # one replica: ZeRO-1 would shard nothing
    result = validate("--config", str(ROOT / "configs/training/base_model.json"), "--gpu-memory",
                      "2GB", "--parallel.zero_stage=0")
    assert "set training.recompute=full, set parallel.zero_stage=1, raise tensor/pipeline" \
        in result.stderr


def test_the_memory_fixes_offered_are_those_that_apply():
    """Not recompute=full when it is set, no native ZeRO or model parallelism under DeepSpeed
    (which refuses both): its file's ZeRO stage; Triton's first-step tuning where it is the
    peak."""
    result = validate("--config", str(TINY), "--gpu-memory", "0.05GB", "--training.recompute=full")
    fixes = result.stderr.split("fix: ", 1)[1]
    assert "recompute" not in fixes and "MEGAGPT_AUTOTUNE=0" in fixes
    result = validate("--config", str(ROOT / "configs/training/tiny_deepspeed.json"),
                      "--gpu-memory", "0.2GB")
    fixes = result.stderr.split("fix: ", 1)[1]
    assert "a higher ZeRO stage in configs/deepspeed/zero2.json" in fixes
    assert "tensor/pipeline" not in fixes and "set parallel.zero_stage=1" not in fixes
    torch_ops = [f"--kernels.{op}=torch" for op in ("layernorm", "softmax", "bias_gelu",
                                                   "cross_entropy")]
    result = validate("--config", str(ROOT / "configs/training/tiny_deepspeed.json"),
                      "--gpu-memory", "0.01GB", "--parallel.world_size=1", "--training.batch_size=1",
                      "--training.grad_accumulation_steps=8", "--training.recompute=full",
                      "--kernels.attention=sdpa", *torch_ops)
    assert "fix: a GPU with more memory, or a smaller model" in result.stderr   # nothing else left


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
    for bad in ("0GB", "nan", "infGB", "-3"):
        with pytest.raises(ValueError, match="must be a positive, finite size"):
            parse_memory(bad)


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
    cfg = load_config(ROOT / "configs/training/small_model.json", ["--kernels.attention=eager"])
    m = cfg.model
    kept = kept_bytes(cfg, "cuda")            # bf16, dropout 0.1, Triton softmax and GeLU: the paper's case
    s, b, h, a = m.seq_length, 1, m.d_model, m.n_heads
    eager = activation_bytes_per_layer(m, b, 1, False, "none", kept)
    assert eager == s * b * h * (34 + 5 * a * s / h)
    tp4 = activation_bytes_per_layer(m, b, 4, False, "none", kept)
    assert tp4 == pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    tp4_sp_selective = activation_bytes_per_layer(m, b, 4, True, "selective", kept)
    assert tp4_sp_selective == pytest.approx(s * b * h * 34 / 4)


def test_activations_are_all_16_bit_under_bf16_and_32_bit_under_fp32():
    # No dropout, Triton flash attention on CUDA: per block, the two norm inputs, the QKV and fc1
    # inputs (4), q k v (3, the fused projection's output, read in place), the attention output
    # (1, which the projection reads as it is), the GeLU's input and output (8): 16 values of
    # s*b*h in the activation dtype, the residual stream included, plus the float32 log-sum-exp
    # of each row and head.
    for precision, act in (("bf16", 2), ("fp32", 4)):
        cfg = load_config(ROOT / "configs/training/small_model.json",
                          ["--model.dropout=0", f"--training.precision={precision}"])
        m, kept = cfg.model, kept_bytes(cfg, "cuda")
        s, b, h, a = m.seq_length, 2, m.d_model, m.n_heads
        assert kept.act == act and kept.attention == "flash"
        assert activation_bytes_per_layer(m, b, 1, False, "none", kept) == act * s * b * h * 16 + 4 * a * s * b
    # With dropout, attention on CUDA is torch's SDPA, whose output the projection reads as it is,
    # and the dropout masks are bools.
    sdpa = kept_bytes(load_config(ROOT / "configs/training/small_model.json"), "cuda")
    assert (sdpa.attention, sdpa.attention_output_copy, sdpa.dropout_mask) == ("flash", False, 1)


def test_mixed_precision_states_follow_megatron():
    single = ["--parallel.world_size=1", "--parallel.zero_stage=0"]
    bf16 = estimate_memory(load_config(ROOT / "configs/training/small_model.json", single))
    fp32 = estimate_memory(load_config(ROOT / "configs/training/small_model.json",
                                       single + ["--training.precision=fp32"]))
    n = bf16.params_per_gpu
    assert (bf16.weights, bf16.master_weights, bf16.gradients, bf16.optimizer) == (2 * n, 4 * n, 4 * n, 8 * n)
    assert (fp32.weights, fp32.master_weights, fp32.gradients, fp32.optimizer) == (4 * n, 0, 4 * n, 8 * n)
    # ZeRO-1 over 8 replicas shards the moments and the masters (Megatron's distributed
    # optimizer); the gradient bucket stays whole, reduce-scattered in place.
    zero = estimate_memory(load_config(ROOT / "configs/training/base_model.json"))
    n, dp = zero.params_per_gpu, 8
    assert (zero.weights, zero.master_weights) == (2 * n, 4 * n / dp)
    assert zero.gradients == 4 * n and zero.optimizer == 8 * n / dp
    # without ZeRO every replica holds all of its states
    whole = estimate_memory(load_config(ROOT / "configs/training/base_model.json",
                                        ["--parallel.zero_stage=0"]))
    assert (whole.master_weights, whole.gradients, whole.optimizer) == (4 * n, 4 * n, 8 * n)


def test_deepspeed_states_follow_the_zero_paper():
    cfg = load_config(ROOT / "configs/training/tiny_deepspeed.json", ["--training.precision=bf16"])
    est, dp = estimate_memory(cfg), 2
    n = est.params_per_gpu
    assert (est.weights, est.gradients) == (2 * n, 2 * n / dp)          # ZeRO-2: gradients sharded
    assert (est.master_weights, est.optimizer) == (4 * n / dp, 8 * n / dp)
    one = estimate_memory(load_config(ROOT / "configs/training/tiny_deepspeed.json", [
        "--training.precision=bf16", "--parallel.zero_stage=1",
        "--parallel.deepspeed_config=configs/deepspeed/zero1.json"]))
    assert one.gradients == 2 * n and one.optimizer == 8 * n / dp    # ZeRO-1: the states only


def test_fixed_and_device_terms(monkeypatch):
    cfg = load_config(TINY, ["--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
                             "--parallel.pipeline_parallel_size=1"])
    monkeypatch.delenv("MEGAGPT_AUTOTUNE", raising=False)
    cuda, cpu = estimate_memory(cfg, "cuda"), estimate_memory(cfg, "cpu")
    assert cuda.workspace == 2 * CUBLAS_WORKSPACE_BYTES + CUBLASLT_WORKSPACE_BYTES == 65 * 1024 ** 2
    assert cpu.workspace == 0 and cpu.first_step == 0          # no Triton on the CPU
    # The first step tunes the Triton kernels (a 256 MiB flush buffer) before AdamW's moments
    # exist; with tp = 1 the loss's gradient kernel is tuned first in the backward, before the
    # backward's cuBLAS handle, and copies the logits it writes over to restore them.
    m, t = cfg.model, cfg.training
    logits = 4 * m.seq_length * t.batch_size * m.padded_vocab_size(1)       # fp32
    assert cuda.first_step == (cuda.weights + cuda.gradients + CUBLAS_WORKSPACE_BYTES
                               + CUBLASLT_WORKSPACE_BYTES + cuda.activations
                               + TRITON_BENCH_FLUSH_BYTES + logits)
    assert cuda.total == cuda.first_step > cuda.later_steps    # 7M parameters: the tuning dominates
    monkeypatch.setenv("MEGAGPT_AUTOTUNE", "0")                # first configs, untimed: no buffer
    assert estimate_memory(cfg, "cuda").total == cuda.later_steps
    # With one stage, the tied embedding's two gradients and their sum exist together at the end
    # of the backward.
    embedding = cfg.model.padded_vocab_size(1) * cfg.model.d_model
    assert cuda.temporaries == 3 * 4 * embedding
    assert kept_bytes(cfg, "cuda").fused_loss and not kept_bytes(cfg, "cpu").fused_loss
    with pytest.raises(ValueError, match="device='tpu': must be one of cuda, cpu"):
        estimate_memory(cfg, "tpu")


def test_micro_batches_in_flight_follow_the_schedules():
    def in_flight(pp, vp, micro_batches, rank):
        cfg = load_config(TINY, [f"--parallel.world_size={pp}", "--parallel.tensor_parallel_size=1",
                                 f"--parallel.pipeline_parallel_size={pp}",
                                 f"--parallel.virtual_pipeline_size={vp}",
                                 f"--training.grad_accumulation_steps={micro_batches}"])
        return micro_batches_in_flight(cfg, rank)

    assert in_flight(1, 1, 8, 0) == (1, 1)
    assert [in_flight(2, 1, 8, r) for r in (0, 1)] == [(2, 1), (1, 1)]       # 1F1B: pp - rank
    assert in_flight(4, 1, 2, 0) == (2, 1)                                   # no more than m
    # interleaved: Megatron's pp * (1 + (pp - 1) / (pp * vp)) on the first stage
    assert in_flight(2, 2, 4, 0) == (2 * (1 + 1 / 4), 1)
    assert in_flight(2, 2, 4, 1) == (1.5, 1)
    assert in_flight(2, 2, 2, 1) == (2, 2)            # m = pp: every forward before a backward

"""tools/bench_train.py runs both sides and writes its JSON (a smoke run: no timing is checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--config", "configs/training/tiny_model.json",
         "--steps", "1", "--warmup", "1", "--json", str(out), "--model.n_layers=2",
         "--model.seq_length=32", "--training.grad_accumulation_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["side"] for r in report["rows"]] == ["megagpt", "hf_eager"]
    assert report["megagpt_over_peer_step_time"] > 0
    assert "megagpt step time / peer step time" in result.stdout
    assert "step 1/2 (warm-up): megagpt " in result.stdout          # each step as it ends
    assert "step 2/2 (timed): hf_eager " in result.stdout and ", megagpt " in result.stdout
    # what tells two files apart: the command, the settings in effect, the machine and versions
    assert report["settings"]["model"]["n_layers"] == 2
    assert report["settings"]["kernels"]["attention"] == "auto"
    assert report["settings"]["training"]["cuda_graphs"] is False
    prov = report["provenance"]
    assert "tools/bench_train.py" in prov["command"] and "--model.n_layers=2" in prov["command"]
    assert prov["date"].startswith("20") and prov["torch"] and prov["cpus"] >= 1
    assert prov["cpu"] and prov["host"] and "commit" in prov


def test_without_transformers_and_with_a_failing_profiler_our_figures_are_written(tmp_path):
    """The GPU check's one call: a missing peer or a profiler that fails (as on some CUDA-graph
    replays) lost the whole row, ours included."""
    out = tmp_path / "bench.json"
    script = (
        "import runpy, sys\n"
        "sys.modules['transformers'] = None\n"
        "import torch.profiler\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('profiler broke')\n"
        "torch.profiler.profile = broken\n"
        f"sys.argv = ['bench_train.py', '--config', 'configs/training/tiny_model.json', '--steps',"
        f" '1', '--warmup', '0', '--json', {str(out)!r}, '--profile', '--model.n_layers=2',"
        f" '--model.seq_length=32', '--training.grad_accumulation_steps=1']\n"
        "runpy.run_path('tools/bench_train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peer skipped: transformers does not import" in result.stdout
    assert "profile failed (RuntimeError: profiler broke); the figures above stand" in result.stdout
    assert [r["side"] for r in json.loads(out.read_text())["rows"]] == ["megagpt"]


def test_a_deepspeed_config_is_timed_and_estimated_as_the_native_engine_it_runs(tmp_path):
    """The tool runs our engine in one process: a config's DeepSpeed file is dropped, so the
    settings recorded and the memory estimate beside the peak are those of what ran (the
    estimate was DeepSpeed's accounting, 7% under the native engine's for Base in bf16)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--config", "configs/training/tiny_deepspeed.json",
         "--steps", "1", "--warmup", "0", "--no-peer", "--json", str(out),
         "--model.n_layers=2", "--model.seq_length=32", "--training.grad_accumulation_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["settings"]["parallel"]["deepspeed_config"] is None


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "tools/bench_train.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    result = run("--config", "configs/training/tiny_model.json", "--training.batch_sise=1")
    assert result.returncode == 2 and "did you mean training.batch_size?" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("--config", str(tmp_path / "nope.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run("--config", "configs/training/tiny_model.json", "--steps", "0")
    assert result.returncode == 2 and "--steps must be at least 1" in result.stderr
    result = run("--config", "configs/training/tiny_model.json", "--training.cuda_graphs=true")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training.cuda_graphs=true needs a CUDA device" in result.stderr
    assert "fix: --training.cuda_graphs=false" in result.stderr


def test_the_triton_interpreter_is_never_timed():
    result = subprocess.run([sys.executable, "tools/bench_train.py", "--config",
                             "configs/training/tiny_model.json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 2, result.stdout[-2000:]
    assert "TRITON_INTERPRET is set" in result.stderr and "fix: unset TRITON_INTERPRET" in result.stderr


def test_graph_pool_bytes_count_only_the_private_pools_free_blocks():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench_train import graph_pool_unallocated_bytes
    finally:
        sys.path.remove(str(ROOT / "tools"))
    segments = [
        {"segment_pool_id": (0, 0), "total_size": 1000, "allocated_size": 10},   # the default pool
        {"segment_pool_id": (1, 0), "total_size": 600, "allocated_size": 100},   # a graph's pool
        {"segment_pool_id": (2, 1), "total_size": 50, "allocated_size": 50},
    ]
    assert graph_pool_unallocated_bytes(segments) == 500
    assert graph_pool_unallocated_bytes([]) == 0


def test_device_busy_counts_each_kernel_once():
    """An operator's self device time repeats its kernels': only the kernels' own events count
    (the profiler's table total), not user annotations."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench_train import device_busy_us
    finally:
        sys.path.remove(str(ROOT / "tools"))
    events = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=70.0),  # aten::mm
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=70.0,
                              is_user_annotation=False),                            # its kernel
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=5.0,
                              is_user_annotation=True),
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=30.0,
                              is_user_annotation=False)]
    assert device_busy_us(events) == 100.0


def test_document_masks_are_timed_on_ours_alone(tmp_path):
    """The mock windows hold documents under data.reset_attention_mask; Hugging Face's eager
    GPT-2 takes no document masks, so the peer, which would do other work, is skipped."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--config", "configs/training/tiny_model.json",
         "--steps", "1", "--warmup", "0", "--json", str(out), "--model.n_layers=1",
         "--model.seq_length=32", "--training.grad_accumulation_steps=1",
         "--data.reset_attention_mask=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peer skipped: data.reset_attention_mask=true" in result.stdout
    assert [r["side"] for r in json.loads(out.read_text())["rows"]] == ["megagpt"]

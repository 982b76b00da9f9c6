"""FLOPs and MFU, the metrics.jsonl writer, TensorBoard, the console line and the step timer."""
import json

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.training.metrics import (WANDB_ID_FILE, MetricsWriter, StepTimer, flops_per_token,
                                      format_console_line, memory_gb, peak_flops,
                                      peak_flops_for_name, start_wandb, throughput)

TRAIN = dict(step=120, loss=4.12341, lr=3e-4, grad_norm=0.8123, tokens_per_s=12345.4,
             tflops_per_gpu=101.23, mfu=0.4131, mem_gb=12.34, skipped=0)


def test_flops_per_token_of_gpt2_small_by_hand():
    m = ModelConfig(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, seq_length=1024)
    d, L, T, V = 768, 12, 1024, 50257
    per_layer = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n = V * d + L * per_layer + 2 * d          # token embedding (tied, once), blocks, final norm
    assert n == 124_439_808 - 1024 * 768       # GPT-2's count without the position embeddings
    assert flops_per_token(m) == 6 * n + 12 * L * d * T == 855_166_464


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("Tesla T4", None), ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_flops_table(name, peak):
    assert peak_flops_for_name(name) == peak


def test_peak_flops_of_devices(monkeypatch):
    assert peak_flops("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0)) == 989e12


def test_throughput_and_mfu():
    tflops, mfu = throughput(tokens_per_s=1000.0, flops_per_tok=1e9, num_gpus=2, peak=1e12)
    assert (tflops, mfu) == (0.5, 0.5)
    assert throughput(1000.0, 1e9, 2, None) == (0.5, None)
    with pytest.raises(ValueError, match=r"num_gpus=0 must be >= 1"):
        throughput(1000.0, 1e9, 0, 1e12)


def test_memory_is_none_on_cpu():
    assert memory_gb("cpu") is None


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_appended_as_valid_json_lines(tmp_path):
    path = tmp_path / "run" / "logs" / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(dict(TRAIN, loss=torch.tensor(4.5), skipped=torch.tensor(1)))
    assert read_lines(path) == [dict(TRAIN, loss=4.5, skipped=1)]   # flushed before close
    writer.write({"step": 121, "loss": float("nan"), "grad_norm": float("inf"), "mfu": None})
    writer.write({"step": 200, "val_loss": 3.5, "val_ppl": 33.1})
    writer.close()
    assert read_lines(path)[1:] == [{"step": 121, "loss": None, "grad_norm": None, "mfu": None},
                                    {"step": 200, "val_loss": 3.5, "val_ppl": 33.1}]


def test_resumed_run_continues_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(path)
    for step in (10, 20, 30):
        first.write({"step": step, "loss": 1.0})
    first.close()
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')   # a line cut short by a killed process
    resumed = MetricsWriter(path, resume_step=20)   # resumed from the checkpoint of step 20
    resumed.write({"step": 30, "loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_lines(path)] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    again = MetricsWriter(path)
    again.write({"step": 40, "loss": 0.25})
    again.close()
    assert [r["step"] for r in read_lines(path)] == [10, 20, 30, 40]


def test_a_fresh_run_moves_an_earlier_file_and_tensorboard_folder_aside(tmp_path, monkeypatch):
    import megagpt.training.metrics as metrics
    monkeypatch.setattr(metrics.time, "strftime", lambda fmt: "20261129-101500")   # one second
    path, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    earlier = MetricsWriter(path, tensorboard_dir=tb)
    earlier.write({"step": 10, "loss": 1.0})
    earlier.close()
    fresh = MetricsWriter(path, tensorboard_dir=tb, fresh=True)
    fresh.write({"step": 1, "loss": 2.0})
    fresh.close()
    assert read_lines(path) == [{"step": 1, "loss": 2.0}]
    (old_file, kept_file), (old_tb, kept_tb) = fresh.set_aside
    assert (old_file, old_tb) == (path, tb) and kept_file.name.startswith("metrics.jsonl.previous-")
    assert read_lines(kept_file) == [{"step": 10, "loss": 1.0}] and any(kept_tb.iterdir())
    for n in (1, 2):        # more starts within the same second: each kept under its own name
        again = MetricsWriter(path, tensorboard_dir=tb, fresh=True)
        again.write({"step": 1, "loss": 3.0 + n})
        again.close()
    kept = sorted(tmp_path.glob("metrics.jsonl.previous-*"))
    assert len(kept) == 3 and len(list(tmp_path.glob("tb.previous-*"))) == 3
    assert sorted(r["loss"] for k in kept for r in read_lines(k)) == [1.0, 2.0, 4.0]
    path.write_text("")                        # an empty file is not worth keeping
    again = MetricsWriter(path, fresh=True)
    again.close()
    assert again.set_aside == []


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "sub" / "metrics.jsonl", tensorboard_dir=tmp_path / "tb",
                           enabled=False)
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("record, message", [
    ({"loss": 1.0}, r"record\['step'\]=None must be an integer"),
    ({"step": 1.5}, r"record\['step'\]=1.5 must be an integer"),
    ({"step": 1, "loss": [1.0]}, r"value \[1.0\] of type list is not a number"),
])
def test_bad_records_are_refused(tmp_path, record, message):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    with pytest.raises((ValueError, TypeError), match=message):
        writer.write(record)
    writer.close()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    writer.write(dict(TRAIN, mfu=None))
    writer.write({"step": 200, "val_loss": 3.5, "val_ppl": 33.1})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "mfu" not in events.Tags()["scalars"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(120, 4.1234)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(200, 3.5)]


def test_a_resume_continues_tensorboard_from_the_checkpoints_step(tmp_path):
    """Resuming from step 5's checkpoint drops TensorBoard's records of later steps (a run that
    went on past its last save) and keeps step 5's own: the loss curve has each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    for step in range(1, 8):
        writer.write(dict(TRAIN, step=step))
    writer.close()
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb",
                           resume_step=5)
    for step in range(6, 9):
        writer.write(dict(TRAIN, step=step))
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


class FakeRun:
    def __init__(self):
        self.logged, self.finished = [], None

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code):
        self.finished = exit_code


def test_wandb_gets_each_records_numbers_at_its_step(tmp_path):
    run = FakeRun()
    writer = MetricsWriter(tmp_path / "metrics.jsonl", wandb_run=run)
    writer.write(dict(TRAIN, mfu=None, loss=float("nan")))
    writer.write({"step": 200, "val_loss": 3.5, "val_ppl": 33.1})
    writer.close()
    assert run.logged[0][0] == 120 and "loss" not in run.logged[0][1]     # null: not a number
    assert "mfu" not in run.logged[0][1] and run.logged[0][1]["lr"] == 3e-4
    assert run.logged[1] == (200, {"val_loss": 3.5, "val_ppl": 33.1})
    assert run.finished == 0
    failed = FakeRun()
    MetricsWriter(tmp_path / "metrics.jsonl", wandb_run=failed).close(failed=True)
    assert failed.finished == 1                 # a run stopped by an error shows as failed


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(tmp_path,
                                                                               monkeypatch):
    import sys
    import types
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    start_wandb("proj", "tiny", {"a": 1}, tmp_path / "run", resuming=False)
    first = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    start_wandb("proj", "tiny", {"a": 1}, tmp_path / "run", resuming=True)
    start_wandb("proj", "tiny", {"a": 1}, tmp_path / "run", resuming=False)
    ids = [c["id"] for c in calls]
    assert ids[0] == ids[1] == first and ids[2] != first
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == ids[2]
    assert calls[0] == dict(project="proj", name="tiny", id=first, resume="allow",
                            config={"a": 1}, dir=str(tmp_path / "run"))


def test_console_line_of_a_training_record():
    assert format_console_line(TRAIN, max_steps=1000) == (
        "step  120/1000 | loss 4.1234 | lr 3.00e-04 | grad 0.812 | 12,345 tok/s | "
        "101.2 TFLOP/s | MFU 41.3% | mem 12.3 GB | skipped 0")


def test_console_line_leaves_out_absent_fields():
    record = dict(TRAIN, mfu=None, mem_gb=None)
    del record["grad_norm"]
    assert format_console_line(record) == (
        "step 120 | loss 4.1234 | lr 3.00e-04 | 12,345 tok/s | 101.2 TFLOP/s | skipped 0")
    assert format_console_line({"step": 200, "val_loss": 3.5, "val_ppl": 33.12}, 1000) == (
        "step  200/1000 | val loss 3.5000 | val ppl 33.12")


def test_step_timer_over_log_intervals():
    now, syncs = [100.0], []
    timer = StepTimer(synchronize=lambda: syncs.append(1), clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.5
        timer.step(tokens=1000)
    assert timer.lap() == (0.5, 2000.0)
    assert timer.lap() == (0.0, 0.0)     # no step since the last lap
    now[0] += 3.0
    timer.step(tokens=600)
    assert timer.lap() == (3.0, 200.0)
    assert len(syncs) == 4               # construction and each lap read the clock after a sync


def test_paused_time_is_left_out_of_the_interval():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    now[0] = 2.0
    timer.step(tokens=100)
    with timer.paused():            # evaluation or a checkpoint: 10 s
        now[0] = 12.0
    now[0] = 14.0
    timer.step(tokens=100)
    assert timer.lap() == (2.0, 50.0)           # 4 s of training for 2 steps, 200 tokens
    with timer.paused():
        now[0] = 20.0
    now[0] = 21.0
    timer.step(tokens=10)
    assert timer.lap() == (1.0, 10.0)

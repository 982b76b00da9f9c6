"""tools/bench_kernels.py: the CPU smoke pass (every case runs, the JSON holds every row) and the
device timing's bookkeeping under stand-ins for CUDA graphs."""
import contextlib
import importlib.util
import json
import types
import weakref
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("reps", ["0", "-3"])
def test_fewer_than_one_rep_is_refused(reps, capsys):
    """--reps 0 reached statistics.median([]) on a GPU, a traceback after the warm-ups."""
    with pytest.raises(SystemExit) as info:
        _load_bench().main(["--reps", reps])
    assert info.value.code == 2
    assert f"--reps must be at least 1, got {reps}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark times; "
                                                      "tools/gpu_check.sh runs it")
def test_smoke_pass_writes_every_case(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out)])
    shown = capsys.readouterr().out
    assert "timings need a CUDA GPU" in shown
    assert "the Triton kernels under the interpreter" in shown   # tests/kernels sets it
    report = json.loads(out.read_text())
    assert report["timed"] is False and report["complete"] is True
    assert report["provenance"]["triton_interpret"] == "1"
    rows = report["results"]
    assert {r["op"] for r in rows} == {"attention", "attention_in_model", "layer_norm",
                                       "scaled_masked_softmax", "bias_gelu", "cross_entropy",
                                       "attention_dropout", "attention_documents"}
    assert {(r["pass"], r["side"]) for r in rows} == {
        (p, s) for p in ("fwd", "fwd+bwd") for s in ("triton", "torch")}
    for row in rows:
        assert row["ms"] is None and row["throughput"] is None and row["device_ms"] is None
        if row["op"] == "attention_dropout":       # each side drops with its own masks
            assert row["max_abs_diff"] is None and "dropout 0.1" in row["shape"], row
        else:
            assert row["max_abs_diff"] < 1e-4, row


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of `device_time_case`: captures run their body once
    (as a capture does), replays and events count, every timed run takes 1.5 ms. A replay
    fails if a tensor registered in ``captured`` (weak references) has been freed: a real graph
    would read freed memory."""

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.captured = []

    def install(self, monkeypatch):
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                assert all(ref() is not None for ref in fake.captured), "replay of freed inputs"

        class Capture(contextlib.AbstractContextManager):
            def __init__(self, graph):
                fake.captures += 1

            def __exit__(self, *exc):
                return None

        class Event:
            def __init__(self, **kwargs):
                pass

            def record(self):
                pass

            def elapsed_time(self, other):
                return 1.5

        stream = types.SimpleNamespace(wait_stream=lambda other: None)
        for name, value in dict(CUDAGraph=Graph, graph=Capture, Event=Event,
                                Stream=lambda: stream, current_stream=lambda: stream,
                                stream=lambda s: contextlib.nullcontext(),
                                set_stream=lambda s: None,
                                synchronize=lambda: None, empty_cache=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_device_timing_replays_each_input_set_and_tabulates(monkeypatch):
    bench = _load_bench()
    fake = _FakeCuda()
    fake.install(monkeypatch)
    # CPU tensors on any machine: on a GPU machine the stand-ins would also stand in for the
    # autotuner's timing; there the real capture runs in tools/gpu_check.sh's benchmark
    case = bench.layer_norm_case("tiny", 8, 64, "cpu", torch.float32)
    make = case.make

    def make_and_register():
        inputs = make()
        fake.captured.extend(weakref.ref(t) for t in inputs)
        return inputs

    case.make = make_and_register
    draws = []
    randn_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda t: draws.append(t.shape) or randn_like(t))
    ms = bench.device_time_case(case, backward=True, reps=4)
    # one upstream gradient a side, drawn once and kept for the side's captures and replays
    assert len(draws) == 2
    # a graph per side and input set (three small sets), replayed once a run, plus a warm-up run
    assert fake.captures == 2 * 3
    assert fake.replays == 2 * 3 * (4 + 1)
    assert ms == {"triton": pytest.approx(0.5), "torch": pytest.approx(0.5)}
    row = {"op": case.op, "case": case.name, "shape": case.shape, "pass": "fwd+bwd",
           "side": "triton", "unit": case.unit, "max_abs_diff": 0.0,
           **bench._timing(case, "fwd+bwd", {"triton": 2.0, "torch": 1.0}, "triton"),
           **bench._timing(case, "fwd+bwd", ms, "triton", prefix="device_")}
    assert row["speedup_vs_torch"] == 0.5 and row["device_speedup_vs_torch"] == 1.0
    assert row["device_throughput"] == pytest.approx(case.work["fwd+bwd"] / 0.5e-3 / 1e9)
    table = bench._format_table([row], copy_gbs=row["device_throughput"] * 2)
    assert "device % copy BW" in table.splitlines()[0] and "50%" in table.splitlines()[1]

"""What the command-line programs share: how they exit, and the override syntax in --help."""
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.cli import run_main


def test_run_main_exits_with_the_status_main_returns():
    with pytest.raises(SystemExit) as info:
        run_main(lambda: 2)
    assert info.value.code == 2


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tools/preprocess_data.py", "--input", "x"])

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_main(interrupted)
    assert info.value.code == 130
    assert capsys.readouterr().err == "preprocess_data.py: interrupted (Ctrl-C)\n"


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("program", ["pretrain_gpt.py", "tools/validate_config.py",
                                     "tools/bench_memory.py", "tools/bench_train.py",
                                     "tools/bench_checkpoint.py"])
def test_every_program_taking_a_config_explains_overrides_in_its_help(program):
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Any config field can be overridden after the config: --section.field=VALUE" in text


@pytest.mark.parametrize("program", sorted(p.name for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_ends_through_run_main(program):
    """The bench tools ended a Ctrl-C with Python's traceback; the others with one line."""
    text = (ROOT / "tools" / program).read_text()
    main_block = text.split('if __name__ == "__main__":', 1)[1]
    assert "run_main(main)" in main_block, program


def test_ctrl_c_in_a_bench_tool_is_one_line(tmp_path):
    import os
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "tools/bench_memory.py", "--config",
                             "configs/training/tiny_model.json", "--steps", "50",
                             "--json", str(tmp_path / "m.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if "single process" in line:                 # measuring
            break
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().endswith("bench_memory.py: interrupted (Ctrl-C)") and "Traceback" not in err


class _Store:
    def __init__(self, posted=None):
        self.posted = {} if posted is None else {"megagpt/error/rank0": posted.encode()}

    def set(self, key, value):
        self.posted[key] = value.encode()

    def wait(self, keys, timeout):
        if not all(k in self.posted for k in keys):
            raise RuntimeError("Wait timeout")

    def get(self, key):
        return self.posted[key]


@pytest.mark.parametrize("rank, posted, printed", [
    ("0", None, "error: no checkpoint fits\n"),                 # rank 0 prints, and posts it
    ("1", "no checkpoint fits", ""),                           # the same as rank 0's: said
    ("1", "another rank failed", "error (rank 1): no checkpoint fits\n"),   # its own
    ("1", None, "error (rank 1): no checkpoint fits\n"),        # rank 0 said nothing in time
])
def test_a_rank_prints_its_error_unless_rank_0_said_the_same(monkeypatch, capsys, rank, posted,
                                                              printed):
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain_gpt", ROOT / "pretrain_gpt.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    store = _Store(posted)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(program.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(program.dist.distributed_c10d, "_get_default_store", lambda: store)
    program.report_error("no checkpoint fits", wait_s=0.1)
    assert capsys.readouterr().err == printed
    if rank == "0":
        assert store.posted == {"megagpt/error/rank0": b"no checkpoint fits"}

"""What the command-line programs share: how they exit, and the override syntax in --help."""
import subprocess
import sys
import types
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


def test_output_into_a_closed_pipe_ends_quietly_with_status_141():
    """`validate_config.py ... | head -1` printed a BrokenPipeError traceback and exited 1, which
    the tool's exit statuses give an invalid config."""
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} tools/validate_config.py --config "
                       f"configs/training/*.json | true; echo status ${{PIPESTATUS[0]}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "status 141", result
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, \
        result.stderr
    closed = subprocess.run(["bash", "-c", f"{sys.executable} tools/validate_config.py --config "
                                           f"configs/training/tiny_model.json >&-"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr   # no stdout


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


def _report(rank, world, messages, wait_s):
    """report_error on every rank with the real process group's store; what each printed."""
    import contextlib
    import importlib.util
    import io
    import os
    spec = importlib.util.spec_from_file_location("pretrain_gpt", ROOT / "pretrain_gpt.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    os.environ["RANK"] = str(rank)
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        if messages[rank] != "silent":           # "silent": this rank never reports (busy)
            program.report_error(messages[rank], wait_s=wait_s)
    return out.getvalue()


@pytest.mark.parametrize("messages, printed", [
    # every rank the same error: rank 0 says it, once
    (["no checkpoint fits", "no checkpoint fits"], ["error: no checkpoint fits\n", ""]),
    # one rank failed alone, the others were told (AnotherRankFailed: None): the failing one says
    ([None, "rank 1's data is missing", None],
     ["", "error (rank 1): rank 1's data is missing\n", ""]),
    # different errors: each says its own
    (["another rank's files were not written", "this rank's files were not written"],
     ["error: another rank's files were not written\n",
      "error (rank 1): this rank's files were not written\n"]),
    # rank 0 busy elsewhere: rank 1 waits for it, then says its own
    (["silent", "rank 1 alone"], ["", "error (rank 1): rank 1 alone\n"]),
])
def test_an_error_is_printed_once_by_the_ranks_that_share_it(messages, printed):
    """Every rank printed the same error; with the first version of this, an error of one
    rank alone was never printed (rank 0 ended without a word, and torchrun stopped the rank
    that was waiting for it)."""
    from megagpt.testing import run_distributed
    assert run_distributed(_report, len(messages), messages, 1.0) == printed


def _pretrain_gpt():
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain_gpt", ROOT / "pretrain_gpt.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    return program


@pytest.mark.parametrize("env, fix", [
    # two nodes of 2: the fix is the product of torchrun's two counts (it said --nproc_per_node 8)
    (dict(WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", RANK="2", LOCAL_RANK="0"),
     "fix: torchrun --nnodes N --nproc_per_node M with N x M = 8 (now 2 x 2), or "),
    # srun without torchrun: every task alone ("1 processes were started", and a fix of
    # --parallel.world_size=1 that would start 4 runs into one save dir)
    (dict(SLURM_NTASKS="4", SLURM_LOCALID="0"),
     "error: 4 tasks were started without torchrun (srun python ...), each a run of its own; fix: "
     "start them through torchrun, srun torchrun ... as docs/distributed.md shows\n"),
])
def test_a_world_size_mismatch_names_the_launch_that_fits(monkeypatch, capsys, env, fix):
    from megagpt.config import load_config
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS",
                 "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    program = _pretrain_gpt()
    monkeypatch.setattr(program.time, "sleep", lambda s: None)
    cfg = load_config(ROOT / "configs" / "training" / "tiny_model.json",
                      ["--parallel.world_size=8", "--parallel.tensor_parallel_size=2",
                       "--parallel.pipeline_parallel_size=2"])
    with pytest.raises(SystemExit):
        program.init_distributed(cfg)
    err = capsys.readouterr().err     # printed on each node's first rank (LOCAL_RANK 0)
    assert fix in err, err


def test_tensor_parallel_groups_across_nodes_are_warned_of():
    from megagpt.config import load_config
    program = _pretrain_gpt()
    cfg = load_config(ROOT / "configs" / "training" / "tiny_model.json")   # tp 2
    assert program.tensor_parallel_across_nodes(cfg, 4) is None
    assert program.tensor_parallel_across_nodes(cfg, 3).startswith(
        "parallel.tensor_parallel_size=2 does not divide the 3 processes a node runs: "
        "tensor-parallel groups span nodes")


def _collective_left(rank, mode, port, queue):
    """Rank 0 all-reduces; rank 1 ends ("die") or sleeps past the 5 s timeout ("freeze")."""
    import datetime
    import os
    import time

    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5))
    if rank == 1:
        time.sleep(1 if mode == "die" else 10)
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(3))
    except RuntimeError as e:
        cfg = types.SimpleNamespace(parallel=types.SimpleNamespace(
            distributed_timeout_minutes=5 / 60))
        queue.put(_pretrain_gpt().outside_failure(e, cfg))
    queue.close()
    queue.join_thread()            # sent before the exit that skips Python's own clean-up
    os._exit(0)


@pytest.mark.parametrize("mode, said", [
    ("die", r"another rank ended while this one waited for it in a collective \(Connection "
            r"closed by peer \[127.0.0.1\]:\d+\); the first rank to fail says why in its log"),
    ("freeze", r"another rank sent nothing for parallel.distributed_timeout_minutes=0.0833333 "
               r"\(Timed out waiting 5000ms for recv operation to complete\): it froze, or works "
               r"far longer than this one between collectives; .*fix: if it was only slow .*")])
def test_a_collective_another_rank_left_is_one_line(mode, said):
    """gloo's errors (a C++ source location, "GLHF!") reached the user as a traceback of where
    this rank waited; now one line each."""
    import multiprocessing
    import re

    from megagpt.testing import free_port
    context = multiprocessing.get_context("fork")
    queue, port = context.Queue(), free_port()
    workers = [context.Process(target=_collective_left, args=(r, mode, port, queue))
               for r in range(2)]
    for w in workers:
        w.start()
    message = queue.get(timeout=60)
    for w in workers:
        w.join(timeout=30)
    assert re.fullmatch(said, message), message


def test_a_killed_loader_worker_is_one_line_with_the_fix():
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(num_workers=4))
    program = _pretrain_gpt()
    killed = RuntimeError("DataLoader worker (pid 31668) is killed by signal: Killed. ")
    assert program.outside_failure(killed, cfg) == (
        "DataLoader worker (pid 31668) is killed by signal: Killed (the out-of-memory killer, "
        "most often: `dmesg` says); fix: fewer loader processes (data.num_workers=4), or more "
        "memory")
    assert program.outside_failure(RuntimeError("CUDA error: out of memory"), cfg) is None
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:598] Connection reset by peer. more")
    assert program.outside_failure(reset, cfg) == (
        "another rank ended while this one waited for it in a collective (Connection reset by "
        "peer); the first rank to fail says why in its log")

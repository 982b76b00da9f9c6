"""The real command lines end to end: preprocess -> torchrun pretrain_gpt.py on several layouts."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
CORPUS = ROOT / "megagpt" / "data" / "assets" / "shakespeare.jsonl.gz"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """The first 12 acts of the bundled corpus, preprocessed with the real tool."""
    tmp = tmp_path_factory.mktemp("data")
    with gzip.open(CORPUS, "rt") as src, open(tmp / "acts.jsonl", "w") as dst:
        for _, line in zip(range(12), src):
            dst.write(line)
    out = tmp / "acts"
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp / "acts.jsonl"),
                    "--output-prefix", str(out), "--tokenizer", "gpt2", "--append-eod",
                    "--workers", "2"], cwd=ROOT, check=True, capture_output=True)
    return f"{out}_text_document"


def train(tmp_path, prefix, tp, pp, dp, steps, name):
    world = tp * pp * dp
    run_dir = tmp_path / name
    cmd = [str(TORCHRUN), "--nproc_per_node", str(world), "pretrain_gpt.py",
           "--config", "configs/training/tiny_model.json",
           f"--parallel.world_size={world}", f"--parallel.tensor_parallel_size={tp}",
           f"--parallel.pipeline_parallel_size={pp}", f"--data.train_data_path=[\"{prefix}\"]",
           "--data.num_workers=0", "--data.split=90,10,0", f"--data.cache_dir={tmp_path / 'cache'}",
           "--model.n_layers=2", "--model.d_model=64", f"--training.max_steps={steps}",
           "--training.batch_size=2", f"--training.grad_accumulation_steps={4 // dp}",
           "--training.log_interval=1", "--training.eval_interval=0", "--training.warmup_steps=2",
           f"--logging.run_dir={run_dir}", f"--checkpoint.save_dir={run_dir / 'ckpt'}",
           "--checkpoint.save_interval=0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_twenty_steps_make_the_loss_fall(tmp_path, prefix):
    losses = train(tmp_path, prefix, 1, 1, 1, 20, "one")
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefix):
    return train(tmp_path_factory.mktemp("ref"), prefix, 1, 1, 1, 3, "ref")


@pytest.mark.parametrize("tp, pp, dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_layouts_give_the_same_first_losses(tmp_path, prefix, reference, tp, pp, dp):
    losses = train(tmp_path, prefix, tp, pp, dp, 3, f"tp{tp}pp{pp}dp{dp}")
    assert losses == pytest.approx(reference, rel=1e-5)


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    """Every rank finds the problem; rank 0 says it, once, and the other ranks exit after it
    (torchrun stops all ranks at the first failure, which must not silence rank 0)."""
    cmd = [str(TORCHRUN), "--nproc_per_node", "4", "pretrain_gpt.py",
           "--config", "configs/training/tiny_model.json", "--training.max_steps=6",
           f"--logging.run_dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    error = "training.warmup_steps=10: exceeds the decay length (training.max_steps=6)"
    assert result.stderr.count(error) == 1, result.stderr[-3000:]


def test_a_world_size_mismatch_under_torchrun_is_printed_once_with_a_fix_that_fits(tmp_path):
    """It was printed by every rank, and offered --parallel.world_size=2 for a tp 2 x pp 2 layout
    that 2 processes cannot hold."""
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "pretrain_gpt.py",
           "--config", "configs/training/tiny_model.json", f"--logging.run_dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    error = ("error: parallel.world_size=4 but 2 processes were started; fix: torchrun "
             "--nproc_per_node 4 ..., or --parallel.world_size=2 with tensor x pipeline parallel "
             "sizes whose product divides 2 (now 2 x 2)")
    assert result.stderr.count(error) == 1, result.stderr[-3000:]


def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    """Every rank printed the same resume error (8 lines on one node of 8 GPUs)."""
    def run(*extra, program="pretrain_gpt.py"):
        cmd = [str(TORCHRUN), "--nproc_per_node", "2", program,
               "--config", "configs/training/tiny_model.json", "--parallel.world_size=2",
               "--parallel.tensor_parallel_size=1", "--parallel.pipeline_parallel_size=1",
               "--data.mock=true", "--data.num_workers=0", "--model.d_model=64",
               "--model.estimated_parameters=null", "--training.max_steps=1",
               "--training.warmup_steps=1", "--training.eval_interval=0",
               f"--logging.run_dir={tmp_path}", f"--checkpoint.save_dir={tmp_path / 'ckpt'}",
               *extra]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    first = run("--model.n_layers=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("--model.n_layers=4", "--training.max_steps=2")   # another architecture
    errors = [line for line in again.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), again.stderr[-3000:]
    assert "does not fit this config" in errors[0] and "model.n_layers" in again.stderr
    # an error of one rank alone is printed by it (rank 0, told by AnotherRankFailed, waits for
    # it: without that, torchrun stopped rank 1 before it spoke)
    wrapper = tmp_path / "rank1_fails.py"
    wrapper.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import megagpt.training.trainer as trainer\n"
        "from megagpt.data.gpt_dataset import DatasetBuildError\n"
        "build = trainer.build_mock_datasets\n"
        "def fails_on_rank_1(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise DatasetBuildError('rank 1 cannot read its data; fix: mount it')\n"
        "    return build(*args, **kwargs)\n"
        "trainer.build_mock_datasets = fails_on_rank_1\n"
        "import pretrain_gpt\n"
        "sys.exit(pretrain_gpt.main())\n")
    alone = run("--model.n_layers=2", "--checkpoint.load=none",
                f"--checkpoint.save_dir={tmp_path / 'other'}", program=str(wrapper))
    errors = [line for line in alone.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error (rank 1): rank 1 cannot read its data; fix: mount it"], \
        alone.stderr[-3000:]

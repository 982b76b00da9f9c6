"""Checkpoint layout, atomic saving, pruning, verified loading, compatibility and RNG state."""
import errno
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import megagpt
from megagpt.testing import run_distributed
from megagpt.training import checkpoint as ckpt
from megagpt.training.checkpoint import (CheckpointError, capture_rng_state, check_compatible,
                                         find_latest, is_complete, load_checkpoint,
                                         resolve_load_path, restore_rng_state, save_checkpoint)

MODEL = dict(vocab_size=100, d_model=16, n_heads=2, n_layers=4, seq_length=8,
             ffn_hidden_size=None, make_vocab_size_divisible_by=128)
LAYOUT = dict(tp=1, pp=1, dp=1, vp=1)


def make_meta(step, parallel=LAYOUT, **model):
    return {"config": {"model": dict(MODEL, **model), "training": {"seed": 1}},
            "consumed_samples": 8 * step, "parallel": dict(parallel)}


def save_one(save_dir, step, keep_last=3, **kw):
    """A one-process save with recognisable contents."""
    args = dict(rank=0, tp_rank=0, pp_rank=0, dp_rank=0, meta=make_meta(step),
                model_state={"w": torch.full((2, 2), float(step))},
                optim_state={"optimizer": {"step": step}, "scaler": {}},
                rng_state=capture_rng_state({}), keep_last=keep_last, all_min=lambda ok: ok)
    args.update(kw)
    return save_checkpoint(save_dir, step, **args)


def steps_in(save_dir):
    return sorted(p.name for p in Path(save_dir).iterdir())


def test_folder_layout_and_meta(tmp_path):
    before = time.strftime("%Y-%m-%d")
    path = save_one(tmp_path / "ckpt", 5)
    assert path == tmp_path / "ckpt" / "step_0000005"
    assert steps_in(tmp_path / "ckpt") == ["latest", "step_0000005"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_0000005\n"
    names = ["model_tp0_pp0.pt", "optim_rank00000.pt", "rng_rank00000.pt"]
    assert sorted(os.listdir(path)) == sorted(names + ["meta.json"])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["files"] == {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in names}
    assert meta["file_sizes"] == {n: (path / n).stat().st_size for n in names}
    assert (meta["step"], meta["consumed_samples"], meta["world_size"]) == (5, 40, 1)
    assert meta["parallel"] == LAYOUT
    assert meta["config"]["model"] == MODEL
    assert meta["megagpt_version"] == megagpt.__version__
    assert meta["timestamp"].startswith(before)

    meta2, model, optim, rng = load_checkpoint(path, tp_rank=0, pp_rank=0, dp_rank=0)
    assert meta2 == meta
    assert torch.equal(model["w"], torch.full((2, 2), 5.0))
    assert optim == {"optimizer": {"step": 5}, "scaler": {}}
    assert set(rng) == {"python", "numpy", "torch", "cuda", "tracker"}


def all_min(value: int) -> int:
    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag)


def _save_on_two_ranks(rank, world_size, save_dir, tp):
    parallel = dict(tp=tp, pp=1, dp=world_size // tp, vp=1)
    tp_rank, dp_rank = rank % tp, rank // tp
    save_checkpoint(save_dir, 7, rank=rank, tp_rank=tp_rank, pp_rank=0, dp_rank=dp_rank,
                    model_state={"rank": torch.tensor(rank)},
                    optim_state={"rank": torch.tensor(rank)},
                    rng_state=capture_rng_state({}), meta=make_meta(7, parallel),
                    keep_last=2, all_min=all_min)
    path = Path(save_dir) / "step_0000007"
    _, model, optim, _ = load_checkpoint(path, tp_rank=tp_rank, pp_rank=0, dp_rank=dp_rank)
    mine = (model["rank"].item(), optim["rank"].item())
    # a larger data-parallel size (allowed without ZeRO): extra replicas read dp rank 0's files
    _, _, optim_extra, _ = load_checkpoint(path, tp_rank=tp_rank, pp_rank=0, dp_rank=5)
    return mine, optim_extra["rank"].item(), sorted(os.listdir(path))


@pytest.mark.parametrize("tp, models, expected", [
    (1, ["model_tp0_pp0.pt"], [((0, 0), 0), ((0, 1), 0)]),
    (2, ["model_tp0_pp0.pt", "model_tp1_pp0.pt"], [((0, 0), 0), ((1, 1), 1)]),
], ids=["dp2", "tp2"])
def test_two_processes_both_write(tmp_path, tp, models, expected):
    results = run_distributed(_save_on_two_ranks, 2, str(tmp_path), tp)
    files = sorted(models + ["meta.json", "optim_rank00000.pt", "optim_rank00001.pt",
                             "rng_rank00000.pt", "rng_rank00001.pt"])
    assert [(mine, extra) for mine, extra, _ in results] == expected
    assert all(listing == files for _, _, listing in results)
    assert steps_in(tmp_path) == ["latest", "step_0000007"]


def _engine_save_fails_on_rank_1(rank, world_size, save_dir):
    def write_extra(tmp):             # an engine's own save, collective as DeepSpeed's is
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        dist.barrier()
    try:
        save_checkpoint(save_dir, 7, rank=rank, tp_rank=0, pp_rank=0, dp_rank=rank,
                        model_state={}, optim_state={}, rng_state=capture_rng_state({}),
                        meta=make_meta(7, dict(tp=1, pp=1, dp=2, vp=1)), keep_last=2,
                        all_min=all_min, write_extra=write_extra)
    except CheckpointError as e:
        return str(e)


def test_an_engine_save_that_fails_on_one_rank_is_an_error_on_every_rank(tmp_path):
    """The failing rank waited in our agreement while the others waited in the engine's own
    collective: every rank hung until the process group's timeout."""
    start = time.monotonic()
    messages = run_distributed(_engine_save_fails_on_rank_1, 2, str(tmp_path), timeout=120)
    assert time.monotonic() - start < 60
    step = tmp_path / "step_0000007"
    assert messages[1].startswith(f"saving {step}: the engine's files were not written (No space "
                                  f"left on device); fix: free space"), messages
    assert messages[0].startswith(f"saving {step}: the engine's files were not written ("), messages
    assert not step.exists()


@pytest.mark.parametrize("cause,fix", [
    (OSError(errno.ENOSPC, "No space left on device"), "fix: free space in checkpoint.save_dir="),
    (RuntimeError("PytorchStreamWriter failed writing file data/0"), "fix: free space in "),
    (OSError(errno.EROFS, "Read-only file system"), "fix: make checkpoint.save_dir="),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "fix: free space in checkpoint.save_dir="),
    (OSError(errno.ENOTDIR, "Not a directory"), "or a folder above it is now a file"),
    (OSError(errno.EIO, "Input/output error"), "fix: see to checkpoint.save_dir="),
    (None, "fix: checkpoint.save_dir={} or a folder above it is now a file: move it away")])
def test_a_failed_save_names_the_fix_its_cause_calls_for(tmp_path, cause, fix):
    """Every cause but a permission was told to free space: a file where the save dir was, too."""
    save_dir = tmp_path / "ckpt"
    save_one(save_dir, 1)
    if cause is None:              # the save dir replaced by a file while the run goes on
        shutil.rmtree(save_dir)
        save_dir.write_text("")
        with pytest.raises(CheckpointError, match=re.escape(fix.format(save_dir))):
            save_one(save_dir, 2)
        return

    def write_extra(tmp):
        raise cause
    with pytest.raises(CheckpointError) as info:
        save_one(save_dir, 2, write_extra=write_extra)
    assert fix in str(info.value) and str(info.value).endswith("(the previous checkpoint is "
                                                               "still `latest`)")
    assert find_latest(save_dir) == save_dir / "step_0000001"


def test_a_link_to_nothing_where_the_step_goes_is_replaced(tmp_path):
    (tmp_path / "step_0000004").symlink_to(tmp_path / "nowhere")
    path = save_one(tmp_path, 4)
    assert is_complete(path) and not path.is_symlink()


def test_leftover_tmp_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    save_one(tmp_path, 3)
    leftover = tmp_path / "step_0000005.tmp"
    leftover.mkdir()
    (leftover / "model_tp0_pp0.pt").write_bytes(b"half a file")
    assert find_latest(tmp_path) == tmp_path / "step_0000003"
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "step_0000003"
    save_one(tmp_path, 4)
    assert steps_in(tmp_path) == ["latest", "step_0000003", "step_0000004"]


def _save_then_die(save_dir):
    save_one(save_dir, 3)
    calls = []

    def all_min(ok):   # the third agreement comes after every file is written, before the rename
        calls.append(1)   # (the first two: rank 0 made the folder, and every rank sees it)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return ok
    save_one(save_dir, 5, all_min=all_min)


def test_process_killed_after_writing_resumes_from_previous(tmp_path):
    child = mp.get_context("fork").Process(target=_save_then_die, args=(tmp_path,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path / "step_0000005.tmp")) == [
        "model_tp0_pp0.pt", "model_tp0_pp0.pt.sha256", "optim_rank00000.pt",
        "optim_rank00000.pt.sha256", "rng_rank00000.pt", "rng_rank00000.pt.sha256"]
    assert resolve_load_path("auto", tmp_path) == tmp_path / "step_0000003"
    save_one(tmp_path, 5)
    assert steps_in(tmp_path) == ["latest", "step_0000003", "step_0000005"]
    assert load_checkpoint(tmp_path / "step_0000005", tp_rank=0, pp_rank=0, dp_rank=0)[0]["step"] == 5


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: replaced.append((Path(a), Path(b)))
                        or real_replace(a, b))
    save_one(tmp_path, 1)
    save_one(tmp_path, 2)
    assert replaced.count((tmp_path / "latest.tmp", tmp_path / "latest")) == 2
    assert (tmp_path / "latest").read_text() == "step_0000002\n"
    assert not (tmp_path / "latest.tmp").exists()


@pytest.mark.parametrize("swap", [True, False], ids=["atomic-swap", "set-aside"])
def test_saving_a_step_again_replaces_it_and_never_leaves_none(tmp_path, monkeypatch, swap):
    # keep_last=1: the step being replaced is the only checkpoint. With renameat2's exchange the
    # new folder takes its name in one step; where the system lacks it, it is set aside first.
    real_exchange = ckpt.exchange_paths
    if swap:
        (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
        if not real_exchange(tmp_path / "x", tmp_path / "y"):
            pytest.skip("this file system cannot swap folders (renameat2 RENAME_EXCHANGE)")
        (tmp_path / "x").rmdir(), (tmp_path / "y").rmdir()
    exchanged = []

    def exchange(a, b):
        if not swap:
            return False
        assert (Path(b) / "meta.json").is_file()          # the old one is whole up to the swap
        exchanged.append(real_exchange(a, b))
        return exchanged[-1]
    monkeypatch.setattr(ckpt, "exchange_paths", exchange)
    save_one(tmp_path, 4, keep_last=1)
    save_one(tmp_path, 4, keep_last=1, model_state={"w": torch.full((2, 2), 44.0)})
    assert exchanged == ([True] if swap else [])
    assert steps_in(tmp_path) == ["latest", "step_0000004"]
    model = load_checkpoint(tmp_path / "step_0000004", tp_rank=0, pp_rank=0, dp_rank=0)[1]
    assert float(model["w"][0, 0]) == 44.0


def test_a_linked_step_is_pruned_by_removing_the_link(tmp_path):
    """Pruning a step folder that is a link failed the save (rmtree refuses links) after the
    new step was already `latest`; the link goes, what it points to stays."""
    ckpt, elsewhere = tmp_path / "ckpt", tmp_path / "archive"
    save_one(ckpt, 2)
    save_one(ckpt, 4)
    elsewhere.mkdir()
    shutil.move(ckpt / "step_0000004", elsewhere / "step_0000004")
    (ckpt / "step_0000004").symlink_to(elsewhere / "step_0000004")
    said = []
    save_one(ckpt, 6, keep_last=1, warn=said.append)
    assert steps_in(ckpt) == ["latest", "step_0000006"] and said == []
    assert (elsewhere / "step_0000004" / "meta.json").is_file()


def test_a_step_that_cannot_be_pruned_is_a_warning_and_the_save_stands(tmp_path, monkeypatch):
    save_one(tmp_path, 2)
    (tmp_path / "step_0000003.tmp").mkdir()            # a save that did not finish
    remove = ckpt._remove_folder

    def busy(path):
        if path.name == "step_0000002":
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        remove(path)
    monkeypatch.setattr(ckpt, "_remove_folder", busy)
    said = []
    path = save_one(tmp_path, 4, keep_last=1, warn=said.append)
    assert (tmp_path / "latest").read_text() == "step_0000004\n" and is_complete(path)
    assert said == [f"{path} is saved and `latest`, but {tmp_path / 'step_0000002'} could not be "
                    f"removed (Directory not empty); remove it by hand to free its space"]
    assert steps_in(tmp_path) == ["latest", "step_0000002", "step_0000004"]


def test_latest_naming_a_missing_or_incomplete_folder_falls_back(tmp_path):
    for step in (1, 2, 3):
        save_one(tmp_path, step)
    (tmp_path / "latest").write_text("step_0000009\n")
    assert find_latest(tmp_path) == tmp_path / "step_0000003"
    (tmp_path / "step_0000003" / "meta.json").unlink()
    (tmp_path / "latest").write_text("step_0000003\n")
    assert find_latest(tmp_path) == tmp_path / "step_0000002"
    (tmp_path / "step_0000002" / "rng_rank00000.pt").write_bytes(b"truncated")
    assert find_latest(tmp_path) == tmp_path / "step_0000001"


def test_passing_over_what_latest_names_is_said(tmp_path):
    for step in (1, 2):
        save_one(tmp_path, step)
    said = []
    assert find_latest(tmp_path, warn=said.append) == tmp_path / "step_0000002" and said == []
    (tmp_path / "step_0000002" / "rng_rank00000.pt").write_bytes(b"truncated")
    assert resolve_load_path("auto", tmp_path, warn=said.append) == tmp_path / "step_0000001"
    assert said == [f"{tmp_path / 'latest'} names a checkpoint that cannot be used "
                    f"({tmp_path / 'step_0000002'} is not a complete checkpoint: rng_rank00000.pt "
                    f"has 9 bytes, meta.json records "
                    f"{(tmp_path / 'step_0000001' / 'rng_rank00000.pt').stat().st_size}); "
                    f"using step_0000001, the latest complete one"]
    (tmp_path / "latest").write_text("step_0000007\n")
    find_latest(tmp_path, warn=said.append)
    assert said[-1].endswith(f"({tmp_path / 'step_0000007'} does not exist); using step_0000001, "
                             f"the latest complete one")
    # damaged: not text (a UnicodeDecodeError), a name too long for the file system (an
    # OSError from exists()), zero bytes (printed whole): all passed over in one short line
    for content, held in [(b"\xff\xfe\x80garbage", "bytes that are not text"),
                          (b"x" * 300, repr("x" * 40) + "..."),
                          (b"\0" * 4096, repr("\0" * 40) + "...")]:
        (tmp_path / "latest").write_bytes(content)
        assert find_latest(tmp_path, warn=said.append) == tmp_path / "step_0000001"
        assert said[-1] == (f"{tmp_path / 'latest'} names a checkpoint that cannot be used (it "
                            f"does not hold a step_NNNNNNN name but {held}); using step_0000001, "
                            f"the latest complete one")


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        save_one(tmp_path, step, keep_last=2)
    assert steps_in(tmp_path) == ["latest", "step_0000004", "step_0000005"]
    # resumed from an older step: the new save is kept, and the first attempt's later steps are
    # not pruned in its favour (they were, down to the highest, before)
    save_one(tmp_path, 2, keep_last=2)
    assert steps_in(tmp_path) == ["latest", "step_0000002", "step_0000004", "step_0000005"]
    assert find_latest(tmp_path) == tmp_path / "step_0000002"
    save_one(tmp_path, 3, keep_last=2)
    save_one(tmp_path, 4, keep_last=2)   # replaces the first attempt's step 4; prunes step 2
    assert steps_in(tmp_path) == ["latest", "step_0000003", "step_0000004", "step_0000005"]
    assert find_latest(tmp_path) == tmp_path / "step_0000004"


def test_keep_last_zero_keeps_all_and_resaving_a_step_replaces_it(tmp_path):
    for step in (1, 2, 3):
        save_one(tmp_path, step, keep_last=0)
    save_one(tmp_path, 2, keep_last=0, model_state={"w": torch.zeros(1)})
    assert steps_in(tmp_path) == ["latest", "step_0000001", "step_0000002", "step_0000003"]
    _, model, _, _ = load_checkpoint(tmp_path / "step_0000002", tp_rank=0, pp_rank=0, dp_rank=0)
    assert torch.equal(model["w"], torch.zeros(1))


def test_corrupt_byte_is_refused(tmp_path):
    path = save_one(tmp_path, 1)
    data = bytearray((path / "optim_rank00000.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optim_rank00000.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optim_rank00000.pt is corrupt: its SHA-256 is "
                                              r"[0-9a-f]{64}, meta.json records"):
        load_checkpoint(path, tp_rank=0, pp_rank=0, dp_rank=0)


def test_loading_another_layout_names_the_missing_file(tmp_path):
    path = save_one(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"has no model_tp1_pp0.pt: it was saved with tp=1, "
                                              r"pp=1, world size 1.*convert_checkpoint.py"):
        load_checkpoint(path, tp_rank=1, pp_rank=0, dp_rank=0)


def test_incompatible_architecture_names_both_values():
    meta = make_meta(1)
    with pytest.raises(CheckpointError) as e:
        check_compatible(meta, dict(MODEL, n_layers=8, d_model=32), LAYOUT, where="ck/step_0000001")
    text = str(e.value)
    assert "ck/step_0000001 does not fit this config" in text
    assert "checkpoint has model.n_layers=4, the config says 8" in text
    assert "checkpoint has model.d_model=16, the config says 32" in text
    assert "checkpoint has model.ffn_hidden_size=64, the config says 128" in text
    assert "it is another model: give checkpoint.load a checkpoint of this one" in text
    check_compatible(meta, dict(MODEL, ffn_hidden_size=64, dropout=0.0), LAYOUT)  # same width


def test_the_gelu_is_part_of_the_architecture_and_older_checkpoints_had_the_tanh_one():
    from megagpt.config import ModelConfig
    meta = make_meta(1)
    assert "activation" not in meta["config"]["model"]   # as written before the field existed
    check_compatible(meta, ModelConfig(**MODEL), LAYOUT)
    with pytest.raises(CheckpointError, match="checkpoint has model.activation=gelu_tanh, the "
                                              "config says gelu"):
        check_compatible(meta, ModelConfig(**MODEL, activation="gelu"), LAYOUT)


def test_model_config_dataclass_is_accepted():
    from megagpt.config import ModelConfig
    check_compatible(make_meta(1), ModelConfig(**MODEL), LAYOUT)
    with pytest.raises(CheckpointError, match=r"model.vocab_size=100, the config says 50257"):
        check_compatible(make_meta(1), ModelConfig(**dict(MODEL, vocab_size=50257)), LAYOUT)


def test_other_tensor_or_pipeline_layout_says_to_convert():
    with pytest.raises(CheckpointError) as e:
        check_compatible(make_meta(1), MODEL, dict(LAYOUT, tp=2, pp=2), where="ck")
    text = str(e.value)
    assert "checkpoint has parallel.tensor_parallel_size=1, the config says 2" in text
    assert "checkpoint has parallel.pipeline_parallel_size=1, the config says 2" in text
    assert ("tools/convert_checkpoint.py --input ck --output NEW_DIR --to megagpt "
            "--tensor-parallel-size 2 --pipeline-parallel-size 2 --virtual-pipeline-size 1` and "
            "set checkpoint.load=NEW_DIR") in text
    # the virtual pipeline size is named too: the converter keeps the source's by default
    with pytest.raises(CheckpointError, match=r"--pipeline-parallel-size 1 --virtual-pipeline-size 2`"):
        check_compatible(make_meta(1), MODEL, dict(LAYOUT, vp=2), where="ck")


def test_data_parallel_size_may_change_only_without_zero():
    check_compatible(make_meta(1), MODEL, dict(LAYOUT, dp=4))
    sharded = make_meta(1, dict(LAYOUT, dp=2, zero_stage=1))
    check_compatible(sharded, MODEL, dict(LAYOUT, dp=2, zero_stage=1))
    convert = (r"convert it to a weights-only checkpoint \(`python tools/convert_checkpoint.py "
               r"--input ck --output NEW_DIR --to megagpt`\) and set checkpoint.load=NEW_DIR, "
               r"which resumes its step with a fresh optimizer state")
    # the way out is not another zero_stage, which the next check refuses
    with pytest.raises(CheckpointError, match=r"data-parallel size 2, this run has 4 with "
                                              r"parallel.zero_stage=1: its optimizer state is "
                                              r"sharded over its data-parallel ranks; fix: resume "
                                              r"with world size 2, or " + convert):
        check_compatible(sharded, MODEL, dict(LAYOUT, dp=4, zero_stage=1), where="ck")
    with pytest.raises(CheckpointError, match=r"data-parallel size 1, this run has 2 with "
                                              r"parallel.zero_stage=1: this run shards the "
                                              r"optimizer state over 2 ranks; fix: resume with "
                                              r"world size 1, or " + convert):
        check_compatible(make_meta(1, dict(LAYOUT, zero_stage=1)), MODEL, dict(LAYOUT, dp=2, zero_stage=1),
                         where="ck")
    with pytest.raises(CheckpointError, match=r"parallel.zero_stage=1, the config says 0: its "
                                              r"optimizer state was saved sharded over the "
                                              r"data-parallel ranks; fix: set "
                                              r"parallel.zero_stage=1 to resume, or " + convert):
        check_compatible(sharded, MODEL, dict(LAYOUT, dp=2), where="ck")
    check_compatible(sharded, MODEL, dict(LAYOUT, dp=4), with_optimizer=False)   # weights only


def test_parallel_sizes_must_be_complete():
    with pytest.raises(ValueError, match=r"parallel_sizes=\{'tp': 1\} lacks pp, dp, vp"):
        check_compatible(make_meta(1), MODEL, {"tp": 1})


def test_resolve_load_path(tmp_path):
    assert resolve_load_path("auto", tmp_path / "nothing") is None
    assert resolve_load_path("auto", tmp_path) is None
    assert resolve_load_path("auto", None) is None
    assert resolve_load_path("none", tmp_path) is None
    assert resolve_load_path(None, tmp_path) is None
    save_one(tmp_path / "run", 1)
    save_one(tmp_path / "run", 2)
    assert resolve_load_path("auto", tmp_path / "run") == tmp_path / "run" / "step_0000002"
    assert resolve_load_path(str(tmp_path / "run"), None) == tmp_path / "run" / "step_0000002"
    step1 = tmp_path / "run" / "step_0000001"
    assert resolve_load_path(str(step1), None) == step1


def test_bad_load_paths_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=rf"checkpoint.load={missing}: {missing} does not "
                                              rf"exist; fix: .*checkpoint.load=auto"):
        resolve_load_path(str(missing), None)
    with pytest.raises(CheckpointError, match=rf"{tmp_path} holds no complete checkpoint"):
        resolve_load_path(str(tmp_path), None)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{hf} is a Hugging Face model folder, not a "
                                              rf"checkpoint of ours; fix: .*checkpoint.pretrained"
                                              rf"={hf}"):
        resolve_load_path(str(hf), None)
    megatron = tmp_path / "megatron"
    (megatron / "iter_0000010").mkdir(parents=True)
    (megatron / "latest_checkpointed_iteration.txt").write_text("10")
    for given in (megatron, megatron / "iter_0000010"):
        with pytest.raises(CheckpointError, match=rf"{given} is a Megatron-LM checkpoint, not a "
                                                  rf"checkpoint of ours; fix: .*checkpoint."
                                                  rf"pretrained={given}.*which keeps its step"):
            resolve_load_path(str(given), None)
    (tmp_path / "step_0000004").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint.load=.*step_0000004: .*step_0000004 is "
                                              r"not a complete checkpoint: it has no meta.json"):
        resolve_load_path(str(tmp_path / "step_0000004"), None)
    (tmp_path / "step_0000005.tmp").mkdir()
    with pytest.raises(CheckpointError, match=r"step_0000005.tmp is a save that did not finish"):
        resolve_load_path(str(tmp_path / "step_0000005.tmp"), None)
    with pytest.raises(CheckpointError, match=r"has no meta.json"):
        load_checkpoint(tmp_path / "step_0000004", tp_rank=0, pp_rank=0, dp_rank=0)


@pytest.mark.parametrize("kw, message", [
    (dict(keep_last=-1), r"checkpoint.keep_last=-1: must be an integer >= 1, or 0"),
    (dict(meta={"config": {}}), r"meta lacks consumed_samples, parallel"),
    (dict(meta=dict(make_meta(1), parallel={"tp": 1})), r"lacks pp, dp, vp"),
    (dict(meta=dict(make_meta(1), extra=object())), r"meta must be JSON-serialisable"),
    (dict(rank=1), r"rank=1 is outside the world of size 1"),
    (dict(tp_rank=1), r"rank=0 is \(tp, dp, pp\) = \(0, 0, 0\) .* but tp_rank=1"),
])
def test_bad_save_arguments(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        save_one(tmp_path, 1, **kw)
    assert not tmp_path.joinpath("step_0000001.tmp").exists()


def test_negative_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"step=-1 must be an integer >= 0"):
        save_one(tmp_path, -1)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()   # leaves a cached Gaussian in numpy's state
    tracker = {"tensor-parallel": torch.Generator().manual_seed(9).get_state()}
    path = save_one(tmp_path, 1, rng_state=capture_rng_state(tracker))
    expected = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    _, _, _, rng = load_checkpoint(path, tp_rank=0, pp_rank=0, dp_rank=0)
    restored = restore_rng_state(rng)
    assert draws() == expected
    assert torch.equal(restored["tensor-parallel"], tracker["tensor-parallel"])


def test_restore_refuses_foreign_state():
    with pytest.raises(CheckpointError, match=r"lacks numpy, torch, cuda, tracker"):
        restore_rng_state({"python": random.getstate()})


def test_optimizer_layout_must_match():
    from megagpt.training.checkpoint import check_optimizer_layout

    layout = [["layers.0.ln1.weight", 32], ["layers.0.ln1.bias", 32]]
    check_optimizer_layout(layout, [list(e) for e in layout], sharded_by_tp_layout=True)
    check_optimizer_layout(None, layout, sharded_by_tp_layout=False)   # an older checkpoint
    with pytest.raises(CheckpointError, match=r"ckpt/step_5: its optimizer state is for 2 "
                                              r"parameter pieces, this run's optimizer steps 1, "
                                              r"and they differ first at position 1: the "
                                              r"checkpoint has layers.0.ln1.bias \(32 values\), "
                                              r"this run nothing"):
        check_optimizer_layout(layout, layout[:1], sharded_by_tp_layout=False,
                               where="ckpt/step_5")
    with pytest.raises(CheckpointError, match=r"differ first at position 0: the checkpoint has "
                                              r"layers.0.ln1.weight \(32 values\), this run "
                                              r"layers.0.ln1.bias \(32 values\)"):
        check_optimizer_layout(layout, layout[::-1], sharded_by_tp_layout=False)
    with pytest.raises(CheckpointError, match=r"ZeRO-1 optimizer state saved with tensor "
                                              r"parallelism by an older megagpt.*--to megagpt"):
        check_optimizer_layout(None, layout, sharded_by_tp_layout=True)


def test_a_host_copy_shares_nothing_with_the_state_and_reuses_an_earlier_copy():
    from megagpt.training.checkpoint import _host_copy
    state = {"w": torch.randn(3, 4), "step": 7, "groups": [{"lr": 0.1, "m": torch.ones(2)}],
             "pair": (torch.zeros(1), "x")}
    first = _host_copy(state)
    assert first["w"].data_ptr() != state["w"].data_ptr() and torch.equal(first["w"], state["w"])
    assert first["groups"][0] is not state["groups"][0] and isinstance(first["pair"], tuple)
    state["w"].add_(1.0)
    state["groups"][0]["m"] = torch.ones(5)                  # another shape: a new tensor
    second = _host_copy(state, first)
    assert second["w"] is first["w"] and torch.equal(second["w"], state["w"])
    assert second["groups"][0]["m"].shape == (5,) and second["step"] == 7


def test_a_save_dir_given_for_a_step_folder_is_named_as_one(tmp_path):
    """Reading a save dir where a step folder belongs said "not a complete checkpoint ... a save
    that did not finish"; it says what the folder is and what to give instead."""
    from megagpt.model.reshard import full_state_from_checkpoint

    (tmp_path / "step_0000002").mkdir()
    (tmp_path / "latest").write_text("step_0000002\n")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is a save dir, not one of its "
                                              rf"checkpoints; fix: give a step folder of it "
                                              rf"\({tmp_path}/step_NNNNNNN\), or read its latest "
                                              rf"with megagpt.convert.load_source"):
        full_state_from_checkpoint(tmp_path)


def test_the_cuda_stream_is_saved_and_restored_where_there_is_one(monkeypatch):
    """On a GPU the device's generator (dropout masks drawn on it) goes into the checkpoint and
    comes back on resume; on a CPU-only machine a GPU checkpoint's is skipped. Stand-ins for
    torch.cuda: this machine has no GPU."""
    device_state, restored = torch.tensor([1, 2, 3], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = capture_rng_state({})
    assert torch.equal(state["cuda"], device_state)
    restore_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restore_rng_state(state)
    assert len(restored) == 1

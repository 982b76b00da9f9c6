"""The trainer in-process on gloo: exact resume, skipped steps, aborts, SIGTERM."""
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from megagpt.model.gpt import gather_full_state_dict
from megagpt.parallel import state
from megagpt.testing import (TINY_VOCAB, check_a_damaged_file_stops_every_rank, run_distributed,
                             sigterm_when_ready, tiny_config)
from megagpt.training.checkpoint import CheckpointError, load_checkpoint
from megagpt.training.optim import lr_at
from megagpt.training.trainer import (WORKERS_SHIELDED, Trainer, TrainingAborted,
                                     data_order_changes, end_daemonic_children, loader_worker_options, output_problems,
                                     shield_worker_from_stray_sigterm, start_loader)

ROOT = Path(__file__).resolve().parents[2]


def run_config(run_dir, steps, tp=1, pp=1, dp=1, **overrides):
    defaults = dict(checkpoint__save_dir=str(run_dir / "ckpt"), checkpoint__save_interval=5,
                    logging__run_dir=str(run_dir), logging__progress_bar=False,
                    training__log_interval=1, training__eval_interval=0, data__num_workers=0)
    return tiny_config(tp=tp, pp=pp, dp=dp, steps=steps, **{**defaults, **overrides})


def _train(rank, world, run_dir, steps, layout, max_steps=None):
    cfg = run_config(Path(run_dir), steps if max_steps is None else max_steps, **layout)
    ps = state.initialize_parallel(cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size)
    trainer = Trainer(cfg, ps, log=lambda *a: None)
    trainer.train(until=steps)
    params = {}
    with trainer.engine.master_weights():     # ZeRO-1: every replica gathers the masters
        if ps.dp_rank == 0:
            for chunk in trainer.engine.chunks:
                params.update(gather_full_state_dict(chunk))
    return params


def losses(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.mark.parametrize("layout", [dict(), dict(training__precision="bf16"),
                                    # CPU dropout masks come from torch's global generator, which
                                    # a data loader drew from at each resume and evaluation
                                    dict(model__dropout=0.1, training__eval_interval=3),
                                    pytest.param(dict(tp=2, pp=2), marks=pytest.mark.slow),
                                    pytest.param(dict(dp=2, zero=1, training__precision="bf16"),
                                                 marks=pytest.mark.slow)],
                         ids=["1x1x1", "1x1x1-bf16", "1x1x1-dropout-eval", "tp2xpp2",
                              "dp2-zero1-bf16"])
def test_resume_continues_exactly(tmp_path, layout):
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    straight = run_distributed(_train, world, str(tmp_path / "a"), 10, layout)
    run_distributed(_train, world, str(tmp_path / "b"), 5, layout, 10)
    resumed = run_distributed(_train, world, str(tmp_path / "b"), 10, layout)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "b")) == 10
    merged_a = {k: v for r in straight for k, v in r.items()}
    merged_b = {k: v for r in resumed for k, v in r.items()}
    for k, v in merged_a.items():
        assert torch.equal(v, merged_b[k]), k


def test_evaluation_leaves_the_training_losses_alone(tmp_path):
    layout = dict(model__dropout=0.1)
    run_distributed(_train, 1, str(tmp_path / "a"), 6, layout)
    run_distributed(_train, 1, str(tmp_path / "b"), 6, dict(layout, training__eval_interval=2))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def _resume_messages(rank, world, run_dir, max_steps, until):
    messages = []
    cfg = run_config(Path(run_dir), max_steps)
    Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append).train(until=until)
    return messages


def test_a_resume_with_another_schedule_says_so(tmp_path):
    run_distributed(_resume_messages, 1, str(tmp_path), 6, 2)
    same = run_distributed(_resume_messages, 1, str(tmp_path), 6, 3)[0]
    assert not any("another learning-rate schedule" in m for m in same)
    longer = run_distributed(_resume_messages, 1, str(tmp_path), 9, 4)[0]
    schedule = run_config(tmp_path, 6).training
    was, now = lr_at(3, schedule), lr_at(3, run_config(tmp_path, 9).training)
    assert any("warning: resuming" in m and "another learning-rate schedule "
               f"(training.max_steps 6 -> 9); the rate departs from the saved run's schedule at "
               f"step 4: {was:.4g} -> {now:.4g}" in m for m in longer), longer


def test_raising_max_steps_with_the_decay_steps_set_keeps_the_schedule(tmp_path):
    """Megatron's way to extend a run, its decay steps fixed: the rates to come are the saved
    run's, so there is nothing to warn of (it was told the rate changed)."""
    fixed = dict(training__lr_decay_steps=6)
    run_distributed(_resume_with, 1, str(tmp_path), 6, 6, fixed)
    longer = run_distributed(_resume_with, 1, str(tmp_path), 9, 9, fixed)[0]
    assert any("resumed from" in m for m in longer), longer
    assert not any("warning" in m for m in longer), longer


def _resume_with(rank, world, run_dir, max_steps, until, overrides):
    messages = []
    cfg = run_config(Path(run_dir), max_steps, **overrides)
    Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append).train(until=until)
    return messages


def test_a_resume_with_other_data_settings_says_so(tmp_path):
    """The samples' order is built from the seed, the data settings and the sample count: a
    resume that changes any of them is told that the samples not yet consumed are reordered."""
    run_distributed(_resume_with, 1, str(tmp_path), 6, 2, {})
    same = run_distributed(_resume_with, 1, str(tmp_path), 6, 3, {})[0]
    assert not any("other data settings" in m for m in same), same
    changed = run_distributed(_resume_with, 1, str(tmp_path), 9, 4, dict(training__seed=7))[0]
    assert any("warning: resuming" in m and "other data settings (training.seed 11 -> 7); the "
               "training samples' "
               "order is built from them, so after the 24 samples consumed" in m
               for m in changed), changed


@pytest.mark.parametrize("micro, saved, fix", [
    (1, (1, 8, 1), "to keep it, set training.grad_accumulation_steps=4"),
    (2, (1, 12, 1), "to keep it, set training.batch_size=1 and training.grad_accumulation_steps=6"),
    (1, (1, 2, 1), "no micro-batch size and count keep it at data-parallel size 2 (the interleaved "
                   "schedule needs a multiple of 2 micro-batches)"),
])
def test_the_global_batch_warning_suggests_a_split_the_layout_accepts(micro, saved, fix):
    """Under the interleaved schedule the micro-batches must be a multiple of pp: the warning
    suggested a grad_accumulation_steps that validation then refused."""
    import types
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = tiny_config(pp=2, vp=2, dp=2, micro=micro)
    trainer.state = types.SimpleNamespace(dp_world_size=2)
    trainer.global_batch = 8
    batch_size, accumulation, dp = saved
    message = trainer._global_batch_change(
        "ckpt", {"batch_size": batch_size, "grad_accumulation_steps": accumulation}, dp)
    assert message.endswith(fix), message


def _resume_on_indexed_data(rank, world, run_dir, max_steps, until, last_length=40):
    """The tiny model on 30 documents of 40 tokens (28 of them for training: 69 samples of 16
    an epoch; global batch 8): the order of the samples depends on their count. `last_length`:
    the first document's length (the data made again, otherwise)."""
    from megagpt.data.indexed import write_documents
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, TINY_VOCAB, (40,), generator=g).tolist() for _ in range(30)]
    docs[0] = docs[0][:last_length]
    prefix = str(write_documents(Path(run_dir) / "d", docs).prefix)
    return _resume_with(rank, world, run_dir, max_steps, until, dict(
        data__mock=False, data__train_data_path=[prefix], model__vocab_size=50257,
        data__split="95,5,0", data__cache_dir=str(Path(run_dir) / "cache")))


def test_a_resume_is_told_of_a_new_sample_order_only_when_the_count_changes_it(tmp_path):
    """Raising max_steps reorders the samples to come only when a dataset's epochs, or how its
    last epoch is shuffled, change (it warned at every change of the count)."""
    run_distributed(_resume_on_indexed_data, 1, str(tmp_path), 10, 2)    # 80 samples: 2 epochs
    same = run_distributed(_resume_on_indexed_data, 1, str(tmp_path), 12, 4)[0]   # 96: still
    assert any("resumed from" in m for m in same), same
    assert not any("other data settings" in m for m in same), same
    more = run_distributed(_resume_on_indexed_data, 1, str(tmp_path), 30, 6)[0]   # 240: 4
    assert any("other data settings (training samples 96 -> 240 (consumed + steps to go x "
               "global batch), which changes a dataset's epochs or how its last epoch is "
               "shuffled)" in m for m in more), more
    # the checkpoint records its tokenizer, which checkpoint.pretrained is checked against
    from megagpt.data.tokenizer import load_tokenizer
    meta = json.loads((tmp_path / "ckpt" / "step_0000006" / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == load_tokenizer("gpt2").fingerprint
    # the same paths and settings, the data made again with a document 1 token shorter
    other = run_distributed(_resume_on_indexed_data, 1, str(tmp_path), 30, 8, 39)[0]
    changed = [m for m in other if "other data settings" in m]
    assert len(changed) == 1 and (f"other data settings (the training data itself (the "
                                  f"documents' count or lengths differ from the saved run's: "
                                  f"the files at data.train_data_path were made again or "
                                  f"replaced; digest {meta['train_data_digest']} -> ") in changed[0]


def test_the_data_order_settings_follow_what_the_training_split_is_built_from():
    """data.split matters only while validation is carved out of the training data, and whether
    it is changes the training split (its share of each dataset, or the whole): a resume that
    set data.val_data_path trained on other samples without a word."""
    cfg = tiny_config(data__split="90,10,0")
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert data_order_changes(saved, cfg) == []
    with_val = tiny_config(data__split="90,10,0", data__val_data_path=["runs/data/v"])
    assert data_order_changes(saved, with_val) == [
        "data.val_data_path [] -> ['runs/data/v'] (training now takes whole datasets, no longer "
        "their share of data.split)"]
    saved_with_val = json.loads(json.dumps(with_val.to_dict()))
    other_split = tiny_config(data__split="80,20,0", data__val_data_path=["runs/data/v"])
    assert data_order_changes(saved_with_val, other_split) == []     # split unused: no warning
    assert data_order_changes(saved, tiny_config(data__split="80,20,0")) == [
        "data.split 90,10,0 -> 80,20,0"]
    sft = dict(training__mode="finetune", data__format="sft", data__mock=False,
               data__train_data_path=["runs/data/chat.jsonl"])
    saved_sft = json.loads(json.dumps(tiny_config(**sft, data__tokenizer_path="gpt2").to_dict()))
    assert data_order_changes(saved_sft, tiny_config(**sft, data__tokenizer_path="tok")) == [
        "data.tokenizer_path gpt2 -> tok"]


def test_a_resume_with_a_smaller_global_batch_has_the_samples_to_finish(tmp_path):
    """The training set holds the samples consumed plus the steps to go at the resumed run's
    global batch: 6 steps of 8, then 4 more of 2, need 56 (max_steps x global batch, 20, ran
    out: a traceback before the first step)."""
    run_distributed(_resume_with, 1, str(tmp_path), 6, 6, {})
    messages = run_distributed(_resume_with, 1, str(tmp_path), 10, 8,
                               dict(training__grad_accumulation_steps=1))[0]
    assert ("warning: resuming " + str(tmp_path / "ckpt" / "step_0000006") + " with another "
            "global batch: 8 -> 2 sequences a step (training.batch_size x grad_accumulation_steps "
            "x data-parallel size: 2 x 4 x 1 -> 2 x 1 x 1); the steps from here on take the new "
            "one, at the same learning rates; to keep it, set "
            "training.grad_accumulation_steps=4") in messages, messages
    again = run_distributed(_resume_with, 1, str(tmp_path), 10, 10,    # the same settings again
                            dict(training__grad_accumulation_steps=1))[0]
    assert not any("other data settings" in m for m in again), again
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000010"


def test_a_converted_checkpoint_keeps_the_runs_training_set_size(tmp_path):
    """A conversion dropped train_samples from meta.json: resuming from it warned of a data
    order change that had not happened (20 -> 56, the run's own size being 56)."""
    from megagpt.convert import convert
    run_distributed(_resume_with, 1, str(tmp_path), 6, 6, {})
    run_distributed(_resume_with, 1, str(tmp_path), 10, 8, dict(training__grad_accumulation_steps=1))
    convert(tmp_path / "ckpt" / "step_0000008", tmp_path / "converted", "megagpt",
            log=lambda line: None)
    messages = run_distributed(_resume_with, 1, str(tmp_path), 10, 10, dict(
        training__grad_accumulation_steps=1,
        checkpoint__load=str(tmp_path / "converted" / "step_0000008")))[0]
    assert any("resumed the weights of" in m for m in messages), messages
    assert not any("other data settings" in m for m in messages), messages


def test_a_checkpoint_of_nothing_trained_gives_no_setting_warnings(tmp_path):
    """A Hugging Face model converted to ours is at step 0 with its config made from a template:
    there is no saved run whose schedule or data order could change (it warned of both)."""
    trainer = Trainer.__new__(Trainer)
    messages = []
    trainer.cfg, trainer.log, trainer.global_batch = run_config(tmp_path, 6), messages.append, 8
    other = run_config(tmp_path, 9, training__learning_rate=0.5, training__seed=3).to_dict()
    trainer._warn_setting_changes({"step": 0, "consumed_samples": 0, "config": other,
                                   "parallel": {"dp": 1}}, "converted")
    assert messages == []
    trainer._warn_setting_changes({"step": 2, "consumed_samples": 16, "config": other,
                                   "parallel": {"dp": 1}}, "trained")
    assert any("another learning-rate schedule" in m for m in messages), messages
    other["training"]["mode"] = "finetune"       # resuming a run of the other mode goes on with it
    trainer._warn_setting_changes({"step": 2, "consumed_samples": 16, "config": other,
                                   "parallel": {"dp": 1}}, "trained")
    assert ("warning: resuming trained, a training.mode=finetune run, with training.mode="
            "pretrain: its step, optimizer state and schedule go on; to start a pretrain run from "
            "its weights instead, set checkpoint.pretrained=trained and a new "
            "checkpoint.save_dir") in messages, messages
    # a run saved before the samples' order became Megatron-core's is told its order changes
    trainer.cfg.data.mock = False
    same = trainer.cfg.to_dict()
    for version, warned in [(None, True), (1, True), (2, False)]:
        messages.clear()
        meta = {"step": 2, "consumed_samples": 16, "config": same, "parallel": {"dp": 1}}
        if version is not None:
            meta["data_index_version"] = version
        trainer._warn_setting_changes(meta, "old")
        trainer.train_samples, trainer.train_ds = 48, None     # as the datasets built
        trainer._warn_data_order()
        assert any(f"the samples' order itself (data index version {version or 1} -> 2" in m
                   for m in messages) == warned, messages


def _start(rank, world, run_dir, steps, overrides, stop_after_save=False):
    messages = []
    cfg = run_config(Path(run_dir), steps, **overrides)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    if stop_after_save:       # a scheduler's SIGTERM lands while the periodic save runs
        save = trainer.save

        def save_then_sigterm(**kwargs):
            path = save(**kwargs)
            trainer._stop_requested = True
            return path
        trainer.save = save_then_sigterm
    trainer.train()
    return messages


def test_a_fresh_run_does_not_replace_another_runs_checkpoints(tmp_path):
    """checkpoint.load=none (or a checkpoint from elsewhere) in a save dir that holds checkpoints
    would replace them step by step: refused, naming the save dir and the fixes; going back to
    an earlier step of the same save dir is allowed."""
    run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__save_interval=2))
    ckpt = tmp_path / "ckpt"
    before = sorted(p.name for p in ckpt.iterdir())
    for load in ("none", str(tmp_path / "elsewhere" / "step_0000002")):
        if load != "none":
            shutil.copytree(ckpt / "step_0000002", load)
        with pytest.raises(RuntimeError, match=rf"checkpoint.save_dir={ckpt} already holds "
                                               rf"checkpoints up to step_0000004, and this run "
                                               rf".* at step [02] \(checkpoint.load={load}\): its "
                                               rf"saves would replace them; fix: choose a new "
                                               rf"checkpoint.save_dir, or set checkpoint.load="
                                               rf"auto"):
            run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__load=load))
    assert sorted(p.name for p in ckpt.iterdir()) == before
    # the save dir by default is under the run dir: a new run dir (or name) is a fix there too
    run_distributed(_start, 1, str(tmp_path / "d"), 2, dict(checkpoint__save_dir=None))
    with pytest.raises(RuntimeError, match=r"fix: choose a new checkpoint.save_dir \(or "
                                           r"logging.run_dir, under which it is by default\), "
                                           r"or set checkpoint.load=auto"):
        run_distributed(_start, 1, str(tmp_path / "d"), 2,
                        dict(checkpoint__save_dir=None, checkpoint__load="none"))
    assert (tmp_path / "d" / "checkpoints" / "step_0000002").is_dir()
    back = run_distributed(_start, 1, str(tmp_path), 3,
                           dict(checkpoint__load=str(ckpt / "step_0000002")))[0]
    assert any("resumed from" in m and "step_0000002 at step 2" in m for m in back), back
    # a copy of the latest from elsewhere (a converted checkpoint, say) only adds later steps
    shutil.copytree(ckpt / "step_0000004", tmp_path / "converted" / "step_0000004")
    run_distributed(_start, 1, str(tmp_path), 6,
                    dict(checkpoint__load=str(tmp_path / "converted" / "step_0000004")))
    assert (ckpt / "step_0000006").is_dir()


def test_a_save_dir_whose_every_checkpoint_is_damaged_is_not_started_over(tmp_path):
    """checkpoint.load=auto found no complete checkpoint (each has a file cut short, as an
    interrupted copy leaves it) and trained from step 0 over them: refused, naming them and why;
    a damaged checkpoint before a run's start is no reason to refuse."""
    run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__save_interval=2))
    ckpt = tmp_path / "ckpt"
    for step in ("step_0000002", "step_0000004"):
        cut = next(f for f in sorted((ckpt / step).iterdir()) if f.name.startswith("model"))
        cut.write_bytes(cut.read_bytes()[:1000])
    for load in ("auto", "none"):
        with pytest.raises(RuntimeError, match=rf"checkpoint.save_dir={ckpt} holds no complete "
                                               rf"checkpoint, only damaged ones \(step_0000002, "
                                               rf"step_0000004; {ckpt / 'step_0000004'} is not a "
                                               rf"complete checkpoint: model.* has 1000 bytes, "
                                               rf"meta.json records \d+\), and this run starts "
                                               rf"fresh at step 0 \(checkpoint.load={load}\): its "
                                               rf"saves would replace them; fix: restore the "
                                               rf"missing or damaged files"):
            run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__load=load))
    assert sorted(p.name for p in ckpt.iterdir() if p.name != ".lock") == [
        "latest", "step_0000002", "step_0000004"]
    # a run going on from another save dir's step 2 would replace the damaged step 4 too
    run_distributed(_start, 1, str(tmp_path / "later"), 2, dict(checkpoint__save_interval=2))
    elsewhere = str(tmp_path / "later" / "ckpt" / "step_0000002")
    with pytest.raises(RuntimeError, match=rf"only damaged ones \(step_0000004; .*and this run "
                                           rf"continues from {elsewhere} at step 2"):
        run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__load=elsewhere))
    shutil.rmtree(ckpt / "step_0000004")
    run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__load=elsewhere))
    assert (ckpt / "step_0000004").is_dir()


def _sigterm_at_start(rank, world, run_dir, overrides):
    messages = []
    cfg = run_config(Path(run_dir), 6, **overrides)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    trainer._stop_requested = True
    trainer.train()
    return messages


def test_a_linked_step_folder_resumes_and_going_back_saves_the_step_again(tmp_path):
    """A step folder that is a link into the save dir is the save dir's own (auto resumes it);
    a run gone back to an earlier step and stopped at once saves that step again, so `latest`
    names it and not the abandoned later one."""
    run_distributed(_start, 1, str(tmp_path), 4, dict(checkpoint__save_interval=2))
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_0000004").rename(tmp_path / "step_0000004")
    (ckpt / "step_0000004").symlink_to(tmp_path / "step_0000004")
    auto = run_distributed(_sigterm_at_start, 1, str(tmp_path), {})[0]
    assert "SIGTERM: step 4 is saved; stopping" in auto, auto
    back = run_distributed(_sigterm_at_start, 1, str(tmp_path),
                           dict(checkpoint__load=str(ckpt / "step_0000002")))[0]
    assert "SIGTERM: saving step 2 and stopping" in back, back
    assert (ckpt / "latest").read_text().strip() == "step_0000002"


def test_a_sigterm_during_a_save_does_not_save_the_step_again(tmp_path):
    messages = run_distributed(_start, 1, str(tmp_path), 6, dict(checkpoint__save_interval=2),
                               True)[0]
    assert [m for m in messages if m.startswith(("saved", "SIGTERM"))] == [
        f"saved checkpoint {tmp_path / 'ckpt' / 'step_0000002'}", "SIGTERM: step 2 is saved; stopping"]


def _out_of_time_at(rank, world, run_dir, step, overrides):
    """A run whose clock passes training.exit_duration_minutes on rank 1 alone, after `step`."""
    messages = []
    cfg = run_config(Path(run_dir), 8, dp=world, **overrides)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    train_step = trainer.engine.train_step

    def then_late(*args):
        result = train_step(*args)
        if rank == 1 and trainer.step + 1 == step:
            trainer.started -= 3600.0
        return result
    trainer.engine.train_step = then_late
    trainer.train()
    return messages, trainer.step


def test_exit_duration_saves_and_stops_every_rank_at_the_same_step(tmp_path):
    """training.exit_duration_minutes (a job's time limit): the first rank whose clock passes it
    stops every rank at the same step boundary, with a checkpoint of that step; the job ends
    normally, and running it again resumes there."""
    overrides = dict(training__exit_duration_minutes=30, checkpoint__save_interval=0)
    (messages, step), (_, step1) = run_distributed(_out_of_time_at, 2, str(tmp_path), 3, overrides)
    assert step == step1 == 3
    assert "training.exit_duration_minutes=30 has passed: saving step 3 and stopping" in messages
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000003"
    (messages, step), _ = run_distributed(_out_of_time_at, 2, str(tmp_path), 0, overrides)
    assert any("resumed from" in m and "at step 3" in m for m in messages), messages
    assert step == 8


def _on_separate_save_dirs(rank, world, run_dir, steps, startup_check=True):
    """Two ranks whose checkpoint.save_dir are different folders, as on nodes that do not
    share the file system it is on (`startup_check=False`: as if the start-up check had seen a
    marker, a stale view); what each raised."""
    from megagpt.training.trainer import AnotherRankFailed
    cfg = run_config(Path(run_dir), steps, dp=2, checkpoint__save_interval=2)
    if rank == 1:
        cfg.checkpoint.save_dir = str(Path(run_dir) / "node1")
    if not startup_check:
        Trainer._check_save_dir_shared = lambda self: None
    try:
        Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None).train()
    except (CheckpointError, AnotherRankFailed) as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_a_save_dir_not_shared_by_every_rank_is_refused(tmp_path):
    """Each rank read `latest` in its own folder: on nodes without a shared file system the
    ranks resumed different steps without a word, or trained until a save failed with 'free
    space'. Refused at the start; the resume and the save check too, for a stale view."""
    first = run_distributed(_on_separate_save_dirs, 2, str(tmp_path / "a"), 4)
    assert first[0].startswith("AnotherRankFailed"), first
    assert f"checkpoint.save_dir={tmp_path / 'a' / 'node1'}: rank 1 (host " in first[1] and \
        "does not see the folder rank 0 writes; it must be one folder every node shares; fix: " \
        "put it on a file system mounted on every node" in first[1], first[1]
    saving = run_distributed(_on_separate_save_dirs, 2, str(tmp_path / "b"), 4, False)
    assert "a rank does not see the folder rank 0 created" in saving[0], saving
    assert "rank 1 (host " in saving[1] and "does not see the folder" in saving[1] and \
        "checkpoint.save_dir must be one folder every node shares" in saving[1], saving[1]
    run_distributed(_train, 2, str(tmp_path / "c"), 2, dict(dp=2))   # a checkpoint on rank 0's
    resuming = run_distributed(_on_separate_save_dirs, 2, str(tmp_path / "c"), 4, False)
    assert all("the ranks would resume different checkpoints from checkpoint.save_dir=" in e
               and "from none (a fresh start) to step 2" in e for e in resuming), resuming


def _late_from_the_start(rank, world, run_dir):
    """A launch whose start-up alone took longer than training.exit_duration_minutes."""
    messages = []
    cfg = run_config(Path(run_dir), 8, training__exit_duration_minutes=30,
                     checkpoint__save_interval=0)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    trainer.started -= 3600.0
    trainer.train()
    return messages, trainer.step


def test_every_launch_trains_a_step_before_its_time_limit_stops_it(tmp_path):
    """As Megatron's: a launch whose limit passed before its first step trains that step, then
    saves and stops; launched again (a requeue), it gets on by a step, not nowhere."""
    for step in (1, 2):
        messages, trained = run_distributed(_late_from_the_start, 1, str(tmp_path))[0]
        assert trained == step
        assert f"training.exit_duration_minutes=30 has passed: saving step {step} and stopping" \
            in messages


def _saved_states(run_dir, step, world):
    path = Path(run_dir) / "ckpt" / f"step_{step:07d}"
    return [load_checkpoint(path, tp_rank=0, pp_rank=0, dp_rank=r)[1:3] for r in range(world)]


def test_background_saves_equal_foreground_ones_and_resume_exactly(tmp_path):
    """checkpoint.async_save: the periodic checkpoints (steps 3, 6, 9) are written by a thread
    while training goes on, each completed (latest moved to it) before the next one starts; the
    last one in the foreground. They hold what foreground saves hold, and a resume from one
    continues exactly."""
    every = dict(dp=2, checkpoint__save_interval=3, checkpoint__keep_last=0)
    run_distributed(_start, 2, str(tmp_path / "fg"), 10, every)
    messages = run_distributed(_start, 2, str(tmp_path / "bg"), 10,
                               dict(every, checkpoint__async_save=True))[0]
    ckpt = tmp_path / "bg" / "ckpt"
    expected = []
    for step in (3, 6, 9):
        expected += [f"saving checkpoint {ckpt / f'step_{step:07d}'} in the background",
                     f"saved checkpoint {ckpt / f'step_{step:07d}'}"]
    assert [m for m in messages if m.startswith("sav")] == expected + [
        f"saved checkpoint {ckpt / 'step_0000010'}"]
    for step in (3, 6, 9, 10):
        for (fg_model, fg_optim), (bg_model, bg_optim) in zip(_saved_states(tmp_path / "fg", step, 2),
                                                               _saved_states(tmp_path / "bg", step, 2)):
            torch.testing.assert_close(bg_model, fg_model, rtol=0, atol=0)
            torch.testing.assert_close(bg_optim.pop("optimizer"), fg_optim.pop("optimizer"),
                                       rtol=0, atol=0)
            assert bg_optim == fg_optim        # the scaler, layout and skip counts
    run_distributed(_start, 2, str(tmp_path / "bg"), 10,
                    dict(every, checkpoint__async_save=True, checkpoint__load=str(ckpt / "step_0000006")))
    assert losses(tmp_path / "bg") == losses(tmp_path / "fg")


def _host_copy_after_training(rank, world, run_dir):
    cfg = run_config(Path(run_dir), 5, checkpoint__save_interval=2, checkpoint__async_save=True)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    held, save = [], trainer.save

    def noting_save(**kwargs):
        held.append((trainer.step, trainer._host_states is not None))
        return save(**kwargs)
    trainer.save = noting_save
    trainer.train()
    return held, trainer._host_states is None and trainer.pending is None


def test_the_host_copy_is_reused_and_let_go_once_training_ends(tmp_path):
    """The background save of step 4 copies into step 2's host buffers; the foreground save at
    the end lets them go (a checkpoint's worth of memory), not kept for the life of the process."""
    held, let_go = run_distributed(_host_copy_after_training, 1, str(tmp_path))[0]
    assert held == [(2, False), (4, True), (5, True)] and let_go


def _failing_background_save(rank, world, run_dir):
    import megagpt.training.checkpoint as checkpoint
    write = checkpoint._write_rank_files

    def disk_full(tmp, *args):
        if rank == 1:
            raise OSError(28, "No space left on device")
        write(tmp, *args)
    checkpoint._write_rank_files = disk_full
    _start(rank, world, run_dir, 6, dict(dp=2, checkpoint__save_interval=3,
                                         checkpoint__async_save=True))


def test_a_failed_background_save_stops_every_rank_and_names_the_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)CheckpointError: saving .*step_0000003: "
                                           r"(this rank's files were not written in the "
                                           r"background \(No space left on device\); fix: free "
                                           r"space|another rank's files were not written in the "
                                           r"background)"):
        run_distributed(_failing_background_save, 2, str(tmp_path))
    assert not (tmp_path / "ckpt" / "step_0000003").exists()


def _one_rank_fails(rank, world, run_dir, stage, background):
    """Rank 1 fails to write its files, or rank 0 to create the folder or to finalize; returns
    each rank's message (it was a gloo traceback on the others, or a wait in a barrier)."""
    import errno

    import megagpt.training.checkpoint as checkpoint
    write, write_text, mkdir = checkpoint._write_rank_files, checkpoint._write_atomic_text, Path.mkdir

    def disk_full(tmp, *args):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(tmp, *args)

    def meta_fails(path, text):
        if path.name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        write_text(path, text)

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        mkdir(self, *args, **kwargs)

    if stage == "write":
        checkpoint._write_rank_files = disk_full
    elif stage == "finalize":
        checkpoint._write_atomic_text = meta_fails
    else:
        Path.mkdir = read_only
    with pytest.raises(checkpoint.CheckpointError) as info:
        _start(rank, world, run_dir, 2, dict(dp=2, checkpoint__save_interval=1,
                                             checkpoint__async_save=background))
    return str(info.value)


@pytest.mark.parametrize("stage, background", [("write", False), ("finalize", False),
                                               ("create", True), ("finalize", True)])
def test_a_save_that_fails_on_one_rank_is_a_message_on_every_rank(tmp_path, stage, background):
    own, other = run_distributed(_one_rank_fails, 2, str(tmp_path), stage, background)
    if stage == "write":
        own, other = other, own
    step = tmp_path / "ckpt" / "step_0000001"
    expected = {"write": ("this rank's files were not written (No space left on device); fix: "
                          "free space", "another rank's files were not written"),
                "finalize": ("it could not be completed (No space left on device); fix: free "
                             "space", "rank 0 could not complete it"),
                "create": (f"its folder {step}.tmp could not be created (Read-only file "
                           f"system); fix: make checkpoint.save_dir=", "rank 0 could not create "
                                                                       "its folder")}[stage]
    assert own.startswith(f"saving {step}: {expected[0]}"), own
    assert other.startswith(f"saving {step}: {expected[1]} (its own message says why)"), other
    assert "the previous checkpoint is still `latest`" in own + other
    assert not step.exists()


def _failing_foreground_save(rank, world, run_dir):
    import megagpt.training.checkpoint as checkpoint

    def torch_save_on_a_full_disk(*args):       # how torch.save reports it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
    checkpoint._write_rank_files = torch_save_on_a_full_disk
    with pytest.raises(checkpoint.CheckpointError) as info:
        _start(rank, world, run_dir, 2, {})
    return str(info.value)


def _failing_completion(rank, world, run_dir):
    import errno

    import megagpt.training.checkpoint as checkpoint

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoint._write_atomic_text = full                  # meta.json, `latest`
    with pytest.raises(checkpoint.CheckpointError) as info:
        _start(rank, world, run_dir, 2, {})
    return str(info.value)


def test_a_failed_foreground_save_is_a_checkpoint_error_with_the_fix(tmp_path):
    """It was a traceback from torch's zip writer, or from writing meta.json and `latest`."""
    message = run_distributed(_failing_foreground_save, 1, str(tmp_path / "a"))[0]
    assert message.startswith(f"saving {tmp_path / 'a' / 'ckpt' / 'step_0000002'}: this rank's "
                              f"files were not written ([enforce fail at"), message
    assert "fix: free space in checkpoint.save_dir=" in message and "is still `latest`" in message
    message = run_distributed(_failing_completion, 1, str(tmp_path / "b"))[0]
    assert message.startswith(f"saving {tmp_path / 'b' / 'ckpt' / 'step_0000002'}: it could not be "
                              f"completed (No space left on device); fix: free space"), message


def test_a_sigterm_while_a_background_save_runs_completes_it_and_stops(tmp_path):
    messages = run_distributed(_start, 1, str(tmp_path), 9,
                               dict(checkpoint__save_interval=3, checkpoint__async_save=True), True)[0]
    assert [m for m in messages if m.startswith(("sav", "SIGTERM"))] == [
        f"saving checkpoint {tmp_path / 'ckpt' / 'step_0000003'} in the background",
        f"saved checkpoint {tmp_path / 'ckpt' / 'step_0000003'}", "SIGTERM: step 3 is saved; stopping"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000003"


def _missing_data(rank, world, run_dir, failing_rank):
    cfg = run_config(Path(run_dir), 2, dp=2, data__mock=rank != failing_rank,
                     data__train_data_path=[str(Path(run_dir) / "nowhere_text_document")])
    try:
        Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    except Exception as e:
        return type(e).__name__, str(e)
    return "built", ""


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_data_error_on_one_rank_stops_the_others_without_a_word(tmp_path, failing_rank):
    """Rank 0 builds the datasets first, then the others (a rank may see other files: another
    node's disk); when one fails, the rest stop with AnotherRankFailed (pretrain_gpt exits 1
    quietly there) instead of a broken collective's traceback."""
    out = run_distributed(_missing_data, 2, str(tmp_path), failing_rank)
    kinds = [kind for kind, _ in out]
    assert kinds[failing_rank] == "DatasetBuildError" and "fix:" in out[failing_rank][1]
    assert kinds[1 - failing_rank] == "AnotherRankFailed"


def _resume_with_optimizer_settings(rank, world, run_dir, overrides):
    messages = []
    cfg = run_config(Path(run_dir), 6, **overrides)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    trainer.train(until=2 if not overrides else 3)
    return messages, [(g["weight_decay"], g["betas"], g["eps"])
                      for g in trainer.engine.optimizer.param_groups]


def test_a_resume_applies_the_configs_optimizer_settings(tmp_path):
    saved = run_distributed(_resume_with_optimizer_settings, 1, str(tmp_path), {})[0][1]
    assert saved == [(0.1, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)]
    changed = dict(training__weight_decay=0.0, training__adam_beta2=0.99, training__adam_eps=1e-6)
    messages, groups = run_distributed(_resume_with_optimizer_settings, 1, str(tmp_path), changed)[0]
    assert groups == [(0.0, (0.9, 0.99), 1e-6), (0.0, (0.9, 0.99), 1e-6)]
    assert any("other optimizer settings (training.weight_decay 0.1 -> 0.0, training.adam_beta2 "
               "0.95 -> 0.99, training.adam_eps 1e-08 -> 1e-06); they apply from step 2 on" in m
               for m in messages), messages


def _weighted_validation(rank, world, run_dir):
    cfg = run_config(Path(run_dir), 2, training__eval_interval=1, training__eval_iters=2)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    losses, counts = iter([1.0, 4.0]), iter([10, 30])
    trainer.engine.eval_step = lambda batch: next(losses)
    trainer.engine.global_tokens = lambda batch: next(counts)
    return trainer.evaluate()


def test_validation_is_a_mean_over_tokens_not_over_batches(tmp_path):
    assert run_distributed(_weighted_validation, 1, str(tmp_path))[0] == pytest.approx(
        (1.0 * 10 + 4.0 * 30) / 40)      # the mean of the two batches' means would be 2.5


def _throughput_tokens(rank, world, run_dir):
    """The tokens a fine-tuning run's step timer counts, and the global batch's size."""
    from megagpt.training import trainer as trainer_module
    counted = []

    class RecordingTimer(trainer_module.StepTimer):
        def step(self, tokens):
            counted.append(tokens)
            return super().step(tokens)

    trainer_module.StepTimer = RecordingTimer
    cfg = run_config(Path(run_dir), 2, model__vocab_size=50257, training__mode="finetune",
                     data__mock=False, data__format="sft", data__train_data_path=[SFT_DATA],
                     data__split="90,10,0")
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    trainer.train()
    return counted, trainer.global_batch * cfg.model.seq_length


def test_throughput_counts_every_token_of_a_fine_tuning_batch(tmp_path):
    counted, processed = run_distributed(_throughput_tokens, 1, str(tmp_path))[0]
    assert counted == [processed, processed]   # not only the response tokens the loss counts


def _resume_with_buckets(rank, world, run_dir, steps, bucket_mb):
    cfg = run_config(Path(run_dir), 10, dp=2, zero=1, parallel__bucket_size_mb=bucket_mb)
    ps = state.initialize_parallel(1, 1)
    Trainer(cfg, ps, log=lambda *a: None).train(until=steps)


def test_optimizer_state_for_other_pieces_is_refused(tmp_path):
    """ZeRO-1 state saved with one bucket size, resumed with another: the shards hold other
    pieces of other parameters, so the moments would land on the wrong ones; refused, naming the
    first difference and the way out."""
    run_distributed(_resume_with_buckets, 2, str(tmp_path), 5, 25.0)
    with pytest.raises(RuntimeError, match=r"its optimizer state is for \d+ parameter pieces, "
                                           r"this run's optimizer steps \d+, and they differ first "
                                           r"at position \d+: .*--to megagpt"):
        run_distributed(_resume_with_buckets, 2, str(tmp_path), 7, 0.02)


def _ignored_label_losses(rank, world):
    """The engine's loss of one batch with half its tokens left out by loss_mask 0, by labels
    of -100, and by both; then a batch of only -100 labels trained."""
    from megagpt.testing import fixed_batches, split_microbatches
    from megagpt.training.engine import Engine
    cfg = tiny_config(model__vocab_size=1001)
    engine = Engine(cfg, state.initialize_parallel(1, 1), "cpu")
    batch = split_microbatches(fixed_batches(1)[0], 0, 1, 2)
    masked = [dict(mb, loss_mask=torch.ones_like(mb["loss_mask"]).index_fill(1, torch.arange(8), 0))
              for mb in batch]
    ignored = [dict(mb, labels=mb["labels"].index_fill(1, torch.arange(8), -100),
                    loss_mask=torch.ones_like(mb["loss_mask"])) for mb in batch]
    no_mask = [{k: v for k, v in mb.items() if k != "loss_mask"} for mb in ignored]
    # masked out and pointing at a padding column (1001..1023): never read, not NaN
    padding = [dict(mb, labels=mb["labels"].index_fill(1, torch.arange(8), 1020)) for mb in masked]
    losses = [engine.eval_step(b) for b in (masked, ignored, no_mask, padding)]
    all_ignored = [dict(mb, labels=torch.full_like(mb["labels"], -100)) for mb in batch]
    return losses, engine.train_step(all_ignored, 1e-3)


def test_labels_of_minus_100_count_as_masked_tokens_in_the_step(tmp_path):
    """The engine divided the loss by a token count that included the -100 labels (half the
    loss here), and trained a step of only -100 labels; a masked label in the vocabulary's
    padding made the loss NaN on the torch path."""
    losses, step = run_distributed(_ignored_label_losses, 1)[0]
    assert math.isfinite(losses[0]) and losses == [losses[0]] * 4, losses
    assert step.skipped and step.tokens == 0


def _nan_steps(rank, world, run_dir, bad_steps, max_skipped, until=None, **overrides):
    cfg = run_config(Path(run_dir), 8, dp=2, training__max_skipped_steps=max_skipped, **overrides)
    ps = state.initialize_parallel(1, 1)
    trainer = Trainer(cfg, ps, log=lambda *a: None)
    if cfg.checkpoint.async_save:       # a writer slow enough to be busy when the run aborts
        import megagpt.training.checkpoint as checkpoint
        write = checkpoint._write_rank_files
        checkpoint._write_rank_files = lambda *args: (time.sleep(1.5), write(*args))
    engine = trainer.engine
    schedule = engine.schedule

    def poisoned(*args, **kwargs):
        if not (trainer.step in bad_steps and rank == 1):  # only one rank sees the NaN
            return schedule(*args, **kwargs)
        weight = engine.chunks[0].layers["0"].mlp.fc1.weight
        hook = weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
        try:
            return schedule(*args, **kwargs)
        finally:
            hook.remove()

    engine.schedule = poisoned
    try:
        trainer.train(until=until)
    except TrainingAborted as e:
        return ("aborted", str(e), trainer.step, trainer.skipped_total)
    return ("done", "", trainer.step, trainer.skipped_total)


def test_an_abort_keeps_the_background_save_in_progress(tmp_path):
    """max_skipped_steps stops every rank at the same step: the checkpoint a thread is still
    writing is completed first, so the run can resume from it as the message says."""
    out = run_distributed(_nan_steps, 2, str(tmp_path), {4, 5}, 2, None,
                          checkpoint__save_interval=3, checkpoint__async_save=True)
    assert [o[:1] + o[2:3] for o in out] == [("aborted", 6), ("aborted", 6)]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000003"


def test_a_nan_gradient_skips_the_step_on_every_rank(tmp_path):
    out = run_distributed(_nan_steps, 2, str(tmp_path), {2, 5}, 3)
    assert [o[0] for o in out] == ["done", "done"]
    assert [o[3] for o in out] == [2, 2]                     # counted on both ranks
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "skipped" in r] == [0, 0, 1, 1, 1, 2, 2, 2]
    # the schedule counts updates made (Megatron's): a skipped step leaves the rate where it was
    lrs = [r["lr"] for r in records if "lr" in r]
    updates_before = [0, 1, 2, 2, 3, 4, 4, 5]    # steps 3 and 6 (1-based) were skipped
    schedule = run_config(tmp_path, 8, dp=2).training
    assert lrs == pytest.approx([lr_at(n, schedule) for n in updates_before])


def test_the_count_of_skips_in_a_row_survives_a_resume(tmp_path):
    """Steps 4 and 5 non-finite, a checkpoint at step 5, then step 6 non-finite after the resume:
    three in a row, the limit."""
    out = run_distributed(_nan_steps, 2, str(tmp_path), {3, 4}, 3, 5)
    assert out[0][:1] == ("done",) and out[0][2:] == (5, 2)
    out = run_distributed(_nan_steps, 2, str(tmp_path), {5}, 3)
    status, message, step, skipped = out[0]
    assert status == "aborted" and step == 6 and skipped == 3, out[0]


def test_repeated_non_finite_steps_abort_with_a_message(tmp_path):
    """The step that aborts is recorded (in metrics.jsonl and the console) before the run
    stops, whatever the log interval."""
    out = run_distributed(_nan_steps, 2, str(tmp_path), {2, 3, 4, 5}, 3, None,
                          training__log_interval=4)
    status, message, step, skipped = out[0]
    assert status == "aborted" and step == 5 and skipped == 3
    assert "3 consecutive steps had a non-finite loss or gradient (training.max_skipped_steps=3)" in message
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["grad_norm"], r["skipped"]) for r in records if "skipped" in r][-1] == \
        (5, None, 3)                              # the poisoned gradient's norm: not finite
    assert [r["step"] for r in records if "skipped" in r] == [4, 5]


def _fp16_from_scale(rank, world, run_dir, initial_scale, min_scale):
    from megagpt.training.precision import DynamicLossScaler
    messages = []
    cfg = run_config(Path(run_dir), 14, training__precision="fp16",
                     training__max_skipped_steps=2)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    trainer.engine.scaler = DynamicLossScaler(initial_scale, min_scale=min_scale)
    try:
        trainer.train()
    except TrainingAborted as e:
        return "aborted", str(e), trainer.skipped_total, trainer.engine.scaler.scale
    return "done", messages, trainer.skipped_total, trainer.engine.scaler.scale


def test_fp16_overflows_lower_the_scale_without_stopping_the_run(tmp_path):
    """A loss scale far too high overflows the fp16 gradients for several steps in a row while
    the scaler backs off: those skips are the scaler's work, not a fault (they counted toward
    max_skipped_steps, 2 here, and stopped the run); once the scale is at its minimum, a skip is
    a fault again."""
    status, messages, skipped, scale = run_distributed(_fp16_from_scale, 1, str(tmp_path / "a"),
                                                       2.0 ** 40, 1.0)[0]
    assert status == "done" and skipped >= 3 and scale < 2.0 ** 40, (status, messages)
    assert sum("fp16 gradients overflowed" in m for m in messages) == skipped
    status, message, skipped, _ = run_distributed(_fp16_from_scale, 1, str(tmp_path / "b"),
                                                  2.0 ** 40, 2.0 ** 40)[0]
    assert status == "aborted" and skipped == 2, message


def _fresh_run(rank, world, run_dir, save_dir):
    cfg = run_config(Path(run_dir), 3, checkpoint__save_dir=str(Path(run_dir) / save_dir))
    Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None).train()


def test_a_fresh_run_into_a_used_run_dir_sets_the_old_metrics_aside(tmp_path):
    """A run that starts at step 0 where another wrote its metrics moves that file aside
    (metrics.jsonl.previous-<date-time>): one file, one run's steps."""
    run_distributed(_fresh_run, 1, str(tmp_path), "ckpt")
    run_distributed(_fresh_run, 1, str(tmp_path), "other_ckpt")
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3]
    (kept,) = tmp_path.glob("metrics.jsonl.previous-*")
    assert [json.loads(x)["step"] for x in kept.read_text().splitlines()
            if "loss" in json.loads(x)] == [1, 2, 3]


def _fp16_resume(rank, world, run_dir, until):
    from megagpt.training.precision import DynamicLossScaler
    cfg = run_config(Path(run_dir), 10, training__precision="fp16")
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    if trainer.step == 0:         # a scale far too high: the run backs it off, skipping steps
        trainer.engine.scaler = DynamicLossScaler(2.0 ** 40)
    trainer.train(until=until)
    return trainer.engine.scaler.state_dict(), trainer.skipped_total


def test_an_fp16_resume_continues_the_loss_scale(tmp_path):
    """The loss scaler's state (scale, growth and hysteresis counts) comes back with the
    checkpoint: a resumed fp16 run backs off and grows as the straight run does, and its losses
    are the same (without it, the scale restarted at 2**16 and the losses parted at step 7)."""
    straight = run_distributed(_fp16_resume, 1, str(tmp_path / "a"), 10)[0]
    run_distributed(_fp16_resume, 1, str(tmp_path / "b"), 5)
    resumed = run_distributed(_fp16_resume, 1, str(tmp_path / "b"), 10)[0]
    assert straight == resumed and straight[0]["scale"] < 2.0 ** 40 and straight[1] > 5
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_metrics_reach_weights_and_biases_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    """logging.wandb_project with the real wandb package, offline: the run's id is kept in the
    run dir, its records are written under <run_dir>/wandb/, and a resume logs to the same id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = dict(logging__wandb_project="megagpt-tests", checkpoint__save_interval=2)
    run_distributed(_resume_with, 1, str(tmp_path), 4, 2, overrides)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    # wandb names an offline run's folder by the second it starts, and these runs take less
    # than one: the resume starts in the next second, so that its records get a folder of their own
    time.sleep(1.0 - time.time() % 1.0)
    run_distributed(_resume_with, 1, str(tmp_path), 4, 4, overrides)
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list((tmp_path / "wandb").iterdir())
    for f in files:            # the records' keys are in W&B's own binary log
        assert b"grad_norm" in f.read_bytes() and b"tokens_per_s" in f.read_bytes()


def _wandb_init_fails(rank, world, run_dir):
    import importlib.machinery
    import types
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")
    fake.init = init
    sys.modules["wandb"] = fake
    cfg = run_config(Path(run_dir), 2, dp=world, logging__wandb_project="p")
    try:
        Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None).train()
    except Exception as e:
        return type(e).__name__, str(e)
    return "trained", ""


def _wandb_run_of_a_failing_step(rank, world, run_dir):
    import importlib.machinery
    import types
    finished = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: types.SimpleNamespace(
        log=lambda values, step: None, finish=lambda exit_code: finished.append(exit_code))
    sys.modules["wandb"] = fake
    cfg = run_config(Path(run_dir), 4, logging__wandb_project="p")
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    step = trainer.engine.train_step

    def fails_at_3(microbatches, lr):
        if trainer.step == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return step(microbatches, lr)
    trainer.engine.train_step = fails_at_3
    with pytest.raises(RuntimeError, match="illegal memory access"):
        trainer.train()
    return finished


def test_a_run_stopped_by_an_error_finishes_its_wandb_run_as_failed(tmp_path):
    assert run_distributed(_wandb_run_of_a_failing_step, 1, str(tmp_path))[0] == [1]


def test_a_failed_wandb_start_stops_every_rank_with_the_fix(tmp_path):
    """Only rank 0 starts the W&B run: when that fails (not logged in), the other ranks are
    told and stop, instead of waiting in the first collective until its timeout."""
    (kind0, message), (kind1, _) = run_distributed(_wandb_init_fails, 2, str(tmp_path))
    assert kind0 == "WandbError" and kind1 == "AnotherRankFailed"
    assert message.startswith("logging.wandb_project=p: wandb.init failed (api_key not "
                              "configured (no-tty)); fix: `wandb login` or WANDB_API_KEY")


def test_wandb_without_the_package_is_refused_on_every_rank(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = run_config(tmp_path, 2, logging__wandb_project="p")
    with pytest.raises(ValueError, match=r"logging.wandb_project=p: the wandb package is not "
                                         r"installed; fix: pip install wandb"):
        Trainer(cfg, None)
    assert any("the wandb package is not installed" in p for p in output_problems(cfg))


def test_wandb_that_does_not_import_is_refused_with_the_error(tmp_path, monkeypatch):
    """An installed wandb whose import fails (a broken install) was a traceback after the
    banner; it is refused before the run, as a missing one is."""
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('cannot import name x from protobuf')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "shim"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    cfg = run_config(tmp_path, 2, logging__wandb_project="p")
    with pytest.raises(ValueError, match=r"logging.wandb_project=p: the wandb package is installed "
                                         r"but does not import \(ImportError: cannot import name x "
                                         r"from protobuf\); fix: repair it"):
        Trainer(cfg, None)


def test_max_skipped_steps_zero_never_aborts(tmp_path):
    out = run_distributed(_nan_steps, 2, str(tmp_path), {2, 3, 4, 5}, 0)
    assert [o[0] for o in out] == ["done", "done"] and out[0][3] == 4, out


def _masked_out_at(rank, world, run_dir, empty_step, only_rank=None):
    """Every loss_mask of step `empty_step`'s micro-batches zeroed (on `only_rank`, or on all)."""
    messages = []
    cfg = run_config(Path(run_dir), 5, dp=world, training__max_skipped_steps=1)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    train_step, weights = trainer.engine.train_step, {}

    def masked(microbatches, lr):
        if trainer.step + 1 == empty_step and only_rank in (None, rank):
            for mb in microbatches:
                mb["loss_mask"] = torch.zeros(mb["labels"].shape)
        before = [p.detach().clone() for p in trainer.engine.chunks[0].parameters()]
        result = train_step(microbatches, lr)
        weights[trainer.step + 1] = all(torch.equal(a, b) for a, b in zip(
            before, trainer.engine.chunks[0].parameters()))
        return result
    trainer.engine.train_step = masked
    trainer.train()
    return messages, weights, trainer.skipped_total, logging.getLogger("megagpt").level


def test_a_global_batch_without_loss_tokens_is_skipped_not_counted_as_a_fault(tmp_path):
    """Fine-tuning batches whose every loss_mask is 0 (prompts filling the window): the step was
    logged as loss 0 and still moved the weights (AdamW's momentum and decay). It is skipped on
    every rank, logged, its loss null, and it does not count toward max_skipped_steps (1 here);
    a batch empty on one replica only is an ordinary step."""
    out = run_distributed(_masked_out_at, 2, str(tmp_path / "all"), 3)
    for messages, unchanged, skipped, _ in out:
        assert unchanged == {1: False, 2: False, 3: True, 4: False, 5: False} and skipped == 1
    assert any("step 3: no token of the global batch counts in the loss" in m for m in out[0][0])
    records = [json.loads(x) for x in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"] is None, r["skipped"]) for r in records][2] == (3, True, 1)
    assert records[2]["tokens_per_s"] == 0 < records[3]["tokens_per_s"]   # no forward, no tokens
    # every rank reads the same data: its warnings (skipped lines, cut examples) come from rank 0
    assert out[0][3] != logging.ERROR and out[1][3] == logging.ERROR
    out = run_distributed(_masked_out_at, 2, str(tmp_path / "one"), 3, 1)
    assert [o[1][3] for o in out] == [False, False] and out[0][2] == 0


def _peaks_per_rank(rank, world, run_dir, peaks):
    """Train 3 steps, logging at steps 2 and 3, with this rank's peak memory read from `peaks`."""
    import megagpt.training.trainer as trainer_module
    reads = iter(peaks[rank])
    trainer_module.memory_gb = lambda device: next(reads)   # as torch.cuda.max_memory_allocated
    cfg = tiny_config(pp=2, steps=3, checkpoint__save_dir=str(Path(run_dir) / "ckpt"),
                      logging__run_dir=run_dir, logging__progress_bar=False,
                      training__log_interval=2, training__eval_interval=0, data__num_workers=0)
    trainer = Trainer(cfg, state.initialize_parallel(1, 2), log=lambda *a: None)
    return trainer.train()["mem_gb"]


def test_the_logged_peak_memory_is_the_largest_of_any_rank(tmp_path):
    """Rank 0 (pipeline stage 0) writes metrics.jsonl; mem_gb is the MAX over every rank, reduced
    at each log step, here stage 1's at step 2 and stage 0's at step 3."""
    peaks = {0: [1.5, 5.0], 1: [3.25, 2.0]}
    last = run_distributed(_peaks_per_rank, 2, str(tmp_path), peaks)
    assert last == [5.0, 5.0]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["mem_gb"]) for r in records] == [(2, 3.25), (3, 5.0)]


def test_the_peak_memory_stays_null_on_cpus_with_several_ranks(tmp_path):
    run_distributed(_train, 2, str(tmp_path), 2, dict(dp=2))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["mem_gb"] for r in records] == [None, None]


class _WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


def check_worker_shield() -> None:
    """A loader worker outlives a SIGTERM from another process (a scheduler's) and ends on its
    trainer's (the loader ending it)."""
    loader = torch.utils.data.DataLoader(_WorkerPids(), batch_size=1, num_workers=1,
                                         **loader_worker_options(1))
    batches = iter(loader)
    pid = int(next(batches))
    worker = next(p for p in multiprocessing.active_children() if p.pid == pid)
    subprocess.run(["kill", "-TERM", str(pid)], check=True)     # a scheduler's SIGTERM
    time.sleep(1.0)
    assert worker.is_alive()
    assert [int(next(batches)) for _ in range(3)] == [pid] * 3
    os.kill(pid, signal.SIGTERM)                                  # the loader ending its worker
    worker.join(timeout=10)
    assert worker.exitcode == 0


@pytest.mark.skipif(not WORKERS_SHIELDED, reason="the shield is Linux-only (sigwaitinfo)")
def test_a_loader_worker_ends_on_the_trainers_sigterm_and_outlives_anyone_elses():
    check_worker_shield()


@pytest.mark.skipif(not WORKERS_SHIELDED, reason="the shield is Linux-only (sigwaitinfo)")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_worker_shield_holds_whatever_the_default_start_method(method):
    """Python 3.14 makes forkserver the default; a spawned worker has library threads that the
    shield could not cover, so the workers are forked whatever the default."""
    code = (f"import multiprocessing; multiprocessing.set_start_method({method!r}); "
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_trainer; test_trainer.check_worker_shield(); print('held')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "held" in result.stdout, result.stderr[-3000:]


def _stray_sigterm_then_shield(trainer_pid, worker_id):
    """A scheduler's SIGTERM landing before the shield is up (the window a new evaluation
    loader's workers open), then the shield."""
    subprocess.run(["kill", "-TERM", str(os.getpid())], check=True)
    time.sleep(0.3)
    shield_worker_from_stray_sigterm(trainer_pid, worker_id)


@pytest.mark.skipif(not WORKERS_SHIELDED, reason="the shield is Linux-only (sigwaitinfo)")
def test_a_sigterm_before_the_shield_is_up_waits_for_it():
    loader = torch.utils.data.DataLoader(
        _WorkerPids(), batch_size=1, num_workers=1, multiprocessing_context="fork",
        worker_init_fn=functools.partial(_stray_sigterm_then_shield, os.getpid()))
    batches = start_loader(loader)
    pid = int(next(batches))
    assert [int(next(batches)) for _ in range(3)] == [pid] * 3
    del batches


def _ignore_sigterm_and_wait():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_children_that_ignore_sigterm_are_killed_after_the_grace_period():
    """The exit hook bounds what multiprocessing's own exit would wait for without a limit."""
    child = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait, daemon=True)
    child.start()
    time.sleep(0.5)
    start = time.monotonic()
    end_daemonic_children(grace_s=1.0)
    assert child.exitcode == -signal.SIGKILL
    assert time.monotonic() - start < 5


@pytest.mark.slow
@pytest.mark.parametrize("workers, to_group", [(0, False), (2, True)],
                         ids=["the-trainer", "its-process-group-with-loader-workers"])
def test_sigterm_saves_and_exits_zero(tmp_path, workers, to_group):
    """SIGTERM to the trainer, or to its whole process group as a scheduler sends it (the data
    loader's workers too), saves a checkpoint and exits 0."""
    cmd = [sys.executable, "pretrain_gpt.py", "--config", "configs/training/tiny_model.json",
           "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
           "--parallel.pipeline_parallel_size=1", "--data.mock=true",
           f"--data.num_workers={workers}",
           "--training.max_steps=100000", "--training.log_interval=1", "--training.eval_interval=2",
           "--training.eval_iters=1",
           "--checkpoint.save_interval=0", f"--logging.run_dir={tmp_path}",
           f"--checkpoint.save_dir={tmp_path / 'checkpoints'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=to_group)
    metrics = tmp_path / "metrics.jsonl"
    output = sigterm_when_ready(
        proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2,
        to_group=to_group, wait=120)
    assert proc.returncode == 0, output
    assert "SIGTERM: saving step" in output
    if to_group:                        # and no worker outlives the run
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "checkpoints" / latest / "meta.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_without_a_traceback(tmp_path):
    """Ctrl-C reaches the trainer's whole process group (its loader workers too): one line says
    what was kept and how to stop with a checkpoint, no rank or worker prints a traceback, and
    the status is the shell's for SIGINT."""
    cmd = [sys.executable, "pretrain_gpt.py", "--config", "configs/training/tiny_model.json",
           "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
           "--parallel.pipeline_parallel_size=1", "--data.mock=true", "--data.num_workers=2",
           "--training.max_steps=100000", "--training.log_interval=1", "--training.eval_interval=0",
           "--checkpoint.save_interval=0", f"--logging.run_dir={tmp_path}",
           f"--checkpoint.save_dir={tmp_path / 'checkpoints'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    output = sigterm_when_ready(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2,
                                to_group=True, wait=120, signum=signal.SIGINT)
    assert proc.returncode == 130, output
    assert (f"interrupted (Ctrl-C): stopped without saving; no checkpoint in "
            f"{tmp_path / 'checkpoints'} yet; to stop with a checkpoint, send SIGTERM") in output
    assert "Traceback" not in output, output


def test_ctrl_c_names_the_checkpoint_to_resume_from_and_how():
    from pretrain_gpt import kept_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(logging__run_dir=tmp)               # save dir by default in the run dir
        assert kept_checkpoint(cfg) == f"no checkpoint in {tmp}/checkpoints yet"
        step = Path(tmp) / "checkpoints" / "step_0000004"
        step.mkdir(parents=True)
        (step / "model.pt").write_text("x")
        (step / "meta.json").write_text(json.dumps({"step": 4, "files": {"model.pt": "sha"}}))
        (step.parent / "latest").write_text("step_0000004\n")
        assert kept_checkpoint(cfg) == f"the last checkpoint is {step}; the same command resumes from it"
        cfg.checkpoint.load = "none"
        assert kept_checkpoint(cfg) == (f"the last checkpoint is {step}; to resume from it, set "
                                        f"checkpoint.load=auto (it is none)")


ONE_PROCESS = [sys.executable, "pretrain_gpt.py", "--config", "configs/training/tiny_model.json",
               "--parallel.world_size=1", "--parallel.tensor_parallel_size=1",
               "--parallel.pipeline_parallel_size=1", "--data.num_workers=0",
               "--training.eval_interval=0"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--data.train_data_path=[\"runs/nowhere/shakespeare_text_document.bin\"]"],
     "error: data.train_data_path: indexed dataset 'runs/nowhere/shakespeare_text_document.bin': "),
    (["--data.tokenizer_path=runs/nowhere/tokenizer"],
     "error: data.tokenizer_path 'runs/nowhere/tokenizer' does not exist; fix: give \"gpt2\""),
    (["--checkpoint.pretrained=runs/nowhere/gpt2", "--data.mock=true"],
     "error: checkpoint.pretrained=runs/nowhere/gpt2 does not exist; fix: point it at a "
     "checkpoint of ours of this architecture: train it first"),
    (["--kernels.layernorm=triton", "--data.mock=true"],
     "error: kernels.layernorm=triton: the Triton kernels cannot run on cpu"),
    (["--training.optimizer=apex", "--data.mock=true"],
     "error: training.optimizer=\"apex\": apex.optimizers.FusedAdam is not importable"),
])
def test_a_bad_path_is_one_message_not_a_traceback(tmp_path, args, message):
    cmd = [*ONE_PROCESS, f"--logging.run_dir={tmp_path}", f"--checkpoint.save_dir={tmp_path / 'c'}",
           *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_missing_pretrained_folder_of_a_gpt2_size_names_its_download():
    """Only a GPT-2 architecture is offered OpenAI's weights (the tiny model was offered them)."""
    from megagpt.config import load_config
    from megagpt.convert import ConversionError
    from megagpt.training.trainer import pretrained_state
    model = load_config(ROOT / "configs" / "training" / "base_model.json").model
    with pytest.raises(ConversionError, match="`hf download gpt2-medium config.json "
                                              "model.safetensors --local-dir runs/nowhere`"):
        pretrained_state("runs/nowhere", model)


def test_output_folders_that_cannot_be_written_are_named_before_training(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    bad = run_config(tmp_path, 2, checkpoint__save_dir=str(tmp_path / "afile"),
                     logging__metrics_file=str(tmp_path / "afile" / "sub" / "m.jsonl"))
    assert output_problems(bad) == [
        f"checkpoint.save_dir={tmp_path / 'afile'}: cannot write there ({tmp_path / 'afile'} is "
        f"a file); fix: choose another path",
        f"logging.metrics_file={tmp_path / 'afile' / 'sub' / 'm.jsonl'}: cannot write there "
        f"({tmp_path / 'afile'} is a file); fix: choose another path"]
    defaults = run_config(tmp_path, 2, checkpoint__save_dir=None,
                          logging__run_dir=str(tmp_path / "afile" / "run"))
    assert output_problems(defaults)[0].startswith(
        f"checkpoint.save_dir (default {tmp_path / 'afile' / 'run' / 'checkpoints'}, under "
        f"logging.run_dir={tmp_path / 'afile' / 'run'}): cannot write there")
    assert output_problems(run_config(tmp_path / "new" / "run", 2)) == []


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_a_config_problem_is_printed_by_rank_zero_only(monkeypatch, capsys, rank, shown):
    import runpy
    main = runpy.run_path(str(ROOT / "pretrain_gpt.py"))["main"]
    monkeypatch.setenv("RANK", rank)
    assert main(["--config", str(ROOT / "configs/training/tiny_model.json"),
                 "--training.learnig_rate=1"]) == 1
    err = capsys.readouterr().err
    assert ("training.learnig_rate=1: unknown field; did you mean training.learning_rate?" in err) \
        == shown, err


@pytest.mark.slow
def test_a_save_dir_that_is_a_file_is_one_message_before_training(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = subprocess.run([*ONE_PROCESS, "--data.mock=true", f"--logging.run_dir={tmp_path}",
                             f"--checkpoint.save_dir={tmp_path / 'afile'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"checkpoint.save_dir={tmp_path / 'afile'}: cannot write there" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_an_id_beyond_the_vocabulary_read_in_a_loader_worker_is_one_message(tmp_path):
    from megagpt.data.indexed import write_documents
    prefix = write_documents(tmp_path / "d", [list(range(200))] * 20 + [[60000] * 200]).prefix
    cmd = [*ONE_PROCESS, "--data.num_workers=2", f"--data.train_data_path=[\"{prefix}\"]",
           "--data.split=1,0,0", f"--data.cache_dir={tmp_path / 'k'}", "--training.max_steps=20",
           "--training.warmup_steps=1", f"--logging.run_dir={tmp_path}",
           f"--checkpoint.save_dir={tmp_path / 'c'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "holds token id 60000, but model.vocab_size=50257" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path):
    cmd = [*ONE_PROCESS, "--data.mock=true", "--training.max_steps=2", "--training.warmup_steps=1",
           "--training.log_interval=1",
           f"--logging.run_dir={tmp_path}", f"--checkpoint.save_dir={tmp_path / 'c'}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert ("nothing to train: the run resumed at step 2, and training.max_steps=2; fix: raise "
            "training.max_steps") in again.stdout


SFT_DATA = str(ROOT / "megagpt" / "data" / "assets" / "sft_example.jsonl")


def _pretrain_then_finetune(rank, world, run_dir, layout):
    """Pretrain 2 steps on one layout (mock data, GPT-2 vocabulary); fine-tune on another."""
    run_dir = Path(run_dir)
    model = dict(model__vocab_size=50257)
    tp, dp = layout
    cfg = run_config(run_dir / "pre", 2, tp=tp, dp=dp, **model)
    ps = state.initialize_parallel(tp, 1)
    pre = Trainer(cfg, ps, log=lambda *a: None)
    pre.train()
    pre_weights = gather_full_state_dict(pre.engine.chunks[0])
    state.destroy_parallel()
    ft_tp, ft_dp = dp, tp                    # the other layout: (2, 1) <-> (1, 2)
    ft_cfg = run_config(run_dir / "ft", 2, tp=ft_tp, dp=ft_dp, **model, training__mode="finetune",
                        data__mock=False, data__format="sft", data__train_data_path=[SFT_DATA],
                        data__split="90,10,0", checkpoint__pretrained=str(run_dir / "pre" / "ckpt"))
    ps = state.initialize_parallel(ft_tp, 1)
    messages = []
    ft = Trainer(ft_cfg, ps, log=messages.append)
    start_weights = gather_full_state_dict(ft.engine.chunks[0])
    step = next(ft._batches(ft.train_ds, 0))
    mask = torch.cat([mb["loss_mask"] for mb in step])
    result = ft.engine.train_step(step, 1e-4)
    return dict(pre=pre_weights, start=start_weights, mask_sum=float(mask.sum()), numel=mask.numel(),
                tokens=result.tokens, loss=result.loss, messages=messages, dp=ft_dp)


@pytest.mark.slow
def test_finetuning_starts_from_a_pretraining_checkpoint_of_another_layout(tmp_path):
    out = run_distributed(_pretrain_then_finetune, 2, str(tmp_path), (2, 1))
    r = out[0]
    for k, v in r["pre"].items():                 # TP2 weights arrive whole in the DP2 run
        assert torch.equal(r["start"][k], v), k
    assert any("initialised the weights from" in m for m in r["messages"])
    assert 0 < r["mask_sum"] < r["numel"]         # prompts carry no loss
    assert r["tokens"] == sum(o["mask_sum"] for o in out)   # the loss counts masked tokens only
    assert torch.isfinite(torch.tensor(r["loss"]))


def test_finetune_mode_needs_fine_tuning_data():
    from megagpt.config import ConfigError
    with pytest.raises(ConfigError, match="training.mode=finetune: trains on fine-tuning data"):
        tiny_config(training__mode="finetune", data__mock=False, data__train_data_path=["x"])


def _from_hf_folder(rank, world, run_dir, hf_dir):
    cfg = run_config(Path(run_dir), 2, checkpoint__pretrained=hf_dir)
    ps = state.initialize_parallel(1, 1)
    trainer = Trainer(cfg, ps, log=lambda *a: None)
    return gather_full_state_dict(trainer.engine.chunks[0])


def test_finetuning_can_start_from_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megagpt.hf import from_hf, hf_config_dict
    m = tiny_config().model
    hf_cfg = dict(hf_config_dict(m), n_positions=2 * m.seq_length)   # more positions than used
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    model.save_pretrained(tmp_path / "hf")
    weights = run_distributed(_from_hf_folder, 1, str(tmp_path / "run"), str(tmp_path / "hf"))[0]
    expected = from_hf(model.state_dict(), m)
    for k, v in expected.items():
        assert torch.equal(weights[k], v), k


def test_pretrained_weights_of_another_architecture_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megagpt.hf import hf_config_dict
    m = tiny_config().model
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**dict(hf_config_dict(m), n_layer=2))) \
        .save_pretrained(tmp_path / "hf")
    # a CheckpointError: pretrain_gpt prints it as one message, not a traceback
    with pytest.raises(RuntimeError, match=r"(?s)CheckpointError: checkpoint.pretrained does not "
                                           r"fit this config:.*has model.n_layers=2, the config "
                                           r"says 4.*fix: give the config the checkpoint's "
                                           r"architecture"):
        run_distributed(_from_hf_folder, 1, str(tmp_path / "run"), str(tmp_path / "hf"))


def test_pretrained_weights_of_another_tokenizer_are_refused(tmp_path):
    """checkpoint.pretrained trained with one tokenizer and fine-tuned with another trained on
    ids that meant other text, without a word (with another vocabulary size the messages sent
    the user between model.vocab_size and the tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from megagpt.convert import convert, write_hf_tokenizer
    from megagpt.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from megagpt.hf import hf_config_dict
    from megagpt.model.reshard import shard_full_state
    from megagpt.training.checkpoint import write_checkpoint_offline
    from megagpt.training.trainer import pretrained_state
    m = tiny_config().model
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(m)))
    model.save_pretrained(tmp_path / "bare")                      # no tokenizer files
    model.save_pretrained(tmp_path / "hf")
    own = train_bpe_tokenizer(["some text to learn from, " * 20], vocab_size=300,
                              output_dir=tmp_path / "tok")
    write_hf_tokenizer(own, tmp_path / "hf", m.seq_length)
    hf = str(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=rf"checkpoint.pretrained: {hf} was trained with the "
                                              rf"tokenizer {hf} \(fingerprint "
                                              rf"{own.fingerprint[:12]}\), but "
                                              rf"data.tokenizer_path=gpt2 is another .*; fix: set "
                                              rf"data.tokenizer_path={hf}"):
        pretrained_state(hf, m, "gpt2")
    with pytest.raises(CheckpointError) as info:      # and another architecture: both named
        pretrained_state(hf, dataclasses.replace(m, n_layers=m.n_layers + 1), "gpt2")
    assert str(info.value).endswith(
        f"; fix: set data.tokenizer_path={hf}\nand its architecture is not the config's (fix: "
        f"give the config the checkpoint's architecture (its model section or "
        f"model.config_file)):\n  - {hf} has model.n_layers={m.n_layers}, the config says "
        f"{m.n_layers + 1}"), str(info.value)
    assert pretrained_state(hf, m, str(tmp_path / "tok")).keys()  # the same tokenizer: accepted
    assert pretrained_state(str(tmp_path / "bare"), m, "gpt2").keys()   # unknown: not checked
    convert(str(tmp_path / "bare"), tmp_path / "bare_ours", "megagpt", log=lambda line: None)
    assert pretrained_state(str(tmp_path / "bare_ours"), m, str(tmp_path / "tok")).keys()  # still
    # a tokenizer that only adds tokens after the source's gives the same ids to their text
    extended = tmp_path / "extended.json"
    backend = own.backend
    backend.add_special_tokens(["<|user|>", "<|assistant|>"])
    backend.save(str(extended))
    assert pretrained_state(hf, m, str(extended)).keys()
    # a converted copy keeps its source's tokenizer path; a run's checkpoint records the
    # fingerprint of the tokenizer it trained with, which decides
    convert(hf, tmp_path / "ours", "megagpt", log=lambda line: None)
    with pytest.raises(CheckpointError, match=rf"ours/step_0000000 was trained with the tokenizer "
                                              rf"{hf} "):
        pretrained_state(str(tmp_path / "ours"), m, "gpt2")
    config = tiny_config(data__mock=False, data__train_data_path=["runs/data/x"]).to_dict()
    gpt2 = load_tokenizer("gpt2")
    meta = {"config": config, "consumed_samples": 0, "tokenizer_fingerprint": gpt2.fingerprint,
            "parallel": {"tp": 1, "pp": 1, "dp": 1, "vp": 1}}
    full = pretrained_state(str(tmp_path / "bare"), m)
    write_checkpoint_offline(tmp_path / "run", 3, shard_full_state(full, m, 1, 1), meta)
    assert pretrained_state(str(tmp_path / "run"), m, "gpt2").keys()
    with pytest.raises(CheckpointError, match=r"run/step_0000003 was trained with the tokenizer "
                                              r"gpt2 "):
        pretrained_state(str(tmp_path / "run"), m, str(tmp_path / "tok"))


def _test_evaluation(rank, world, run_dir, until, data):
    """Train on indexed data; returns the metrics records, what was said, and the test loss
    computed again from the test dataset."""
    from megagpt.data.indexed import write_documents
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, TINY_VOCAB, (40,), generator=g).tolist() for _ in range(30)]
    prefix = str(write_documents(Path(run_dir) / "d", docs).prefix)
    cfg = run_config(Path(run_dir), 4, data__mock=False, data__train_data_path=[prefix],
                     model__vocab_size=50257,
                     data__cache_dir=str(Path(run_dir) / "cache"), training__eval_iters=2,
                     **{f"data__{k}": (v if v != "PREFIX" else [prefix]) for k, v in data.items()})
    said = []
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=said.append)
    trainer.train(until=until)
    again = trainer.evaluate(trainer.test_ds) if trainer.test_ds is not None else None
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return records, said, again


@pytest.mark.parametrize("data, tested", [
    (dict(split="6,2,2", val_data_path=[]), True),       # carved out of the training data
    (dict(split="1,0,0", val_data_path=[], test_data_path="PREFIX"), True),
    (dict(split="8,2,0", val_data_path=[]), False),      # no test share
    (dict(split="98,1,1", val_data_path=[]), False),     # a share of no document: said
])
def test_a_finished_run_ends_with_a_test_evaluation_as_megatrons_does(tmp_path, data, tested):
    """data.test_data_path was never read, nor the test share of data.split."""
    records, said, again = run_distributed(_test_evaluation, 1, str(tmp_path), None, data)[0]
    tests = [r for r in records if "test_loss" in r]
    if not tested:
        assert tests == [] and again is None
        assert any(m.startswith("no test evaluation: data.split='98,1,1' leaves the test split")
                   for m in said) == (data["split"] == "98,1,1")
        return
    assert tests == [{"step": 4, "test_loss": again, "test_ppl": pytest.approx(math.exp(again))}]
    assert records[-1] is not None and "test_loss" in records[-1]       # after the last step's
    assert any(m.startswith(f"step 4: test loss {again:.4f}, perplexity ") for m in said)


def _relaunched_finished_run(rank, world, run_dir):
    """A finished run launched again: nothing to train, but it is tested (its first launch may
    have stopped during the test)."""
    _test_evaluation(rank, world, run_dir, None, dict(split="6,2,2", val_data_path=[]))
    state.destroy_parallel()
    return _test_evaluation(rank, world, run_dir, None, dict(split="6,2,2", val_data_path=[]))


def test_a_finished_run_launched_again_is_tested_again(tmp_path):
    records, said, again = run_distributed(_relaunched_finished_run, 1, str(tmp_path))[0]
    assert any(m.startswith("nothing to train: the run resumed at step 4") for m in said)
    assert [r for r in records if "test_loss" in r] == [
        {"step": 4, "test_loss": again, "test_ppl": pytest.approx(math.exp(again))}] * 2


def test_a_run_stopped_before_its_last_step_is_not_tested(tmp_path):
    records, _, _ = run_distributed(_test_evaluation, 1, str(tmp_path), 2,
                                    dict(split="6,2,2", val_data_path=[]))[0]
    assert [r for r in records if "test_loss" in r] == []


def _skips_survive_conversion(rank, world, run_dir):
    from megagpt.convert import convert
    run_dir = Path(run_dir)
    trainer = Trainer(run_config(run_dir / "a", 6), state.initialize_parallel(1, 1),
                      log=lambda *a: None)
    trainer.train(until=2)
    trainer.skipped_total = 1          # as after a step with no token in the loss
    source = trainer.save()
    convert(source, run_dir / "converted", "megagpt", tp=1, pp=1, log=lambda line: None)
    state.destroy_parallel()
    # another ZeRO stage: the copy has no optimizer state to disagree with (the fix a refusal
    # of the original checkpoint gives)
    resumed = Trainer(run_config(run_dir / "b", 6, checkpoint__load=str(run_dir / "converted"),
                                 parallel__zero_stage=1),
                      state.initialize_parallel(1, 1), log=lambda *a: None)
    return trainer.skipped_total, resumed.step, resumed.skipped_total


def test_a_weights_only_copy_keeps_the_learning_rate_schedule_where_it_was(tmp_path):
    """The skipped steps, which do not advance the schedule, were lost: the copy's run took the
    learning rate of a later step. It resumes under another ZeRO stage too."""
    assert run_distributed(_skips_survive_conversion, 1, str(tmp_path))[0] == (1, 2, 1)


def _train_into_a_locked_save_dir(rank, world, run_dir, wait):
    from megagpt.training import trainer as trainer_module
    trainer_module.SAVE_DIR_LOCK_WAIT_S = wait
    said = []
    try:
        Trainer(run_config(Path(run_dir), 2), state.initialize_parallel(1, 1),
                log=said.append).train()
    except CheckpointError as e:
        return str(e), said
    return None, said


def test_a_second_run_into_one_save_dir_waits_then_is_refused(tmp_path):
    """A job submitted twice: both runs wrote step folders and `latest` into one save dir."""
    from megagpt.fsutil import FolderLock
    lock = FolderLock(tmp_path / "ckpt")
    assert lock.take() is None
    try:
        error, said = run_distributed(_train_into_a_locked_save_dir, 1, str(tmp_path), 1.0)[0]
    finally:
        lock.release()
    assert error.startswith(f"checkpoint.save_dir={tmp_path / 'ckpt'} is in use by another run "
                            f"(pid {os.getpid()} on host "), error
    assert "fix: stop that run, or give this one another checkpoint.save_dir" in error
    assert any("is locked by another run" in m and "waiting up to 1 s" in m for m in said), said
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock"]
    assert not (tmp_path / "metrics.jsonl").exists()
    # once the other run has ended, it trains
    error, _ = run_distributed(_train_into_a_locked_save_dir, 1, str(tmp_path), 1.0)[0]
    assert error is None and (tmp_path / "ckpt" / "latest").is_file()


def _resume_after_a_predecessor(rank, world, run_dir):
    from megagpt.training import trainer as trainer_module
    trainer_module.SAVE_DIR_LOCK_WAIT_S = 60.0
    said = []
    trainer = Trainer(run_config(Path(run_dir), 6, checkpoint__save_interval=2,
                                 checkpoint__keep_last=0),
                      state.initialize_parallel(1, 1), log=said.append)
    return trainer.step, said


def test_a_requeued_run_resumes_from_its_predecessors_last_save(tmp_path):
    """The lock was taken only when training started: a run that waited for its predecessor had
    already chosen the checkpoint to resume, an older one, and its saves replaced the newer."""
    import threading

    from megagpt.fsutil import FolderLock
    run_distributed(_train, 1, str(tmp_path), 4, dict(checkpoint__save_interval=2,
                                                      checkpoint__keep_last=0))
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "step_0000004\n"
    shutil.move(ckpt / "step_0000004", tmp_path / "step_0000004")     # not saved yet
    (ckpt / "latest").write_text("step_0000002\n")
    lock = FolderLock(ckpt)
    assert lock.take() is None

    def predecessor_ends():               # it saves step 4, then ends
        time.sleep(3)
        shutil.move(tmp_path / "step_0000004", ckpt / "step_0000004")
        (ckpt / "latest").write_text("step_0000004\n")
        lock.release()
    ending = threading.Thread(target=predecessor_ends)
    ending.start()
    try:
        step, said = run_distributed(_resume_after_a_predecessor, 1, str(tmp_path))[0]
    finally:
        ending.join()
    assert step == 4, said
    assert any("is locked by another run" in m for m in said), said



def _document_batches(rank, world, run_dir):
    cfg = run_config(Path(run_dir), 2, model__vocab_size=50257, model__seq_length=128,
                     training__mode="finetune", data__mock=False, data__format="sft",
                     data__train_data_path=[SFT_DATA], data__split="90,10,0",
                     data__reset_attention_mask=True, data__reset_position_ids=True,
                     data__eod_mask_loss=True)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    step = next(trainer._batches(trainer.train_ds, 0))
    trainer.train()
    return dict(step=step, eod=trainer.eod_id, last=losses(run_dir)[-1])


def test_the_loader_marks_each_windows_documents_for_the_model(tmp_path):
    """Packed fine-tuning with data.reset_attention_mask, reset_position_ids and eod_mask_loss:
    every micro-batch carries the ids and positions of its examples, the end-of-document
    predictions are out of the loss, and the run trains."""
    from megagpt.data.documents import document_ids, document_positions

    out = run_distributed(_document_batches, 1, str(tmp_path))[0]
    for mb in out["step"]:
        tokens, eod = mb["tokens"], out["eod"]
        assert torch.equal(mb["document_ids"], document_ids(tokens, eod))
        assert torch.equal(mb["position_ids"], document_positions(mb["document_ids"]))
        assert not mb["loss_mask"][tokens == eod].any()
        assert (mb["document_ids"][:, -1] > 0).all()      # several examples a window
    assert math.isfinite(out["last"][1])


def _mock_documents_then_resume(rank, world, run_dir, steps, overrides):
    messages = []
    cfg = run_config(Path(run_dir), 4, **overrides)
    trainer = Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    step = next(trainer._batches(trainer.train_ds, 0))
    trainer.train(until=steps)
    return messages, step, trainer.eod_id


def test_mock_windows_hold_documents_and_a_resume_names_changed_document_settings(tmp_path):
    """Mock data with document settings: windows of documents ending with the end-of-document
    id (the vocabulary's last one here, GPT-2's 50256 lying beyond it), so the settings act; a
    resume with other document settings is told what changes."""
    from megagpt.data.documents import document_ids

    on = dict(data__reset_attention_mask=True, data__reset_position_ids=True)
    messages, step, eod = run_distributed(_mock_documents_then_resume, 1, str(tmp_path), 2,
                                          on)[0]
    assert eod == TINY_VOCAB - 1
    for mb in step:
        assert torch.equal(mb["document_ids"], document_ids(mb["tokens"], eod))
        assert (mb["document_ids"][:, -1] > 0).all() and (mb["position_ids"][:, 0] == 0).all()
    assert not any("document settings" in m for m in messages)
    messages = run_distributed(_mock_documents_then_resume, 1, str(tmp_path), 3,
                               dict(data__eod_mask_loss=True))[0][0]
    assert any("with other document settings (data.reset_attention_mask true -> false, "
               "data.reset_position_ids true -> false, data.eod_mask_loss false -> true); from "
               "step 2 on, what a token attends to, its position or what counts in the loss "
               "change" in m for m in messages), messages


def _documents_without_ends(rank, world, run_dir):
    import numpy as np

    from megagpt.data.indexed import IndexedDatasetWriter, tokenizer_record
    from megagpt.data.tokenizer import load_tokenizer

    messages, prefixes = [], {}
    for append_eod in (False, True):
        prefix = Path(run_dir) / f"data_{append_eod}"
        record = dict(tokenizer_record(load_tokenizer("gpt2")), append_eod=append_eod)
        with IndexedDatasetWriter(prefix, np.uint16, record) as w:
            for _ in range(20):
                w.add_document(np.arange(1, 40))
            w.finalize()
        prefixes[append_eod] = str(prefix)
    cfg = run_config(Path(run_dir), 2, model__vocab_size=50257, data__mock=False,
                     data__train_data_path=[prefixes[False], prefixes[True]],
                     data__split="1,0,0", data__reset_attention_mask=True)
    Trainer(cfg, state.initialize_parallel(1, 1), log=messages.append)
    return messages, prefixes


def test_document_settings_on_data_made_without_document_ends_are_warned(tmp_path):
    messages, prefixes = run_distributed(_documents_without_ends, 1, str(tmp_path))[0]
    warned = [m for m in messages if "made without end-of-document tokens" in m]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {prefixes[False]} was made "), \
        messages
    assert "fix: preprocess it again with --append-eod" in warned[0]


def _resume_with_a_damaged_file(rank, world, run_dir):
    cfg = run_config(Path(run_dir), 4, dp=2)
    try:
        Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    except Exception as e:
        return type(e).__name__, str(e)
    return "built", ""


def test_a_rank_that_cannot_read_its_checkpoint_files_stops_every_rank(tmp_path):
    """One rank's file damaged (or missing on its node): that rank names it, the others stop at
    once (not at the first collective's timeout, half an hour later)."""
    run_distributed(_train, 2, str(tmp_path), 2, dict(dp=2), 4)
    check_a_damaged_file_stops_every_rank(tmp_path, _resume_with_a_damaged_file)


def _resume_from_a_copy_that_does_not_fit(rank, world, run_dir, stale):
    """Rank 1's view of the checkpoint is another run's (a node's stale copy, say) in one part:
    its meta.json (a wider model), its model weights (a wrong shape) or its optimizer state."""
    import megagpt.training.trainer as trainer_module

    if rank == 1:
        read_meta, load_checkpoint = trainer_module.read_meta, trainer_module.load_checkpoint

        def other_meta(path):
            meta = read_meta(path)
            meta["config"]["model"]["d_model"] *= 2
            return meta

        def other_states(*args, **kwargs):
            meta, model, optim, rng = load_checkpoint(*args, **kwargs)
            if stale == "weights":
                name = next(iter(model["chunk0"]))
                model["chunk0"][name] = model["chunk0"][name][:1]
            else:
                optim["optimizer"]["param_groups"] = optim["optimizer"]["param_groups"][:1]
            return meta, model, optim, rng
        if stale == "meta":
            trainer_module.read_meta = other_meta
        else:
            trainer_module.load_checkpoint = other_states
    return _resume_with_a_damaged_file(rank, world, run_dir)


@pytest.mark.slow
def test_a_rank_whose_checkpoint_does_not_fit_stops_every_rank(tmp_path):
    """A state readable on every rank that fits this run on one rank only: that rank says why,
    the others stop at once with it, at each stage of the resume."""
    run_distributed(_train, 2, str(tmp_path), 2, dict(dp=2), 4)
    step = tmp_path / "ckpt" / "step_0000002"
    expected = {"meta": ("CheckpointError", "does not fit this config", f"use {step}"),
                "weights": ("RuntimeError", "size mismatch", f"load its weights from {step}"),
                "optimizer": ("ValueError", "parameter group",
                              f"load its optimizer state from {step}")}
    for stale, (kind, message, what) in expected.items():
        out = run_distributed(_resume_from_a_copy_that_does_not_fit, 2, str(tmp_path), stale)
        assert out[1][0] == kind and message in out[1][1], (stale, out)
        assert out[0] == ("AnotherRankFailed", f"another rank could not {what}"), (stale, out)


def _pretrained_missing_on_rank_1(rank, world, run_dir):
    import megagpt.training.trainer as trainer_module

    source = str(Path(run_dir) / "ckpt")
    if rank == 1:                          # the checkpoint is missing on this rank's node
        def missing(*args, **kwargs):
            raise OSError(f"[Errno 2] No such file or directory: '{source}'")
        trainer_module.pretrained_state = missing
    cfg = run_config(Path(run_dir) / "new", 4, dp=2, checkpoint__pretrained=source)
    try:
        Trainer(cfg, state.initialize_parallel(1, 1), log=lambda *a: None)
    except Exception as e:
        if rank == 1:
            time.sleep(10)                 # as a slow node would: the other must not wait on it
        return type(e).__name__, str(e)
    return "built", ""


def test_a_rank_that_cannot_read_the_pretrained_weights_stops_every_rank(tmp_path):
    run_distributed(_train, 2, str(tmp_path), 2, dict(dp=2), 4)
    start = time.monotonic()
    out = run_distributed(_pretrained_missing_on_rank_1, 2, str(tmp_path), timeout=60)
    assert out[1][0] == "OSError"
    assert out[0] == ("AnotherRankFailed", "another rank could not read "
                      f"checkpoint.pretrained={tmp_path / 'ckpt'}")
    assert time.monotonic() - start < 60

"""A checkpoint trained on TP2 x PP2, resharded to TP1 x PP2 and then TP2 x PP1, and exported to
Hugging Face: the same weights, the same loss in every layout, and training resumes from it."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megagpt.convert import convert
from megagpt.model.reshard import full_state_from_checkpoint
from megagpt.parallel import state
from megagpt.testing import fixed_batches, run_distributed, split_microbatches, tiny_config
from megagpt.training.checkpoint import find_latest, load_checkpoint
from megagpt.training.engine import Engine
from megagpt.training.trainer import Trainer

transformers = pytest.importorskip("transformers")

STEPS, SAVED_AT = 4, 2
BATCH = fixed_batches(1, seed=9)[0]               # (8, 17): one global batch, ids < 1001


def run_config(run_dir: Path, tp, pp, **overrides):
    return tiny_config(tp=tp, pp=pp, steps=STEPS, model__vocab_size=50257,
                       checkpoint__save_dir=str(run_dir / "ckpt"), checkpoint__keep_last=5,
                       logging__run_dir=str(run_dir), logging__progress_bar=False,
                       training__log_interval=1, training__eval_interval=0,
                       data__num_workers=0, **overrides)


def eval_loss(engine: Engine, ps) -> float:
    mbs = split_microbatches(BATCH, ps.dp_rank, ps.dp_world_size, engine.cfg.training.batch_size)
    return engine.eval_step(mbs)


def _train_source(rank, world, run_dir):
    """TP2 x PP2: train to step 2 (saved), its loss on BATCH, then on to step 4."""
    cfg = run_config(Path(run_dir), 2, 2)
    ps = state.initialize_parallel(2, 2)
    trainer = Trainer(cfg, ps, log=lambda *a: None)
    trainer.train(until=SAVED_AT)
    loss = eval_loss(trainer.engine, ps)
    trainer.train()
    return loss


def _evaluate_and_resume(rank, world, run_dir, tp1pp2, tp2pp1):
    """World 2: the loss on BATCH as TP1 x PP2 and as TP2 x PP1, then training from TP2 x PP1."""
    losses = []
    for (tp, pp), save_dir in [((1, 2), tp1pp2), ((2, 1), tp2pp1)]:
        cfg = run_config(Path(run_dir) / "eval", tp, pp)
        ps = state.initialize_parallel(tp, pp)
        engine = Engine(cfg, ps)
        _, model_state, _, _ = load_checkpoint(find_latest(save_dir), tp_rank=ps.tp_rank,
                                               pp_rank=ps.pp_rank, dp_rank=ps.dp_rank)
        for c, chunk in enumerate(engine.chunks):
            chunk.load_state_dict(model_state[f"chunk{c}"])
        losses.append(eval_loss(engine, ps))
        state.destroy_parallel()
    cfg = run_config(Path(run_dir) / "resumed", 2, 1, checkpoint__load=str(tp2pp1))
    ps = state.initialize_parallel(2, 1)
    messages = []
    trainer = Trainer(cfg, ps, log=messages.append)
    start = trainer.step
    trainer.train()
    return dict(losses=losses, start=start, messages=messages)


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.mark.slow
def test_reshard_keeps_weights_and_loss_and_training_resumes(tmp_path):
    source_loss = run_distributed(_train_source, 4, str(tmp_path / "src"), timeout=300)[0]
    source = tmp_path / "src" / "ckpt" / f"step_{SAVED_AT:07d}"
    quiet = dict(log=lambda line: None)
    convert(source, tmp_path / "tp1pp2", "megagpt", tp=1, pp=2, **quiet)
    convert(tmp_path / "tp1pp2", tmp_path / "tp2pp1", "megagpt", tp=2, pp=1, **quiet)
    convert(source, tmp_path / "hf", "hf", **quiet)

    _, weights = full_state_from_checkpoint(source)
    for layout in ("tp1pp2", "tp2pp1"):
        meta, converted = full_state_from_checkpoint(find_latest(tmp_path / layout))
        assert meta["step"] == SAVED_AT and meta["weights_only"] is True
        assert converted.keys() == weights.keys()
        assert all(torch.equal(converted[k], v) for k, v in weights.items()), layout

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        logits = hf(BATCH[:, :-1]).logits
    hf_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), BATCH[:, 1:].reshape(-1))
    assert hf_loss.item() == pytest.approx(source_loss, rel=1e-5)

    out = run_distributed(_evaluate_and_resume, 2, str(tmp_path / "run"), str(tmp_path / "tp1pp2"),
                          str(tmp_path / "tp2pp1"), timeout=300)[0]
    assert out["losses"] == pytest.approx([source_loss, source_loss], rel=1e-5)
    assert out["start"] == SAVED_AT
    assert any("optimizer state starts fresh" in m for m in out["messages"])
    straight, resumed = train_losses(tmp_path / "src"), train_losses(tmp_path / "run" / "resumed")
    assert sorted(resumed) == [3, 4]
    # the first resumed step's loss is computed before any update: the same weights, the same data
    assert resumed[SAVED_AT + 1] == pytest.approx(straight[SAVED_AT + 1], rel=1e-5)

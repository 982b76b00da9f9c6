"""Every (tp, pp, dp) layout trains the same model as one process: losses, grad norms, parameters."""
import functools
import warnings

import pytest
import torch

from megagpt.model.gpt import gather_full_state_dict
from megagpt.parallel import state
from megagpt.parallel.random import seed_everything
from megagpt.testing import fixed_batches, run_distributed, split_microbatches, tiny_config
from megagpt.training.engine import Engine
from megagpt.training.optim import lr_at

STEPS = 5


def _train(rank, world, cfg_kwargs):
    # no deprecated collective (torch 2.13 renamed the all-gather and reduce-scatter into tensors)
    warnings.filterwarnings("error", message=r".*torch\.distributed\..* is deprecated",
                            category=FutureWarning)
    cfg_kwargs = dict(cfg_kwargs)
    documents = cfg_kwargs.pop("documents", False)
    cfg = tiny_config(**cfg_kwargs)
    par = cfg.parallel
    ps = state.initialize_parallel(par.tensor_parallel_size, par.pipeline_parallel_size)
    seed_everything(cfg.training.seed, ps.tp_rank, ps.pp_rank)
    engine = Engine(cfg, ps, p2p_timeout_s=60)
    initial = _full_masters(engine, ps)
    losses, norms = [], []
    for step, tokens in enumerate(fixed_batches(STEPS, documents=documents)):
        mbs = split_microbatches(tokens, ps.dp_rank, ps.dp_world_size, cfg.training.batch_size,
                                 documents)
        result = engine.train_step(mbs, lr_at(step, cfg.training))
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return dict(losses=losses, norms=norms, params=_full_masters(engine, ps), initial=initial)


def _full_masters(engine, ps) -> dict:
    """The whole model's float32 masters, also in bf16 (on data-parallel rank 0; under ZeRO-1
    every replica gathers)."""
    params = {}
    with engine.master_weights():
        if ps.dp_rank == 0:
            for chunk in engine.chunks:
                params.update(gather_full_state_dict(chunk))
    return params


@functools.lru_cache(maxsize=None)
def reference():
    return run_distributed(_train, 1, {})[0]


@functools.lru_cache(maxsize=None)
def reference_documents():
    return run_distributed(_train, 1, {"documents": True})[0]


def check_layout(**cfg_kwargs):
    world = cfg_kwargs.get("tp", 1) * cfg_kwargs.get("pp", 1) * cfg_kwargs.get("dp", 1)
    outs = run_distributed(_train, world, cfg_kwargs, timeout=300)
    ref = reference_documents() if cfg_kwargs.get("documents") else reference()
    params = {}
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(out["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
        params.update(out["params"])
    assert params.keys() == ref["params"].keys()
    for k, v in ref["params"].items():
        torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_reference_learns():
    ref = reference()
    assert ref["losses"][-1] < ref["losses"][0]
    assert all(n > 0.5 for n in ref["norms"][:2])   # clipping at 0.5 is exercised


def _gradient_the_optimizer_reads(rank, world, grad_clip):
    cfg = tiny_config(training__grad_clip=grad_clip)
    ps = state.initialize_parallel(1, 1)
    seed_everything(cfg.training.seed)
    engine = Engine(cfg, ps, p2p_timeout_s=60)
    step, seen = engine.optimizer.step, []

    def spy(*args, **kwargs):
        grads = [p.grad.double() for group in engine.optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        seen.append(torch.stack([g.norm() for g in grads]).norm().item())
        return step(*args, **kwargs)
    engine.optimizer.step = spy
    tokens = next(iter(fixed_batches(1)))
    result = engine.train_step(split_microbatches(tokens, 0, 1, cfg.training.batch_size), 1e-3)
    return result.grad_norm, seen[0]


@pytest.mark.parametrize("grad_clip", [0.5, 0.0, 1e3])
def test_clipping_scales_the_gradient_the_optimizer_reads_to_grad_clip(grad_clip):
    """A norm above training.grad_clip reaches the optimizer as grad_clip (Megatron's
    clip / (norm + 1e-6)); below it, or with clipping off (0), untouched. The layouts'
    equivalence cannot see this: the one-process reference clips the same way."""
    norm, read = run_distributed(_gradient_the_optimizer_reads, 1, grad_clip)[0]
    assert norm > 0.5
    assert read == pytest.approx(grad_clip if 0 < grad_clip < norm else norm, rel=1e-5)


@pytest.mark.parametrize("tp, pp, dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_one_dimension(tp, pp, dp):
    check_layout(tp=tp, pp=pp, dp=dp)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)])
def test_two_and_three_dimensions(tp, pp, dp):
    check_layout(tp=tp, pp=pp, dp=dp)


def test_interleaved_pipeline():
    check_layout(pp=2, vp=2)


def test_zero1():
    check_layout(dp=2, zero=1)


@pytest.mark.slow
def test_zero1_with_tensor_pipeline_and_sequence_parallel():
    check_layout(tp=2, pp=2, dp=2, zero=1, parallel__sequence_parallel=True)


@pytest.mark.slow
def test_every_feature_of_the_layout_at_once():
    """Interleaving with tensor, sequence and data parallelism, ZeRO-1 and full recompute, one
    sequence a micro-batch (4 a replica: a multiple of pp, as interleaving needs)."""
    check_layout(tp=2, pp=2, dp=2, vp=2, zero=1, micro=1, parallel__sequence_parallel=True,
                 training__recompute="full")


def test_document_masks_and_positions_change_the_training():
    """Windows of several documents (data.reset_attention_mask and reset_position_ids) train
    another model than the same tokens as one sequence: the masks reach every layer."""
    ref, documents = reference(), reference_documents()
    assert documents["losses"][0] != pytest.approx(ref["losses"][0], rel=1e-3)
    assert documents["losses"][-1] < documents["losses"][0]


@pytest.mark.parametrize("layout", [
    dict(tp=2, parallel__sequence_parallel=True, training__recompute="selective"),
    pytest.param(dict(pp=2, vp=2, dp=2, training__recompute="full"), marks=pytest.mark.slow),
    pytest.param(dict(tp=2, pp=2, dp=2, zero=1, parallel__sequence_parallel=True),
                 marks=pytest.mark.slow)],
    ids=["tp2-sp-selective", "pp2-vp2-dp2-full", "tp2-pp2-dp2"])
def test_document_masks_in_every_layout(layout):
    """Every stage of a pipeline and every tensor-parallel rank gets the micro-batch's document
    ids (the pipeline sends only hidden states; the masks come from the micro-batch)."""
    check_layout(documents=True, **layout)


def test_accumulation_equals_one_large_batch():
    check_layout(micro=8)     # one micro-batch of 8 against the reference's 4 of 2


def test_sequence_parallel_with_full_recompute_and_data_parallel_buckets():
    """The sequence-parallel QKV and fc1 gather their input again in the backward, which full
    recompute runs inside the checkpointed block, while the buckets take the gradients."""
    check_layout(tp=2, dp=2, parallel__sequence_parallel=True, training__recompute="full")


# ---- bf16: 16-bit parameters and activations, float32 masters and gradient buckets ----------

BF16 = {"training__precision": "bf16"}


@functools.lru_cache(maxsize=None)
def reference_bf16():
    return run_distributed(_train, 1, BF16)[0]


def test_bf16_tracks_fp32():
    ref, bf16 = reference(), reference_bf16()
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(ref["losses"]),
                               rtol=1e-4, atol=0)
    assert all(v.dtype == torch.float32 for v in bf16["params"].values())   # the masters
    assert bf16["params"].keys() == ref["params"].keys()


def test_bf16_data_parallel_equals_one_process():
    """Each micro-batch's bf16 gradient is the same in both; they are summed in float32, in the
    bucket and by the all-reduce, so nothing is rounded to bf16 on the way: losses and norms are
    identical, the masters differ only by the order of the float32 sums."""
    ref = reference_bf16()
    outs = run_distributed(_train, 2, dict(BF16, dp=2), timeout=300)
    assert outs[0]["losses"] == ref["losses"] and outs[0]["norms"] == ref["norms"]
    for k, v in ref["params"].items():
        torch.testing.assert_close(outs[0]["params"][k], v, rtol=1e-6, atol=1e-8, msg=k)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(dp=2, zero=1)],
                         ids=["tp2", "pp2", "dp2-zero1"])
def test_bf16_layouts_track_one_process(layout):
    """bf16 rounds differently when a matmul is split (tp) or the tied embedding's two gradients
    are summed in float32 rather than in bf16 (pp): losses agree to 1e-4, and the float32
    masters' movement as `check_16bit_layout` says."""
    check_16bit_layout(reference_bf16(), dict(BF16, **layout))


def check_16bit_layout(ref, cfg_kwargs):
    """16-bit layouts against one 16-bit process: losses to 1e-4; what training moved the
    float32 masters to a tenth of the reference's movement over the whole model, and less than
    0.6 of it in every tensor (one not updated, or updated twice, is 1 off)."""
    world = cfg_kwargs.get("tp", 1) * cfg_kwargs.get("pp", 1) * cfg_kwargs.get("dp", 1)
    outs = run_distributed(_train, world, cfg_kwargs, timeout=300)
    params = {}
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-4, atol=0)
        params.update(out["params"])
    # what training moved each float32 master, here and in the reference: 5 Adam steps move a
    # weight by at most 0.011, so a check of the weights themselves passes untrained ones
    moved = {k: v - ref["initial"][k] for k, v in ref["params"].items()}
    for k, v in moved.items():       # the key bias's gradient is rounding alone (the softmax
        off = (params[k] - ref["params"][k]).norm() / v.norm()     # ignores it): up to 0.49
        assert off < 0.6, f"{k}: moved {off:.3f} of its reference movement away from it"
    total = torch.cat([(params[k] - v).flatten() for k, v in ref["params"].items()]).norm()
    assert total / torch.cat([v.flatten() for v in moved.values()]).norm() < 0.1


@functools.lru_cache(maxsize=None)
def reference_fp16():
    return run_distributed(_train, 1, {"training__precision": "fp16"})[0]


@pytest.mark.slow
def test_fp16_in_a_pipeline_with_zero1_tracks_one_process():
    """fp16 (16-bit weights, dynamic loss scaling) was tested on one process only: a pipeline
    with interleaving and ZeRO-1 over two replicas trains as one process does, to fp16's
    rounding (11 bits: tighter than bf16's)."""
    check_16bit_layout(reference_fp16(), {"training__precision": "fp16", "pp": 2, "vp": 2,
                                          "dp": 2, "zero": 1, "micro": 1})


def _train_with_mask_weight(rank, world, weight, dp):
    cfg = tiny_config(dp=dp)
    ps = state.initialize_parallel(1, 1)
    seed_everything(cfg.training.seed, ps.tp_rank, ps.pp_rank)
    engine = Engine(cfg, ps, p2p_timeout_s=60)
    losses = []
    for step, tokens in enumerate(fixed_batches(2)):
        mbs = split_microbatches(tokens, ps.dp_rank, dp, cfg.training.batch_size)
        for mb in mbs:
            mb["loss_mask"] = mb["loss_mask"] * weight
        losses.append(engine.train_step(mbs, lr_at(step, cfg.training)).loss)
    return losses


@pytest.mark.parametrize("dp", [1, 2])
def test_loss_mask_weights_are_not_rounded_to_a_token_count(dp):
    """A loss mask may weight tokens: the loss is the weighted mean, so weighting every token
    alike (0.3 here: 8 x 16 x 0.3 = 38.4 summed, which a token count would truncate to 38)
    trains exactly as a mask of ones does."""
    ones = run_distributed(_train_with_mask_weight, dp, 1.0, dp)[0]
    weighted = run_distributed(_train_with_mask_weight, dp, 0.3, dp)[0]
    torch.testing.assert_close(torch.tensor(weighted), torch.tensor(ones), rtol=1e-6, atol=0)

"""training.cuda_graphs: each block's forward and backward replayed as CUDA graphs.

On a CPU: the config rules and the engine's refusal. On a GPU: graphed training equals eager
training step for step (the same kernels run on the same data, only launched from a graph)."""
import datetime

import pytest
import torch
import torch.distributed as dist

from megagpt.config import ConfigError
from megagpt.model.gpt import gather_full_state_dict
from megagpt.parallel import state
from megagpt.testing import fixed_batches, free_port, split_microbatches, tiny_config
from megagpt.training.engine import Engine
from megagpt.training.optim import lr_at

GRAPHS = {"training__cuda_graphs": True}


@pytest.mark.parametrize("override, setting", [
    ({"model__dropout": 0.1}, "model.dropout=0.1"),
    ({"tp": 2}, "parallel.tensor_parallel_size=2"),
    ({"pp": 2}, "parallel.pipeline_parallel_size=2"),
    ({"training__recompute": "full"}, "training.recompute=full"),
])
def test_settings_graphs_cannot_replay_are_refused(override, setting):
    with pytest.raises(ConfigError, match=rf"training.cuda_graphs=true: not with {setting} .* fix: "):
        tiny_config(**GRAPHS, **override)


@pytest.fixture
def one_process():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
    yield state.initialize_parallel(1, 1)
    state.destroy_parallel()
    dist.destroy_process_group()


def test_a_cpu_engine_refuses_cuda_graphs(one_process):
    with pytest.raises(ValueError, match=r"training.cuda_graphs=true needs a CUDA device, but this "
                                         r"rank runs on cpu; fix: training.cuda_graphs=false"):
        Engine(tiny_config(**GRAPHS), one_process, device="cpu")


def _train(ps, **overrides):
    cfg = tiny_config(training__precision="bf16", **overrides)
    engine = Engine(cfg, ps, device="cuda")
    losses = []
    for step, tokens in enumerate(fixed_batches(4)):
        mbs = split_microbatches(tokens, 0, 1, cfg.training.batch_size)
        losses.append(engine.train_step(mbs, lr_at(step, cfg.training)).loss)
    eval_loss = engine.eval_step(split_microbatches(fixed_batches(1, seed=9)[0], 0, 1,
                                                    cfg.training.batch_size))
    with engine.master_weights():
        params = gather_full_state_dict(engine.chunks[0])
    return losses, eval_loss, params


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernels", [{}, {"model__d_model": 128,     # head dim 32 for flash attention
                                          **{f"kernels__{op}": "auto" for op in
                                             ("attention", "layernorm", "softmax", "bias_gelu",
                                              "cross_entropy")}}], ids=["torch", "triton"])
def test_graphed_training_equals_eager(one_process, kernels):
    eager = _train(one_process, **kernels)
    graphed = _train(one_process, **GRAPHS, **kernels)
    torch.testing.assert_close(torch.tensor(graphed[0]), torch.tensor(eager[0]), rtol=1e-6, atol=0)
    assert len(set(graphed[0])) == len(graphed[0])                 # the weights did change
    assert graphed[1] == pytest.approx(eager[1], rel=1e-6)      # eval runs the blocks eagerly
    for name, value in eager[2].items():
        torch.testing.assert_close(graphed[2][name], value, rtol=1e-5, atol=1e-7, msg=name)

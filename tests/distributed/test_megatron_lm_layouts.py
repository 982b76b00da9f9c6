"""Megatron-LM checkpoints cut by megatron-core itself: GPTModel stages built on tp x pp (x vp)
gloo processes, as Megatron-LM's get_model builds them, each rank saving what Megatron-LM's
'torch' format saves. Every parameter is set from its global name (Megatron's own layer_number
and partition_dim decide which block and which slice a rank holds), so every layout is a slice of
one model, and megagpt.megatron_lm must read each back to the same weights as the one-process
save. The one-process save's logits are megatron-core's own (test_model_megatron_core.py)."""
import argparse
import re
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist

from megagpt.convert import load_source
from megagpt.testing import run_distributed

pytest.importorskip("megatron.core", reason="megatron-core is a test extra on Linux x86-64 only")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
HIDDEN, HEADS, SEQ, VOCAB = 64, 4, 32, 1001     # the vocabulary padded to 1024 at tp 1 and 2


def global_values(model, tp, tp_rank):
    """Every parameter from a generator seeded by its global name, this rank's slice of it."""
    numbers = {name: module.layer_number for name, module in model.named_modules()
               if name.startswith("decoder.layers.") and hasattr(module, "layer_number")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            name = re.sub(r"^decoder\.layers\.(\d+)\.",
                          lambda m: f"layer {numbers['decoder.layers.' + m[1]]}.", name)
            name = "embedding.word_embeddings.weight" if name == "output_layer.weight" else name
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = 0.1 * torch.randn(shape, generator=g) + ("layernorm.weight" in name)
            p.copy_(full if dim is None else full.chunk(tp, dim)[tp_rank])


def _save_rank(rank, world, root, tp, pp, vp, layers):
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    # megatron-core moves the tied embedding to the GPU before all-reducing it between stages
    torch.Tensor.cuda = lambda self, *a, **k: self
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
    t, r = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    cfg = TransformerConfig(num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vp,
                            use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0, gradient_accumulation_fusion=False,
                            bias_dropout_fusion=False, masked_softmax_fusion=False,
                            pipeline_dtype=torch.float32)
    state = {"args": argparse.Namespace(
        num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
        ffn_hidden_size=4 * HIDDEN, max_position_embeddings=SEQ, seq_length=SEQ,
        tokenizer_type="NullTokenizer", vocab_size=VOCAB - 1, bias_gelu_fusion=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, hidden_dropout=0.0, attention_dropout=0.0),
        "checkpoint_version": 3.0, "iteration": 7}
    for c in range(vp or 1):              # as Megatron-LM's get_model and save_checkpoint
        stage = c if vp else None
        if vp:
            ps.set_virtual_pipeline_model_parallel_rank(c)
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=1024,
                         max_sequence_length=SEQ, position_embedding_type="learned_absolute",
                         share_embeddings_and_output_weights=True, vp_stage=stage,
                         pre_process=ps.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=stage),
                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False,
                                                                vp_stage=stage))
        global_values(model, tp, t)
        state[f"model{c}" if vp else "model"] = model.state_dict_for_save_checkpoint()
    folder = root / "iter_0000007" / (f"mp_rank_{t:02d}" + (f"_{r:03d}" if pp > 1 else ""))
    folder.mkdir(parents=True)
    torch.save(state, folder / "model_optim_rng.pt")
    dist.barrier()
    ps.destroy_model_parallel()


def megatron_save(root, tp=1, pp=1, vp=None, layers=4):
    run_distributed(_save_rank, tp * pp, root, tp, pp, vp, layers, timeout=240)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    return root


@pytest.mark.parametrize("tp,pp,vp,layers", [(2, 1, None, 4), (1, 2, None, 4), (2, 2, None, 4),
                                             (1, 2, 2, 8)], ids=["tp2", "pp2", "tp2_pp2",
                                                                 "pp2_vp2"])
def test_megatron_core_s_own_layouts_read_back_as_its_one_process_save(tmp_path, tp, pp, vp,
                                                                       layers):
    one = load_source(megatron_save(tmp_path / "one", layers=layers))
    split = load_source(megatron_save(tmp_path / "split", tp, pp, vp, layers))
    assert split.layout == (tp, pp, vp or 1) and one.model == split.model
    assert set(split.full_state) == set(one.full_state)
    for name, value in one.full_state.items():
        assert torch.equal(split.full_state[name], value), name

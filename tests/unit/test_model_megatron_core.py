"""The single-process model equals megatron-core's own GPTModel (local layer spec, learned
positions, tied embedding) on the same weights, and our vocab-parallel cross-entropy equals
megatron-core's on one rank. Megatron's tanh GeLU (`activation_func=openai_gelu`, or F.gelu with
`bias_activation_fusion=True`, whose fused kernel is tanh) is our default, GPT-2's; its unfused
F.gelu is erf, our model.activation=gelu. Megatron's loss also counts the padding columns; ours
leaves them out."""
import contextlib
import dataclasses
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.config import KernelsConfig, ModelConfig
from megagpt.model.gpt import GPTStage, StageSpec, load_full_state_dict
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy

pytest.importorskip("megatron.core", reason="megatron-core is a test extra on Linux x86-64 only")
with warnings.catch_warnings():    # at import: Apex and TransformerEngine are absent, ...
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state, tensor_parallel  # noqa: E402
    from megatron.core.models.gpt import GPTModel  # noqa: E402
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
    from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
    from megatron.core.transformer.utils import openai_gelu  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")     # Apex / TransformerEngine absent, etc.
M = ModelConfig(vocab_size=1001, d_model=64, n_heads=4, n_layers=3, seq_length=32, dropout=0.0)
KERNELS = dict(layernorm="torch", softmax="torch", bias_gelu="torch", cross_entropy="torch")
_NAMES = {"input_layernorm": "ln1", "self_attention.linear_qkv": "attn.qkv",
          "self_attention.linear_proj": "attn.proj", "pre_mlp_layernorm": "ln2",
          "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"}


def from_megatron_core(state: dict, n_heads: int) -> dict:
    """megatron-core GPTModel state dict (tp = pp = 1, tied) -> our canonical names. Megatron's
    fused QKV rows are [head][q, k, v][head_dim]; ours are [q, k, v][head][head_dim]."""
    out = {"embedding.wte.weight": state["embedding.word_embeddings.weight"],
           "embedding.wpe.weight": state["embedding.position_embeddings.weight"],
           "final_ln.weight": state["decoder.final_layernorm.weight"],
           "final_ln.bias": state["decoder.final_layernorm.bias"]}
    for key, value in state.items():
        if not key.startswith("decoder.layers.") or key.endswith("_extra_state"):
            continue
        i, rest = key.removeprefix("decoder.layers.").split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        if module == "self_attention.linear_qkv":
            value = value.reshape(n_heads, 3, -1, *value.shape[1:]).transpose(0, 1) \
                .reshape(value.shape)
        out[f"layers.{i}.{_NAMES[module]}.{leaf}"] = value
    return out


class _NoCudaRng:        # attention dropout forks megatron's CUDA RNG even at p = 0
    fork = staticmethod(lambda name=None: contextlib.nullcontext())


class _CpuBuffer:        # megatron's global memory buffer allocates on torch.cuda.current_device()
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(*shape, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def megatron_on_one_cpu_rank(tmp_path_factory):
    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parallel_state, "get_global_memory_buffer", lambda: _CpuBuffer())
        mp.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: _NoCudaRng())
        yield
    parallel_state.destroy_model_parallel()
    # megatron-core 0.16.1's destroy leaves its intra-partial data-parallel groups set; a
    # process forked later (the gloo tests of tests/distributed, in the same pytest) would free
    # them, and freeing a gloo group without its threads aborts or hangs the child
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)
    if created:
        dist.destroy_process_group()


def megatron_model(**fields):
    cfg = TransformerConfig(num_layers=M.n_layers, hidden_size=M.d_model,
                            num_attention_heads=M.n_heads, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0,
                            init_method_std=0.1, gradient_accumulation_fusion=False,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, **fields)
    torch.manual_seed(0)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=M.padded_vocab_size(1),
                     max_sequence_length=M.seq_length, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=True)
    with torch.no_grad():    # norms and biases start constant; make them matter
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def run_both(megatron, attention, ids, m=M):
    ours = GPTStage(m, KernelsConfig(attention=attention, **KERNELS),
                    StageSpec(0, m.n_layers, True, True))
    load_full_state_dict(ours, from_megatron_core(megatron.state_dict(), M.n_heads))
    s = ids.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]   # None: a CUDA mask
    ref = megatron(ids, torch.arange(s).expand_as(ids), causal)[..., :M.vocab_size]
    return ours, ours(ids)[..., :M.vocab_size], ref


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("fields", [dict(activation_func=openai_gelu),
                                    dict(bias_activation_fusion=True),
                                    dict(activation_func=openai_gelu,
                                         apply_query_key_layer_scaling=True)],
                         ids=["openai_gelu", "fused_bias_gelu", "qk_layer_scaling"])
def test_logits_loss_and_gradients_equal_megatron_core(attention, fields):
    megatron = megatron_model(**fields)
    ids, labels = torch.randint(0, M.vocab_size, (3, 20)), torch.randint(0, M.vocab_size, (3, 20))
    ours, logits, ref = run_both(megatron, attention, ids)
    assert (logits - ref).abs().max().item() <= 1e-5
    ref_loss = F.cross_entropy(ref.reshape(-1, M.vocab_size), labels.reshape(-1))
    loss_sum, n = ours(ids, labels)
    torch.testing.assert_close(loss_sum / n, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    (loss_sum / n).backward()
    theirs = from_megatron_core({k: p.grad for k, p in megatron.named_parameters()}, M.n_heads)
    for name, p in ours.named_parameters():
        g = p.grad[:M.vocab_size] if name == "embedding.wte.weight" else p.grad
        torch.testing.assert_close(g, theirs[name][:g.shape[0]], rtol=1e-4, atol=1e-6, msg=name)


def test_megatron_s_unfused_erf_gelu_is_model_activation_gelu_and_padding_is_in_its_loss():
    megatron = megatron_model()                       # activation_func=F.gelu: erf
    ids, labels = torch.randint(0, M.vocab_size, (2, 16)), torch.randint(0, M.vocab_size, (2, 16))
    with torch.no_grad():
        _, logits, ref = run_both(megatron, "eager", ids, dataclasses.replace(M, activation="gelu"))
        assert (logits - ref).abs().max().item() <= 1e-5
        _, logits, ref = run_both(megatron, "eager", ids)        # the tanh GeLU
        assert (logits - ref).abs().max().item() > 1e-4
        s = ids.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
        per_token = megatron(ids, torch.arange(s).expand_as(ids), causal, labels=labels)
        full = megatron(ids, torch.arange(s).expand_as(ids), causal)
    assert torch.all(per_token > F.cross_entropy(full[..., :M.vocab_size].transpose(1, 2), labels,
                                                 reduction="none"))   # padding columns counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_vocab_parallel_cross_entropy_equals_megatron_core(dtype, fused):
    if fused and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the fused loss runs its Triton kernel, whose bf16 arithmetic Triton's "
                    "interpreter gets wrong (bf16 is checked on a GPU)")
    torch.manual_seed(0)
    logits, target = 3 * torch.randn(7, 3, 1024), torch.randint(0, 1001, (7, 3))
    ours_in, theirs_in = (logits.to(dtype).clone().requires_grad_() for _ in range(2))
    ours = vocab_parallel_cross_entropy(ours_in, target, 1024, None, fused=fused)
    theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_in, target)  # edits theirs_in
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=2e-6)
    weights = torch.randn(7, 3)
    (ours * weights).sum().backward()
    (theirs.float() * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad.float(), theirs_in.grad.float(), rtol=1e-5, atol=1e-6)
    padded = vocab_parallel_cross_entropy(logits, target, 1001)  # ours leaves the padding out
    torch.testing.assert_close(padded, tensor_parallel.vocab_parallel_cross_entropy(
        logits[..., :1001].contiguous(), target))


# -- Megatron-LM checkpoints of this GPTModel, read by megagpt.megatron_lm (convert.load_source) -

def megatron_args(**changes):
    """The arguments Megatron-LM's pretrain_gpt.py saves, for megatron_model()'s sizes."""
    import argparse

    args = dict(num_layers=M.n_layers, hidden_size=M.d_model, num_attention_heads=M.n_heads,
                ffn_hidden_size=4 * M.d_model, max_position_embeddings=M.seq_length,
                seq_length=M.seq_length, tokenizer_type="NullTokenizer",
                vocab_size=M.vocab_size - 1, padded_vocab_size=M.padded_vocab_size(1),
                make_vocab_size_divisible_by=128, position_embedding_type="learned_absolute",
                normalization="LayerNorm", norm_epsilon=1e-5, bias_gelu_fusion=True,
                hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                consumed_train_samples=96, bf16=False, params_dtype=torch.float32)
    args.update(changes)
    return argparse.Namespace(**args)


def megatron_reference(megatron, ids):
    s = ids.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return megatron(ids, torch.arange(s).expand_as(ids), causal)[..., :M.vocab_size]


@pytest.mark.parametrize("names", ["local", "transformer_engine"])
def test_a_megatron_lm_torch_checkpoint_gives_megatron_core_s_logits(tmp_path, names):
    from megagpt.convert import load_source, our_logits

    megatron = megatron_model(bias_activation_fusion=True)      # Megatron-LM's default MLP
    state = megatron.state_dict_for_save_checkpoint()
    if names == "transformer_engine":     # the local spec's own map to the TE spec's names
        spec = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
        for key in list(state):
            for local, te in spec.items():
                if f".{local}" in key:
                    state[key.replace(f".{local}", f".{te}")] = state.pop(key)
    assert any("layer_norm_weight" in k for k in state) == (names == "transformer_engine")
    folder = tmp_path / "save" / "iter_0000005" / "mp_rank_00"
    folder.mkdir(parents=True)
    torch.save({"args": megatron_args(), "checkpoint_version": 3.0, "iteration": 5,
                "model": state}, folder / "model_optim_rng.pt")
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("5")
    source = load_source(tmp_path / "save")
    assert (source.step, source.consumed_samples, source.layout) == (5, 96, (1, 1, 1))
    ids = torch.randint(0, M.vocab_size, (3, 20))
    logits = our_logits(source.model, source.full_state, ids)
    assert (logits - megatron_reference(megatron, ids)).abs().max().item() <= 1e-5


def test_a_megatron_lm_torch_dist_checkpoint_gives_megatron_core_s_logits(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megagpt.convert import load_source, our_logits

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)   # CUDA-only spots
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")       # of the writer
    megatron = megatron_model(bias_activation_fusion=True)
    folder = tmp_path / "save" / "iter_0000005"
    folder.mkdir(parents=True)
    dist_checkpointing.save({"args": megatron_args(), "checkpoint_version": 3.0, "iteration": 5,
                             "model": megatron.sharded_state_dict()}, str(folder))
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("5")
    source = load_source(tmp_path / "save")
    assert (source.step, source.layout) == (5, (1, 1, 1))
    ids = torch.randint(0, M.vocab_size, (3, 20))
    logits = our_logits(source.model, source.full_state, ids)
    assert (logits - megatron_reference(megatron, ids)).abs().max().item() <= 1e-5

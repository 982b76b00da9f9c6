"""Gathering and re-sharding model weights between layouts is exact."""
import torch

from megagpt.config import KernelsConfig, ModelConfig
from megagpt.model.gpt import GPTStage, init_weights, stage_spec
from megagpt.model.reshard import gather_shards, shard_full_state, sharding_rules

M = ModelConfig(vocab_size=1001, d_model=32, n_heads=4, n_layers=4, seq_length=16, dropout=0.0)
KERNELS = KernelsConfig(attention="eager", layernorm="torch", softmax="torch", bias_gelu="torch",
                        cross_entropy="torch")


def single_process_state():
    model = GPTStage(M, KERNELS, stage_spec(M.n_layers, 0, 1))
    init_weights(model, M, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embedding.wte.weight"] = state["embedding.wte.weight"][:M.vocab_size]
    return state


def test_rules_know_how_each_weight_is_split():
    rules = sharding_rules(M)
    assert rules["layers.0.attn.qkv.weight"] == (0, 3)
    assert rules["layers.0.attn.proj.weight"] == (1, 1)
    assert rules["layers.0.attn.proj.bias"] == (None, 1)
    assert rules["embedding.wte.weight"] == (0, 1) and rules["embedding.wpe.weight"] == (None, 1)


def test_shard_then_gather_is_identity_for_every_layout():
    full = single_process_state()
    for tp, pp, vp in [(1, 1, 1), (2, 1, 1), (4, 2, 1), (2, 2, 2), (1, 4, 1)]:
        shards = shard_full_state(full, M, tp, pp, vp)
        back = gather_shards(shards, M, tp, pp)
        assert back.keys() == full.keys()
        for k, v in full.items():
            assert torch.equal(back[k], v), (tp, pp, vp, k)


def test_shards_have_the_model_shapes_and_names():
    full = single_process_state()
    shards = shard_full_state(full, M, 1, 2, 2)
    last_chunk = shards[(0, 1)]["chunk1"]
    assert set(last_chunk) == {"layers.3." + s for s in (
        "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")} | {"final_ln.weight", "final_ln.bias", "output_weight"}
    stage = GPTStage(M, KERNELS, stage_spec(M.n_layers, 1, 2, 1, 2))
    stage.load_state_dict(last_chunk)
    assert torch.equal(stage.output_weight[:M.vocab_size], full["embedding.wte.weight"])


def test_the_vocabulary_padding_of_a_sharded_state_is_zero_as_the_model_holds_it():
    """shard_full_state gives each rank what its stage's state_dict() holds: the rows past the
    vocabulary (the last shard's, at tp 2) are zeros, as init_weights leaves them."""
    full = single_process_state()
    states = shard_full_state(full, M, 2, 1)
    last = states[(1, 0)]["chunk0"]["embedding.wte.weight"]
    rows = M.padded_vocab_size(2) // 2
    pad = M.padded_vocab_size(2) - M.vocab_size
    assert torch.all(last[rows - pad:] == 0) and torch.any(last[:rows - pad] != 0)
    model = GPTStage(M, KERNELS, stage_spec(M.n_layers, 0, 1))
    init_weights(model, M, seed=3)
    own = model.state_dict()["embedding.wte.weight"]
    assert torch.equal(shard_full_state(full, M, 1, 1)[(0, 0)]["chunk0"]["embedding.wte.weight"],
                       own)

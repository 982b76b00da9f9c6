"""Reading Megatron-LM checkpoints (megagpt/megatron_lm.py) without megatron installed: files
written in Megatron-LM's 'torch' layout from one of our models' weights, cut as Megatron cuts
them, read back equal in every tensor and pipeline layout; every architecture the model cannot
express refused naming Megatron's argument; damaged or partial folders refused with the fix.
What megatron-core itself writes is checked in test_model_megatron_core.py and
tests/distributed/test_megatron_lm_layouts.py."""
import argparse
import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.convert import ConversionError, convert, load_source, our_logits
from megagpt.megatron_lm import merge_stages
from megagpt.model.reshard import full_state_shapes

M = ModelConfig(vocab_size=100, d_model=32, n_heads=4, n_layers=4, seq_length=16, dropout=0.0,
                init_std=0.1)
_OURS_TO_MEGATRON = {
    "ln1": "input_layernorm", "attn.qkv": "self_attention.linear_qkv",
    "attn.proj": "self_attention.linear_proj", "ln2": "pre_mlp_layernorm",
    "mlp.fc1": "mlp.linear_fc1", "mlp.fc2": "mlp.linear_fc2"}
_SPLIT = {"self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
          "mlp.linear_fc1.weight": 0, "mlp.linear_fc1.bias": 0,
          "self_attention.linear_proj.weight": 1, "mlp.linear_fc2.weight": 1}


def random_state(m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = full_state_shapes(m)
    return {name: torch.randn(shape, generator=g) * 0.2 for name, shape in shapes.items()}


def megatron_args(**changes):
    args = dict(num_layers=M.n_layers, hidden_size=M.d_model, num_attention_heads=M.n_heads,
                ffn_hidden_size=4 * M.d_model, max_position_embeddings=M.seq_length,
                seq_length=M.seq_length, tokenizer_type="NullTokenizer",
                vocab_size=M.vocab_size - 1, padded_vocab_size=128,
                make_vocab_size_divisible_by=128, normalization="LayerNorm", norm_epsilon=1e-5,
                position_embedding_type="learned_absolute", openai_gelu=False,
                bias_gelu_fusion=True, swiglu=False, add_bias_linear=True,
                untie_embeddings_and_output_weights=False, hidden_dropout=0.0,
                attention_dropout=0.0, init_method_std=0.1, bf16=True,
                consumed_train_samples=448, transformer_impl="local")
    args.update(changes)
    return argparse.Namespace(**args)


def megatron_stage(full, m, layers, first, last, t, tp, te_names=False):
    """One stage's weights on tensor-parallel rank t, in megatron-core's names and cuts."""
    out = {}
    for local, i in enumerate(layers):
        for ours, theirs in _OURS_TO_MEGATRON.items():
            for leaf in ("weight", "bias"):
                value = full[f"layers.{i}.{ours}.{leaf}"]
                if ours == "attn.qkv":    # ours [q, k, v][head], Megatron's [head][q, k, v]
                    value = value.reshape(3, m.n_heads, -1, *value.shape[1:]).transpose(0, 1) \
                        .reshape(value.shape)
                name = f"{theirs}.{leaf}"
                if te_names and theirs.endswith("layernorm"):
                    into = ("self_attention.linear_qkv" if theirs == "input_layernorm"
                            else "mlp.linear_fc1")
                    name = f"{into}.layer_norm_{leaf}"
                dim = _SPLIT.get(name)
                if dim is not None:
                    value = value.chunk(tp, dim)[t]
                out[f"decoder.layers.{local}.{name}"] = value.clone()
            out[f"decoder.layers.{local}.mlp.linear_fc1._extra_state"] = None
    rows = m.padded_vocab_size(tp)
    if first:
        wte = torch.cat([full["embedding.wte.weight"],
                         torch.zeros(rows - m.vocab_size, m.d_model)])
        out["embedding.word_embeddings.weight"] = wte.chunk(tp, 0)[t].clone()
        out["embedding.position_embeddings.weight"] = full["embedding.wpe.weight"].clone()
    if last:
        out["decoder.final_layernorm.weight"] = full["final_ln.weight"].clone()
        out["decoder.final_layernorm.bias"] = full["final_ln.bias"].clone()
        if not first:
            out["output_layer.weight"] = torch.zeros(rows // tp, m.d_model)
    return out


def write_megatron(root, full, m=M, tp=1, pp=1, vp=1, iteration=7, args=None, te_names=False):
    """A Megatron-LM save dir in the 'torch' format holding `full` (our names) at tp x pp x vp."""
    args = args or megatron_args(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    per = m.n_layers // (pp * vp)
    folder = Path(root) / f"iter_{iteration:07d}"
    for t in range(tp):
        for r in range(pp):
            chunks = []
            for c in range(vp):
                stage = c * pp + r
                chunks.append(megatron_stage(full, m, range(stage * per, (stage + 1) * per),
                                             stage == 0, stage == pp * vp - 1, t, tp, te_names))
            state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
            state.update({"model": chunks[0]} if vp == 1 else
                         {f"model{c}": chunk for c, chunk in enumerate(chunks)})
            name = f"mp_rank_{t:02d}" + (f"_{r:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            torch.save(state, folder / name / "model_optim_rng.pt")
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return Path(root)


@pytest.mark.parametrize("tp,pp,vp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2),
                                      (4, 1, 1)])
def test_every_layout_reads_back_the_weights_it_was_cut_from(tmp_path, tp, pp, vp):
    full = random_state()
    source = load_source(write_megatron(tmp_path / "mlm", full, tp=tp, pp=pp, vp=vp))
    assert source.kind == "megatron" and source.layout == (tp, pp, vp)
    assert (source.step, source.consumed_samples) == (7, 448)
    assert dataclasses.replace(source.model, config_file=None) == M
    assert set(source.full_state) == set(full)
    for name, value in full.items():
        assert torch.equal(source.full_state[name], value), name


def test_transformer_engine_names_and_zero_centred_norms(tmp_path):
    full = random_state()
    shifted = {k: v - 1 if k.endswith(("ln1.weight", "ln2.weight", "final_ln.weight")) else v
               for k, v in full.items()}
    args = megatron_args(apply_layernorm_1p=True, transformer_impl="transformer_engine")
    source = load_source(write_megatron(tmp_path / "mlm", shifted, args=args, te_names=True))
    for name, value in full.items():
        torch.testing.assert_close(source.full_state[name], value, rtol=0, atol=1e-6, msg=name)


def test_an_iteration_folder_a_release_and_the_run_config(tmp_path):
    full = random_state()
    root = write_megatron(tmp_path / "mlm", full, iteration=12)
    source = load_source(root / "iter_0000012")
    assert source.step == 12 and source.config["training"]["precision"] == "bf16"
    assert source.config["model"]["vocab_size"] == M.vocab_size
    assert source.tokenizer_known is False and any("NullTokenizer" in n for n in source.notes)
    (root / "iter_0000012").rename(root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert load_source(root).path.name == "release"


def test_gpt2_tokenizer_runs_name_the_bundled_tokenizer(tmp_path):
    m = dataclasses.replace(M, vocab_size=50257, n_layers=1)
    args = megatron_args(tokenizer_type="GPT2BPETokenizer", vocab_file="/gone/gpt2-vocab.json",
                         merge_file="/gone/gpt2-merges.txt", num_layers=1, vocab_size=None)
    full = random_state(m)
    root = tmp_path / "mlm"
    folder = root / "iter_0000001" / "mp_rank_00"
    folder.mkdir(parents=True)
    state = megatron_stage(full, m, range(1), True, True, 0, 1)
    torch.save({"args": args, "iteration": 1, "model": state}, folder / "model_optim_rng.pt")
    source = load_source(root / "iter_0000001")
    assert (source.tokenizer_path, source.tokenizer_known, source.model.vocab_size) == \
        ("gpt2", True, 50257)
    assert torch.equal(source.full_state["embedding.wte.weight"], full["embedding.wte.weight"])


def test_converts_to_ours_and_to_hugging_face_with_the_same_logits(tmp_path):
    pytest.importorskip("transformers")
    full = random_state()
    root = write_megatron(tmp_path / "mlm", full, tp=2, pp=2)
    ours = convert(root, tmp_path / "ours", "megagpt", tp=1, pp=1, verify=True, log=lambda _: None)
    assert ours.max_logit_difference <= 1e-5
    assert any("NullTokenizer" in note for note in ours.notes)
    back = load_source(tmp_path / "ours")
    assert back.step == 7 and back.consumed_samples == 448
    ids = torch.randint(0, M.vocab_size, (2, 9))
    torch.testing.assert_close(our_logits(back.model, back.full_state, ids),
                               our_logits(M, full, ids), rtol=0, atol=1e-5)
    with pytest.raises(ConversionError, match="has 50257 ids but the model's vocabulary is 100"):
        convert(root, tmp_path / "hf", "hf", log=lambda _: None)
    assert not (tmp_path / "hf").exists()


ARCHITECTURES = [
    (dict(normalization="RMSNorm"), "--normalization RMSNorm"),
    (dict(swiglu=True), "--swiglu"),
    (dict(squared_relu=True), "--squared-relu"),
    (dict(quick_geglu=True), "--quick-geglu"),
    (dict(position_embedding_type="rope"), "--position-embedding-type rope"),
    (dict(position_embedding_type=None, use_rotary_position_embeddings=True),
     "--position-embedding-type rope"),
    (dict(untie_embeddings_and_output_weights=True), "--untie-embeddings-and-output-weights"),
    (dict(group_query_attention=True, num_query_groups=2), "--num-query-groups 2"),
    (dict(kv_channels=16), "--kv-channels 16"),
    (dict(multi_latent_attention=True), "--multi-latent-attention"),
    (dict(qk_layernorm=True), "--qk-layernorm"),
    (dict(num_experts=8), "--num-experts 8"),
    (dict(add_bias_linear=False), "--disable-bias-linear"),
    (dict(apply_residual_connection_post_layernorm=True),
     "--apply-residual-connection-post-layernorm"),
    (dict(use_legacy_models=True), "--use-legacy-models"),
]


@pytest.mark.parametrize("changes,flag", ARCHITECTURES, ids=[f for _, f in ARCHITECTURES])
def test_an_architecture_the_model_cannot_express_is_refused_naming_the_argument(
        tmp_path, changes, flag):
    root = write_megatron(tmp_path / "mlm", random_state(), args=megatron_args(**changes))
    with pytest.raises(ConversionError, match="cannot express") as e:
        load_source(root)
    assert flag in str(e.value)


@pytest.mark.parametrize("openai_gelu", [False, True])
def test_megatron_core_s_unfused_gelu_is_the_exact_one_openai_gelu_or_not(tmp_path, openai_gelu):
    args = megatron_args(bias_gelu_fusion=False, openai_gelu=openai_gelu)
    source = load_source(write_megatron(tmp_path / "mlm", random_state(), args=args))
    assert source.model == dataclasses.replace(M, activation="gelu")
    assert source.config["model"]["activation"] == "gelu"


def test_weights_with_no_place_and_the_legacy_model_are_refused(tmp_path):
    root = write_megatron(tmp_path / "mlm", random_state())
    path = root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(8)
    torch.save(state, path)
    with pytest.raises(ConversionError, match=r"no place for: decoder\.layers\.<i>\."
                                              r"self_attention\.q_layernorm\.weight"):
        load_source(root)
    state["model"] = {"language_model": {"embedding": {}}}
    torch.save(state, path)
    with pytest.raises(ConversionError, match="legacy model.*--saver core"):
        load_source(root)


def test_weights_of_other_sizes_than_the_arguments_are_refused(tmp_path):
    root = write_megatron(tmp_path / "mlm", random_state(), args=megatron_args(num_layers=5))
    with pytest.raises(ConversionError, match="layers.4.ln1.weight: missing"):
        load_source(root)
    root = write_megatron(tmp_path / "mlm2", random_state(), args=megatron_args(
        max_position_embeddings=32))
    with pytest.raises(ConversionError, match=r"embedding.wpe.weight: \(16, 32\) in the weights, "
                                              r"\(32, 32\) from the arguments"):
        load_source(root)


def test_damaged_or_partial_folders_are_refused_with_the_fix(tmp_path):
    root = write_megatron(tmp_path / "mlm", random_state(), tp=2, pp=2)
    (root / "latest_checkpointed_iteration.txt").write_text("9")
    with pytest.raises(ConversionError, match="names iteration 9, but iter_0000009 is not in"):
        load_source(root)
    (root / "latest_checkpointed_iteration.txt").write_text("\x00garbage")
    with pytest.raises(ConversionError, match="neither an iteration number nor 'release'"):
        load_source(root)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    (root / "iter_0000007" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    with pytest.raises(ConversionError, match="lacks mp_rank_01_001/model_optim_rng.pt of its "
                                              "tp 2 x pp 2 ranks' files"):
        load_source(root)
    file = root / "iter_0000007" / "mp_rank_00_001" / "model_optim_rng.pt"
    file.write_bytes(file.read_bytes()[:1000])
    (root / "iter_0000007" / "mp_rank_01_001").rmdir()
    with pytest.raises(ConversionError, match="lacks mp_rank_01_001"):
        load_source(root)
    (root / "iter_0000007" / "mp_rank_01_001").mkdir()
    torch.save({}, root / "iter_0000007" / "mp_rank_01_001" / "model_optim_rng.pt")
    with pytest.raises(ConversionError, match="mp_rank_00_001.*cannot be read.*truncated"):
        load_source(root)


def test_expert_parallel_ranks_are_refused(tmp_path):
    root = write_megatron(tmp_path / "mlm", random_state())
    (root / "iter_0000007" / "mp_rank_00").rename(root / "iter_0000007" / "mp_rank_00_000_000")
    with pytest.raises(ConversionError, match="expert-parallel.*mixture-of-experts"):
        load_source(root)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_reading_a_file_runs_none_of_the_code_its_pickle_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_megatron(tmp_path / "mlm", random_state())
    path = root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["optimizer"] = _Payload()
    torch.save(state, path)
    with pytest.raises(ConversionError, match="refused by torch's weights-only loader .*"
                                              "GLOBAL posix.system"):
        load_source(root)
    assert not (tmp_path / "pwned").exists()
    state["optimizer"] = {"param_groups": [{"lr": torch.tensor(1.0)}], "kind": _Inert()}
    torch.save(state, path)
    assert load_source(root).model == M     # another class of the run's: a stand-in


class _Inert:
    def __reduce__(self):
        return (_Inert, ())


def test_stages_whose_tensor_parallel_ranks_differ_are_refused():
    a = {"decoder.final_layernorm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match="rank 1 holds other weights than rank 0"):
        merge_stages([[a, {}]], 2)


def write_torch_dist(root, full, m=M, args=None, iteration=7):
    """A Megatron-LM save dir in the 'torch_dist' format, as megatron-core lays it out: whole
    tensors, each block weight stacked over the layers, the layer norms under Transformer
    Engine's names, the arguments in common.pt, Megatron's metadata.json (written with
    torch.distributed.checkpoint here; megatron-core's own writer is checked in
    test_model_megatron_core.py)."""
    import torch.distributed.checkpoint as dcp

    stage = megatron_stage(full, m, range(m.n_layers), True, True, 0, 1, te_names=True)
    state = {k: v for k, v in stage.items() if not k.startswith("decoder.layers.")}
    for key in [k for k in stage if k.startswith("decoder.layers.0.")]:
        rest = key.removeprefix("decoder.layers.0.")
        if stage[key] is not None:
            state[f"decoder.layers.{rest}"] = torch.stack(
                [stage[f"decoder.layers.{i}.{rest}"] for i in range(m.n_layers)])
    state["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"] = torch.zeros(3)
    folder = Path(root) / f"iter_{iteration:07d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"args": args or megatron_args(), "checkpoint_version": 3.0,
                "iteration": iteration}, folder / "common.pt")
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist", '
                                          '"sharded_backend_version": 1, "common_backend": '
                                          '"torch", "common_backend_version": 1}')
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return Path(root)


def test_the_torch_dist_format_reads_back_the_weights(tmp_path):
    full = random_state()
    args = megatron_args(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    source = load_source(write_torch_dist(tmp_path / "mlm", full, args=args))
    assert source.kind == "megatron" and source.layout == (2, 2, 1) and source.step == 7
    assert set(source.full_state) == set(full)
    for name, value in full.items():
        assert torch.equal(source.full_state[name], value), name


def test_a_torch_dist_folder_missing_its_index_or_arguments_is_refused(tmp_path):
    root = write_torch_dist(tmp_path / "mlm", random_state())
    (root / "iter_0000007" / ".metadata").unlink()
    with pytest.raises(ConversionError, match="lacks .metadata: a torch_dist save that did not "
                                              "finish"):
        load_source(root)
    root = write_torch_dist(tmp_path / "mlm2", random_state())
    (root / "iter_0000007" / "common.pt").unlink()
    with pytest.raises(ConversionError, match="lacks common.pt"):
        load_source(root)
    root = write_torch_dist(tmp_path / "mlm3", random_state(), args=megatron_args(swiglu=True))
    with pytest.raises(ConversionError, match="--swiglu"):
        load_source(root)
    root = write_torch_dist(tmp_path / "mlm4", random_state())
    for data in (root / "iter_0000007").glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ConversionError, match="cannot be read .*truncated or corrupt"):
        load_source(root)


def gpt2_sized_run(root, tp=2):
    """A one-block run with GPT-2's tokenizer, saved at tp 2 (its weights in our names too)."""
    m = dataclasses.replace(M, vocab_size=50257, n_layers=1)
    full = random_state(m, seed=3)
    args = megatron_args(tokenizer_type="GPT2BPETokenizer", vocab_size=None, num_layers=1,
                         tensor_model_parallel_size=tp)
    return write_megatron(root, full, m, tp=tp, args=args), m, full


def test_the_command_line_writes_a_hugging_face_folder_from_a_megatron_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    import subprocess
    import sys

    root, m, full = gpt2_sized_run(tmp_path / "mlm")
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    run = subprocess.run([sys.executable, str(tool), "--input", str(root), "--output",
                          str(tmp_path / "hf"), "--to", "hf", "--verify"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "read Megatron-LM checkpoint" in run.stdout and "largest logit difference" in run.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, m.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, our_logits(m, full, ids), rtol=0, atol=1e-4)


def test_checkpoint_pretrained_starts_from_a_megatron_run(tmp_path):
    from megagpt.training.trainer import pretrained_state

    root, m, full = gpt2_sized_run(tmp_path / "mlm")
    weights = pretrained_state(str(root), m, "gpt2")
    assert all(torch.equal(weights[name], value) for name, value in full.items())
    with pytest.raises(Exception, match="has model.n_layers=1, the config says 2"):
        pretrained_state(str(root), dataclasses.replace(m, n_layers=2), "gpt2")


def test_transformer_engine_2_extra_state_tensors_are_passed_over(tmp_path):
    """Transformer Engine 2 saves each module's extra state as a uint8 tensor of a pickle."""
    import pickle

    full = random_state()
    root = write_megatron(tmp_path / "mlm", full, te_names=True)
    path = root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    for i in range(M.n_layers):
        for module in ("self_attention.linear_qkv", "self_attention.core_attention",
                       "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            state["model"][f"decoder.layers.{i}.{module}._extra_state"] = torch.frombuffer(
                bytearray(pickle.dumps(None)), dtype=torch.uint8)
    torch.save(state, path)
    source = load_source(root)
    assert all(torch.equal(source.full_state[k], v) for k, v in full.items())


def test_zero_centred_norms_of_a_bf16_run_keep_their_gain_exactly(tmp_path):
    full = {k: v.bfloat16() for k, v in random_state().items()}
    shifted = {k: v - 1 if k.endswith(("ln1.weight", "ln2.weight", "final_ln.weight")) else v
               for k, v in full.items()}
    args = megatron_args(apply_layernorm_1p=True)
    source = load_source(write_megatron(tmp_path / "mlm", shifted, args=args))
    assert {v.dtype for v in source.full_state.values()} == {torch.float32}
    for name, value in shifted.items():
        norm = name.endswith(("ln1.weight", "ln2.weight", "final_ln.weight"))
        expected = value.float() + 1 if norm else value.float()
        assert torch.equal(source.full_state[name], expected), name
    assert any("float32" in note for note in source.notes)


def test_other_distributed_formats_and_partial_arguments_are_named(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp" / "iter_0000005"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=str(folder), no_dist=True)
    with pytest.raises(ConversionError, match="--ckpt-format torch_dcp or fsdp_dtensor save, "
                                              "which is not read here"):
        load_source(folder)
    root = write_megatron(tmp_path / "noargs", random_state(), args=argparse.Namespace(
        num_layers=4, tokenizer_type="NullTokenizer"))
    with pytest.raises(ConversionError, match="arguments lack hidden_size, num_attention_heads"):
        load_source(root)


def test_a_checkpoint_without_its_first_stage_or_given_by_one_rank_is_refused(tmp_path):
    root = write_megatron(tmp_path / "mlm", random_state())
    path = root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("embedding.")}
    torch.save(state, path)
    with pytest.raises(ConversionError, match="holds no embedding.word_embeddings.weight"):
        load_source(root)
    for given in (path, path.parent):
        with pytest.raises(ConversionError, match=rf"is one rank's part of a Megatron-LM "
                                                  rf"checkpoint; fix: give the iteration folder "
                                                  rf"holding every rank's, --input "
                                                  rf"{root / 'iter_0000007'}$"):
            load_source(given)


def test_the_run_s_epsilon_dropout_and_precision_are_taken(tmp_path):
    args = megatron_args(norm_epsilon=1e-6, hidden_dropout=0.1, attention_dropout=0.0,
                         bf16=False, fp16=True)
    source = load_source(write_megatron(tmp_path / "fp16", random_state(), args=args))
    assert (source.model.layernorm_eps, source.model.dropout) == (1e-6, 0.1)
    assert source.config["training"]["precision"] == "fp16"
    assert any("--hidden-dropout and --attention-dropout differ" in n for n in source.notes)
    args = megatron_args(bf16=False, layernorm_epsilon=1e-6, norm_epsilon=None)
    source = load_source(write_megatron(tmp_path / "fp32", random_state(), args=args))
    assert source.config["training"]["precision"] == "fp32"
    assert source.model.layernorm_eps == 1e-6           # the argument's older name


def test_the_torch_dist_layout_is_the_run_s_tensor_and_pipeline_sizes(tmp_path):
    args = megatron_args(tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
                         virtual_pipeline_model_parallel_size=None)
    assert load_source(write_torch_dist(tmp_path / "mlm", random_state(),
                                        args=args)).layout == (2, 1, 1)


def test_arguments_without_the_gelu_fusion_flag_and_an_exactly_full_vocabulary(tmp_path):
    args = megatron_args(vocab_size=127)                # 127 ids + the end-of-document one
    del args.bias_gelu_fusion                           # Megatron's default: fused, tanh
    m = dataclasses.replace(M, vocab_size=128)
    source = load_source(write_megatron(tmp_path / "mlm", random_state(m), m, args=args))
    assert source.model.activation == "gelu_tanh" and source.model.vocab_size == 128
    assert not any("not recorded" in note for note in source.notes)


def test_a_model_the_config_validator_refuses_is_named(tmp_path):
    args = megatron_args(max_position_embeddings=None, seq_length=None)
    with pytest.raises(ConversionError, match="cannot express:\n  - model.seq_length"):
        load_source(write_megatron(tmp_path / "mlm", random_state(), args=args))


def test_blocks_not_numbered_from_zero_are_named():
    stage = {"decoder.layers.1.input_layernorm.weight": torch.ones(4),
             "decoder.layers.2.input_layernorm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match=r"numbered \[1, 2\], not from 0 one by one"):
        merge_stages([[stage]], 2)


def test_checkpoint_pretrained_reads_a_checkpoint_of_ours_from_before_model_activation(tmp_path):
    import json

    from megagpt.training.checkpoint import CheckpointError
    from megagpt.training.trainer import pretrained_state

    convert(write_megatron(tmp_path / "mlm", random_state()), tmp_path / "ours", "megagpt",
            tp=1, pp=1, log=lambda _: None)
    meta_path = tmp_path / "ours" / "step_0000007" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["model"]["activation"]           # as written before the field existed
    meta_path.write_text(json.dumps(meta))
    assert pretrained_state(str(tmp_path / "ours"), M).keys()
    with pytest.raises(CheckpointError, match="has model.activation=gelu_tanh, the config says "
                                              "gelu"):
        pretrained_state(str(tmp_path / "ours"), dataclasses.replace(M, activation="gelu"))

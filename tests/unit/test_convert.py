"""Conversion between layouts and to and from Hugging Face GPT-2; the two command-line tools."""
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from megagpt.config import load_config
from megagpt.convert import (ConversionError, Source, convert, converted_config, load_source,
                             our_logits)
from megagpt.data.tokenizer import GPT2_DIR, load_tokenizer
from megagpt.hf import hf_config_dict
from megagpt.model.gpt import build_stage, gather_full_state_dict
from megagpt.model.reshard import full_state_from_checkpoint, shard_full_state
from megagpt.testing import tiny_config
from megagpt.training.checkpoint import (CheckpointError, check_compatible, expected_files,
                                         find_latest, is_complete, load_checkpoint,
                                         write_checkpoint_offline)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[2]
CFG = tiny_config(model__vocab_size=50257)       # the GPT-2 vocabulary, so the tokenizer fits
M = CFG.model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full():
    """The tiny model's weights, every tensor perturbed so that biases and norms matter too."""
    state = gather_full_state_dict(build_stage(CFG))
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def write_ours(save_dir, full, tp, pp, vp=1, step=5):
    meta = {"config": CFG.to_dict(), "consumed_samples": 40,
            "parallel": {"tp": tp, "pp": pp, "dp": 1, "vp": vp}}
    return write_checkpoint_offline(save_dir, step, shard_full_state(full, M, tp, pp, vp), meta)


@pytest.fixture(scope="module")
def ours(tmp_path_factory, full):
    """Save dirs of the same weights at tp 1 x pp 1 and tp 2 x pp 2."""
    root = tmp_path_factory.mktemp("ours")
    for tp, pp in [(1, 1), (2, 2)]:
        write_ours(root / f"tp{tp}pp{pp}", full, tp, pp)
    return root


def quiet(*args, **kwargs):
    """convert(...) without its progress lines."""
    return convert(*args, log=lambda line: None, **kwargs)


def tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ---------------------------------------------------------------------------------------------
# The offline checkpoint writer

def test_offline_checkpoints_have_the_trainer_format_and_are_weights_only(tmp_path, full):
    step_dir = write_ours(tmp_path, full, 2, 2, vp=2)
    assert step_dir == tmp_path / "step_0000005" and find_latest(tmp_path) == step_dir
    meta = json.loads((step_dir / "meta.json").read_text())
    assert set(meta["files"]) == set(expected_files(2, 2, 4)) and is_complete(step_dir)
    assert meta["weights_only"] is True and meta["step"] == 5 and meta["world_size"] == 4
    shards = shard_full_state(full, M, 2, 2, 2)
    for rank, (t, d, p) in enumerate([(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]):
        _, model_state, optim_state, rng_state = load_checkpoint(step_dir, tp_rank=t, pp_rank=p,
                                                                 dp_rank=d)
        assert optim_state == {} and rng_state == {}
        for chunk, state in shards[(t, p)].items():
            assert all(torch.equal(model_state[chunk][k], v) for k, v in state.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_offline_writer_refuses_missing_ranks(tmp_path, full):
    meta = {"config": CFG.to_dict(), "consumed_samples": 0,
            "parallel": {"tp": 2, "pp": 1, "dp": 1, "vp": 1}}
    with pytest.raises(ValueError, match=r"keys \[\(0, 0\)\], the layout tp=2 x pp=1 needs "
                                         r"\[\(0, 0\), \(1, 0\)\]"):
        write_checkpoint_offline(tmp_path, 1, {(0, 0): {}}, meta)


# ---------------------------------------------------------------------------------------------
# Ours -> Hugging Face

@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp2"])
def test_export_gives_gpt2_the_same_logits(tmp_path, ours, full, layout):
    out = tmp_path / "hf"
    result = quiet(ours / layout, out, "hf")
    assert result.output == out and result.max_logit_difference is None
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()   # tied
    assert hf.transformer.wte.weight.shape == (M.vocab_size, M.d_model)          # no padding
    ids = torch.randint(0, M.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (hf(ids).logits - our_logits(M, full, ids)).abs().max().item()
    assert difference <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert leftovers(tmp_path) == []


def test_the_exported_tokenizer_and_configs_load_offline(tmp_path, ours):
    quiet(ours / "tp2pp2", tmp_path / "hf", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "ROMEO: héllo, wörld!\n<|endoftext|>"   # Hugging Face reads the special string as its id
    assert tokenizer.encode(text) == load_tokenizer("gpt2").encode(text, allow_special=True)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode([50256]) == "<|endoftext|>"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == dict(hf_config_dict(M), bos_token_id=50256, eos_token_id=50256)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == generation.pad_token_id == generation.bos_token_id == 50256


def test_verify_reports_the_largest_logit_difference(tmp_path, ours):
    lines = []
    result = convert(ours / "tp2pp2", tmp_path / "hf", "hf", verify=True, log=lines.append)
    assert 0 <= result.max_logit_difference <= 1e-4
    assert any(line.startswith("verify: every weight equal to the source's; largest logit "
                               "difference") for line in lines)


@pytest.mark.parametrize("to", ["hf", "megagpt"])
def test_verify_finds_a_weight_the_logits_do_not_see(tmp_path, ours, monkeypatch, to):
    """A change of a weight the logits of the verification batch barely see (its positions are
    the first 16: an export that zeroed the position embeddings past them passed) is found:
    the weights, read back, are compared too."""
    import megagpt.convert as conversion

    if to == "hf":
        export = conversion.to_hf

        def broken(state, m):
            out = export(state, m)
            out["transformer.wpe.weight"][-1] += 1e-6
            return out
        monkeypatch.setattr(conversion, "to_hf", broken)
    else:
        shard = conversion.shard_full_state

        def broken(full, *args, **kwargs):
            full = dict(full, **{"embedding.wpe.weight": full["embedding.wpe.weight"].clone()})
            full["embedding.wpe.weight"][-1] += 1e-6
            return shard(full, *args, **kwargs)
        monkeypatch.setattr(conversion, "shard_full_state", broken)
    with pytest.raises(ConversionError, match=r"--verify: 1 weight\(s\) of the written output "
                                              r"differ from the source's \(embedding.wpe.weight\); "
                                              r"the output was not written"):
        quiet(ours / "tp1pp1", tmp_path / "out", to, verify=True)
    assert not (tmp_path / "out").exists()


def test_a_failed_verification_writes_nothing(tmp_path, ours, monkeypatch):
    import megagpt.convert as conversion

    monkeypatch.setattr(conversion, "logit_difference", lambda source, to, written: 0.5)
    with pytest.raises(ConversionError, match="--verify: the largest logit difference 0.5 exceeds "
                                              "0.001; the output was not written"):
        quiet(ours / "tp1pp1", tmp_path / "out", "megagpt", verify=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours, and ours -> ours

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A GPT-2 saved by transformers, every weight random (biases and norms too)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(M)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder


def test_hf_to_ours_to_hf_gives_identical_tensors(tmp_path, hf_folder):
    quiet(hf_folder, tmp_path / "ours", "megagpt", tp=2, pp=2)
    quiet(tmp_path / "ours", tmp_path / "back", "hf")
    original = safetensors_torch.load_file(hf_folder / "model.safetensors")
    back = safetensors_torch.load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    for k, v in original.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "gelu_fast", "gelu_python"])
def test_an_hf_gpt2_with_another_gelu_converts_both_ways_with_its_logits(tmp_path, hf_folder,
                                                                          activation):
    """activation_function "gelu" (the exact GeLU; "gelu_python" too) is model.activation=gelu,
    and back; "gelu_pytorch_tanh" and "gelu_fast" (the old Megatron GPT-2 converter's) are GPT-2's
    tanh GeLU (gelu_tanh, exported as "gelu_new")."""
    folder = tmp_path / activation
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, activation_function=activation)))
    source = load_source(folder)
    exact = activation in ("gelu", "gelu_python")
    assert source.model.activation == ("gelu" if exact else "gelu_tanh")
    quiet(folder, tmp_path / "ours", "megagpt", tp=2, verify=True)
    quiet(tmp_path / "ours", tmp_path / "back", "hf", verify=True)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["activation_function"] == ("gelu" if exact else "gelu_new")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.randint(0, M.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = our_logits(source.model, source.full_state, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    tanh = dataclasses.replace(source.model, activation="gelu_tanh")
    assert ((our_logits(tanh, source.full_state, ids) - theirs).abs().max().item() > 1e-4) == exact


def test_an_hf_gpt2_with_different_dropouts_converts_with_its_residual_one(tmp_path, hf_folder,
                                                                           monkeypatch):
    """Dropout changes neither the weights nor inference: a config.json whose three dropout
    probabilities differ (which transformers loads) converts, model.dropout = resid_pdrop. The
    source given as a relative path is recorded whole."""
    folder = tmp_path / "drops"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    for drops in (dict(attn_pdrop=0.0, resid_pdrop=0.1, embd_pdrop=0.1),   # two values, three
                  dict(attn_pdrop=0.0, resid_pdrop=0.1, embd_pdrop=0.2)):
        (folder / "config.json").write_text(json.dumps(dict(config, **drops)))
        source = load_source(folder)
        assert source.model.dropout == 0.1
    assert source.full_state.keys() == load_source(hf_folder).full_state.keys()
    monkeypatch.chdir(tmp_path)
    quiet("drops", tmp_path / "ours", "megagpt", verify=True)
    meta = json.loads((tmp_path / "ours" / "step_0000000" / "meta.json").read_text())
    assert meta["converted_from"] == str(folder)


def test_the_python_block_of_models_md_runs_as_written(hf_folder, capsys):
    """docs/models.md shows how to load a model from Python: that block, on a Hugging Face
    folder instead of runs/tiny_model/checkpoints."""
    text = (ROOT / "docs" / "models.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/tiny_model/checkpoints"' in block
    exec(block.replace('"runs/tiny_model/checkpoints"', repr(str(hf_folder))), {})
    text_out, loss = capsys.readouterr().out.splitlines()[-2:]
    assert 0 < float(loss) < 20


def test_a_missing_input_is_named_before_its_output(tmp_path):
    with pytest.raises(ConversionError, match=r"--input .*nope does not exist"):
        quiet(tmp_path / "nope", tmp_path / "nope", "hf")


def test_an_output_inside_the_input_is_refused(tmp_path, ours):
    """It was written there: inside a step folder, pruning the step removes it too."""
    step = ours / "tp1pp1" / "step_0000005"
    for source, output in [(ours / "tp1pp1", ours / "tp1pp1" / "conv"), (step, step / "hf"),
                           (step, step)]:
        with pytest.raises(ConversionError, match=rf"--output {output} is( inside)? --input "
                                                  rf"{source}: the source would hold the output"):
            quiet(source, output, "hf")
        assert not (output / "config.json").exists()


def test_a_sharded_hf_folder_converts_and_a_missing_shard_is_named(tmp_path, hf_folder):
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_folder, local_files_only=True)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    whole, parts = load_source(hf_folder), load_source(tmp_path / "sharded")
    assert whole.full_state.keys() == parts.full_state.keys()
    assert all(torch.equal(v, parts.full_state[k]) for k, v in whole.full_state.items())
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(ConversionError, match=rf"{tmp_path / 'sharded'} is missing 1 of the "
                                              rf"{len(shards)} weight files "
                                              rf"model.safetensors.index.json lists "
                                              rf"\({shards[1]}\); fix: copy or download them too"):
        load_source(tmp_path / "sharded")


def test_hf_pytorch_model_bin_converts_too(tmp_path, hf_folder):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    weights = safetensors_torch.load_file(hf_folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    result = quiet(folder, tmp_path / "ours", "megagpt", verify=True)
    assert result.max_logit_difference <= 1e-4


def test_hf_to_ours_is_a_resumable_weights_only_checkpoint(tmp_path, hf_folder):
    result = quiet(hf_folder, tmp_path / "ours", "megagpt", tp=2, pp=1, verify=True)
    assert result.max_logit_difference <= 1e-4
    assert "the optimizer state starts fresh" in result.notes[0]
    step_dir = find_latest(tmp_path / "ours")
    meta = json.loads((step_dir / "meta.json").read_text())
    assert step_dir.name == "step_0000000" and meta["consumed_samples"] == 0
    assert meta["weights_only"] is True
    assert meta["parallel"] == {"tp": 2, "pp": 1, "dp": 1, "vp": 1, "zero_stage": 0}
    cfg = load_config(raw=meta["config"])                    # a whole, valid training config
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (32, 4, 50257)
    assert (cfg.parallel.world_size, cfg.parallel.tensor_parallel_size) == (2, 2)
    small = load_config(ROOT / "configs" / "training" / "small_model.json")
    assert cfg.training == small.training
    check_compatible(meta, cfg.model, {"tp": 2, "pp": 1, "dp": 4, "vp": 1, "zero_stage": 1},
                     with_optimizer=False)


@pytest.mark.parametrize("path", [(2, 2, 1), (1, 2, 2), (2, 1, 1), (1, 1, 1)])
def test_ours_to_ours_keeps_every_weight_bit_for_bit(tmp_path, ours, full, path):
    tp, pp, vp = path
    quiet(ours / "tp2pp2", tmp_path / "out", "megagpt", tp=tp, pp=pp, vp=vp)
    meta, back = full_state_from_checkpoint(find_latest(tmp_path / "out"))
    assert back.keys() == full.keys()
    assert all(torch.equal(back[k], v) for k, v in full.items())
    assert (meta["step"], meta["consumed_samples"]) == (5, 40)
    assert meta["parallel"] == {"tp": tp, "pp": pp, "dp": 1, "vp": vp, "zero_stage": 0}
    assert meta["config"]["parallel"]["world_size"] == tp * pp
    assert meta["config"]["parallel"]["tensor_parallel_size"] == tp
    assert meta["config"]["training"] == CFG.to_dict()["training"]


@pytest.mark.parametrize("source, layout, micro", [
    (dict(dp=2, micro=2, training__global_batch_size=8), (2, 1, 1), 2),
    (dict(dp=4, micro=2), (1, 2, 1), 2),
    (dict(micro=8, training__global_batch_size=8), (1, 2, 2), 4),
    (dict(dp=2, micro=1), (1, 4, 1), 1),
    (dict(dp=2, zero=1, deepspeed_config=str(ROOT / "configs/deepspeed/zero2.json")), (2, 1, 1), 2),
    (dict(dp=2, zero=1, deepspeed_config=str(ROOT / "configs/deepspeed/zero2.json")), (1, 1, 1), 2),
    (dict(micro=8, training__cuda_graphs=True), (2, 1, 1), 8),
], ids=["dp2-to-tp2", "dp4-to-pp2", "vp2-needs-even-micro-batches", "dp2-to-pp4",
        "deepspeed-to-tp2", "deepspeed-dp2-to-one", "cuda-graphs-to-tp2"])
def test_the_recorded_config_is_a_valid_run_at_the_new_layout_with_the_same_global_batch(
        source, layout, micro):
    """A converted checkpoint's config is a config one can train with at its layout."""
    ds = source.pop("deepspeed_config", None)
    old = tiny_config(**source, **({"parallel__deepspeed_config": ds, "parallel__zero_stage": 2}
                                   if ds else {})).to_dict()
    tp, pp, vp = layout
    cfg = load_config(raw=converted_config(
        Source("megagpt", ROOT, M, {}, old, 5, 40, (1, 1, 1), "gpt2"), tp, pp, vp))
    par, t = cfg.parallel, cfg.training
    assert (par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
            par.virtual_pipeline_size) == (tp * pp, tp, pp, vp)
    assert (t.batch_size, t.batch_size * t.grad_accumulation_steps) == (micro, 8)
    assert par.deepspeed_config is None
    assert old["training"]["global_batch_size"] == t.global_batch_size
    assert t.cuda_graphs == (old["training"]["cuda_graphs"] and tp * pp == 1)


def test_deepspeed_stays_in_the_recorded_config_of_the_same_one_replica_layout():
    old = tiny_config(parallel__deepspeed_config=str(ROOT / "configs/deepspeed/zero2.json"),
                      parallel__zero_stage=2).to_dict()
    cfg = load_config(raw=converted_config(
        Source("megagpt", ROOT, M, {}, old, 5, 40, (1, 1, 1), "gpt2"), 1, 1, 1))
    assert (cfg.parallel.deepspeed_config, cfg.parallel.zero_stage) == (
        old["parallel"]["deepspeed_config"], 2)


def test_a_global_batch_the_interleaved_schedule_cannot_split_is_said(tmp_path, full):
    odd = tiny_config(micro=3, training__grad_accumulation_steps=1)     # 3 sequences a step
    meta = {"config": odd.to_dict(), "consumed_samples": 40,
            "parallel": {"tp": 1, "pp": 1, "dp": 1, "vp": 1}}
    write_checkpoint_offline(tmp_path / "src", 5, shard_full_state(full, M, 1, 1, 1), meta)
    result = quiet(tmp_path / "src", tmp_path / "out", "megagpt", tp=1, pp=2, vp=2)
    assert any("does not split into a multiple of pp=2" in note for note in result.notes)
    assert not any("does not split" in note for note in quiet(
        tmp_path / "src", tmp_path / "out2", "megagpt", tp=1, pp=2, vp=1).notes)


def test_the_layout_defaults_to_the_sources(tmp_path, ours):
    quiet(ours / "tp2pp2" / "step_0000005", tmp_path / "out", "megagpt")
    meta = json.loads((tmp_path / "out" / "step_0000005" / "meta.json").read_text())
    assert (meta["parallel"]["tp"], meta["parallel"]["pp"]) == (2, 2)


def test_an_empty_output_folder_is_used(tmp_path, ours):
    (tmp_path / "out").mkdir()
    quiet(ours / "tp1pp1", tmp_path / "out", "megagpt")
    assert is_complete(tmp_path / "out" / "step_0000005")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, nothing written

def make_half_written(root: Path, full) -> Path:
    step_dir = write_ours(root / "save", full, 2, 1)
    (step_dir / "model_tp1_pp0.pt").unlink()
    return step_dir


BAD_INPUTS = {
    "missing": (lambda root, full: root / "nope", "--input {} does not exist"),
    "a run dir": (lambda root, full: _folder(_folder(root / "run", {"metrics.jsonl": ""}) /
                                             "checkpoints", {}).parent,
                  "--input {0} is a run's folder (found: checkpoints, metrics.jsonl); fix: give "
                  "its save dir, --input {0}/checkpoints"),
    "neither": (lambda root, full: _folder(root / "junk", {"notes.txt": "hi"}),
                "--input {} is neither a checkpoint of ours nor a Hugging Face or Megatron-LM "
                "one (found: notes.txt)"),
    "unfinished save": (lambda root, full: _folder(root / "save" / "step_0000003.tmp", {"x.pt": ""}).parent,
                        "--input {} holds no complete checkpoint (step_0000003.tmp: saves that did "
                        "not finish)"),
    "tmp step folder": (lambda root, full: _folder(root / "step_0000003.tmp", {"x.pt": ""}),
                        "--input: {} is not a complete checkpoint: it has no meta.json"),
    "half-written step": (make_half_written,
                          "--input {} is not a complete checkpoint: model_tp1_pp0.pt is missing"),
    "not gpt2": (lambda root, full: _folder(root / "llama", {"config.json": json.dumps(
        {"model_type": "llama", "hidden_size": 64})}),
        "{} config.json names a 'llama' model; only GPT-2 (model_type \"gpt2\") converts"),
    "config not an object": (lambda root, full: _folder(root / "listcfg", {"config.json": "[1, 2]"}),
                             "{}/config.json holds a JSON list, not the object of a Hugging Face "
                             "model config"),
    "untied gpt2": (lambda root, full: _folder(root / "untied", {"config.json": json.dumps(
        dict(hf_config_dict(M), tie_word_embeddings=False))}),
        "{} is a GPT-2 this model cannot express:\n  - tie_word_embeddings=false; the model "
        "always ties the input and output embeddings"),
    "no weights": (lambda root, full: _folder(root / "noweights", {"config.json": json.dumps(
        hf_config_dict(M))}), "{} has config.json but no weights: expected one of model.safetensors"),
    # attention scaled otherwise than by 1/sqrt(head_dim): converted silently before, with
    # logits 0.8-2.3 off
    "layer-scaled attention": (lambda root, full: _folder(root / "crfm", {"config.json": json.dumps(
        dict(hf_config_dict(M), scale_attn_by_inverse_layer_idx=True))}),
        "{} is a GPT-2 this model cannot express:\n  - scale_attn_by_inverse_layer_idx=true"),
    "unscaled attention": (lambda root, full: _folder(root / "unscaled", {"config.json": json.dumps(
        dict(hf_config_dict(M), scale_attn_weights=False))}),
        "{} is a GPT-2 this model cannot express:\n  - scale_attn_weights=false"),
    # a hand-edited config.json: converted (exit 0) into a checkpoint nothing could load, or a
    # traceback, before; checked as the validator checks a model section, in config.json's names
    "heads not dividing the width": (lambda root, full: _folder(root / "heads", {"config.json": json.dumps(
        dict(hf_config_dict(M), n_head=5))}),
        "{} is a GPT-2 this model cannot express:\n  - n_embd=32: must be divisible by n_head=5; "
        "fix: choose n_head among 1, 2, 4"),
    "dropout out of range": (lambda root, full: _folder(root / "drop", {"config.json": json.dumps(
        dict(hf_config_dict(M), resid_pdrop=1.5, embd_pdrop=1.5, attn_pdrop=1.5))}),
        "  - resid_pdrop/embd_pdrop/attn_pdrop=1.5: must be in [0, 1)"),
    "null positions": (lambda root, full: _folder(root / "nopos", {"config.json": json.dumps(
        dict(hf_config_dict(M), n_positions=None))}),
        "{} is a GPT-2 this model cannot express:\n  - n_positions=null: must be an integer"),
    "quoted inner size": (lambda root, full: _folder(root / "inner", {"config.json": json.dumps(
        dict(hf_config_dict(M), n_inner="96"))}),
        "  - n_inner=\"96\": must be an integer, got str; fix: write 96"),
    "quoted tie": (lambda root, full: _folder(root / "tie", {"config.json": json.dumps(
        dict(hf_config_dict(M), tie_word_embeddings="true"))}),
        "  - tie_word_embeddings=\"true\"; the model always ties the input and output "
        "embeddings (true)"),
}


def _folder(path: Path, files: dict) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_with_a_message_and_nothing_written(tmp_path, full, case):
    make, message = BAD_INPUTS[case]
    source = make(tmp_path / "in", full)
    with pytest.raises(ConversionError) as info:
        quiet(source, tmp_path / "out", "megagpt")
    assert message.format(source) in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_output_that_cannot_be_written_is_a_message_and_leaves_nothing(tmp_path, ours,
                                                                         monkeypatch):
    """An output under a file, or a disk that fills up (for both formats): tracebacks before."""
    import errno

    import megagpt.convert as convert_module
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConversionError, match=r"--output .*afile/out: cannot write there "
                                              r"\(.*afile is a file\); fix: choose another path"):
        quiet(ours / "tp1pp1", tmp_path / "afile" / "out", "megagpt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(convert_module, "write_checkpoint_offline", full)
    import safetensors.torch

    def full_safetensors(*args, **kwargs):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_safetensors)
    for to in ("megagpt", "hf"):
        with pytest.raises(ConversionError, match=r"--output .*out: cannot write \(.*No space left "
                                                  r"on device.*\); nothing was written; fix: free"):
            quiet(ours / "tp1pp1", tmp_path / "out", to)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    import tokenizers                       # the tokenizer's files: the library's bare Exception

    def tokenizer_full(self, path, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(tokenizers.Tokenizer, "save", tokenizer_full)
    with pytest.raises(ConversionError, match=r"cannot write \(No space left on device \(os error "
                                              r"28\)\); nothing was written"):
        quiet(ours / "tp1pp1", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_verify_that_cannot_load_the_output_says_so_not_disk_full(tmp_path, ours, monkeypatch):
    import megagpt.convert as convert_module

    def unloadable(*args, **kwargs):       # how transformers reports a folder it cannot load
        raise OSError("Error no file named model.safetensors found in directory")
    monkeypatch.setattr(convert_module, "hf_logits", unloadable)
    with pytest.raises(ConversionError, match=r"--verify: the written output does not load "
                                              r"\(Error no file named .*\); the output was not "
                                              r"written"):
        quiet(ours / "tp1pp1", tmp_path / "out", "hf", verify=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("change, shown", [
    (dict(n_inner=64), "layers.0.mlp.fc1.weight: (128, 32) in the weights, (64, 32) from config.json"),
    (dict(n_positions=64), "embedding.wpe.weight: (16, 32) in the weights, (64, 32) from config.json"),
    (dict(n_embd=28, n_head=4), "embedding.wte.weight: (50257, 32) in the weights, (50257, 28) "
                                "from config.json"),
    (dict(n_positions=8), "embedding.wpe.weight: (16, 32) in the weights, (8, 32) from config.json"),
    (dict(n_layer=3), "blocks 3-3 are in the weights, past config.json's n_layer=3"),
], ids=["n_inner", "n_positions", "n_embd", "fewer-positions", "fewer-layers"])
def test_weights_of_other_sizes_than_config_json_are_refused(tmp_path, hf_folder, change, shown):
    """Each converted before (exit 0) into a checkpoint nothing could load, or failed with a
    traceback."""
    folder = tmp_path / "mismatch"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(ConversionError, match="the weights are not the model config.json "
                                              "describes") as info:
        quiet(folder, tmp_path / "out", "megagpt")
    assert shown in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_hf_folders_own_tokenizer_is_recorded_in_the_converted_checkpoint(tmp_path, hf_folder,
                                                                           monkeypatch):
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(hf_folder, folder)
    shutil.copy(GPT2_DIR / "vocab.json", folder)
    shutil.copy(GPT2_DIR / "merges.txt", folder)
    monkeypatch.chdir(tmp_path)     # a relative --input is recorded absolute: it was recorded
    quiet("with_tokenizer", tmp_path / "ours", "megagpt")    # as typed, wrong from elsewhere
    meta = json.loads((tmp_path / "ours" / "step_0000000" / "meta.json").read_text())
    assert meta["config"]["data"]["tokenizer_path"] == str(folder.resolve())
    quiet(hf_folder, tmp_path / "ours2", "megagpt")        # none of its own: GPT-2's
    meta = json.loads((tmp_path / "ours2" / "step_0000000" / "meta.json").read_text())
    assert meta["config"]["data"]["tokenizer_path"] == "gpt2"


def test_weights_of_another_vocabulary_than_config_json_are_refused(tmp_path, hf_folder):
    folder = tmp_path / "edited"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + 7)))
    with pytest.raises(ConversionError, match=f"{folder}: the Hugging Face embedding has "
                                              f"{config['vocab_size']} rows but model.vocab_size="
                                              f"{config['vocab_size'] + 7}; fix: make config.json"):
        quiet(folder, tmp_path / "out", "megagpt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_hf_weights_are_refused_with_the_file_named(tmp_path, hf_folder, weights):
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    data = (hf_folder / "model.safetensors").read_bytes()
    if weights == "pytorch_model.bin":
        torch.save(safetensors_torch.load_file(hf_folder / "model.safetensors"), tmp_path / "w")
        data = (tmp_path / "w").read_bytes()
    (folder / weights).write_bytes(data[: len(data) // 3])
    with pytest.raises(ConversionError, match=f"{folder / weights} cannot be read .*: truncated "
                                              f"or corrupt; fix: copy or export it again"):
        quiet(folder, tmp_path / "out", "megagpt")
    assert not (tmp_path / "out").exists()


def test_the_exported_weights_are_as_readable_as_the_other_files(tmp_path, ours):
    old = os.umask(0o022)
    try:
        quiet(ours / "tp2pp2", tmp_path / "hf", "hf")
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_a_corrupt_file_is_refused(tmp_path, full):
    step_dir = write_ours(tmp_path / "save", full, 1, 1)
    path = step_dir / "model_tp0_pp0.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model_tp0_pp0.pt is corrupt: its SHA-256 is"):
        quiet(step_dir, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("layout, message", [
    (dict(tp=3), "--tensor-parallel-size=3: must divide model.n_heads=4; fix: choose "
                 "--tensor-parallel-size among 1, 2, 4, so that each rank holds whole heads"),
    (dict(pp=3), "--pipeline-parallel-size=3 x --virtual-pipeline-size=1 = 3: must divide "
                 "model.n_layers=4; fix: choose a product among 1, 2, 4, so that every stage holds "
                 "as many layers"),
    (dict(pp=1, vp=2), "--virtual-pipeline-size=2: needs --pipeline-parallel-size > 1; fix: set "
                       "--virtual-pipeline-size=1 or raise --pipeline-parallel-size"),
    (dict(tp=0), "--tensor-parallel-size=0: must be 1 or more"),
])
def test_a_layout_that_cannot_split_the_model_is_refused(tmp_path, ours, layout, message):
    with pytest.raises(ConversionError) as info:
        quiet(ours / "tp2pp2", tmp_path / "out", "megagpt", **layout)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused(tmp_path, ours):
    _folder(tmp_path / "out", {"keep.txt": "mine"})
    with pytest.raises(ConversionError, match="--output .*out already exists and is not an empty "
                                              "folder; fix: choose a new path, or remove it first"):
        quiet(ours / "tp1pp1", tmp_path / "out", "hf")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (dict(to="hf", tp=2), "--tensor-parallel-size, --pipeline-parallel-size and "
                          "--virtual-pipeline-size apply to --to megagpt only"),
    (dict(to="megagpt", tokenizer="gpt2"), "--tokenizer applies to --to hf only"),
    (dict(to="onnx"), "--to onnx: must be hf or megagpt"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, ours, args, message):
    with pytest.raises(ConversionError, match=message):
        quiet(ours / "tp1pp1", tmp_path / "out", **args)


def test_hf_to_hf_and_a_tokenizer_larger_than_the_vocabulary_are_refused(tmp_path, hf_folder, full,
                                                                         capsys):
    with pytest.raises(ConversionError, match="is already a Hugging Face folder; fix: --to megagpt"):
        quiet(hf_folder, tmp_path / "out", "hf")
    small = CFG.to_dict()
    small["model"]["vocab_size"] = 1001
    meta = {"config": small, "consumed_samples": 0, "parallel": {"tp": 1, "pp": 1, "dp": 1, "vp": 1}}
    small_full = dict(full, **{"embedding.wte.weight": full["embedding.wte.weight"][:1001]})
    m = load_config(raw=small).model
    write_checkpoint_offline(tmp_path / "small", 1, shard_full_state(small_full, m, 1, 1), meta)
    recorded = (f"the tokenizer gpt2, taken by default \\({tmp_path / 'small' / 'step_0000001'} "
                f"records none it was trained with\\), has 50257 ids but the model's vocabulary is "
                f"1001 \\(model.vocab_size\\); fix: pass the tokenizer the model was trained with")
    with pytest.raises(ConversionError, match=recorded):
        quiet(tmp_path / "small", tmp_path / "out", "hf")
    with pytest.raises(ConversionError, match="--tokenizer gpt2 has 50257 ids but the model's "
                                              "vocabulary is 1001"):
        convert(tmp_path / "small", tmp_path / "out", "hf", tokenizer="gpt2", log=lambda _: None)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # generate garbled such a model's text (its ids read as GPT-2's): refused the same way
    capsys.readouterr()
    assert tool("generate").main(["--checkpoint", str(tmp_path / "small"), "--prompt", "a",
                                  "--greedy", "--max-new-tokens", "2"]) == 1
    assert "generate: error: the tokenizer gpt2, taken by default" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command lines

def test_convert_tool_exit_status_and_output(tmp_path, ours, capsys):
    main = tool("convert_checkpoint").main
    assert main(["--input", str(ours / "tp2pp2"), "--output", str(tmp_path / "a"), "--to",
                 "megagpt", "--tensor-parallel-size", "1", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: every weight equal to the source's; largest logit difference 0 " \
        "(tolerance 0.001)" in out
    assert "note: weights only" in out and f"done: {tmp_path / 'a'}" in out
    assert main(["--input", str(ours / "tp2pp2"), "--output", str(tmp_path / "b"), "--to",
                 "megagpt", "--tensor-parallel-size", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: the target layout cannot split this model")
    assert not (tmp_path / "b").exists()


def test_generate_tool_streams_one_prompt_and_prints_a_batch(tmp_path, ours, capsys):
    main = tool("generate").main
    common = ["--checkpoint", str(ours / "tp2pp2"), "--max-new-tokens", "5"]
    assert main([*common, "--prompt", "ROMEO:", "--greedy"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("ROMEO:") and streamed.endswith("\n")
    assert main([*common, "--prompt", "ROMEO:", "--prompt", "JULIET: O", "--greedy"]) == 0
    batch = capsys.readouterr().out
    assert batch.startswith("--- [0] ---\n" + streamed) and "--- [1] ---\nJULIET: O" in batch
    args = [*common, "--prompt", "ROMEO:", "--temperature", "0.8", "--top-k", "40"]
    samples = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] != samples[2]


def test_generate_tool_with_a_smaller_tokenizer_says_so_and_chooses_only_its_ids(tmp_path, ours,
                                                                                   capsys):
    from megagpt.data.tokenizer import train_bpe_tokenizer
    small = train_bpe_tokenizer(["ROMEO: but soft, what light through yonder window breaks"] * 20,
                                vocab_size=260, output_dir=tmp_path / "tok")
    main = tool("generate").main
    assert main(["--checkpoint", str(ours / "tp2pp2"), "--tokenizer", str(tmp_path / "tok"),
                 "--prompt", "ROMEO:", "--prompt", "soft", "--max-new-tokens", "8",
                 "--temperature", "5", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert (f"generate: note: the tokenizer has 260 ids and the model {M.vocab_size} "
            f"(model.vocab_size); ids from 260 on have no text and are never chosen") in out.err
    texts = [block.split("\n", 1)[1] for block in out.out.split("--- [")[1:]]
    new = [small.encode(text.rstrip("\n"))[len(small.encode(p)):]
           for text, p in zip(texts, ["ROMEO:", "soft"])]
    assert all(new), out.out          # every row printed text of its own


def test_a_tokenizer_one_id_larger_than_the_vocabulary_is_refused(ours):
    import dataclasses as dc
    from megagpt.convert import source_tokenizer
    source = load_source(ours / "tp1pp1")
    assert source_tokenizer(source, "gpt2").vocab_size == source.model.vocab_size == 50257
    smaller = dc.replace(source, model=dc.replace(source.model, vocab_size=50256))
    with pytest.raises(ConversionError, match="--tokenizer gpt2 has 50257 ids but the model's "
                                              "vocabulary is 50256"):
        source_tokenizer(smaller, "gpt2")


def test_a_tokenizer_given_that_is_not_the_one_trained_with_is_refused(tmp_path, full, capsys):
    """--tokenizer of generate.py and convert_checkpoint.py --to hf: one whose fingerprint is not
    the recorded one would read the prompt as other ids and write other text: refused as
    checkpoint.pretrained refuses it; the one trained with (as a copy elsewhere) is taken."""
    from megagpt.data.tokenizer import train_bpe_tokenizer
    text = ["ROMEO: but soft, what light through yonder window breaks"] * 20
    trained = train_bpe_tokenizer(text, vocab_size=300, output_dir=tmp_path / "tok")
    train_bpe_tokenizer([t.upper() for t in text], vocab_size=300, output_dir=tmp_path / "other")
    shutil.copytree(tmp_path / "tok", tmp_path / "copy")
    cfg = CFG.to_dict()
    cfg["data"].update(mock=False, tokenizer_path=str(tmp_path / "tok"))
    meta = {"config": cfg, "consumed_samples": 40, "tokenizer_fingerprint": trained.fingerprint,
            "parallel": {"tp": 1, "pp": 1, "dp": 1, "vp": 1}}
    write_checkpoint_offline(tmp_path / "run", 5, shard_full_state(full, M, 1, 1), meta)
    step = tmp_path / "run" / "step_0000005"
    refusal = (f"{step} was trained with the tokenizer {tmp_path / 'tok'} (fingerprint "
               f"{trained.fingerprint[:12]}), but --tokenizer={tmp_path / 'other'} is another")
    main = tool("generate").main
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", "ROMEO:", "--greedy",
            "--max-new-tokens", "2", "--tokenizer"]
    assert main([*argv, str(tmp_path / "other")]) == 1
    assert refusal in capsys.readouterr().err
    with pytest.raises(ConversionError, match=re.escape(refusal)):
        convert(tmp_path / "run", tmp_path / "hf", "hf", tokenizer=str(tmp_path / "other"),
                log=lambda _: None)
    assert main([*argv, str(tmp_path / "copy")]) == 0


def test_a_recorded_tokenizer_path_that_does_not_load_says_where_it_came_from(ours, monkeypatch,
                                                                             tmp_path):
    import dataclasses as dc
    from megagpt.convert import source_tokenizer
    from megagpt.data.tokenizer import TokenizerError
    source = dc.replace(load_source(ours / "tp2pp2"), tokenizer_path="runs/tok")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError) as info:
        source_tokenizer(source, None)
    assert str(info.value) == (f"the tokenizer recorded with {source.path} does not load (read "
                               f"from {tmp_path}): data.tokenizer_path 'runs/tok' does not "
                               f"exist; fix: pass --tokenizer PATH")      # one fix, the flag's
    assert source_tokenizer(source, "gpt2").vocab_size == 50257


@pytest.mark.parametrize("args, status, message", [
    (["--greedy", "--top-k", "5"], 2, "--greedy takes the most likely token; it cannot be combined "
                                      "with --top-k"),
    (["--temperature", "0"], 2, "--temperature=0.0: must be > 0 and finite; fix: e.g. 0.8, or "
                                "greedy decoding (--greedy)"),
    (["--top-k", "-1", "--top-p", "0"], 2, "--top-k=-1: must be >= 0 (0 keeps every token); fix: "
                                           "e.g. 40; --top-p=0.0: must be in (0, 1]"),
    (["--max-new-tokens", "0"], 2, "--max-new-tokens=0: must be at least 1"),
    (["--seed", "99999999999999999999"], 2, "--seed=99999999999999999999: must be in [0, 2**64)"),
    (["--max-new-tokens", "20"], 1, "generate: error: the longest prompt has 3 tokens; with "
                                    "--max-new-tokens=20 the model reads 22 positions, more than "
                                    "its context of 16 (model.seq_length); fix: set "
                                    "--max-new-tokens <= 14"),
])
def test_generate_tool_refuses_bad_settings(ours, capsys, args, status, message):
    main = tool("generate").main
    argv = ["--checkpoint", str(ours / "tp1pp1"), "--prompt", "ROMEO:", *args]
    if status == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    else:
        assert main(argv) == status
    assert message in capsys.readouterr().err


def test_generate_tool_reads_a_special_string_in_a_prompt_as_its_id(ours, capsys):
    argv = ["--checkpoint", str(ours / "tp1pp1"), "--prompt", "<|endoftext|>", "--max-new-tokens", "20"]
    assert tool("generate").main(argv) == 1
    assert "the longest prompt has 1 tokens" in capsys.readouterr().err


def test_generate_tool_chat_sends_the_prompt_as_fine_tuning_encodes_it(ours, capsys,
                                                                      monkeypatch):
    from megagpt.data.sft_dataset import tokenize_examples
    module, sent = tool("generate"), []

    def generate(model, prompts, **kwargs):
        sent.extend(prompts)
        return [[] for _ in prompts]
    monkeypatch.setattr(module, "generate", generate)
    monkeypatch.setattr(module, "check_request", lambda *args: None)   # a context of 16 tokens
    question = "Fix this:\n\nprint(x)\n"
    assert module.main(["--checkpoint", str(ours / "tp1pp1"), "--chat", "--system", "Be brief.",
                        "--prompt", question, "--prompt", "Who?"]) == 0
    out = capsys.readouterr().out
    assert f"--- [0] ---\nSystem: Be brief.\nUser: {question}\nAssistant:" in out
    tok = load_tokenizer("gpt2")
    example = tokenize_examples([[("system", "Be brief."), ("user", question),
                                  ("assistant", "Done.")]], tok)
    done = tok.encode_batch([" Done.\n"])[0]
    assert sent[0] == example.tokens[:-len(done) - 1].tolist()   # up to the answer
    assert sent[0] != tok.encode(f"System: Be brief.\nUser: {question}\nAssistant:")
    assert sent[1] == tok.encode("System: Be brief.\nUser: Who?\nAssistant:")
    assert module.main(["--checkpoint", str(ours / "tp1pp1"), "--chat", "--prompt", "Who?"]) == 0
    assert capsys.readouterr().out.startswith("User: Who?\nAssistant:")   # one prompt: streamed
    with pytest.raises(SystemExit) as info:
        module.main(["--checkpoint", str(ours / "tp1pp1"), "--system", "x", "--prompt", "y"])
    assert info.value.code == 2
    assert "--system is a message of the chat template: add --chat" in capsys.readouterr().err


def test_generate_tool_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert tool("generate").main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert f"generate: error: --checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


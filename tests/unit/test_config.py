"""The config tree: shipped configs, overrides, and a clear message for every bad input."""
import dataclasses
import json
from pathlib import Path

import pytest

from megagpt.config import ConfigError, ConfigFileError, load_config, parse_overrides
from megagpt.estimate import count_parameters

ROOT = Path(__file__).resolve().parents[2]
TRAINING = sorted((ROOT / "configs" / "training").glob("*.json"))
TINY = ROOT / "configs" / "training" / "tiny_model.json"

EXPECTED_PARAMETERS = {"small_model": 124_439_808, "base_model": 354_823_168,
                       "large_model": 1_315_723_264}


def tiny_raw() -> dict:
    return json.loads(TINY.read_text())


def problems_of(raw: dict, overrides=None, path=TINY) -> list[str]:
    """Load a raw dict as if it were the file `path`; return the problems reported."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, raw=raw)
    return info.value.problems


def test_every_readme_config_file_exists():
    for rel in ["training/small_model.json", "training/base_model.json", "training/large_model.json",
                "models/gpt_small.json", "models/gpt_base.json", "models/gpt_large.json",
                "dataset/pretraining.json", "dataset/finetuning.json", "README.md",
                "training/tiny_model.json"]:
        assert (ROOT / "configs" / rel).is_file(), rel


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_shipped_training_configs_are_valid_and_counted(path):
    cfg = load_config(path)
    n = count_parameters(cfg.model)
    assert cfg.model.estimated_parameters == n
    if path.stem in EXPECTED_PARAMETERS:
        assert n == EXPECTED_PARAMETERS[path.stem]
    assert cfg.name == path.stem
    assert cfg.model.config_file and cfg.data.config_file


def test_parameter_count_equals_hugging_face_gpt2_on_the_meta_device():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("gpt_small", "gpt_base", "gpt_large", "gpt_tiny"):
        hf = transformers.AutoConfig.from_pretrained(str(ROOT / "configs" / "models" / f"{name}.json"))
        with torch.device("meta"):
            model = transformers.GPT2LMHeadModel(hf)
        cfg = load_config(TINY, raw={**tiny_raw(), "model": {"config_file": f"configs/models/{name}.json"}})
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model), name


def test_configs_readme_snippet_in_the_form_that_works():
    """The configs README shows `AutoConfig.from_json_file`, which transformers does not have;
    `AutoConfig.from_pretrained(file)` and `GPT2Config.from_json_file(file)` load the same file."""
    transformers = pytest.importorskip("transformers")
    path = str(ROOT / "configs" / "models" / "gpt_tiny.json")
    assert not hasattr(transformers.AutoConfig, "from_json_file")
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModel.from_config(config)
    assert type(model).__name__ == "GPT2Model"
    assert transformers.GPT2Config.from_json_file(path).n_embd == config.n_embd == 128
    with open(ROOT / "configs" / "dataset" / "pretraining.json") as f:
        data_config = json.load(f)
    assert "train_data_path" in data_config


def test_model_fields_come_from_the_architecture_file():
    raw = tiny_raw()
    raw["model"] = {"config_file": "configs/models/gpt_small.json"}
    cfg = load_config(TINY, raw=raw, overrides=["--parallel.tensor_parallel_size=1",
                                                "--parallel.pipeline_parallel_size=1",
                                                "--parallel.world_size=1"])
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.seq_length, m.vocab_size) == (768, 12, 12, 1024, 50257)
    assert m.dropout == 0.1 and m.ffn_size == 3072


def test_overrides_both_spellings_and_types():
    cfg = load_config(TINY, ["--training.max_steps=700", "--training.learning_rate", "3e-4",
                             "--data.mock=true", "--checkpoint.load=none",
                             "--data.train_data_path=[\"0.5\", \"a\", \"0.5\", \"b\"]"])
    assert cfg.training.max_steps == 700 and cfg.training.learning_rate == 3e-4
    assert cfg.data.mock is True and cfg.checkpoint.load == "none"
    assert cfg.data.train_data_path == ["0.5", "a", "0.5", "b"]
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == {"a.b": "1", "c.d": "x=y"}


def test_string_field_keeps_numeric_looking_text():
    cfg = load_config(TINY, ["--checkpoint.load=123", "--data.split=1,0,0"])
    assert cfg.checkpoint.load == "123" and cfg.data.split == "1,0,0"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigFileError, match="not found: .*nope.json"):
        load_config(tmp_path / "nope.json")


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "model": {\n    "d_model": 12,,\n  }\n}\n')
    with pytest.raises(ConfigFileError, match=r"bad.json:3:19: invalid JSON"):
        load_config(path)


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigFileError, match="top level must be a JSON object"):
        load_config(path)


def test_missing_required_field():
    raw = tiny_raw()
    del raw["training"]["learning_rate"]
    del raw["data"]["config_file"]
    del raw["data"]["tokenizer_path"]
    problems = problems_of(raw)
    assert any(p.startswith("training.learning_rate: required field is missing") for p in problems)
    assert any(p.startswith("data.tokenizer_path: required field is missing") for p in problems)


def test_missing_section():
    raw = tiny_raw()
    del raw["training"]
    assert any(p.startswith("training: required field is missing") for p in problems_of(raw))


def test_wrong_type():
    problems = problems_of(tiny_raw(), ["--training.batch_size=\"four\"", "--data.mock=1",
                                        "--training.learning_rate=true"])
    assert 'training.batch_size="four": must be an integer, got str' in problems
    assert "data.mock=1: must be true or false, got int" in problems
    assert "training.learning_rate=true: must be a number, got bool" in problems
    raw = tiny_raw()
    raw["training"]["batch_size"] = "2"          # a quoted number in the JSON
    assert 'training.batch_size="2": must be an integer, got str; fix: write 2' in problems_of(raw)
    for field, value, fix in [("logging.tensorboard", "True", "; fix: write true"),
                              ("training.lr_decay_steps", "None", "; fix: write null"),
                              ("training.learning_rate", ".001", "; fix: write 0.001"),
                              ("training.max_steps", "1e3", "")]:    # 1000.0: not an integer
        raw = tiny_raw()
        section, name = field.split(".")
        raw[section][name] = value
        problem = next(p for p in problems_of(raw) if p.startswith(f'{field}="{value}"'))
        assert problem.endswith(f"got str{fix}"), problem


def test_overrides_take_the_forms_python_and_shells_write():
    """.1 and 1. are numbers, True/False booleans, None null: as a user would type them."""
    cfg = load_config(TINY, ["--model.dropout=.1", "--training.learning_rate=1.",
                             "--training.max_steps=+70", "--data.mock=True",
                             "--parallel.sequence_parallel=False",
                             "--parallel.deepspeed_config=None"], raw=tiny_raw())
    assert (cfg.model.dropout, cfg.training.learning_rate, cfg.training.max_steps) == (0.1, 1.0, 70)
    assert cfg.data.mock is True and cfg.parallel.sequence_parallel is False
    assert cfg.parallel.deepspeed_config is None
    problems = problems_of(tiny_raw(), ["--checkpoint.load=None", "--training.max_steps=1e3",
                                        "--model.dropout=nan", "--data.mock=yes"])
    assert ('checkpoint.load=null: must be a string; fix: give it a value: "auto" (resume from '
            'latest if any), "none", or a path') in problems
    assert "training.max_steps=1000.0: must be an integer, got float" in problems
    assert 'model.dropout="nan": must be a number, got str' in problems
    assert 'data.mock="yes": must be true or false, got str' in problems


def test_a_misspelt_section_in_an_override_shows_the_whole_override():
    problems = problems_of(tiny_raw(), ["--trainng.learning_rate=1"])
    assert "--trainng.learning_rate=1: unknown section trainng; did you mean training?" in problems


def test_unknown_field_suggests_the_closest_name():
    raw = tiny_raw()
    raw["training"]["learnin_rate"] = 0.1
    raw["trainig"] = {}
    problems = problems_of(raw, ["--parallel.tensor_paralel_size=2"])
    assert any("training.learnin_rate=0.1: unknown field; did you mean training.learning_rate?" in p
               for p in problems)
    assert any("trainig={}: unknown field; did you mean training?" in p for p in problems)
    assert any("did you mean parallel.tensor_parallel_size?" in p for p in problems)


def test_a_field_in_the_wrong_section_is_sent_to_its_own():
    problems = problems_of(tiny_raw(), ["--training.save_interval=10"])
    assert ("training.save_interval=10: unknown field; save_interval belongs in the checkpoint "
            "section: checkpoint.save_interval") in problems


@pytest.mark.parametrize("path, kind, field", [
    ("configs/models/gpt_tiny.json", "a model architecture file", "model.config_file"),
    ("configs/dataset/pretraining.json", "a dataset file", "data.config_file"),
    ("configs/deepspeed/zero1.json", "a DeepSpeed config", "parallel.deepspeed_config")])
def test_an_architecture_dataset_or_deepspeed_file_given_as_the_config_says_so(path, kind, field):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{ROOT / path} is {kind}") and "fix: --config takes a training config" in problem
    assert problem.endswith(f"which names such a file in its {field}")


def test_bad_choice_lists_the_valid_ones():
    problems = problems_of(tiny_raw(), ["--training.precision=fp8", "--kernels.attention=fast"])
    assert "training.precision=fp8: must be one of fp32, bf16, fp16" in problems
    assert "kernels.attention=fast: must be one of auto, triton, flash_attn, sdpa, eager" in problems


@pytest.mark.parametrize("field", ["model.n_layers", "training.batch_size", "training.max_steps",
                                   "parallel.tensor_parallel_size", "training.grad_accumulation_steps"])
@pytest.mark.parametrize("value", [0, -2])
def test_zero_or_negative_size(field, value):
    problems = problems_of(tiny_raw(), [f"--{field}={value}"])
    assert f"{field}={value}: must be positive; fix: set it to 1 or more" in problems


def test_a_non_positive_number_gets_a_fix_of_its_kind():
    problems = problems_of(tiny_raw(), ["--training.learning_rate=-1", "--model.init_std=0",
                                        "--training.exit_duration_minutes=0"])
    assert "training.learning_rate=-1.0: must be positive; fix: give it a value above 0" in problems
    assert ("training.exit_duration_minutes=0.0: must be positive; fix: give it a value above 0"
            in problems)
    assert "model.init_std=0.0: must be positive; fix: give it a value above 0" in problems


def test_optimizer_and_schedule_values_that_would_break_training_are_refused():
    """Each passed validation before, then crashed (adam_eps < 0, a negative seed) or trained
    nothing (adam_eps = 0 skips every step; a decay of 0 steps holds min_lr from the start)."""
    problems = problems_of(tiny_raw(), ["--training.adam_eps=0", "--training.seed=-1",
                                        "--training.lr_decay_steps=0"])
    assert "training.adam_eps=0.0: must be positive; fix: give it a value above 0" in problems
    assert any(p.startswith("training.seed=-1: must be in [0, 2**32)") for p in problems), problems
    assert "training.lr_decay_steps=0: must be positive; fix: set it to 1 or more" in problems
    assert any(p.startswith("training.seed=4294967296: must be in") for p in problems_of(
        tiny_raw(), ["--training.seed=4294967296"]))
    load_config(TINY, ["--training.seed=0", "--training.seed=4294967295"], raw=tiny_raw())


def test_validation_needs_batches_and_keep_last_zero_keeps_all():
    problems = problems_of(tiny_raw(), ["--training.eval_interval=5", "--training.eval_iters=0"])
    assert any(p.startswith("training.eval_iters=0: validation every 5 steps needs at least one "
                            "batch; fix:") for p in problems), problems
    load_config(TINY, ["--training.eval_interval=0", "--training.eval_iters=0"], raw=tiny_raw())
    assert load_config(TINY, ["--checkpoint.keep_last=0"], raw=tiny_raw()).checkpoint.keep_last == 0
    assert "checkpoint.keep_last=-1: must be 0 or more" in problems_of(
        tiny_raw(), ["--checkpoint.keep_last=-1"])


def test_fused_attention_takes_dropout():
    for attention in ("triton", "flash_attn", "auto", "sdpa", "eager"):
        cfg = load_config(TINY, ["--model.dropout=0.1", f"--kernels.attention={attention}",
                                 "--training.precision=bf16"], raw=tiny_raw())
        assert (cfg.model.dropout, cfg.kernels.attention) == (0.1, attention)


def test_fused_attention_head_sizes_and_precision_are_checked_before_launch():
    # tiny: d_model 128; 8 heads give head size 16, which the Triton kernel does not have.
    problems = problems_of(tiny_raw(), ["--model.dropout=0", "--model.n_heads=8",
                                        "--kernels.attention=triton"])
    assert any(p.startswith("kernels.attention=triton: the head size model.d_model / model.n_heads "
                            "= 128 / 8 = 16 is not one the kernel supports (32, 64, 128); fix: "
                            "kernels.attention=auto") for p in problems), problems
    load_config(TINY, ["--model.dropout=0", "--model.n_heads=8", "--kernels.attention=auto"],
                raw=tiny_raw())
    problems = problems_of(tiny_raw(), ["--model.dropout=0", "--model.d_model=1024", "--model.n_heads=2",
                                        "--kernels.attention=flash_attn", "--training.precision=fp32"])
    assert any(p.startswith("kernels.attention=flash_attn: the head size model.d_model / "
                            "model.n_heads = 512 is above flash-attn's 256") for p in problems), problems
    assert any(p.startswith("kernels.attention=flash_attn: flash-attn runs float16/bfloat16 only, "
                            "but training.precision=fp32; fix:") for p in problems), problems


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400])
def test_numbers_must_be_finite(value):
    fields = ["training.learning_rate", "training.grad_clip", "model.init_std", "model.layernorm_eps"]
    problems = problems_of(tiny_raw(), [f"--{f}={value}" for f in fields])
    for field in fields:
        assert any(p.startswith(f"{field}={value[:20]}") and p.endswith(": must be a finite number")
                   for p in problems), problems


def test_a_config_file_override_is_read_and_the_inline_values_written_for_the_old_one_yield():
    """Every shipped config repeats its files' values inline; a file chosen on the command line
    replaces them (they were refused as disagreeing before, with no way to fix it from the
    command line), and the other overrides still win over the file."""
    path = ROOT / "configs/training/small_model.json"
    cfg = load_config(path, ["--model.config_file=configs/models/gpt_base.json",
                             "--model.estimated_parameters=null", "--model.n_layers=12"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (1024, 16, 12)
    cfg = load_config(TINY, ["--model.config_file=configs/models/gpt_small.json",
                             "--model.estimated_parameters=null"])
    assert (cfg.model.d_model, cfg.model.seq_length) == (768, 1024)   # not tiny's context of 128
    cfg = load_config(path, ["--training.mode=finetune",
                             "--data.config_file=configs/dataset/finetuning.json",
                             "--data.train_data_path=[\"megagpt/data/assets/sft_example.jsonl\"]"])
    assert (cfg.data.format, cfg.data.train_data_path) == (
        "sft", ["megagpt/data/assets/sft_example.jsonl"])
    with pytest.raises(ConfigError, match="model.config_file=configs/models/nope.json: "):
        load_config(path, ["--model.config_file=configs/models/nope.json"])


def test_an_inline_context_may_be_shorter_than_the_architectures_not_longer():
    raw = json.loads((ROOT / "configs/training/finetune_small.json").read_text())
    raw["model"]["seq_length"] = 512                         # a task's context
    assert load_config(ROOT / "configs/training/finetune_small.json", raw=raw).model.seq_length == 512
    raw["model"]["seq_length"] = 2048
    assert any(p.startswith("model.seq_length=2048 disagrees with configs/models/gpt_small.json "
                            "which says 1024") for p in problems_of(
        raw, path=ROOT / "configs/training/finetune_small.json"))


def test_tensor_parallel_must_divide_heads():
    problems = problems_of(tiny_raw(), ["--parallel.tensor_parallel_size=3", "--parallel.world_size=6",
                                        "--parallel.pipeline_parallel_size=1"])
    assert any(p.startswith("parallel.tensor_parallel_size=3: must divide model.n_heads=4; "
                            "fix: choose tensor_parallel_size among 1, 2, 4") for p in problems)


def test_pipeline_must_divide_layers():
    problems = problems_of(tiny_raw(), ["--parallel.pipeline_parallel_size=3", "--parallel.world_size=6"])
    assert any("parallel.pipeline_parallel_size=3 x parallel.virtual_pipeline_size=1 = 3: must "
               "divide model.n_layers=4" in p for p in problems)


def test_world_size_must_match_the_layout():
    problems = problems_of(tiny_raw(), ["--parallel.world_size=6"])
    assert any(p.startswith("parallel.world_size=6: must be a multiple of tensor_parallel_size x "
                            "pipeline_parallel_size = 2 x 2 = 4") for p in problems)


def test_global_batch_must_equal_micro_batch_times_accumulation_times_dp():
    problems = problems_of(tiny_raw(), ["--parallel.world_size=8", "--training.global_batch_size=30"])
    assert any(p.startswith("training.global_batch_size=30: must equal batch_size x "
                            "grad_accumulation_steps x data-parallel size = 2 x 4 x 2 = 16") for p in problems)


def test_interleaved_schedule_rules():
    problems = problems_of(tiny_raw(), ["--parallel.virtual_pipeline_size=2",
                                        "--training.grad_accumulation_steps=3"])
    assert any(p.startswith("training.grad_accumulation_steps=3: the interleaved schedule") for p in problems)
    problems = problems_of(tiny_raw(), ["--parallel.pipeline_parallel_size=1", "--parallel.world_size=2",
                                        "--parallel.virtual_pipeline_size=2"])
    assert any(p.startswith("parallel.virtual_pipeline_size=2: needs pipeline_parallel_size > 1")
               for p in problems)


def test_sequence_parallel_needs_divisible_sequence():
    problems = problems_of(tiny_raw(), ["--parallel.sequence_parallel=true", "--model.seq_length=127"])
    assert any(p.startswith("parallel.sequence_parallel=true: model.seq_length=127 must be divisible "
                            "by parallel.tensor_parallel_size=2") for p in problems)


def test_width_must_divide_into_heads():
    problems = problems_of(tiny_raw(), ["--model.d_model=130"])
    assert any(p.startswith("model.d_model=130: must be divisible by model.n_heads=4") for p in problems)


def test_inline_values_must_agree_with_the_architecture_file():
    raw = tiny_raw()
    raw["model"]["n_layers"] = 8
    problems = problems_of(raw)
    assert ("model.n_layers=8 disagrees with configs/models/gpt_tiny.json which says 4; fix: make "
            "them equal, drop the inline value to keep the file's, or to use another value give "
            "--model.n_layers=... on the command line (it overrides the file) or name a copy of "
            "the file in model.config_file") in problems


def test_an_inline_ffn_size_agrees_with_the_files_null_that_means_four_widths():
    raw = tiny_raw()   # gpt_tiny.json: n_inner null, n_embd 128
    raw["model"]["ffn_hidden_size"] = 512
    assert load_config(TINY, raw=raw).model.ffn_hidden_size == 512
    raw["model"]["ffn_hidden_size"] = 256
    assert any(p.startswith("model.ffn_hidden_size=256 disagrees with configs/models/gpt_tiny.json "
                            "which says null; fix: make them equal") for p in problems_of(raw))


def test_a_partial_architecture_file_still_fills_what_it_has(tmp_path):
    path = tmp_path / "vocab_only.json"
    path.write_text('{"vocab_size": 50257, "n_positions": 16}')
    raw = tiny_raw()
    raw["model"] = dict(raw["model"], config_file=str(path), vocab_size=50257, seq_length=16)
    assert load_config(TINY, raw=raw).model.vocab_size == 50257


@pytest.mark.parametrize("other,kind", [("configs/dataset/pretraining.json", "a dataset file"),
                                         ("configs/training/small_model.json", "a training config"),
                                         ("configs/deepspeed/zero2.json", "a DeepSpeed config")])
def test_a_model_config_file_of_another_kind_is_refused(other, kind):
    """It was read as an architecture with no fields, and the inline values built the model."""
    problems = problems_of(tiny_raw(), [f"--model.config_file={other}"])
    assert any(p.startswith(f"model.config_file={other}: not a Hugging Face GPT-2 config") and
               f"it is {kind}" in p for p in problems), problems


@pytest.mark.parametrize("key", ["zero_optimization", "train_batch_size",
                                 "train_micro_batch_size_per_gpu"])
def test_a_deepspeed_file_is_known_by_any_of_its_batch_or_zero_keys(tmp_path, key):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({key: 4 if key != "zero_optimization" else {"stage": 1}}))
    problems = problems_of(tiny_raw(), [f"--model.config_file={path}"])
    assert any("it is a DeepSpeed config" in p for p in problems), problems


def test_top_level_fields_can_be_overridden_and_odd_values_stay_whole():
    """--name was refused as not of the form --section.field (the README says any field can be
    changed on the command line); a value holding '; ' garbled an unknown section's message."""
    assert load_config(TINY, ["--name=run7", "--description=a try"]).name == "run7"
    problems = problems_of(tiny_raw(), ["--loging.run_dir=/tmp/a; b"])
    assert problems == ["--loging.run_dir=/tmp/a; b: unknown section loging; did you mean logging?"]
    with pytest.raises(ConfigError, match="or one of --name=VALUE, --description=VALUE"):
        load_config(TINY, ["--nmae=x"])


def test_the_dict_a_checkpoint_keeps_loads_back_as_the_same_config():
    """to_dict kept the files' names beside values an override had changed: loading it (a
    checkpoint's meta.json config, which docs/models.md calls valid) failed on the disagreement."""
    cfg = load_config(TINY, ["--data.num_workers=0", "--model.dropout=0.0",
                             "--data.train_data_path=runs/data/other"])
    again = load_config(raw=cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.data.num_workers == 0
    assert again.data.train_data_path == ["runs/data/other"] and again.model.d_model == 128


def test_a_folder_given_as_the_config_is_named_as_one():
    with pytest.raises(ConfigFileError, match=r"config file .*configs/training is a folder; fix: "
                                              r"name a file in it \(base_model.json, "):
        load_config(ROOT / "configs" / "training")


def test_a_key_given_twice_is_refused(tmp_path):
    """The last one silently won: a second learning_rate line, or a whole section twice."""
    text = TINY.read_text().replace('"training": {', '"training": {"learning_rate": 3.0, ', 1)
    assert '"learning_rate": 3.0' in text
    path = tmp_path / "twice.json"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=r"twice.json: 'learning_rate' appears more than "
                                              r"once in one object, and only the last would count"):
        load_config(path)


def test_overrides_replace_values_from_the_referenced_files():
    cfg = load_config(TINY, ["--model.n_layers=8", "--data.split=1,1,0"])
    assert cfg.model.n_layers == 8 and cfg.data.split == "1,1,0"


def test_missing_architecture_file_is_named():
    raw = tiny_raw()
    raw["model"]["config_file"] = "configs/models/nope.json"
    problems = problems_of(raw)
    assert any(p.startswith("model.config_file=configs/models/nope.json:") and "not found" in p
               for p in problems)


def test_bad_blend_and_split():
    problems = problems_of(tiny_raw(), ["--data.train_data_path=[\"0.3\", \"a\", \"b\"]",
                                        "--data.split=90,-10"])
    assert any("data.train_data_path" in p and "odd number (3) of entries" in p for p in problems)
    assert any(p.startswith("data.split='90,-10': must be up to three non-negative weights")
               for p in problems)
    assert any(p.startswith("data.split='0,1,0': gives training no documents") for p in
               problems_of(tiny_raw(), ["--data.split=0,1,0"]))
    for split in ("945/50/5", "969,30", "1"):   # Megatron's forms: "/" too, missing weights are 0
        assert load_config(TINY, [f"--data.split={split}"], raw=tiny_raw()).data.split == split


def test_native_zero_stage_and_deepspeed_layout():
    problems = problems_of(tiny_raw(), ["--parallel.zero_stage=2"])
    assert any(p.startswith("parallel.zero_stage=2: the native path supports 0 or 1") for p in problems)
    problems = problems_of(tiny_raw(), ["--parallel.deepspeed_config=configs/deepspeed/zero2.json"])
    assert any("the DeepSpeed engine runs data parallel only" in p for p in problems)
    problems = problems_of(tiny_raw(), ["--parallel.deepspeed_config=configs/deepspeed/zero2.json",
                                        "--checkpoint.async_save=true"])
    assert any(p.startswith("checkpoint.async_save=true: not with parallel.deepspeed_config=") and
               "fix: async_save=false, or drop deepspeed_config" in p for p in problems)


def test_learning_rate_rules():
    assert load_config(TINY, ["--training.learning_rate=1"]).training.learning_rate == 1
    assert problems_of(tiny_raw(), ["--training.learning_rate=1.5"])[0].startswith(
        "training.learning_rate=1.5: must be at most 1")
    problems = problems_of(tiny_raw(), ["--training.learning_rate=1e38"])
    assert problems == ["training.learning_rate=1e+38: must be at most 1 (AdamW moves each weight "
                        "by up to the learning rate a step; a larger one overflows or diverges at "
                        "once); fix: GPT models train at 1e-4 to 1e-3, e.g. 6e-4 for Small"]
    problems = problems_of(tiny_raw(), ["--training.min_lr=0.01", "--training.warmup_steps=500"])
    assert any(p.startswith("training.min_lr=0.01: must not exceed training.learning_rate=0.003") for p in problems)
    assert any(p.startswith("training.warmup_steps=500: exceeds the decay length "
                            "(training.max_steps=100)") for p in problems)


def test_every_problem_is_reported_together():
    problems = problems_of(tiny_raw(), ["--training.batch_size=0", "--parallel.world_size=6",
                                        "--training.precision=fp8", "--logging.tensorbord=true",
                                        "--model.dropout=1.5"])
    assert len(problems) >= 5
    message = str(ConfigError(problems, "x.json"))
    assert message.startswith(f"{len(problems)} problem(s) in x.json:")


def test_problems_with_overrides_name_the_command_line_too():
    """They were said to be in the file alone, where a user looked for a field the file lacks."""
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["--training.max_steps=abc"])
    assert str(info.value).startswith(f"1 problem(s) in {TINY} with its command-line overrides:")
    with pytest.raises(ConfigError) as info:
        load_config(TINY, {"training.max_steps": "abc"})
    assert info.value.source == f"{TINY} with its command-line overrides"


def test_absurd_sizes_are_refused_before_anything_is_built():
    """A vocabulary of 1e20 or a width of 1e16 crashed the validator inside torch (a storage
    size overflow while counting parameters on the meta device)."""
    problems = problems_of(tiny_raw(), ["--model.vocab_size=100000000000000000000"])
    assert problems == ["model.vocab_size=100000000000000000000: must be below 2**31 (token ids "
                        "and tensor sizes are 32-bit in the data format and the kernels); fix: "
                        "check the value"]
    problems = problems_of(tiny_raw(), ["--model.d_model=4000000", "--model.n_heads=4"])
    assert len(problems) == 1 and problems[0].startswith("model: 7.68e+14 parameters")
    load_config(TINY, ["--model.d_model=4096", "--model.n_heads=32",
                       "--model.estimated_parameters=null"], raw=tiny_raw())


def test_malformed_override():
    with pytest.raises(ConfigError, match="is not of the form --section.field=value"):
        load_config(TINY, ["training.max_steps=3"])
    with pytest.raises(ConfigError, match="has no value"):
        load_config(TINY, ["--training.max_steps"])
    problems = problems_of(tiny_raw(), ["--training.max_steps.x=3"])
    assert any("training.max_steps is not a section" in p for p in problems)


def test_configs_readme_documents_every_field():
    import dataclasses

    from megagpt.config import SECTIONS, PreprocessingConfig
    readme = (ROOT / "configs" / "README.md").read_text()
    for section, cls in [*SECTIONS.items(), ("data.preprocessing", PreprocessingConfig)]:
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"configs/README.md does not document {section}.{f.name}"


def _documented_defaults(readme: str) -> dict[str, str]:
    """{"section.field": the default cell} from configs/README.md's section tables."""
    import re
    cells, section = {}, None
    for line in readme.splitlines():
        heading = re.match(r"^### `(\w+)`$", line)
        if heading:
            section = heading.group(1)
        elif section and line.startswith("| `"):
            names, default = [c.strip() for c in line.split("|")[1:3]]
            names = re.findall(r"`(\w+)`", names)
            values = [v.strip() for v in default.split(",")]   # one default each, or one for all
            values = values if len(names) > 1 and len(values) == len(names) else [default] * len(names)
            cells.update({f"{section}.{n}": v for n, v in zip(names, values)})
    return cells


def test_configs_readme_gives_each_fields_default():
    """Every field's row in configs/README.md states the default the code has."""
    import dataclasses

    from megagpt.config import SECTIONS
    cells = _documented_defaults((ROOT / "configs" / "README.md").read_text())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or dataclasses.is_dataclass(f.type):
                continue
            cell = cells.get(f"{section}.{f.name}")
            assert cell is not None, f"configs/README.md has no row for {section}.{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            word = cell.split(" (")[0].strip('"')
            if f.metadata.get("required"):
                assert word == "*required*", (section, f.name, cell)
            elif default is None:
                assert word == "null", (section, f.name, cell)
            elif isinstance(default, bool):
                assert word == str(default).lower(), (section, f.name, cell)
            elif isinstance(default, (int, float)):
                assert float(word) == default, (section, f.name, cell)
            else:
                assert word == (json.dumps(default) if isinstance(default, list) else default), \
                    (section, f.name, cell)


def test_megatrons_space_separated_data_path_form_is_a_list():
    cfg = load_config(TINY, ["--data.train_data_path=0.3 runs/a 0.7 runs/b"], raw=tiny_raw())
    assert cfg.data.train_data_path == ["0.3", "runs/a", "0.7", "runs/b"]
    cfg = load_config(TINY, ["--data.train_data_path=runs/one"], raw=tiny_raw())
    assert cfg.data.train_data_path == ["runs/one"]


def test_a_weighted_blend_of_fine_tuning_data_is_refused_before_training():
    """Every run refused it when it built the data; the validator passed it."""
    problems = problems_of(tiny_raw(), ["--data.mock=false", "--data.format=sft",
                                        "--training.mode=finetune",
                                        '--data.train_data_path=[0.5, "a.jsonl", 0.5, "b.jsonl"]'])
    assert any("data.train_data_path: blend weights are not supported for fine-tuning data "
               "(data.format=sft); fix: list the jsonl files without weights" in p
               for p in problems), problems


@pytest.mark.parametrize("name", ["corpus_text_document.idx", "chat.jsonl"])
def test_a_path_with_a_space_is_one_path_not_megatrons_form(tmp_path, name):
    """It became two prefixes, and the error named a path the user never wrote."""
    folder = tmp_path / "my data"
    folder.mkdir()
    (folder / name).write_text("")
    value = str(folder / name.removesuffix(".idx"))
    cfg = load_config(TINY, [f"--data.train_data_path={value}"], raw=tiny_raw())
    assert cfg.data.train_data_path == [value]


@pytest.mark.parametrize("value, message", [
    ('[true, "a"]', "data.train_data_path=[True, 'a']: must be dataset prefixes or [weight, prefix"),
    ('["inf", "a"]', "data.train_data_path: blend pair ('inf', 'a') must be a positive weight"),
    ('[""]', "data.train_data_path=['']: must be dataset prefixes"),
    ('[0.5, "a", 0.5]', "a blend is [weight, prefix, weight, prefix, ...] but it has an odd number"),
    ("[0.5,a]", "--data.train_data_path=[0.5,a]: not a JSON list (a path in it needs quotes)"),
    ("0.5 runs/a 0.5", "a blend is [weight, prefix, weight, prefix, ...] but it has an odd number"),
    ('["runs/a", "0.5", "runs/b"]', "'0.5' is a number among prefixes; a blend gives a weight "
                                     "before every prefix or before none"),
])
def test_a_data_path_the_datasets_would_refuse_is_refused_before_training(value, message):
    """The validator reads data paths with the datasets' own parser: these passed it before and
    failed when the data was built (or, not being JSON, became one prefix named "[0.5,a]")."""
    problems = problems_of(tiny_raw(), ["--data.mock=false", f"--data.train_data_path={value}"])
    assert any(message in p for p in problems), problems


def test_megatrons_arguments_map_to_fields_that_exist_and_the_readme_shows_them():
    from megagpt.config import MEGATRON_ARGUMENTS, Config, SECTIONS
    for flag, ours in MEGATRON_ARGUMENTS.items():
        target = ours.split()[0].split("=")[0].rstrip(":")
        if target == "name":
            continue
        section, field_name = target.split(".")
        assert field_name in {f.name for f in dataclasses.fields(SECTIONS[section])}, (flag, ours)
    assert "name" in {f.name for f in dataclasses.fields(Config)}
    readme = (Path(__file__).resolve().parents[2] / "configs" / "README.md").read_text()
    table = readme.split("## From Megatron-LM's arguments", 1)[1].split("\n## ", 1)[0]
    rows = dict(line[3:].split("` | ", 1) for line in table.splitlines() if line.startswith("| `--"))
    assert {k.removeprefix("--"): v.removesuffix(" |") for k, v in rows.items()} == \
        MEGATRON_ARGUMENTS


@pytest.mark.parametrize("arg, expected", [
    ("--tensor-model-parallel-size", "--tensor-model-parallel-size is Megatron-LM's argument; "
                                     "here it is parallel.tensor_parallel_size"),
    ("--micro-batch-size=4", "--micro-batch-size is Megatron-LM's argument; here it is "
                             "training.batch_size"),
    ("--use_distributed_optimizer", "--use_distributed_optimizer is Megatron-LM's argument; here "
                                    "it is parallel.zero_stage=1"),
])
def test_a_megatron_argument_given_as_an_override_says_where_it_goes(arg, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [arg, "2"], raw=tiny_raw())
    assert expected in str(info.value)


def test_every_bad_override_is_reported_at_once():
    """A pasted Megatron command took one run per argument to learn them."""
    with pytest.raises(ConfigError) as info:
        parse_overrides(["--num-layers", "4", "--hidden-size=256", "--training.max_steps=5",
                         "--bf16", "--lr", "3e-4", "oops", "--training.seed"])
    assert [p.split(";")[0].split(" is ")[0] for p in info.value.problems] == [
        "--num-layers", "--hidden-size", "--bf16", "--lr",
        "override 'oops'", "override --training.seed has no value"]


def test_a_collective_timeout_shorter_than_rank_0s_waits_is_refused():
    """Rank 0 alone waits up to 2 minutes for another run's save-dir lock while the others sit
    in a collective: a shorter timeout failed them with a gloo traceback."""
    from megagpt.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"parallel.distributed_timeout_minutes=0.25: must be at "
                                          r"least 3 \(rank 0 alone waits up to 2 minutes"):
        load_config(ROOT / "configs" / "training" / "tiny_model.json",
                    ["--parallel.distributed_timeout_minutes=0.25"])


@pytest.mark.parametrize("overrides, problem", [
    (["--model.seq_length=127", "--parallel.sequence_parallel=true"],
     "parallel.sequence_parallel=true: model.seq_length=127 must be divisible by "
     "parallel.tensor_parallel_size=2; fix: a model.seq_length divisible by 2 (e.g. 128), or "
     "sequence_parallel=false"),
    (["--parallel.virtual_pipeline_size=2", "--training.grad_accumulation_steps=3"],
     "training.grad_accumulation_steps=3: the interleaved schedule needs the number of "
     "micro-batches to be a multiple of parallel.pipeline_parallel_size=2; fix: "
     "grad_accumulation_steps=4, or virtual_pipeline_size=1"),
    (["--data.format=sft"], "data.format=sft: fine-tuning data needs training.mode=finetune, got "
                            "pretrain; fix: training.mode=finetune")])
def test_layout_and_mode_refusals_give_a_fix(overrides, problem):
    assert problem in problems_of(tiny_raw(), overrides)


@pytest.mark.parametrize("overrides, problem", [
    (["--model.dropout=1.0"], "model.dropout=1.0: must be in [0, 1)"),
    (["--parallel.distributed_timeout_minutes=2"],
     "parallel.distributed_timeout_minutes=2.0: must be at least 3"),
    (["--training.lr_decay_steps=50", "--training.warmup_steps=51"],
     "training.warmup_steps=51: exceeds the decay length"),
    (["--training.learning_rate=0.001", "--training.min_lr=0.0015"],
     "training.min_lr=0.0015: must not exceed training.learning_rate=0.001"),
])
def test_each_bound_is_refused_just_past_it(overrides, problem):
    assert any(p.startswith(problem) for p in problems_of(tiny_raw(), overrides)), problem
    ok = {"--model.dropout=1.0": "--model.dropout=0.99",
          "--parallel.distributed_timeout_minutes=2": "--parallel.distributed_timeout_minutes=3",
          "--training.warmup_steps=51": "--training.warmup_steps=50",
          "--training.min_lr=0.0015": "--training.min_lr=0.001"}
    load_config(TINY, [ok.get(o, o) for o in overrides])          # at the bound: valid


def test_the_vocabulary_is_padded_as_megatron_pads_it():
    """The smallest multiple of make_vocab_size_divisible_by x tp, for odd tp too (12 heads
    split 3 ways): each rank's embedding shard holds as many rows."""
    m = load_config(TINY).model
    for tp in range(1, 9):
        multiple = m.make_vocab_size_divisible_by * tp
        padded = m.padded_vocab_size(tp)
        assert padded % multiple == 0 and m.vocab_size <= padded < m.vocab_size + multiple, tp

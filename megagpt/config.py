"""The typed config tree: dataclasses, JSON loading, dotted overrides and one validation pass.

A training config is one JSON object with the sections `model`, `training`, `data`, `parallel`,
`kernels`, `checkpoint` and `logging` (see configs/README.md for every field). `model` may name a
Hugging Face GPT-2 architecture file (`model.config_file`) and `data` a dataset config
(`data.config_file`); values written inline must agree with them, and command-line overrides,
applied after the files are merged, replace either.

`load_config(path, overrides)` reads, merges, type-checks and validates, and raises `ConfigError`
listing every problem at once, each naming the field, its value, the rule and a fix. Nothing here
creates a process group or a tensor, so a bad config is caught before launch.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megagpt.fsutil import dataset_exists

REQUIRED = object()  # sentinel default: the field must be present in the file

ATTENTION_BACKENDS = ("auto", "triton", "flash_attn", "sdpa", "eager")
LAYERNORM_BACKENDS = ("auto", "triton", "torch", "apex")
KERNEL_BACKENDS = ("auto", "triton", "torch")


def _field(default=REQUIRED, choices: tuple | None = None, doc: str = ""):
    """A dataclass field with its allowed values and one line of documentation."""
    meta = {"choices": choices, "doc": doc, "required": default is REQUIRED}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=None if default is REQUIRED else default, metadata=meta)


@dataclass
class ModelConfig:
    config_file: str | None = _field(None, doc="a Hugging Face GPT-2 config (configs/models/*.json)")
    vocab_size: int = _field(doc="tokenizer vocabulary size (GPT-2: 50257)")
    d_model: int = _field(doc="hidden width")
    n_heads: int = _field(doc="attention heads")
    n_layers: int = _field(doc="transformer blocks")
    seq_length: int = _field(1024, doc="context length (learned positions)")
    ffn_hidden_size: int | None = _field(None, doc="MLP width; default 4 * d_model")
    dropout: float = _field(0.1, doc="dropout on embeddings, residuals and attention")
    activation: str = _field("gelu_tanh", choices=("gelu_tanh", "gelu"),
                             doc="the MLP's GeLU: gelu_tanh (GPT-2's tanh approximation) or gelu "
                                 "(the exact one, with erf)")
    layernorm_eps: float = _field(1e-5)
    init_std: float = _field(0.02, doc="std of the normal initialisation")
    make_vocab_size_divisible_by: int = _field(128, doc="pad the vocabulary to a multiple of this x tp")
    estimated_parameters: int | None = _field(None, doc="expected parameter count, checked by the validator")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.d_model

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by * tp (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class TrainingConfig:
    mode: str = _field("pretrain", choices=("pretrain", "finetune"))
    learning_rate: float = _field(doc="peak learning rate, above 0 and at most 1")
    min_lr: float = _field(0.0, doc="learning rate at the end of the decay")
    lr_schedule: str = _field("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _field(0)
    lr_decay_steps: int | None = _field(None, doc="steps of decay after which min_lr holds; default max_steps")
    batch_size: int = _field(doc="micro-batch size per GPU (sequences)")
    grad_accumulation_steps: int = _field(1, doc="micro-batches per optimizer step on each data-parallel rank")
    global_batch_size: int | None = _field(None, doc="optional check: batch_size * grad_accumulation_steps * dp")
    max_steps: int = _field(doc="optimizer steps")
    weight_decay: float = _field(0.1, doc="AdamW decay; never applied to biases, norms and embeddings")
    adam_beta1: float = _field(0.9)
    adam_beta2: float = _field(0.95)
    adam_eps: float = _field(1e-8)
    grad_clip: float = _field(1.0, doc="clip the global gradient norm to this; 0 turns clipping off")
    optimizer: str = _field("adamw", choices=("adamw", "apex"),
                            doc="AdamW (fused on CUDA) or apex's FusedAdam")
    precision: str = _field("bf16", choices=("fp32", "bf16", "fp16"))
    seed: int = _field(1234)
    log_interval: int = _field(10, doc="steps between console lines and metrics records")
    eval_interval: int = _field(1000, doc="steps between validation passes; 0 turns them off")
    eval_iters: int = _field(10, doc="global batches per validation pass and of the end-of-run "
                                     "test evaluation (each grad_accumulation_steps "
                                     "micro-batches a replica)")
    recompute: str = _field("none", choices=("none", "selective", "full"))
    cuda_graphs: bool = _field(False, doc="replay each block's forward and backward as CUDA graphs "
                                          "(one GPU per model replica, dropout 0)")
    max_skipped_steps: int = _field(10, doc="consecutive non-finite steps before the run aborts "
                                                "(0: never)")
    exit_duration_minutes: float | None = _field(None, doc="save and stop at the first step "
                                                 "boundary after this many minutes of the run "
                                                 "(a job's time limit); null: no limit")


@dataclass
class PreprocessingConfig:
    input: str = _field(doc="jsonl or jsonl.gz to tokenize")
    output_prefix: str = _field(doc="writes <prefix>_<key>_document.bin/.idx")
    json_keys: list = _field(["text"])
    append_eod: bool = _field(True)
    workers: int = _field(1)


@dataclass
class DataConfig:
    config_file: str | None = _field(None, doc="a dataset config (configs/dataset/*.json)")
    description: str | None = _field(None)
    format: str = _field("indexed", choices=("indexed", "sft"))
    train_data_path: list = _field(doc="a prefix, or [weight, prefix, weight, prefix, ...] to blend")
    val_data_path: list = _field(doc="validation prefixes; empty: carve validation out of data.split")
    test_data_path: list = _field([])
    split: str = _field("969,30,1", doc="train,valid,test document weights when val_data_path is empty")
    tokenizer_path: str = _field(doc='"gpt2" (bundled), a tokenizer.json, or a vocab/merges folder')
    mock: bool = _field(False, doc="random tokens instead of a dataset (benchmarks, tests)")
    num_workers: int = _field(2, doc="data-loader worker processes")
    sft_packing: bool = _field(True, doc="fine-tuning: pack examples into full windows (else pad)")
    reset_attention_mask: bool = _field(False, doc="a token attends only to the tokens of its "
                                        "own document in the window (an end-of-document token "
                                        "ends one)")
    reset_position_ids: bool = _field(False, doc="positions count from 0 at each document's "
                                      "first token")
    eod_mask_loss: bool = _field(False, doc="no loss on the prediction made at an "
                                 "end-of-document token (the next document's first token)")
    cache_dir: str | None = _field(None, doc="where index arrays are cached; default next to the data")
    preprocessing: PreprocessingConfig | None = _field(None)


@dataclass
class ParallelConfig:
    world_size: int = _field(1, doc="number of processes (GPUs); must equal torchrun's world size")
    tensor_parallel_size: int = _field(1)
    pipeline_parallel_size: int = _field(1)
    virtual_pipeline_size: int = _field(1, doc="model chunks per pipeline rank (>1: interleaved 1F1B)")
    sequence_parallel: bool = _field(False)
    zero_stage: int = _field(0, doc="0 or 1 natively (1 shards optimizer state); 0-3 with DeepSpeed")
    deepspeed_config: str | None = _field(None, doc="a DeepSpeed JSON; training then runs through DeepSpeed")
    bucket_size_mb: float = _field(25.0, doc="gradient all-reduce bucket size")
    distributed_timeout_minutes: float = _field(
        30.0, doc="how long a collective waits for every rank before the run fails")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_parallel_size * self.pipeline_parallel_size)


@dataclass
class KernelsConfig:
    attention: str = _field("auto", choices=ATTENTION_BACKENDS)
    layernorm: str = _field("auto", choices=LAYERNORM_BACKENDS)
    softmax: str = _field("auto", choices=KERNEL_BACKENDS)
    bias_gelu: str = _field("auto", choices=KERNEL_BACKENDS)
    cross_entropy: str = _field("auto", choices=KERNEL_BACKENDS)


@dataclass
class CheckpointConfig:
    save_dir: str | None = _field(None, doc="default <logging.run_dir>/checkpoints")
    save_interval: int = _field(1000, doc="steps between checkpoints; 0: only at the end")
    load: str = _field("auto", doc='"auto" (resume from latest if any), "none", or a path')
    keep_last: int = _field(3, doc="complete checkpoints kept (0: every one)")
    async_save: bool = _field(False, doc="write periodic checkpoints in the background: the "
                              "state is copied to host memory and training goes on while a "
                              "thread writes it")
    pretrained: str | None = _field(None, doc="weights to start from when there is nothing to "
                                    "resume: a checkpoint of ours (any layout) or a Hugging Face "
                                    "GPT-2 folder")


@dataclass
class LoggingConfig:
    run_dir: str | None = _field(None, doc="default runs/<config name>")
    metrics_file: str | None = _field(None, doc="default <run_dir>/metrics.jsonl")
    tensorboard: bool = _field(False)
    wandb_project: str | None = _field(None, doc="log the records to this Weights & Biases "
                                       "project too (rank 0; needs the wandb package)")
    progress_bar: bool = _field(True)


@dataclass
class Config:
    name: str | None = _field(None, doc="run name; default the config file's stem")
    description: str | None = _field(None)
    model: ModelConfig = _field()
    training: TrainingConfig = _field()
    data: DataConfig = _field()
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or f"runs/{self.name or 'default'}"

    @property
    def save_dir(self) -> str:
        """`checkpoint.save_dir`, or its default: the run dir's `checkpoints/`."""
        return self.checkpoint.save_dir or f"{self.run_dir}/checkpoints"

    def to_dict(self) -> dict:
        """The whole config as one self-contained dict (what checkpoints keep): the sections
        hold every value, those read from files and overrides alike, so the files they named
        are dropped (`config_file` null) and the dict loads back as the same config."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["model"]["config_file"] = out["data"]["config_file"] = None
        return out


SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig,
            "parallel": ParallelConfig, "kernels": KernelsConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


class ConfigError(ValueError):
    """Every problem found in a config, each naming the field, the value, the rule and the fix."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class ConfigFileError(ValueError):
    """A config file that cannot be read or is not valid JSON (line and column named)."""


# ---------------------------------------------------------------------------------------------
# Reading files and applying overrides

def read_json(path: str | Path, what: str = "config") -> dict:
    """Read a JSON object, with errors that name the file, the line and the column."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.json"))[:4]
        raise ConfigFileError(f"{what} file {path} is a folder; fix: name a file in it"
                              f"{' (' + ', '.join(found) + ')' if found else ''}")
    if not path.is_file():
        raise ConfigFileError(f"{what} file not found: {path} (check the path; it is read relative "
                              f"to the current directory {Path.cwd()})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"cannot read {what} file {path}: {e}") from e
    duplicates = []

    def no_duplicates(pairs):          # json.loads keeps the last of a repeated key, silently
        keys = [k for k, _ in pairs]
        duplicates.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(pairs)
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg} "
                              f"(run `python -m json.tool {path}` to see it)") from e
    if duplicates:
        raise ConfigFileError(f"{path}: {', '.join(repr(k) for k in dict.fromkeys(duplicates))} "
                              f"appear{'s' if len(set(duplicates)) == 1 else ''} more than once "
                              f"in one object, and only the last would count; fix: keep one of "
                              f"each")
    if not isinstance(obj, dict):
        raise ConfigFileError(f"{path}: the top level must be a JSON object, got {type(obj).__name__}")
    return obj


OVERRIDES_HELP = ("Any config field can be overridden after the config: --section.field=VALUE "
                  "(or --section.field VALUE), e.g. --training.max_steps=1000 "
                  "--parallel.tensor_parallel_size=2 --name=my_run. VALUE is read as JSON where "
                  "it parses (numbers, true/false/null, '[...]' lists), else as text; the fields "
                  "are in configs/README.md.")


def split_config_args(config_args: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """A tool's `--config FILE...` values and its other arguments, as (config files, overrides):
    argparse never reads an argument holding a space as an option, so an override whose value
    has one ('--data.train_data_path=0.3 runs/a 0.7 runs/b') lands among the config files."""
    return ([a for a in config_args if not a.startswith("--")],
            overrides + [a for a in config_args if a.startswith("--")])


# Megatron-LM's arguments and what they are here (configs/README.md, "From Megatron-LM's
# arguments", shows this table; a Megatron argument given as an override is answered from it)
MEGATRON_ARGUMENTS = {
    "num-layers": "model.n_layers",
    "hidden-size": "model.d_model",
    "num-attention-heads": "model.n_heads",
    "seq-length": "model.seq_length",
    "max-position-embeddings": "model.seq_length of the model (the learned positions; a "
                               "training config's own model.seq_length may be shorter)",
    "ffn-hidden-size": "model.ffn_hidden_size",
    "hidden-dropout": "model.dropout (one probability for embeddings, residuals and attention)",
    "attention-dropout": "model.dropout (one probability for embeddings, residuals and "
                         "attention)",
    "layernorm-epsilon": "model.layernorm_eps",
    "norm-epsilon": "model.layernorm_eps",
    "vocab-size": "model.vocab_size",
    "init-method-std": "model.init_std",
    "make-vocab-size-divisible-by": "model.make_vocab_size_divisible_by",
    "micro-batch-size": "training.batch_size",
    "global-batch-size": "training.grad_accumulation_steps = global / (micro-batch x "
                         "data-parallel size); training.global_batch_size checks it",
    "train-iters": "training.max_steps",
    "lr": "training.learning_rate",
    "min-lr": "training.min_lr",
    "lr-decay-style": "training.lr_schedule (cosine, linear or constant)",
    "lr-warmup-iters": "training.warmup_steps",
    "lr-decay-iters": "training.lr_decay_steps",
    "weight-decay": "training.weight_decay",
    "adam-beta1": "training.adam_beta1",
    "adam-beta2": "training.adam_beta2",
    "adam-eps": "training.adam_eps",
    "clip-grad": "training.grad_clip",
    "bf16": "training.precision=bf16",
    "fp16": "training.precision=fp16",
    "seed": "training.seed",
    "log-interval": "training.log_interval",
    "eval-interval": "training.eval_interval",
    "eval-iters": "training.eval_iters",
    "recompute-activations": "training.recompute=selective",
    "recompute-granularity": "training.recompute (full or selective; full recomputes every "
                             "block)",
    "recompute-method": "training.recompute=full is --recompute-method uniform "
                        "--recompute-num-layers 1 (block, or more layers a group, are not here)",
    "recompute-num-layers": "training.recompute=full is --recompute-method uniform "
                            "--recompute-num-layers 1 (block, or more layers a group, are not "
                            "here)",
    "enable-cuda-graph": "training.cuda_graphs=true",
    "exit-duration-in-mins": "training.exit_duration_minutes",
    "data-path": "data.train_data_path (with data.val_data_path=[] to carve data.split out of "
                 "it)",
    "split": "data.split",
    "train-data-path": "data.train_data_path",
    "valid-data-path": "data.val_data_path",
    "test-data-path": "data.test_data_path",
    "data-cache-path": "data.cache_dir",
    "num-workers": "data.num_workers",
    "mock-data": "data.mock=true",
    "reset-attention-mask": "data.reset_attention_mask=true",
    "reset-position-ids": "data.reset_position_ids=true",
    "eod-mask-loss": "data.eod_mask_loss=true",
    "vocab-file": "data.tokenizer_path: the folder of the vocab and merges files (Megatron's "
                  "gpt2-vocab.json and gpt2-merges.txt are GPT-2's: data.tokenizer_path=gpt2)",
    "merge-file": "data.tokenizer_path: the folder of the vocab and merges files (Megatron's "
                  "gpt2-vocab.json and gpt2-merges.txt are GPT-2's: data.tokenizer_path=gpt2)",
    "tokenizer-type": "data.tokenizer_path (GPT2BPETokenizer: gpt2)",
    "tokenizer-model": "data.tokenizer_path (a tokenizer.json, or its folder)",
    "tensor-model-parallel-size": "parallel.tensor_parallel_size",
    "pipeline-model-parallel-size": "parallel.pipeline_parallel_size",
    "num-layers-per-virtual-pipeline-stage": "parallel.virtual_pipeline_size = n_layers / "
                                             "(pipeline size x that number)",
    "num-virtual-stages-per-pipeline-rank": "parallel.virtual_pipeline_size",
    "sequence-parallel": "parallel.sequence_parallel=true",
    "use-distributed-optimizer": "parallel.zero_stage=1",
    "ddp-bucket-size": "parallel.bucket_size_mb (in MB of float32: elements x 4 / 2**20)",
    "distributed-timeout-minutes": "parallel.distributed_timeout_minutes",
    "deepspeed": "parallel.deepspeed_config=FILE (Megatron-DeepSpeed's --deepspeed "
                 "--deepspeed_config FILE)",
    "deepspeed-config": "parallel.deepspeed_config (Megatron-DeepSpeed's --deepspeed_config)",
    "use-flash-attn": "kernels.attention=flash_attn",
    "attention-backend": "kernels.attention (auto: auto; flash: flash_attn or triton; fused: "
                         "sdpa; unfused or local: eager)",
    "no-masked-softmax-fusion": "kernels.softmax=torch",
    "no-bias-gelu-fusion": "model.activation=gelu (megatron-core's unfused MLP computes the "
                           "exact GeLU, with erf; kernels.bias_gelu=torch runs the unfused op)",
    "openai-gelu": "model.activation=gelu_tanh, the default (megatron-core's MLP never reads "
                   "--openai-gelu; its default fused bias-GeLU is the tanh GeLU)",
    "save": "checkpoint.save_dir",
    "load": "checkpoint.load: leave it auto when it is --save's folder (it resumes, and starts "
            "fresh when there is nothing to resume, as Megatron's); another folder must hold a "
            "checkpoint",
    "finetune": "checkpoint.pretrained=FOLDER (--load FOLDER --finetune: its weights, step 0, "
                "a fresh optimizer)",
    "save-interval": "checkpoint.save_interval",
    "async-save": "checkpoint.async_save=true",
    "pretrained-checkpoint": "checkpoint.pretrained",
    "tensorboard-dir": "logging.tensorboard=true (events under logging.run_dir)",
    "wandb-project": "logging.wandb_project",
    "wandb-exp-name": "name",
}


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--section.field=value` or `--section.field value` pairs into {"section.field": "value"}."""
    out, i, problems = {}, 0, []
    top_level = [f for f in _field_names(Config) if _dataclass_of(_hints(Config)[f]) is None]
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or ("." not in arg.split("=", 1)[0]
                                        and arg[2:].split("=", 1)[0] not in top_level):
            megatron = MEGATRON_ARGUMENTS.get(arg[2:].split("=", 1)[0].replace("_", "-"))
            if arg.startswith("--") and megatron:
                problems.append(f"{arg.split('=', 1)[0]} is Megatron-LM's argument; here it is "
                                f"{megatron} (configs/README.md, \"From Megatron-LM's "
                                f"arguments\")")
            else:
                problems.append(f"override {arg!r} is not of the form --section.field=value "
                                f"(e.g. --training.max_steps=100) or one of "
                                f"{', '.join(f'--{f}=VALUE' for f in top_level)}")
            # every one is reported: skip this one's value, if it has one
            i += 2 if (arg.startswith("--") and "=" not in arg and i + 1 < len(args)
                       and not args[i + 1].startswith("--")) else 1
            continue
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        else:
            problems.append(f"override --{key} has no value; write --{key}=VALUE")
            i += 1
            continue
        out[key] = value
        i += 1
    if problems:
        raise ConfigError(problems)
    return out


def _override_value(raw: str, ftype) -> Any:
    """Command-line text to a JSON value: numbers, true/false/null and lists parse, and so do the
    forms Python and shells write that JSON does not (True/False/None, .1, 1., +1) for a field
    of that type; the rest is text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    base = _base_type(ftype)
    if raw == "None":
        return None
    if base is bool and raw in ("True", "False"):
        return raw == "True"
    if base is int:
        try:
            return int(raw)
        except ValueError:
            pass
    if base in (int, float):
        try:
            number = float(raw)
        except ValueError:
            return raw
        return number if math.isfinite(number) else raw
    return raw


def apply_overrides(raw: dict, overrides: dict[str, str], problems: list[str]) -> None:
    """Write each dotted override into the raw config dict, checking the path exists."""
    for key, value in overrides.items():
        parts = key.split(".")
        cls: Any = Config
        node = raw
        for depth, part in enumerate(parts):
            names = _field_names(cls)
            if part not in names:
                prefix = ".".join(parts[:depth])
                problem = _unknown(prefix, part, names, value)
                if depth < len(parts) - 1:   # a section's name: show the whole override
                    section = ".".join(parts[:depth + 1])
                    problem = (f"--{key}={value}: unknown section {section}; "
                               f"{_unknown_hint(prefix, part, names)}")
                problems.append(problem)
                break
            ftype = _hints(cls)[part]
            if depth == len(parts) - 1:
                parsed = _override_value(value, ftype)
                if _base_type(ftype) is str and not isinstance(parsed, str) and parsed is not None:
                    parsed = value
                if _base_type(ftype) is list and isinstance(parsed, str) and len(value.split()) > 1 \
                        and not value.lstrip().startswith("[") and not dataset_exists(value):
                    # Megatron's --data-path form, "0.5 runs/a 0.5 runs/b", unless the value is
                    # one dataset or file (a folder name with a space)
                    parsed = value.split()
                if _base_type(ftype) is list and isinstance(parsed, str) and value.lstrip().startswith("["):
                    problems.append(f"--{key}={value}: not a JSON list (a path in it needs quotes); "
                                    f"fix: --{key}='[0.5, \"runs/data/a\", 0.5, \"runs/data/b\"]' "
                                    f"(the single quotes keep the shell from taking the double)")
                    break
                node[part] = parsed
            else:
                sub = _dataclass_of(ftype)
                if sub is None:
                    problems.append(f"--{key}: {'.'.join(parts[:depth + 1])} is not a section; "
                                    f"write --{'.'.join(parts[:depth + 1])}=VALUE")
                    break
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node, cls = node[part], sub


# ---------------------------------------------------------------------------------------------
# Type checking the raw dict into dataclasses

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _unknown(prefix: str, name: str, names: list[str], value: Any) -> str:
    where = f"{prefix}.{name}" if prefix else name
    return f"{where}={_show(value)}: unknown field; {_unknown_hint(prefix, name, names)}"


def _unknown_hint(prefix: str, name: str, names: list[str]) -> str:
    """Where an unknown name belongs, the closest known one, or the known ones."""
    elsewhere = [section for section, cls in SECTIONS.items()
                 if section != prefix and name in _field_names(cls)]
    if elsewhere:   # the right name in the wrong section: say where it lives
        return f"{name} belongs in the {elsewhere[0]} section: {elsewhere[0]}.{name}"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else \
        f"valid fields{' of ' + prefix if prefix else ''}: {', '.join(names)}"


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _args(tp) -> tuple:
    return typing.get_args(tp)


def _is_optional(tp) -> bool:
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in _args(tp)


def _base_type(tp):
    if _is_optional(tp):
        return next(a for a in _args(tp) if a is not type(None))
    return tp


def _dataclass_of(tp):
    base = _base_type(tp)
    return base if dataclasses.is_dataclass(base) else None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list"}


def _coerce(where: str, value: Any, tp, problems: list[str], doc: str | None = None) -> Any:
    """Check one JSON value against a field type; return the value to store (or None on error)."""
    if value is None:
        if _is_optional(tp):
            return None
        problems.append(f"{where}=null: must be {_TYPE_WORDS.get(_base_type(tp), 'set')}; "
                        f"fix: give it a value{': ' + doc if doc else ''}")
        return None
    base = _base_type(tp)
    sub = _dataclass_of(tp)
    if sub is not None:
        if not isinstance(value, dict):
            problems.append(f"{where}={_show(value)}: must be a JSON object (a section)")
            return None
        return _build(sub, value, where, problems)
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:          # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):  # JSON readers accept NaN and Infinity
            problems.append(f"{where}={_show(value)}: must be a finite number")
            return None
        return number
    if base is list and isinstance(value, str):
        return [value]
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    shown = json.dumps(value) if isinstance(value, str) else _show(value)   # "2", quotes seen
    meant = _override_value(value, tp) if isinstance(value, str) else value
    fits = (meant is None or (isinstance(meant, bool) if base is bool else
                              base in (int, float) and not isinstance(meant, bool)
                              and isinstance(meant, int if base is int else (int, float))))
    fix = f"; fix: write {json.dumps(meant)}" if meant is not value and fits else ""
    problems.append(f"{where}={shown}: must be {_TYPE_WORDS.get(base, base.__name__)}, "
                    f"got {type(value).__name__}{fix}")
    return None


def _build(cls, raw: dict, prefix: str, problems: list[str]):
    """Type-check a raw dict into the dataclass cls, appending every problem found."""
    hints, names, kwargs = _hints(cls), _field_names(cls), {}
    for key, value in raw.items():
        if key not in names:
            problems.append(_unknown(prefix, key, names, value))
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            if f.metadata.get("required"):
                problems.append(f"{where}: required field is missing; fix: add it to the config "
                                f"({f.metadata.get('doc') or 'see configs/README.md'})")
            continue
        value = _coerce(where, raw[f.name], hints[f.name], problems, f.metadata.get("doc"))
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            problems.append(f"{where}={_show(value)}: must be one of {', '.join(choices)}")
        kwargs[f.name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Architecture and dataset files

HF_TO_MODEL = {"vocab_size": "vocab_size", "n_embd": "d_model", "n_head": "n_heads",
               "n_layer": "n_layers", "n_positions": "seq_length", "n_inner": "ffn_hidden_size",
               "layer_norm_epsilon": "layernorm_eps", "initializer_range": "init_std"}
HF_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
# transformers' names of the two GeLUs (gelu_fast: the old Megatron GPT-2 converter's)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu": "gelu",
                  "gelu_python": "gelu"}


def _is_deepspeed_config(raw: dict) -> bool:
    return any(k in raw for k in ("zero_optimization", "train_batch_size",
                                  "train_micro_batch_size_per_gpu"))


def model_fields_from_hf(hf: dict, path: str, problems: list[str]) -> dict:
    """Map a Hugging Face GPT-2 config dict onto `model` fields, noting what cannot be expressed."""
    kind = ("a training config" if "model" in hf or "training" in hf else
            "a DeepSpeed config" if _is_deepspeed_config(hf)
            else "a dataset file" if "train_data_path" in hf else None)
    if kind or not any(key in hf for key in (*HF_TO_MODEL, "model_type")):
        what = f"it is {kind}" if kind else f"it has none of {', '.join(HF_TO_MODEL)}"
        problems.append(f"model.config_file={path}: not a Hugging Face GPT-2 config ({what}); "
                        f"fix: name an architecture file, e.g. configs/models/gpt_small.json")
        return {}
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model.config_file={path}: model_type={hf.get('model_type')!r}; "
                        f"only GPT-2 configs (model_type \"gpt2\") are supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        problems.append(f"model.config_file={path}: activation_function={act!r}; the model "
                        f"computes GPT-2's tanh GeLU (\"gelu_new\") or the exact one "
                        f"(\"gelu\")")
    if hf.get("tie_word_embeddings", True) is not True:
        problems.append(f"model.config_file={path}: tie_word_embeddings="
                        f"{json.dumps(hf['tie_word_embeddings'])}; the model always ties the input "
                        f"and output embeddings (true)")
    # attention scores are always divided by sqrt(head_dim) and by nothing else
    if hf.get("scale_attn_weights", True) is not True:
        problems.append(f"model.config_file={path}: scale_attn_weights="
                        f"{json.dumps(hf['scale_attn_weights'])}; the model always scales the "
                        f"attention scores by 1/sqrt(head_dim) (true), so this checkpoint's "
                        f"attention cannot be expressed")
    if hf.get("scale_attn_by_inverse_layer_idx", False) is not False:
        problems.append(f"model.config_file={path}: scale_attn_by_inverse_layer_idx="
                        f"{json.dumps(hf['scale_attn_by_inverse_layer_idx'])} (true in some "
                        f"Stanford CRFM GPT-2s); the model does not also divide layer i's scores "
                        f"by i + 1 (false), so this checkpoint's attention cannot be expressed")
    out = {ours: hf[theirs] for theirs, ours in HF_TO_MODEL.items() if theirs in hf}
    if act in HF_ACTIVATIONS:
        out["activation"] = HF_ACTIVATIONS[act]
    drops = {hf[k] for k in HF_DROPOUTS if k in hf}
    if len(drops) > 1:
        problems.append(f"model.config_file={path}: resid_pdrop, embd_pdrop and attn_pdrop differ "
                        f"({', '.join(f'{k}={hf[k]}' for k in HF_DROPOUTS if k in hf)}); "
                        f"the model uses one model.dropout, so make them equal")
    elif drops:
        out["dropout"] = drops.pop()
    return out


def resolve_path(path: str, config_path: str | Path | None) -> Path:
    """A path from a config: as given (relative to the working directory) if it exists, else
    relative to the config file's folder or one of its parents (so `configs/models/x.json` works
    from any directory inside the repository)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or config_path is None:
        return p
    for parent in Path(config_path).resolve().parents:
        if (parent / p).exists():
            return parent / p
    return p


def _merge_file(raw_section: dict, from_file: dict, section: str, file_field: str,
                problems: list[str], file_wins: bool = False) -> dict:
    """Values from a referenced file, with inline values required to agree; a model's inline
    `seq_length` may be shorter than the architecture's (a task's context, within the learned
    positions). With `file_wins` (the file named on the command line) every inline value that
    differs yields to the file, `seq_length` too: it was written for the file the config named."""
    merged = dict(from_file)

    def agrees(key, file_value, value) -> bool:
        if key == "ffn_hidden_size":   # null means 4 x d_model (GPT-2's n_inner: null)
            width = raw_section.get("d_model", from_file.get("d_model"))
            file_value, value = (4 * width if v is None and isinstance(width, int) else v
                                 for v in (file_value, value))
        if (section == "model" and key == "seq_length" and not file_wins
                and _is_number(file_value, value)):
            return 0 < value <= file_value
        return file_value == value

    for key, value in raw_section.items():
        if key in from_file and key != file_field and not agrees(key, from_file[key], value):
            if file_wins:
                continue
            problems.append(f"{section}.{key}={_show(value)} disagrees with "
                            f"{raw_section[file_field]} which says {_show(from_file[key])}; "
                            f"fix: make them equal, drop the inline value to keep the file's, "
                            f"or to use another value give --{section}.{key}=... on the command "
                            f"line (it overrides the file) or name a copy of the file in "
                            f"{section}.{file_field}")
        merged[key] = value
    return merged


def _is_number(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _expand_files(raw: dict, config_path: str | None, problems: list[str],
                  from_command_line: set[str] = frozenset()) -> None:
    """Merge the files the model and data sections name; `from_command_line` holds the
    sections whose file an override chose."""
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("config_file"), str):
        path = resolve_path(model["config_file"], config_path)
        try:
            hf = read_json(path, "model.config_file")
            raw["model"] = _merge_file(model, model_fields_from_hf(hf, model["config_file"], problems),
                                       "model", "config_file", problems,
                                       file_wins="model" in from_command_line)
        except ConfigFileError as e:
            problems.append(f"model.config_file={model['config_file']}: {e}")
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("config_file"), str):
        path = resolve_path(data["config_file"], config_path)
        try:
            raw["data"] = _merge_file(data, read_json(path, "data.config_file"), "data",
                                      "config_file", problems,
                                      file_wins="data" in from_command_line)
        except ConfigFileError as e:
            problems.append(f"data.config_file={data['config_file']}: {e}")


# ---------------------------------------------------------------------------------------------
# Loading and validation

def load_config(path: str | Path | None = None, overrides: dict[str, str] | list[str] | None = None,
                raw: dict | None = None) -> Config:
    """Read a training config (or take `raw`), apply overrides, type-check and validate it.

    Raises ConfigFileError for an unreadable file or bad JSON, ConfigError listing every problem.
    """
    if raw is None:
        raw = read_json(path)
    raw = json.loads(json.dumps(raw))
    other = _other_kind_of_file(raw)
    if other:
        kind, field = other
        raise ConfigError([f"{path or 'the config'} is {kind}, not a training config; fix: --config takes a "
                           f"training config (configs/training/*.json), which names such a file "
                           f"in its {field}"], str(path))
    problems: list[str] = []
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    # `--model.config_file=...` names the file to read: it must be in place before the files are
    # read; the config's inline values written for the file it named yield to the new one, and
    # the other overrides, applied after, still win over the file's fields
    files = {k: v for k, v in overrides.items() if k.endswith(".config_file")}
    apply_overrides(raw, files, problems)
    _expand_files(raw, str(path) if path else None, problems,
                  {k.split(".")[0] for k in files})
    apply_overrides(raw, {k: v for k, v in overrides.items() if k not in files}, problems)
    cfg = _build(Config, raw, "", problems)
    cfg.source = str(path) if path else None
    if cfg.name is None and path is not None:
        cfg.name = Path(path).stem
    if None not in (cfg.model, cfg.training, cfg.data, cfg.parallel, cfg.kernels,
                    cfg.checkpoint, cfg.logging):
        problems.extend(validate(cfg))
    if problems:   # the values may come from the file or from an override: name both
        raise ConfigError(problems, f"{cfg.source} with its command-line overrides"
                          if overrides and cfg.source else cfg.source)
    return cfg


def _other_kind_of_file(raw: dict) -> tuple[str, str] | None:
    """What a config-like file other than a training config is, and the training config's field
    that names such a file; or None."""
    if "model" in raw or "training" in raw:
        return None
    if "n_embd" in raw or "model_type" in raw:
        return "a model architecture file (Hugging Face GPT-2 config)", "model.config_file"
    if "train_data_path" in raw or "format" in raw:
        return "a dataset file", "data.config_file"
    if _is_deepspeed_config(raw):
        return "a DeepSpeed config", "parallel.deepspeed_config"
    return None


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# How `layout_problems` names the layout in a training config; other callers (the checkpoint
# converter) pass their own names, e.g. command-line flags.
LAYOUT_NAMES = {"tp": "parallel.tensor_parallel_size", "pp": "parallel.pipeline_parallel_size",
                "vp": "parallel.virtual_pipeline_size", "sp": "parallel.sequence_parallel"}


def layout_problems(m: ModelConfig, tp: int, pp: int, vp: int, sequence_parallel: bool = False,
                    names: dict[str, str] | None = None) -> list[str]:
    """The rules a (tensor, pipeline, virtual pipeline) layout must meet to split model `m`:
    tp divides the heads and the MLP width (and, with sequence parallelism, the sequence), pp x vp
    divides the layers, vp > 1 only with pp > 1. Returns the problems, each naming the setting,
    its value, the rule and a fix; empty when the layout fits.

    `m`'s sizes and tp, pp, vp must already be positive integers. `names` maps "tp", "pp", "vp"
    and "sp" (sequence parallelism) to how the caller's user spells them (default LAYOUT_NAMES,
    the config's fields); a fix names the part after the last dot.
    """
    n = dict(LAYOUT_NAMES, **(names or {}))
    short = {k: v.rsplit(".", 1)[-1] for k, v in n.items()}
    p: list[str] = []
    if m.n_heads % tp:
        p.append(f"{n['tp']}={tp}: must divide model.n_heads={m.n_heads}; fix: choose "
                 f"{short['tp']} among {_divisors(m.n_heads)}, so that each rank holds whole heads")
    if m.ffn_size % tp:
        p.append(f"{n['tp']}={tp}: must divide the MLP width {m.ffn_size} "
                 f"(model.ffn_hidden_size); fix: choose among {_divisors(m.ffn_size)}")
    if m.n_layers % (pp * vp):
        p.append(f"{n['pp']}={pp} x {n['vp']}={vp} = {pp * vp}: must divide "
                 f"model.n_layers={m.n_layers}; fix: choose a product among "
                 f"{_divisors(m.n_layers)}, so that every stage holds as many layers")
    if vp > 1 and pp == 1:
        p.append(f"{n['vp']}={vp}: needs {short['pp']} > 1; "
                 f"fix: set {short['vp']}=1 or raise {short['pp']}")
    if sequence_parallel and tp > 1 and m.seq_length % tp:
        p.append(f"{n['sp']}=true: model.seq_length={m.seq_length} must be divisible by "
                 f"{n['tp']}={tp}; fix: a model.seq_length divisible by {tp} (e.g. "
                 f"{m.seq_length + tp - m.seq_length % tp}), or {short['sp']}=false")
    return p


def _check_attention_backend(cfg: Config, head_dim: int, p: list[str]) -> None:
    """What the fused attention backends cannot run: Triton's head sizes, flash-attn's head sizes
    and float32 (`auto` falls back to SDPA by itself)."""
    m, backend = cfg.model, cfg.kernels.attention
    if backend == "triton":
        from megagpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS
        if head_dim not in SUPPORTED_HEAD_DIMS:
            p.append(f"kernels.attention=triton: the head size model.d_model / model.n_heads = "
                     f"{m.d_model} / {m.n_heads} = {head_dim} is not one the kernel supports "
                     f"({', '.join(map(str, SUPPORTED_HEAD_DIMS))}); fix: kernels.attention=auto "
                     f"(SDPA for this size) or sdpa, or n_heads = d_model / 64")
    elif backend == "flash_attn":
        if head_dim > 256:   # (flash-attn pads other sizes to a multiple of 8 itself)
            p.append(f"kernels.attention=flash_attn: the head size model.d_model / model.n_heads "
                     f"= {head_dim} is above flash-attn's 256; fix: kernels.attention=sdpa, or "
                     f"more heads")
        if cfg.training.precision == "fp32":
            p.append("kernels.attention=flash_attn: flash-attn runs float16/bfloat16 only, but "
                     "training.precision=fp32; fix: training.precision=bf16, or "
                     "kernels.attention=auto or sdpa")


MAX_PARAMETERS = 10 ** 14   # 50x the largest models trained (about 2e12): beyond it, a typo


def validate(cfg: Config) -> list[str]:
    """Every cross-field rule; returns the problems (empty when the config is valid)."""
    p: list[str] = []
    m, t, d, par = cfg.model, cfg.training, cfg.data, cfg.parallel

    def positive(where: str, value, optional: bool = False):
        """Report a value <= 0; True when later rules may use the value (None: missing or mistyped)."""
        if value is None:
            return optional
        if value <= 0:
            fix = "set it to 1 or more" if isinstance(value, int) else "give it a value above 0"
            p.append(f"{where}={value}: must be positive; fix: {fix}")
            return False
        return True

    def known(*values) -> bool:
        return all(v is not None for v in values)

    def non_negative(where: str, value):
        if value is not None and value < 0:
            p.append(f"{where}={value}: must be 0 or more")

    ok = all([positive("model.vocab_size", m.vocab_size), positive("model.d_model", m.d_model),
              positive("model.n_heads", m.n_heads), positive("model.n_layers", m.n_layers),
              positive("model.seq_length", m.seq_length),
              positive("model.ffn_hidden_size", m.ffn_hidden_size, optional=True),
              positive("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by)])
    ok_layout = all([positive("parallel.world_size", par.world_size),
                     positive("parallel.tensor_parallel_size", par.tensor_parallel_size),
                     positive("parallel.pipeline_parallel_size", par.pipeline_parallel_size),
                     positive("parallel.virtual_pipeline_size", par.virtual_pipeline_size)])
    ok_batch = all([positive("training.batch_size", t.batch_size),
                    positive("training.grad_accumulation_steps", t.grad_accumulation_steps),
                    positive("training.global_batch_size", t.global_batch_size, optional=True)])
    positive("training.max_steps", t.max_steps)
    if positive("training.learning_rate", t.learning_rate) and t.learning_rate > 1:
        p.append(f"training.learning_rate={t.learning_rate}: must be at most 1 (AdamW moves each "
                 f"weight by up to the learning rate a step; a larger one overflows or diverges at "
                 f"once); fix: GPT models train at 1e-4 to 1e-3, e.g. 6e-4 for Small")
    positive("training.log_interval", t.log_interval)
    if t.eval_interval and t.eval_iters is not None and t.eval_iters < 1:
        p.append(f"training.eval_iters={t.eval_iters}: validation every {t.eval_interval} steps "
                 f"needs at least one batch; fix: training.eval_iters=10, or "
                 f"training.eval_interval=0 to turn validation off")
    positive("parallel.bucket_size_mb", par.bucket_size_mb)
    if positive("parallel.distributed_timeout_minutes", par.distributed_timeout_minutes) and \
            par.distributed_timeout_minutes < 3:
        p.append(f"parallel.distributed_timeout_minutes={par.distributed_timeout_minutes}: must "
                 f"be at least 3 (rank 0 alone waits up to 2 minutes for another run's save-dir "
                 f"lock, and builds the data's index caches, while the other ranks wait in a "
                 f"collective); fix: set it to 3 or more")
    positive("training.adam_eps", t.adam_eps)
    positive("training.lr_decay_steps", t.lr_decay_steps, optional=True)
    positive("training.exit_duration_minutes", t.exit_duration_minutes, optional=True)
    if known(t.seed) and not 0 <= t.seed < 2 ** 32:
        p.append(f"training.seed={t.seed}: must be in [0, 2**32) (numpy's and the data order's "
                 f"seeds); fix: e.g. 1234")
    positive("model.init_std", m.init_std)
    positive("model.layernorm_eps", m.layernorm_eps)
    for where, value in [("training.warmup_steps", t.warmup_steps), ("training.min_lr", t.min_lr),
                         ("training.weight_decay", t.weight_decay), ("training.grad_clip", t.grad_clip),
                         ("training.eval_interval", t.eval_interval), ("training.eval_iters", t.eval_iters),
                         ("training.max_skipped_steps", t.max_skipped_steps),
                         ("checkpoint.save_interval", cfg.checkpoint.save_interval),
                         ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                         ("data.num_workers", d.num_workers)]:
        non_negative(where, value)
    if known(m.dropout) and not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout={m.dropout}: must be in [0, 1); fix: 0.1 for GPT-2, 0.0 to turn it off")
    if ok and m.d_model % m.n_heads == 0:
        _check_attention_backend(cfg, m.d_model // m.n_heads, p)
    for where, beta in [("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)]:
        if known(beta) and not 0.0 <= beta < 1.0:
            p.append(f"{where}={beta}: must be in [0, 1); fix: 0.9 and 0.95 are usual")
    if known(t.min_lr, t.learning_rate) and t.min_lr > t.learning_rate > 0:
        p.append(f"training.min_lr={t.min_lr}: must not exceed training.learning_rate={t.learning_rate}; "
                 f"fix: e.g. min_lr = learning_rate / 10")
    decay = t.lr_decay_steps if t.lr_decay_steps is not None else t.max_steps
    if t.lr_schedule != "constant" and known(decay, t.warmup_steps) and t.warmup_steps > decay:
        p.append(f"training.warmup_steps={t.warmup_steps}: exceeds the decay length "
                 f"({'training.lr_decay_steps' if t.lr_decay_steps is not None else 'training.max_steps'}"
                 f"={decay}); fix: shorten the warm-up, or lengthen the run")

    if ok:
        sizes = [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
                 ("model.n_heads", m.n_heads), ("model.n_layers", m.n_layers),
                 ("model.seq_length", m.seq_length), ("model.ffn_hidden_size", m.ffn_hidden_size)]
        too_large = [(where, value) for where, value in sizes
                     if value is not None and value >= 2 ** 31]
        p.extend(f"{where}={value}: must be below 2**31 (token ids and tensor sizes are 32-bit "
                 f"in the data format and the kernels); fix: check the value"
                 for where, value in too_large)
        if not too_large:
            from megagpt.estimate import count_parameters
            n = count_parameters(m)
            if n > MAX_PARAMETERS:
                p.append(f"model: {n:.3g} parameters (vocab_size {m.vocab_size}, d_model "
                         f"{m.d_model}, n_layers {m.n_layers}, ffn {m.ffn_size}, seq_length "
                         f"{m.seq_length}), more than {MAX_PARAMETERS:.0e}; fix: check the sizes")
        if m.d_model % m.n_heads:
            p.append(f"model.d_model={m.d_model}: must be divisible by model.n_heads={m.n_heads}; "
                     f"fix: choose n_heads among {_divisors(m.d_model)}")
    if ok and ok_layout:
        tp, pp, vp = par.tensor_parallel_size, par.pipeline_parallel_size, par.virtual_pipeline_size
        p.extend(layout_problems(m, tp, pp, vp, par.sequence_parallel))
        if par.world_size % (tp * pp):
            p.append(f"parallel.world_size={par.world_size}: must be a multiple of "
                     f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp} "
                     f"(world_size = tp x pp x dp); fix: world_size {tp * pp}, {2 * tp * pp}, ...")
        elif ok_batch:
            dp = par.data_parallel_size
            gbs = t.batch_size * t.grad_accumulation_steps * dp
            if t.global_batch_size is not None and t.global_batch_size != gbs:
                p.append(f"training.global_batch_size={t.global_batch_size}: must equal batch_size x "
                         f"grad_accumulation_steps x data-parallel size = {t.batch_size} x "
                         f"{t.grad_accumulation_steps} x {dp} = {gbs}; fix: set it to {gbs} or "
                         f"change grad_accumulation_steps")
            if vp > 1 and t.grad_accumulation_steps % pp:
                more = t.grad_accumulation_steps + pp - t.grad_accumulation_steps % pp
                p.append(f"training.grad_accumulation_steps={t.grad_accumulation_steps}: the "
                         f"interleaved schedule needs the number of micro-batches to be a multiple "
                         f"of parallel.pipeline_parallel_size={pp}; fix: "
                         f"grad_accumulation_steps={more}, or virtual_pipeline_size=1")
        if par.deepspeed_config is None and known(par.zero_stage) and par.zero_stage not in (0, 1):
            p.append(f"parallel.zero_stage={par.zero_stage}: the native path supports 0 or 1; "
                     f"fix: use 0 or 1, or set parallel.deepspeed_config for ZeRO-2/3")
        if par.deepspeed_config is not None:
            if known(par.zero_stage) and par.zero_stage not in (0, 1, 2, 3):
                p.append(f"parallel.zero_stage={par.zero_stage}: must be 0, 1, 2 or 3")
            if tp > 1 or pp > 1:
                p.append(f"parallel.deepspeed_config={par.deepspeed_config}: the DeepSpeed engine "
                         f"runs data parallel only, but tensor_parallel_size={tp} and "
                         f"pipeline_parallel_size={pp}; fix: set both to 1 or drop deepspeed_config")
            if ok_batch and par.world_size % (tp * pp) == 0 and known(
                    t.learning_rate, t.grad_clip, t.adam_beta1, t.adam_beta2, t.adam_eps,
                    t.weight_decay, t.precision, par.zero_stage):
                from megagpt.training.ds_config import deepspeed_config_problems
                p.extend(deepspeed_config_problems(cfg))   # the file, and what contradicts ours

    if t.cuda_graphs:
        blockers = [(f"model.dropout={m.dropout}", "model.dropout=0", known(m.dropout) and m.dropout > 0),
                    (f"parallel.tensor_parallel_size={par.tensor_parallel_size}",
                     "tensor_parallel_size=1", ok_layout and par.tensor_parallel_size > 1),
                    (f"parallel.pipeline_parallel_size={par.pipeline_parallel_size}",
                     "pipeline_parallel_size=1", ok_layout and par.pipeline_parallel_size > 1),
                    ("training.recompute=full", "recompute none or selective", t.recompute == "full"),
                    (f"parallel.deepspeed_config={par.deepspeed_config}", "no deepspeed_config",
                     par.deepspeed_config is not None),
                    ("data.reset_attention_mask=true", "reset_attention_mask=false",
                     d.reset_attention_mask)]
        for setting, fix, blocks in blockers:
            if blocks:
                p.append(f"training.cuda_graphs=true: not with {setting} (graphs replay fixed "
                         f"kernels on fixed buffers: no fresh dropout or document masks, no "
                         f"pipeline's micro-batches in flight, no recompute or DeepSpeed "
                         f"wrapping, tensor parallelism untested); fix: {fix}, or "
                         f"cuda_graphs=false")
    if cfg.checkpoint.async_save and par.deepspeed_config is not None:
        p.append(f"checkpoint.async_save=true: not with parallel.deepspeed_config="
                 f"{par.deepspeed_config} (DeepSpeed writes its own checkpoint files, in the "
                 f"foreground); fix: async_save=false, or drop deepspeed_config")
    if t.mode == "finetune" and d.format != "sft" and not d.mock:
        p.append(f"training.mode=finetune: trains on fine-tuning data, but data.format={d.format}; "
                 f"fix: data.config_file=configs/dataset/finetuning.json (format sft) or "
                 f"training.mode=pretrain")
    if d.format == "sft" and t.mode != "finetune":
        p.append(f"data.format=sft: fine-tuning data needs training.mode=finetune, got "
                 f"{t.mode}; fix: training.mode=finetune")
    if d.mock is False:
        from megagpt.data.blend import DataPathError, parse_data_path   # the datasets' reading
        for where, paths in [("data.train_data_path", d.train_data_path),
                             ("data.val_data_path", d.val_data_path),
                             ("data.test_data_path", d.test_data_path)]:
            if paths is not None:
                try:
                    weighted = any(w is not None for w, _ in parse_data_path(paths, where))
                except DataPathError as e:
                    p.append(str(e))
                    continue
                if weighted and d.format == "sft":
                    p.append(f"{where}: blend weights are not supported for fine-tuning data "
                             f"(data.format=sft); fix: list the jsonl files without weights")
        if d.train_data_path == []:
            p.append("data.train_data_path=[]: needs at least one dataset prefix; fix: run "
                     "tools/preprocess_data.py and name its output prefix, or set data.mock=true")
    from megagpt.data.gpt_dataset import DatasetBuildError, parse_split   # the datasets' reading
    try:
        if not parse_split(d.split or "")[0] > 0:
            p.append(f"data.split={d.split!r}: gives training no documents; fix: a positive "
                     f"first weight, e.g. \"969,30,1\"")
    except DatasetBuildError as e:
        p.append(str(e))
    if m.estimated_parameters is not None and m.estimated_parameters <= 0:
        p.append(f"model.estimated_parameters={m.estimated_parameters}: must be positive")
    return p

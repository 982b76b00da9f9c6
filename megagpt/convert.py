"""Checkpoint conversion: ours (any layout), Hugging Face GPT-2 or Megatron-LM's in; ours or
Hugging Face's out.

    convert(input, output, to="hf")                  # ours or Megatron-LM's -> Hugging Face
    convert(input, output, to="megagpt", tp=1, pp=2)  # any of the three -> ours, any layout

Every source is first read into one unsharded state dict keyed by our canonical parameter names
(`load_source`): a checkpoint of ours through `megagpt.model.reshard.full_state_from_checkpoint`
(hashes checked), a Hugging Face folder through `megagpt.hf.from_hf`, a Megatron-LM checkpoint
(megatron-core's GPTModel, any tensor and pipeline layout) through `megagpt.megatron_lm`. From
there:
- `to="hf"` writes config.json, model.safetensors (the vocabulary padding dropped, `lm_head`
  left to the tied embedding), the tokenizer files and generation_config.json, which
  `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load offline;
- `to="megagpt"` cuts the weights for the target layout (`shard_full_state`) and writes a
  weights-only checkpoint (`write_checkpoint_offline`): the trainer resumes its weights, step
  and consumed samples, and starts the optimizer state fresh. Its meta.json holds the source's
  config (for a Hugging Face or Megatron-LM source: the model from its config or arguments, the
  other sections from configs/training/small_model.json) with the parallel section set to the
  new layout.

The output is written under a temporary name beside it and renamed when complete (after the
optional verification), so a failure leaves nothing at the output path. `verify=True` runs a
fixed batch of token ids through the written output and through the source and compares the
logits (fp32). `load_source` and `single_process_model` also serve tools/generate.py.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megagpt.config import (HF_DROPOUTS, HF_TO_MODEL, ConfigError, KernelsConfig, ModelConfig,
                            layout_problems, load_config, model_fields_from_hf, read_json)
from megagpt.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, save_to
from megagpt.fsutil import give_default_mode, replace_folder_atomically, why_not_a_folder
from megagpt.hf import from_hf, hf_config_dict, to_hf
from megagpt.megatron_lm import (ITERATION_RE, RANK_FILE, RANK_RE, TRACKER,
                                 MegatronCheckpointError, find_checkpoint, read_checkpoint)
from megagpt.model.gpt import GPTStage, StageSpec, load_full_state_dict
from megagpt.model.reshard import (full_state_from_checkpoint, full_state_shapes, model_config_of,
                                   shard_full_state)
from megagpt.training.checkpoint import (META_FILE, STEP_RE, CheckpointError, find_latest,
                                         is_complete, read_meta, write_checkpoint_offline)

HF_CONFIG_TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "training" / "small_model.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_REQUIRED_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
VERIFY_TOLERANCE = 1e-3
INFERENCE_KERNELS = KernelsConfig(attention="sdpa", layernorm="torch", softmax="torch",
                                  bias_gelu="torch", cross_entropy="torch")


class ConversionError(ValueError):
    """An input, output or layout the converter refuses; the message names it and the fix."""


@dataclass
class Source:
    """A model read for conversion or generation, whatever its format."""

    kind: str                           # "megagpt", "hf" or "megatron"
    path: Path                          # our step folder, the Hugging Face folder, or
                                        # Megatron-LM's iteration folder
    model: ModelConfig
    full_state: dict[str, torch.Tensor]  # canonical names, unsharded, the embedding unpadded
    config: dict                        # a whole training config dict
    step: int
    consumed_samples: int
    layout: tuple[int, int, int]        # (tp, pp, vp) it was saved with; (1, 1, 1) for HF
    tokenizer_path: str                 # the tokenizer to use unless one is given
    train_samples: int | None = None    # the training set's size of the run (its meta.json)
    data_index_version: int | None = None   # how the run's sample order was built (meta.json)
    skipped_total: int = 0              # steps the run skipped (the lr schedule did not advance)
    tokenizer_fingerprint: str | None = None   # the run's tokenizer's (meta.json), when recorded
    tokenizer_known: bool = True        # False: a Hugging Face folder without tokenizer files
    notes: list[str] = dataclasses.field(default_factory=list)   # what reading it assumed

    def describe(self) -> str:
        if self.kind == "hf":
            return f"Hugging Face GPT-2 folder {self.path}"
        tp, pp, vp = self.layout
        what = "Megatron-LM checkpoint" if self.kind == "megatron" else "checkpoint"
        return f"{what} {self.path} (step {self.step}, tp {tp} x pp {pp} x vp {vp})"


# ---------------------------------------------------------------------------------------------
# Reading

def locate(path: str | Path, argument: str = "--input") -> tuple[str, Path]:
    """("megagpt", step folder), ("hf", folder) or ("megatron", iteration folder) for a
    user-given path; ConversionError if it is none, naming `argument` (the flag the path came
    from)."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{argument} {p} does not exist; fix: give a save dir or a "
                              f"step_NNNNNNN folder of ours, a Hugging Face GPT-2 folder, or a "
                              f"Megatron-LM save dir")
    if (p / "config.json").is_file() and not (p / META_FILE).exists():
        return "hf", p
    try:
        megatron = find_checkpoint(p)
    except MegatronCheckpointError as e:
        raise ConversionError(f"{argument}: {e}") from e
    if megatron is not None:
        return "megatron", megatron
    rank = p.parent if p.name == RANK_FILE else p
    if RANK_RE.fullmatch(rank.name) and ITERATION_RE.fullmatch(rank.parent.name):
        raise ConversionError(f"{argument} {p} is one rank's part of a Megatron-LM checkpoint; "
                              f"fix: give the iteration folder holding every rank's, "
                              f"{argument} {rank.parent}")
    if (p / META_FILE).exists() or STEP_RE.fullmatch(p.name) or p.name.endswith(".tmp"):
        _check_complete(p, argument)
        return "megagpt", p
    if not p.is_dir():
        raise ConversionError(f"{argument} {p} is a file; fix: give a folder (a save dir, a "
                              f"step_NNNNNNN folder, a Hugging Face GPT-2 folder, or a "
                              f"Megatron-LM save dir)")
    latest = find_latest(p, warn=lambda message: print(f"note: {argument}: {message}",
                                                       file=sys.stderr))
    if latest is not None:
        return "megagpt", latest
    unfinished = sorted(x.name for x in p.glob("step_*.tmp"))
    if unfinished or any(STEP_RE.fullmatch(x.name) for x in p.iterdir()):
        detail = f" ({', '.join(unfinished)}: saves that did not finish)" if unfinished else ""
        raise ConversionError(f"{argument} {p} holds no complete checkpoint{detail}; fix: give a "
                              f"save dir with a complete step_NNNNNNN folder (one with "
                              f"{META_FILE} and every file it lists)")
    found = sorted(x.name for x in p.iterdir())[:8]
    if (p / "checkpoints").is_dir():           # a run dir: its save dir is inside
        raise ConversionError(f"{argument} {p} is a run's folder (found: {', '.join(found)}); "
                              f"fix: give its save dir, {argument} {p / 'checkpoints'}")
    raise ConversionError(f"{argument} {p} is neither a checkpoint of ours nor a Hugging Face "
                          f"or Megatron-LM one (found: {', '.join(found) or 'nothing'}); fix: "
                          f"give a save dir (step_NNNNNNN folders and `latest`), a step folder "
                          f"(with {META_FILE}), a Hugging Face GPT-2 folder (config.json + "
                          f"model.safetensors or pytorch_model.bin), or a Megatron-LM save dir "
                          f"({TRACKER} and iter_NNNNNNN folders)")


def _check_complete(step_dir: Path, argument: str) -> None:
    try:
        meta = read_meta(step_dir)
    except CheckpointError as e:
        raise ConversionError(f"{argument}: {e}; fix: give a complete step folder, or the save "
                              f"dir holding it") from e
    if is_complete(step_dir):
        return
    missing = [f for f in meta.get("files", {}) if not (step_dir / f).is_file()]
    what = (f"{', '.join(missing[:4])} {'is' if len(missing) == 1 else 'are'} missing" if missing
            else "its files differ in size from what meta.json records")
    raise ConversionError(f"{argument} {step_dir} is not a complete checkpoint: {what} (a save "
                          f"or a copy that did not finish); fix: give a complete step folder")


def _architecture_problems(fields: dict, renamed: bool = True) -> list[str]:
    """The config validator's problems with an architecture (types, sizes, heads dividing the
    width), under config.json's names when `renamed`."""
    raw = read_json(HF_CONFIG_TEMPLATE)
    raw["model"] = fields
    try:
        load_config(raw=raw)
    except ConfigError as e:
        if not renamed:
            return [p for p in e.problems if p.startswith("model.")]
        hf_name = {ours: theirs for theirs, ours in HF_TO_MODEL.items()}
        hf_name["dropout"] = "resid_pdrop/embd_pdrop/attn_pdrop"
        ours = re.compile(r"(?:model\.)?\b(" + "|".join(hf_name) + r")\b")
        return [ours.sub(lambda m: hf_name[m[1]], p) for p in e.problems if p.startswith("model.")]
    return []


def read_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, our full state dict) of a Hugging Face GPT-2 folder."""
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path / 'config.json'} cannot be read: {e}") from e
    if not isinstance(hf, dict):
        raise ConversionError(f"{path / 'config.json'} holds a JSON {type(hf).__name__}, not the "
                              f"object of a Hugging Face model config")
    if hf.get("model_type") != "gpt2":
        kind = f"a {hf['model_type']!r} model" if "model_type" in hf else "no model_type"
        raise ConversionError(f"{path} config.json names {kind}; only GPT-2 (model_type "
                              f"\"gpt2\") converts")
    drops = {k: hf[k] for k in HF_DROPOUTS if k in hf}
    if len(set(drops.values())) > 1:   # changes neither the weights nor inference: one of them
        hf = {**hf, **dict.fromkeys(drops, drops.get("resid_pdrop", next(iter(drops.values()))))}
    problems: list[str] = []
    where = str(path / "config.json")
    fields = model_fields_from_hf(hf, where, problems)
    problems = [p.removeprefix(f"model.config_file={where}: ") for p in problems]
    problems += [f"config.json lacks {k}" for k in HF_REQUIRED_FIELDS if k not in hf]
    if not problems:
        problems = _architecture_problems(fields)
    if problems:
        raise ConversionError(f"{path} is a GPT-2 this model cannot express:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    m = ModelConfig(**fields)
    hf_state = _read_hf_weights(path)
    extra = sorted({int(x) for k in hf_state for x in re.findall(r"(?:^|\.)h\.(\d+)\.", k)}
                   - set(range(m.n_layers)))
    positions = [tuple(v.shape) for k, v in hf_state.items() if k.endswith("wpe.weight")]
    wrong = ([f"  - blocks {extra[0]}-{extra[-1]} are in the weights, past config.json's "
              f"n_layer={m.n_layers}"] if extra else [])
    wrong += [f"  - embedding.wpe.weight: {shape} in the weights, ({m.seq_length}, {m.d_model}) "
              f"from config.json" for shape in positions if shape[0] != m.seq_length]
    try:
        full = from_hf(hf_state, m)
    except KeyError as e:
        raise ConversionError(f"{path}: the weights lack {e.args[0]} (config.json says n_layer="
                              f"{m.n_layers}); the weight files are incomplete or of another "
                              f"model") from e
    except ValueError as e:   # weights of other sizes than config.json says
        raise ConversionError(f"{path}: {e}") from e
    expected = full_state_shapes(m)
    wrong += [f"  - {name}: {tuple(value.shape)} in the weights, {expected[name]} from config.json"
              for name, value in full.items()
              if tuple(value.shape) != expected[name] and name != "embedding.wpe.weight"]
    if wrong:
        raise ConversionError(
            f"{path}: the weights are not the model config.json describes (n_layer="
            f"{m.n_layers}, n_embd={m.d_model}, n_inner={m.ffn_hidden_size}, n_positions="
            f"{m.seq_length}, n_head={m.n_heads}):\n"
            + "\n".join(wrong[:8]) + "\nfix: use the config.json the weights were saved with")
    return m, full


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder; ConversionError naming the file that cannot be
    read (truncated, corrupt, or not a weight file)."""
    from safetensors import SafetensorError

    try:
        return _load_hf_weights(path)
    except ConversionError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError,
            pickle.UnpicklingError) as e:
        files = [name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        where = path / files[0] if files else path
        raise ConversionError(f"{where} cannot be read ({type(e).__name__}: {e}): truncated or "
                              f"corrupt; fix: copy or export it again") from e


def _load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ConversionError(f"{path} is missing {len(missing)} of the {len(shards)} weight "
                                  f"files model.safetensors.index.json lists ({listed}); fix: "
                                  f"copy or download them too")
        state = {}
        for name in shards:
            state.update(load_file(str(path / name)))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConversionError(f"{path} has config.json but no weights: expected one of "
                          f"{', '.join(HF_WEIGHT_FILES)}")


def config_from_hf(m: ModelConfig, path: Path, tokenizer_path: str,
                   what: str = "the Hugging Face GPT-2 folder") -> dict:
    """A training config dict for a Hugging Face (or Megatron-LM) model: its architecture and
    tokenizer, the other sections from configs/training/small_model.json (GPT-2 small's recipe),
    one process."""
    cfg = load_config(HF_CONFIG_TEMPLATE).to_dict()
    cfg["name"] = path.name
    cfg["description"] = f"converted from {what} {path}"
    cfg["model"] = dataclasses.asdict(m)
    cfg["data"].update(config_file=None, tokenizer_path=tokenizer_path)
    cfg["checkpoint"].update(save_dir=None, load="auto")
    cfg["logging"].update(run_dir=None, metrics_file=None)
    return cfg


def load_source(path: str | Path, argument: str = "--input") -> Source:
    """Read a checkpoint of ours (a save dir's latest, or a step folder; any layout, merged, its
    hashes checked) or a Hugging Face GPT-2 folder into a `Source`; `argument` names the flag
    the path came from in messages."""
    kind, where = locate(path, argument)
    if kind == "megatron":
        return _megatron_source(where)
    if kind == "hf":
        m, full = read_hf_folder(where)
        has_tokenizer = (where / "tokenizer.json").is_file() or (
            (where / "vocab.json").is_file() and (where / "merges.txt").is_file())
        tokenizer_path = str(where.resolve()) if has_tokenizer else "gpt2"   # from any folder
        return Source("hf", where, m, full, config_from_hf(m, where, tokenizer_path), 0, 0,
                      (1, 1, 1), tokenizer_path, tokenizer_known=has_tokenizer)
    meta, full = full_state_from_checkpoint(where)
    p = meta["parallel"]
    config = meta["config"]
    return Source("megagpt", where, model_config_of(meta), full, config, meta["step"],
                  meta["consumed_samples"], (p["tp"], p["pp"], p["vp"]),
                  config["data"]["tokenizer_path"], meta.get("train_samples"),
                  meta.get("data_index_version", 1), meta.get("skipped_total", 0),
                  meta.get("tokenizer_fingerprint"),
                  # a run on mock data used no tokenizer, whatever its config names
                  tokenizer_known=meta.get("tokenizer_known", True)
                  and not config["data"].get("mock", False))


def _megatron_source(folder: Path) -> Source:
    """A Megatron-LM iteration folder as a Source: the config from configs/training/
    small_model.json with the run's architecture, tokenizer and precision, the layout it was
    saved with."""
    try:
        ckpt = read_checkpoint(folder)
        problems = _architecture_problems(dataclasses.asdict(ckpt.model), renamed=False)
    except MegatronCheckpointError as e:
        raise ConversionError(str(e)) from e
    if problems:
        raise ConversionError(f"{folder} is a GPT this model cannot express:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    expected = full_state_shapes(ckpt.model)
    wrong = [f"  - {name}: missing" for name in expected if name not in ckpt.full_state]
    wrong += [f"  - {name}: {tuple(value.shape)} in the weights, {expected[name]} from the "
              f"arguments" for name, value in ckpt.full_state.items()
              if tuple(value.shape) != expected.get(name)]
    if wrong:
        raise ConversionError(f"{folder}: the weights are not the model its arguments describe "
                              f"(--num-layers {ckpt.model.n_layers}, --hidden-size "
                              f"{ckpt.model.d_model}, --num-attention-heads "
                              f"{ckpt.model.n_heads}):\n"
                              + "\n".join(wrong[:8]))
    config = config_from_hf(ckpt.model, folder.absolute(), ckpt.tokenizer_path,
                            "the Megatron-LM checkpoint")
    config["name"] = folder.absolute().parent.name
    config["training"]["precision"] = ckpt.precision
    return Source("megatron", folder, ckpt.model, ckpt.full_state, config, ckpt.iteration,
                  ckpt.consumed_samples, ckpt.layout, ckpt.tokenizer_path,
                  tokenizer_known=ckpt.tokenizer_known, notes=ckpt.notes)


def source_tokenizer(source: Source, given: str | None) -> Tokenizer:
    """The tokenizer `--tokenizer` gives, else the source's own; when the source's own (a path
    its training config recorded, maybe relative to another folder) does not load, the message
    says where the path came from and how to give another. One with more ids than the model's
    vocabulary is refused (a ConversionError naming where it came from): it is not the one the
    model was trained with, whose text it would garble; so is a given one that is known not to
    be (`tokenizer_mismatch`)."""
    if given:
        tok = load_tokenizer(given, "--tokenizer")
        mismatch = tokenizer_mismatch(source, tok, "--tokenizer")
        if mismatch:
            raise ConversionError(mismatch)
    else:
        try:
            tok = load_tokenizer(source.tokenizer_path, "data.tokenizer_path")
        except TokenizerError as e:
            reason = str(e).split("; fix: ")[0]     # the fix here is another tokenizer
            raise TokenizerError(f"the tokenizer recorded with {source.path} does not load (read "
                                 f"from {Path.cwd()}): {reason}; fix: pass --tokenizer PATH") from e
    if tok.vocab_size > source.model.vocab_size:
        where = (f"--tokenizer {given}" if given else
                 f"the tokenizer recorded with {source.path} ({source.tokenizer_path})"
                 if source.tokenizer_known else
                 f"the tokenizer {source.tokenizer_path}, taken by default ({source.path} "
                 f"records none it was trained with),")
        raise ConversionError(f"{where} has {tok.vocab_size} ids but the model's vocabulary is "
                              f"{source.model.vocab_size} (model.vocab_size); fix: pass the "
                              f"tokenizer the model was trained with (--tokenizer PATH)")
    return tok


def tokenizer_mismatch(source: Source, tokenizer: Tokenizer, field: str) -> str | None:
    """Why `tokenizer` (the one `field` names) is not the one `source` was trained with, or None
    when it is or that cannot be known (a Hugging Face folder without tokenizer files, a
    recorded path that does not load from here and no recorded fingerprint)."""
    if not source.tokenizer_known:
        return None
    try:
        original = load_tokenizer(source.tokenizer_path)
    except TokenizerError:
        original = None
    theirs = source.tokenizer_fingerprint or (original.fingerprint if original else None)
    if theirs is None or theirs == tokenizer.fingerprint:
        return None
    if original is not None and original.fingerprint == theirs and tokenizer.extends(original):
        return None         # the same ids for every token it had, more tokens after them
    return (f"{source.path} was trained with the tokenizer {source.tokenizer_path} (fingerprint "
            f"{theirs[:12]}), but {field}={tokenizer.source} is another (fingerprint "
            f"{tokenizer.fingerprint[:12]}): its ids would mean other text to the weights; fix: "
            f"set {field}={source.tokenizer_path}")


def single_process_model(m: ModelConfig, full_state: dict[str, torch.Tensor]) -> GPTStage:
    """The whole model on one CPU process (tp = pp = 1), holding `full_state`, fp32, eval mode."""
    model = GPTStage(m, INFERENCE_KERNELS, StageSpec(0, m.n_layers, True, True))
    load_full_state_dict(model, full_state)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing

# How check_layout's messages name the layout: the flags of tools/convert_checkpoint.py (and the
# arguments of `convert`), and the source config's own sequence-parallel setting.
LAYOUT_FLAGS = {"tp": "--tensor-parallel-size", "pp": "--pipeline-parallel-size",
                "vp": "--virtual-pipeline-size", "sp": "the source config's parallel.sequence_parallel"}


def check_layout(m: ModelConfig, tp: int, pp: int, vp: int, sequence_parallel: bool = False) -> None:
    """Refuse a layout the model cannot be split into, naming the flag, the numbers and the fix
    (the rules are the config validator's: `megagpt.config.layout_problems`)."""
    problems = [f"{LAYOUT_FLAGS[key]}={value}: must be 1 or more" for key, value in
                (("tp", tp), ("pp", pp), ("vp", vp)) if value < 1]
    if not problems:
        problems = layout_problems(m, tp, pp, vp, sequence_parallel, names=LAYOUT_FLAGS)
    if problems:
        raise ConversionError("the target layout cannot split this model:\n"
                              + "\n".join(f"  - {p}" for p in problems))


def converted_config(source: Source, tp: int, pp: int, vp: int) -> dict:
    """The source's config as the config of a run at the new layout, one data-parallel replica
    (world = tp x pp), training with the same global batch: the old replicas' micro-batches
    become accumulation steps, split smaller where the interleaved schedule (vp > 1) needs a
    multiple of pp of them (kept as they are when no split gives that: `convert` says so); the
    native engine where the layout or the accumulation changes (DeepSpeed runs data parallel
    only and its file fixes the accumulation; its ZeRO stage becomes the native path's 0 or 1);
    no CUDA graphs where tp or pp > 1."""
    config = json.loads(json.dumps(source.config))
    for section in ("model", "data"):     # expanded already; checkpoints before 2026-11-29 kept them
        config[section]["config_file"] = None
    par, t = config["parallel"], config["training"]
    old_dp = par["world_size"] // (par["tensor_parallel_size"] * par["pipeline_parallel_size"])
    global_batch = t["batch_size"] * t["grad_accumulation_steps"] * old_dp
    micro = t["batch_size"]
    if vp > 1:
        micro = next((b for b in range(micro, 0, -1)
                      if global_batch % b == 0 and (global_batch // b) % pp == 0), micro)
    t.update(batch_size=micro, grad_accumulation_steps=global_batch // micro)
    par.update(world_size=tp * pp, tensor_parallel_size=tp, pipeline_parallel_size=pp,
               virtual_pipeline_size=vp)
    if par["deepspeed_config"] is not None and (tp * pp > 1 or old_dp > 1):
        par.update(deepspeed_config=None, zero_stage=min(par["zero_stage"], 1))
    if tp * pp > 1:
        t["cuda_graphs"] = False
    return config


def write_megagpt(source: Source, save_dir: Path, tp: int, pp: int, vp: int) -> Path:
    """Write `source` as a weights-only checkpoint of ours at (tp, pp, vp) into save_dir."""
    meta = {"config": converted_config(source, tp, pp, vp),
            "consumed_samples": source.consumed_samples,
            "parallel": {"tp": tp, "pp": pp, "dp": 1, "vp": vp, "zero_stage": 0},
            "converted_from": str(Path(source.path).absolute()),   # meaningful from anywhere
            "skipped_total": source.skipped_total}
    if source.train_samples is not None:        # the data order the run was on
        meta["train_samples"] = source.train_samples
    if source.data_index_version is not None:
        meta["data_index_version"] = source.data_index_version
    fingerprint = source.tokenizer_fingerprint
    if fingerprint is None and source.tokenizer_known:   # its path may not outlive the copy
        try:
            fingerprint = load_tokenizer(source.tokenizer_path).fingerprint
        except TokenizerError:
            pass
    if fingerprint is not None:
        meta["tokenizer_fingerprint"] = fingerprint
    if not source.tokenizer_known:     # a Hugging Face folder without tokenizer files
        meta["tokenizer_known"] = False
    states = shard_full_state(source.full_state, source.model, tp, pp, vp)
    return write_checkpoint_offline(save_dir, source.step, states, meta)


def write_hf(source: Source, folder: Path, tokenizer: Tokenizer) -> None:
    """Write `source` as a Hugging Face GPT-2 folder: weights, config, tokenizer, generation."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    m, eod = source.model, tokenizer.eod_id
    weights = {k: v for k, v in to_hf(source.full_state, m).items() if k != "lm_head.weight"}
    try:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    except SafetensorError as e:     # its I/O errors (a full disk) are of its own type
        raise OSError(str(e)) from e
    give_default_mode(folder / "model.safetensors")   # safetensors writes it 0600
    _write_json(folder / "config.json", dict(hf_config_dict(m), bos_token_id=eod, eos_token_id=eod))
    _write_json(folder / "generation_config.json",
                {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod})
    write_hf_tokenizer(tokenizer, folder, m.seq_length)


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """vocab.json + merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json
    of a byte-level BPE tokenizer, as Hugging Face's GPT-2 tokenizers read them."""
    from tokenizers import models

    backend = tokenizer.backend
    if not isinstance(backend.model, models.BPE):
        raise ConversionError(f"--tokenizer {tokenizer.source} is a {type(backend.model).__name__} "
                              f"tokenizer; a GPT-2 folder needs a byte-level BPE (the GPT-2 "
                              f"tokenizer, or one from tools/train_tokenizer.py)")
    eod = backend.id_to_token(tokenizer.eod_id)
    save_to(backend.model.save, folder)                      # vocab.json + merges.txt
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab[eod] = tokenizer.eod_id                            # an added token is not in the model
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    save_to(backend.save, folder / "tokenizer.json")
    special = {"bos_token": eod, "eos_token": eod, "unk_token": eod}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json",
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
                 "add_prefix_space": False, **special})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Verification

def verification_ids(m: ModelConfig) -> torch.Tensor:
    """The fixed batch `--verify` runs: (2, min(16, seq_length)) token ids from a seeded draw."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, m.vocab_size, (2, min(16, m.seq_length)), generator=g)


@torch.no_grad()
def our_logits(m: ModelConfig, full_state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits (b, s, vocab_size) of our single-process model holding `full_state`."""
    return single_process_model(m, full_state)(ids)[..., :m.vocab_size]


@torch.no_grad()
def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits (b, s, vocab_size) of `GPT2LMHeadModel.from_pretrained(folder)` in fp32, offline."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).float().eval()
    return model(ids).logits


def logit_difference(source: Source, to: str, written: Path) -> float:
    """Largest |logit difference| between the source and the written output on `verification_ids`:
    to="hf": our model from the source vs GPT2LMHeadModel from `written`; to="megagpt": our model
    from the `written` step folder vs the source (GPT2LMHeadModel for a Hugging Face source)."""
    ids = verification_ids(source.model)
    if to == "hf":
        reference, result = our_logits(source.model, source.full_state, ids), hf_logits(written, ids)
    else:
        meta, full = full_state_from_checkpoint(written)
        result = our_logits(model_config_of(meta), full, ids)
        reference = (hf_logits(source.path, ids) if source.kind == "hf"
                     else our_logits(source.model, source.full_state, ids))
    return (result.float() - reference.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The conversion

@dataclass
class ConversionResult:
    output: Path
    max_logit_difference: float | None      # None without verification
    notes: list[str]


def _check_output(output: Path, input_path: Path) -> None:
    source, target = input_path.resolve(), output.resolve()
    if source.exists() and (target == source or source in target.parents):
        where = "is" if target == source else "is inside"
        raise ConversionError(f"--output {output} {where} --input {input_path}: the source "
                              f"would hold the output (a step folder's is removed with it when "
                              f"training prunes old checkpoints); fix: choose a path outside it, "
                              f"such as {source.parent / (target.name + '_converted')}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"--output {output} already exists and is not an empty folder; fix: "
                              f"choose a new path, or remove it first")
    reason = why_not_a_folder(output.absolute().parent)
    if reason:
        raise ConversionError(f"--output {output}: cannot write there ({reason}); fix: choose "
                              f"another path")


def convert(input_path: str | Path, output: str | Path, to: str, *, tp: int | None = None,
            pp: int | None = None, vp: int | None = None, tokenizer: str | None = None,
            verify: bool = False, log: Callable[[str], None] = print) -> ConversionResult:
    """Convert the model at `input_path` and write it to `output`.

    Args:
        input_path: a save dir or step folder of ours (any layout), a Hugging Face GPT-2 folder,
            or a Megatron-LM save dir or iteration folder.
        output: the folder to create (absent or empty): a Hugging Face folder (to="hf") or a save
            dir holding `step_<N>/` and `latest` (to="megagpt").
        to: "hf" or "megagpt".
        tp, pp, vp: the target layout for to="megagpt" (default: the source's; 1 for HF).
        tokenizer: for to="hf": the tokenizer written with the model (default: the source
            config's data.tokenizer_path).
        verify: compare logits of the output and the source; above VERIFY_TOLERANCE is an error.
        log: receives one line per stage.

    Raises ConversionError (or CheckpointError / TokenizerError from the readers) naming the
    problem; nothing is left at `output` then.
    """
    if to not in ("hf", "megagpt"):
        raise ConversionError(f"--to {to}: must be hf or megagpt")
    if to == "hf" and (tp, pp, vp) != (None, None, None):
        raise ConversionError("--tensor-parallel-size, --pipeline-parallel-size and "
                              "--virtual-pipeline-size apply to --to megagpt only; a Hugging Face "
                              "folder holds the whole model")
    if to == "megagpt" and tokenizer is not None:
        raise ConversionError("--tokenizer applies to --to hf only; a checkpoint of ours names its "
                              "tokenizer in its config (data.tokenizer_path)")
    output = Path(output)
    _check_output(output, Path(input_path))
    source = load_source(input_path)
    if source.kind == "hf" and to == "hf":
        raise ConversionError(f"--input {source.path} is already a Hugging Face folder; fix: "
                              f"--to megagpt to make a checkpoint of ours")
    log(f"read {source.describe()}")
    notes = list(source.notes)
    tok = None
    if to == "megagpt":
        tp, pp, vp = (v if v is not None else d for v, d in zip((tp, pp, vp), source.layout))
        check_layout(source.model, tp, pp, vp, source.config["parallel"].get("sequence_parallel", False))
        notes.append("weights only: resuming from it restores the weights, the step and the "
                     "consumed samples; the optimizer state starts fresh")
        t = converted_config(source, tp, pp, vp)["training"]
        if vp > 1 and t["grad_accumulation_steps"] % pp:
            notes.append(f"the source's global batch ({t['batch_size'] * t['grad_accumulation_steps']} "
                         f"sequences) does not split into a multiple of pp={pp} micro-batches, "
                         f"which the interleaved schedule needs; the recorded config keeps it, so "
                         f"set training.batch_size and grad_accumulation_steps to train at this "
                         f"layout")
    else:
        tok = source_tokenizer(source, tokenizer)
    try:
        with replace_folder_atomically(output) as tmp:
            if to == "megagpt":
                written = write_megagpt(source, tmp, tp, pp, vp)
                log(f"wrote {written.name} for tp {tp} x pp {pp} x vp {vp}")
            else:
                write_hf(source, tmp, tok)
                written = tmp
                log(f"wrote a Hugging Face GPT-2 folder with the tokenizer {tok.source}")
            difference = _verify(source, to, written, log) if verify else None
    except OSError as e:            # a full disk, a read-only file system, a quota
        raise ConversionError(f"--output {output}: cannot write ({e.strerror or e}); nothing was "
                              f"written; fix: free space or choose another location") from e
    return ConversionResult(output, difference, notes)


def weight_mismatches(source: Source, to: str, written: Path) -> list[str]:
    """The names of the source's weights the written output does not hold bit for bit (read
    back in our names), or holds without the source having them. The logits see the positions of
    `verification_ids` only; this sees every weight."""
    if to == "hf":
        back = from_hf(_read_hf_weights(written), source.model)
    else:
        back = full_state_from_checkpoint(written)[1]
    return sorted(name for name in set(source.full_state) | set(back)
                  if name not in back or name not in source.full_state
                  or back[name].dtype != source.full_state[name].dtype
                  or not torch.equal(back[name], source.full_state[name]))


def _verify(source: Source, to: str, written: Path, log: Callable[[str], None]) -> float:
    """--verify: every weight written as the source's, and the largest logit difference
    between the source and what was written within VERIFY_TOLERANCE."""
    try:
        mismatches = weight_mismatches(source, to, written)
        difference = logit_difference(source, to, written)
    except OSError as e:            # transformers reports every load problem as an OSError
        raise ConversionError(f"--verify: the written output does not load ({e}); the output "
                              f"was not written") from e
    if mismatches:
        raise ConversionError(f"--verify: {len(mismatches)} weight(s) of the written output differ "
                              f"from the source's ({', '.join(mismatches[:3])}"
                              f"{', ...' if len(mismatches) > 3 else ''}); the output was not "
                              f"written")
    log(f"verify: every weight equal to the source's; largest logit difference "
        f"{difference:.3g} (tolerance {VERIFY_TOLERANCE})")
    if not difference <= VERIFY_TOLERANCE:
        raise ConversionError(f"--verify: the largest logit difference {difference:.3g} "
                              f"exceeds {VERIFY_TOLERANCE}; the output was not written")
    return difference

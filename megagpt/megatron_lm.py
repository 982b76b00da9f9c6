"""Megatron-LM's GPT checkpoints read into our canonical names, for `megagpt.convert.load_source`
(the converter, tools/generate.py and `checkpoint.pretrained`).

    folder = find_checkpoint(path)           # the iteration folder, or None: not Megatron-LM's
    checkpoint = read_checkpoint(folder)     # the model config, the full weights, the step, ...

What is read: megatron-core's `GPTModel` (Megatron-LM's `pretrain_gpt.py`, the local or the
Transformer Engine layer spec) saved in Megatron-LM's `torch` format (`--ckpt-format torch`):

    <save dir>/latest_checkpointed_iteration.txt       "<iteration>", or "release"
    <save dir>/iter_<7 digits>/ (or release/)
        mp_rank_<tp rank, 2 digits>/model_optim_rng.pt                  one pipeline stage
        mp_rank_<tp rank, 2 digits>_<pp rank, 3 digits>/model_optim_rng.pt   several

Each file holds the run's arguments ('args'), 'iteration' and the rank's weights: 'model', or
'model0', 'model1', ... one per virtual pipeline stage (chunk c of pipeline rank r is stage
c x pp + r, as ours). The files are unpickled with torch's weights-only loader: the classes of
Megatron's own that they name (enums in 'args', the optimizer's state) become inert stand-ins,
so nothing in a file runs and megatron need not be installed; the optimizer state is mapped,
not read.

And in the `torch_dist` format (Megatron-LM's default), an iteration folder of
`torch.distributed.checkpoint` files: `.metadata`, `__<rank>_<n>.distcp`, and `common.pt` with
the arguments and the iteration. Its tensors are stored whole, whatever the layout that saved
them: the blocks' weights stacked along a first dimension of layers, the layer norms under
Transformer Engine's names whichever spec trained it. Only the model's tensors are read (with
`torch.distributed.checkpoint`, no process group), not the optimizer's.

Merging: column-parallel weights (the embedding, the fused QKV, fc1) are joined along their
rows, row-parallel ones (the attention projection, fc2) along their columns, the rest is the
same on every tensor-parallel rank. Each stage numbers its blocks from 0; the stages in order
give the global numbers. Megatron's fused QKV rows are [head][q, k, v][head_dim] (so a
tensor-parallel rank holds whole heads); ours are [q, k, v][head][head_dim]. Transformer
Engine's layer spec keeps each block's layer norms inside the projections that follow them
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`). `--apply-layernorm-1p`
stores weight - 1; the 1 is added back.

The GeLU: megatron-core's MLP computes the tanh GeLU (GPT-2's) with its default fused
bias-GeLU, and the exact one (erf, `F.gelu`) under --no-bias-gelu-fusion, with or without
--openai-gelu, which its MLP never reads: model.activation gelu_tanh or gelu.

What the model cannot express is refused, naming Megatron's argument: RMSNorm, SwiGLU, squared
ReLU, rotary or no positions, untied output weights, grouped-query or multi-latent attention,
QK layer norm, experts, no biases, post-layer-norm residuals. So is the legacy (non-core)
model, whose keys start with 'language_model'.
"""
from __future__ import annotations

import argparse
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.config import ModelConfig
from megagpt.data.tokenizer import TokenizerError, load_tokenizer

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_RE = re.compile(r"iter_(\d{7,})|release")
RANK_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?")
RANK_FILE = "model_optim_rng.pt"
DIST_METADATA = ".metadata"      # torch_dist: torch.distributed.checkpoint's index, written last
COMMON = "common.pt"                 # torch_dist: the arguments and the iteration
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
GPT2_TOKENIZERS = ("GPT2BPETokenizer",)
GPT2_VOCAB_SIZE = 50257

# megatron-core's names after "decoder.layers.<i>." -> (ours after "layers.<i>.", the
# tensor-parallel dimension it is split along, or None where every rank holds all of it)
_LAYER_NAMES = {
    "input_layernorm.weight": ("ln1.weight", None),
    "input_layernorm.bias": ("ln1.bias", None),
    "self_attention.linear_qkv.layer_norm_weight": ("ln1.weight", None),
    "self_attention.linear_qkv.layer_norm_bias": ("ln1.bias", None),
    "self_attention.linear_qkv.weight": ("attn.qkv.weight", 0),
    "self_attention.linear_qkv.bias": ("attn.qkv.bias", 0),
    "self_attention.linear_proj.weight": ("attn.proj.weight", 1),
    "self_attention.linear_proj.bias": ("attn.proj.bias", None),
    "pre_mlp_layernorm.weight": ("ln2.weight", None),
    "pre_mlp_layernorm.bias": ("ln2.bias", None),
    "mlp.linear_fc1.layer_norm_weight": ("ln2.weight", None),
    "mlp.linear_fc1.layer_norm_bias": ("ln2.bias", None),
    "mlp.linear_fc1.weight": ("mlp.fc1.weight", 0),
    "mlp.linear_fc1.bias": ("mlp.fc1.bias", 0),
    "mlp.linear_fc2.weight": ("mlp.fc2.weight", 1),
    "mlp.linear_fc2.bias": ("mlp.fc2.bias", None),
}
_OUTER_NAMES = {
    "embedding.word_embeddings.weight": ("embedding.wte.weight", 0),
    "embedding.position_embeddings.weight": ("embedding.wpe.weight", None),
    "decoder.final_layernorm.weight": ("final_ln.weight", None),
    "decoder.final_layernorm.bias": ("final_ln.bias", None),
}
# the last stage's copy of the tied embedding (Megatron keeps the two equal)
_SKIPPED = ("output_layer.weight",)
# a module's extra state: None, BytesIO, or (Transformer Engine 2) a uint8 tensor of a pickle
EXTRA_STATE = "._extra_state"
REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads")


class MegatronCheckpointError(ValueError):
    """A Megatron-LM checkpoint that cannot be read or expressed; the message says why."""


@dataclass
class MegatronCheckpoint:
    folder: Path                        # the iteration folder
    model: ModelConfig
    full_state: dict[str, torch.Tensor]   # canonical names, unsharded, the embedding unpadded
    iteration: int
    consumed_samples: int
    layout: tuple[int, int, int]        # (tp, pp, vp) it was saved with
    tokenizer_path: str
    tokenizer_known: bool
    precision: str                      # "bf16", "fp16" or "fp32": the run's
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Finding the files

def find_checkpoint(path: Path) -> Path | None:
    """The iteration folder of a Megatron-LM save dir (its tracker file's iteration) or of an
    iteration folder itself; None when `path` is neither."""
    if (path / TRACKER).is_file():
        text = (path / TRACKER).read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(r"\d+|release", text):
            raise MegatronCheckpointError(f"{path / TRACKER} holds {text[:40]!r}, neither an "
                                          f"iteration number nor 'release'; fix: give the "
                                          f"iteration folder itself (iter_NNNNNNN)")
        folder = path / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not folder.is_dir():
            raise MegatronCheckpointError(
                f"{path / TRACKER} names iteration {text}, but {folder.name} is not in {path} "
                f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:6])}); fix: give "
                f"one of its iteration folders")
        return folder
    if path.is_dir() and ITERATION_RE.fullmatch(path.name) and any(
            RANK_RE.fullmatch(p.name) or p.name in (DIST_METADATA, COMMON) or p.suffix == ".distcp"
            for p in path.iterdir()):
        return path
    return None


def _is_torch_dist(folder: Path) -> bool:
    return any(p.name in (DIST_METADATA, COMMON) or p.suffix == ".distcp"
               for p in folder.iterdir())


def _rank_files(folder: Path) -> dict[tuple[int, int], Path]:
    """{(tp rank, pp rank): file} of an iteration folder, checked complete."""
    files, expert = {}, []
    for p in sorted(folder.iterdir()):
        match = RANK_RE.fullmatch(p.name)
        if not match:
            continue
        if match[3]:
            expert.append(p.name)
        files[(int(match[1]), int(match[2] or 0))] = p / RANK_FILE
    if expert:
        raise MegatronCheckpointError(f"{folder} is split over expert-parallel ranks ("
                                      f"{expert[0]}, ...): a mixture-of-experts model, which "
                                      f"this GPT cannot express")
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(q for _, q in files)
    missing = [f"{f.parent.name}/{RANK_FILE}" for f in files.values() if not f.is_file()]
    missing += [f"mp_rank_{t:02d}" + (f"_{q:03d}" if pp > 1 else "") for t in range(tp)
                for q in range(pp) if (t, q) not in files]
    if missing:
        raise MegatronCheckpointError(f"{folder} lacks {', '.join(missing[:4])} of its tp {tp} x "
                                      f"pp {pp} ranks' files; fix: copy the whole iteration "
                                      f"folder")
    return files


def _load(path: Path) -> dict:
    """torch.load with weights only: the classes the file names beyond torch's own and
    argparse.Namespace become inert stand-ins (their state kept as `.state`, never run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [argparse.Namespace] + [
            (type(name.rsplit(".", 1)[-1], (_StandIn,), {}), name)
            for name in names if name != "argparse.Namespace"]
        with torch.serialization.safe_globals(stand_ins):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:       # torch refuses what it never loads (os.system)
        lines = str(e).splitlines()
        reason = next((line.strip() for line in lines if "GLOBAL" in line), lines[0])
        raise MegatronCheckpointError(f"{path} is refused by torch's weights-only loader "
                                      f"({reason}); a Megatron-LM checkpoint names no such "
                                      f"code: the file is another kind, or was altered") from e
    except (OSError, RuntimeError, ValueError, EOFError, AttributeError, KeyError) as e:
        raise MegatronCheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                                      f"truncated or corrupt; fix: copy it again") from e
    if not isinstance(state, dict) or not isinstance(state.get("args"), argparse.Namespace):
        raise MegatronCheckpointError(f"{path} is not a Megatron-LM checkpoint file (no 'args' "
                                      f"with the run's arguments)")
    return state


class _StandIn:
    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# ---------------------------------------------------------------------------------------------
# The architecture

def _arg(args, *names, default=None):
    for name in names:
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return default


def architecture_problems(args) -> list[str]:
    """What a run's arguments ask of the model that ours cannot compute, each naming the
    argument."""
    heads, hidden = _arg(args, "num_attention_heads"), _arg(args, "hidden_size")
    rules = [
        (_arg(args, "use_legacy_models", default=False) or not _arg(args, "use_mcore_models",
                                                                    default=True),
         "--use-legacy-models: the legacy model (keys under 'language_model'); fix: convert it to "
         "megatron-core's first (Megatron-LM's tools/checkpoint/convert.py --saver core)"),
        (_arg(args, "normalization", default="LayerNorm") != "LayerNorm",
         f"--normalization {_arg(args, 'normalization')}: the model's norms are LayerNorm"),
        (_arg(args, "swiglu", default=False), "--swiglu: the model's MLP is a GeLU MLP"),
        (_arg(args, "squared_relu", default=False),
         "--squared-relu: the model's MLP is a GeLU MLP"),
        (_arg(args, "quick_geglu", default=False),
         "--quick-geglu: the model's MLP is a GeLU MLP, not a gated one"),
        (_position_type(args) != "learned_absolute",
         f"--position-embedding-type {_position_type(args)}: the model learns absolute positions"),
        (_arg(args, "untie_embeddings_and_output_weights", default=False),
         "--untie-embeddings-and-output-weights: the model's output layer is its embedding"),
        (_arg(args, "group_query_attention", default=False)
         and _arg(args, "num_query_groups", default=heads) != heads,
         f"--group-query-attention --num-query-groups {_arg(args, 'num_query_groups')}: the "
         f"model's attention has as many key/value heads as query heads ({heads})"),
        (heads and hidden and _arg(args, "kv_channels", default=hidden // heads) * heads != hidden,
         f"--kv-channels {_arg(args, 'kv_channels')}: the model's heads are hidden size / heads "
         f"wide ({hidden} / {heads})"),
        (_arg(args, "multi_latent_attention", default=False),
         "--multi-latent-attention: the model's attention is multi-head attention"),
        (_arg(args, "qk_layernorm", default=False), "--qk-layernorm: the model does not normalize "
                                                    "queries and keys"),
        (_arg(args, "num_experts"), f"--num-experts {_arg(args, 'num_experts')}: the model has "
                                    f"no experts"),
        (not _arg(args, "add_bias_linear", default=True),
         "--disable-bias-linear: the model's linear layers have biases"),
        (_arg(args, "apply_residual_connection_post_layernorm", default=False),
         "--apply-residual-connection-post-layernorm: the model's residuals skip the norms"),
    ]
    return [message for broken, message in rules if broken]


def _position_type(args) -> str:
    kind = _arg(args, "position_embedding_type")
    if kind is not None:
        return kind
    if _arg(args, "use_rotary_position_embeddings", default=False):
        return "rope"
    return "learned_absolute" if _arg(args, "add_position_embedding", default=True) else "none"


def _tokenizer(args, notes: list[str]) -> tuple[str, bool, int | None]:
    """(tokenizer path, whether it is the run's, its vocabulary size) from the run's args."""
    kind = _arg(args, "tokenizer_type", default="GPT2BPETokenizer")
    if kind in GPT2_TOKENIZERS:
        return "gpt2", True, GPT2_VOCAB_SIZE
    if kind == "NullTokenizer" and _arg(args, "vocab_size") is not None:
        notes.append("the run used Megatron's NullTokenizer (token ids without text); the "
                     "converted config names the bundled gpt2 tokenizer in its place: give one "
                     "with the run's ids (--tokenizer, or data.tokenizer_path)")
        return "gpt2", False, args.vocab_size + 1    # its ids, then its end-of-document id
    where = _arg(args, "tokenizer_model", "vocab_file")
    if where is not None and kind == "HuggingFaceTokenizer":
        try:
            return str(where), True, load_tokenizer(where).vocab_size
        except TokenizerError:
            pass
    notes.append(f"the run's tokenizer ({kind}{f', {where}' if where else ''}) is not here; the "
                 f"converted config names the bundled gpt2 tokenizer in its place: give the "
                 f"run's (--tokenizer, or data.tokenizer_path)")
    return "gpt2", False, None


def model_config(args, vocab_rows: int, notes: list[str]) -> tuple[ModelConfig, str, bool]:
    """(our ModelConfig, tokenizer path, tokenizer known) for a run's arguments; `vocab_rows`
    is the embedding's padded row count."""
    path, known, vocab = _tokenizer(args, notes)
    if vocab is None:
        vocab = _arg(args, "vocab_size")
    if vocab is None or vocab > vocab_rows:
        vocab = vocab_rows
        notes.append(f"the vocabulary's size without Megatron's padding is not recorded; every "
                     f"one of the embedding's {vocab_rows} rows is taken as a token")
    hidden = args.hidden_size
    dropouts = {_arg(args, "hidden_dropout", default=0.1), _arg(args, "attention_dropout",
                                                                 default=0.1)}
    if len(dropouts) > 1:
        notes.append(f"--hidden-dropout and --attention-dropout differ ({sorted(dropouts)}); "
                     f"model.dropout takes --hidden-dropout's")
    ffn = _arg(args, "ffn_hidden_size", default=4 * hidden)
    m = ModelConfig(vocab_size=vocab, d_model=hidden, n_heads=args.num_attention_heads,
                    n_layers=args.num_layers,
                    seq_length=_arg(args, "max_position_embeddings", "seq_length"),
                    ffn_hidden_size=None if ffn == 4 * hidden else ffn,
                    dropout=_arg(args, "hidden_dropout", default=0.1),
                    activation=("gelu_tanh" if _arg(args, "bias_gelu_fusion", default=True)
                                else "gelu"),
                    layernorm_eps=_arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5),
                    init_std=_arg(args, "init_method_std", default=0.02),
                    make_vocab_size_divisible_by=_arg(args, "make_vocab_size_divisible_by",
                                                      default=128))
    return m, path, known


# ---------------------------------------------------------------------------------------------
# The weights

def _stage_states(state: dict, path: Path) -> list[dict[str, torch.Tensor]]:
    """The model state dicts of one rank's file, chunk by chunk."""
    if "model" in state:
        chunks = [state["model"]]
    else:
        chunks = [state[f"model{c}"] for c in range(len(state)) if f"model{c}" in state]
    if not chunks:
        raise MegatronCheckpointError(f"{path} holds no model weights (keys: "
                                      f"{', '.join(sorted(map(str, state))[:8])})")
    for chunk in chunks:
        if "language_model" in chunk:
            raise MegatronCheckpointError(
                f"{path} holds Megatron-LM's legacy model (--use-legacy-models: keys under "
                f"'language_model'), not megatron-core's GPTModel; fix: convert it with "
                f"Megatron-LM's tools/checkpoint/convert.py --saver core first")
    return [{k: v for k, v in chunk.items() if isinstance(v, torch.Tensor)} for chunk in chunks]


def merge_stages(stages: list[list[dict[str, torch.Tensor]]], n_heads: int,
                 where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Megatron's weights -> our full state dict (canonical names; the embedding still padded).

    Args:
        stages: in stage order (chunk c of pipeline rank r at c x pp + r), each stage's state
            dicts, one per tensor-parallel rank.
        n_heads: attention heads (the fused QKV rows are reordered head by head).
    """
    full: dict[str, torch.Tensor] = {}
    unknown: set[str] = set()
    offset = 0
    for ranks in stages:
        keys = set(ranks[0])
        for t, state in enumerate(ranks[1:], 1):
            if set(state) != keys:
                raise MegatronCheckpointError(
                    f"{where}: tensor-parallel rank {t} holds other weights than rank 0 "
                    f"({', '.join(sorted(set(state) ^ keys)[:3])}); the files are of different "
                    f"runs or stages")
        numbers = {k.split(".")[2] for k in keys if k.startswith("decoder.layers.")}
        if not all(n.isdigit() for n in numbers):
            raise MegatronCheckpointError(f"{where}: block keys numbered {sorted(numbers)[:4]} "
                                          f"(decoder.layers.<number>. expected)")
        blocks = sorted(map(int, numbers))
        if blocks != list(range(len(blocks))):
            raise MegatronCheckpointError(f"{where}: a stage's blocks are numbered {blocks}, not "
                                          f"from 0 one by one")
        for key in sorted(keys):
            if key in _SKIPPED or key.endswith(EXTRA_STATE):
                continue
            if key.startswith("decoder.layers."):
                _, _, i, rest = key.split(".", 3)
                ours = _LAYER_NAMES.get(rest)
                if ours is not None:
                    ours = (f"layers.{offset + int(i)}.{ours[0]}", ours[1])
            else:
                ours = _OUTER_NAMES.get(key)
            if ours is None:
                unknown.add(re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.<i>.", key))
                continue
            name, dim = ours
            parts = [state[key] for state in ranks]
            full[name] = parts[0] if dim is None else torch.cat(parts, dim)
        offset += len(blocks)
    if unknown:
        raise MegatronCheckpointError(f"{where} holds weights this model has no place for: "
                                      f"{', '.join(sorted(unknown)[:6])}")
    for i in range(offset):
        for suffix in ("weight", "bias"):
            name = f"layers.{i}.attn.qkv.{suffix}"
            if name in full:
                value = full[name]
                full[name] = value.reshape(n_heads, 3, -1, *value.shape[1:]).transpose(0, 1) \
                    .reshape(value.shape)
    return {k: v.detach().clone() for k, v in full.items()}


def _read_torch_format(folder: Path):
    """(first file's dict, its args, the stages for `merge_stages`, (tp, pp, vp))."""
    files = _rank_files(folder)
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(q for _, q in files)
    states = {rank: _load(path) for rank, path in files.items()}
    first = states[(0, 0)]
    _refuse_architecture(first["args"], folder)
    chunks = {rank: _stage_states(state, files[rank]) for rank, state in states.items()}
    vp = len(chunks[(0, 0)])
    if any(len(c) != vp for c in chunks.values()):
        raise MegatronCheckpointError(f"{folder}: the ranks' files hold different numbers of "
                                      f"model chunks (virtual pipeline stages)")
    stages = [[chunks[(t, r)][c] for t in range(tp)] for c in range(vp) for r in range(pp)]
    return first, stages, (tp, pp, vp)


def _read_torch_dist(folder: Path):
    """(common.pt's dict, the whole model as one stage for `merge_stages`, (tp, pp, vp))."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if (folder / DIST_METADATA).is_file() and not any(
            (folder / name).is_file() for name in (COMMON, "metadata.json")):
        raise MegatronCheckpointError(
            f"{folder} holds torch.distributed.checkpoint files without Megatron's common.pt "
            f"and metadata.json: a --ckpt-format torch_dcp or fsdp_dtensor save, which is not "
            f"read here; fix: save it with --ckpt-format torch_dist or torch (Megatron-LM "
            f"converts on load: --ckpt-convert-format torch --ckpt-convert-save DIR)")
    for name in (DIST_METADATA, COMMON):
        if not (folder / name).is_file():
            raise MegatronCheckpointError(
                f"{folder} lacks {name}: a torch_dist save that did not finish, or a copy "
                f"without it; fix: copy the whole iteration folder, or give a complete one")
    common = _load(folder / COMMON)
    args = common["args"]
    _refuse_architecture(args, folder)
    try:
        reader = FileSystemReader(str(folder))
        stored = reader.read_metadata().state_dict_metadata
        state = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
                 for key, item in stored.items()
                 if isinstance(item, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES)}
        with warnings.catch_warnings():      # "no process group: assuming a single process"
            warnings.simplefilter("ignore")
            load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:   # noqa: BLE001 - the latter wraps each cause
        raise MegatronCheckpointError(f"{folder} cannot be read ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}): truncated "
                                      f"or corrupt; fix: copy it again") from e
    stage = {}
    for key, value in state.items():      # the blocks stacked along their first dimension
        if key.startswith("decoder.layers."):
            rest = key.removeprefix("decoder.layers.")
            stage.update({f"decoder.layers.{i}.{rest}": layer for i, layer in enumerate(value)})
        else:
            stage[key] = value
    layout = tuple(int(_arg(args, name, default=1)) for name in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size"))
    return common, [[stage]], layout


def _refuse_architecture(args, folder: Path) -> None:
    missing = [name for name in REQUIRED_ARGS if _arg(args, name) is None]
    if missing:
        raise MegatronCheckpointError(f"{folder}: the run's saved arguments lack "
                                      f"{', '.join(missing)}; it is not a GPT of Megatron-LM's "
                                      f"pretrain_gpt.py")
    problems = architecture_problems(args)
    if problems:
        raise MegatronCheckpointError(f"{folder} is a GPT this model cannot express:\n"
                                      + "\n".join(f"  - {p}" for p in problems))


def read_checkpoint(folder: Path) -> MegatronCheckpoint:
    """Read a Megatron-LM iteration folder (`find_checkpoint`'s) into our names."""
    read = _read_torch_dist if _is_torch_dist(folder) else _read_torch_format
    first, stages, layout = read(folder)
    args = first["args"]
    full = merge_stages(stages, args.num_attention_heads, str(folder))
    if "embedding.wte.weight" not in full:
        raise MegatronCheckpointError(f"{folder} holds no embedding.word_embeddings.weight (the "
                                      f"first pipeline stage's); fix: copy the whole iteration "
                                      f"folder")
    notes: list[str] = []
    if _arg(args, "apply_layernorm_1p", default=False):
        # 1 + a 16-bit weight is not a 16-bit number: float32 holds it exactly, for every weight
        full = {k: v.float() for k, v in full.items()}
        norms = [k for k in full if k.endswith(("ln1.weight", "ln2.weight", "final_ln.weight"))]
        for name in norms:
            full[name] = full[name] + 1
        notes.append("--apply-layernorm-1p: the norms' weights are stored less 1; with the 1 "
                     "added back, the weights are written in float32, which holds them exactly")
    m, tokenizer_path, known = model_config(args, full["embedding.wte.weight"].shape[0], notes)
    full["embedding.wte.weight"] = full["embedding.wte.weight"][:m.vocab_size]
    precision = "bf16" if _arg(args, "bf16", default=False) else (
        "fp16" if _arg(args, "fp16", default=False) else "fp32")
    iteration = int(first.get("iteration", 0) or 0)
    return MegatronCheckpoint(folder, m, full, iteration,
                              int(_arg(args, "consumed_train_samples", default=0)),
                              layout, tokenizer_path, known, precision, notes)

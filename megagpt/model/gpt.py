"""GPT-2, split across a tensor-parallel group the way Megatron-LM splits it, one pipeline stage
at a time.

The architecture is GPT-2's: learned token and position embeddings, pre-LayerNorm blocks of
causal self-attention and a GeLU MLP (4x wide; GPT-2's tanh GeLU, or the exact one with
`model.activation=gelu`), a final LayerNorm, and an output projection tied to the token
embedding, every linear layer with a bias. Per block, under tensor parallelism:

    x ─ LN ─ QKV (column: heads split) ─ attention on my heads ─ proj (row: all-reduce) ─ + ─┐
    ┌──────────────────────────────────────────────────────────────────────────────────────┘
    └ LN ─ fc1 (column) ─ bias-GeLU ─ fc2 (row: all-reduce) ─ + ─> next block

With sequence parallelism the residual stream, the layer norms and the dropouts hold [s/tp, b, h]
and the all-reduces become an all-gather before each column layer and a reduce-scatter after
each row layer. Activations are [seq, batch, hidden] inside the stack.

A stage (`GPTStage`) holds a contiguous range of blocks, plus the embedding if it is the first
stage and the final norm, output projection and loss if it is the last. Block parameters are
named by their global layer number (`layers.7.attn.qkv.weight`), the same in every layout.

For inference, `GPTStage.forward(ids, positions=..., cache=KVCache(...))` keeps every layer's keys
and values, so generating a token costs one position's forward (megagpt/generation.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megagpt.config import Config, KernelsConfig, ModelConfig
from megagpt.kernels import check_document_ids, flash_attention_qkvpacked
from megagpt.kernels.dispatch import get_op, resolve_backend
from megagpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS, document_mask
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagpt.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                     VocabParallelEmbedding, group_rank, group_size)
from megagpt.parallel.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region,
                                       scatter_to_sequence_parallel_region)
from megagpt.parallel.random import full_init, get_rng_tracker, recompute_contexts, shard, unshard


@dataclass
class StageSpec:
    """What one model chunk holds: blocks [first_layer, last_layer) and the two ends."""

    first_layer: int
    last_layer: int
    pre_process: bool    # holds the embedding
    post_process: bool   # holds the final norm, the output projection and the loss


def stage_spec(n_layers: int, pp_rank: int, pp_size: int, vp_chunk: int = 0, vp_size: int = 1) -> StageSpec:
    """Megatron's order: virtual stage v*pp + r (chunk v on pipeline rank r) holds the v*pp+r-th
    slice of n_layers / (pp*vp) blocks."""
    n_stages = pp_size * vp_size
    per_stage = n_layers // n_stages
    stage = vp_chunk * pp_size + pp_rank
    return StageSpec(stage * per_stage, (stage + 1) * per_stage, stage == 0, stage == n_stages - 1)


class Ops:
    """The kernel functions this model calls, resolved once from the `kernels` config for a device."""

    def __init__(self, kernels: KernelsConfig, device, dropout: float, head_dim: int):
        attention = kernels.attention
        # auto: SDPA for the head sizes the Triton kernel lacks, and with dropout, whose Triton
        # path has not been timed on a GPU yet (docs/kernels.md)
        if attention == "auto" and (dropout > 0 or head_dim not in SUPPORTED_HEAD_DIMS):
            attention = "sdpa"
        self.attention_backend = resolve_backend("attention", attention, device)
        self.attention = get_op("attention", attention, device)
        # Triton reads q, k, v inside the fused projection's output and writes the gradient
        # back in its layout: no copies apart or together (the other backends take q, k, v).
        self.attention_qkvpacked = (flash_attention_qkvpacked
                                    if self.attention_backend == "triton" else None)
        self.layer_norm = get_op("layernorm", kernels.layernorm, device)
        self.softmax = get_op("softmax", kernels.softmax, device)
        self.bias_gelu = get_op("bias_gelu", kernels.bias_gelu, device)
        self.cross_entropy_backend = resolve_backend("cross_entropy", kernels.cross_entropy, device)
        self.cross_entropy = get_op("cross_entropy", kernels.cross_entropy, device)


class KVCache:
    """Keys and values of the tokens seen so far, per attention layer, for generation.

    Args:
        key_mask: (b, capacity) bool, True where a position holds a real token and False where it
            holds left padding; `capacity` bounds the positions the cache can hold.

    Each forward with `cache=` appends its s new positions to every layer's keys and values and
    then moves `length` on by s. Queries see the keys at or before their own position that are
    real tokens; a padding query also sees itself, so no softmax row is empty (its output is
    never used). Inference only, on a single process (tp = pp = 1, no sequence parallelism).
    """

    def __init__(self, key_mask: torch.Tensor):
        self.key_mask = key_mask
        self.length = 0
        self.keys: dict[nn.Module, torch.Tensor] = {}
        self.values: dict[nn.Module, torch.Tensor] = {}

    def attend(self, layer: nn.Module, q, k, v):
        """Store k, v of `layer` at [length, length + s) and attend: (b, nh, s, hd) each -> same."""
        b, nh, s, hd = k.shape
        end = self.length + s
        if layer not in self.keys:
            capacity = self.key_mask.shape[1]
            self.keys[layer] = k.new_zeros(b, nh, capacity, hd)
            self.values[layer] = v.new_zeros(b, nh, capacity, hd)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        q_pos = torch.arange(self.length, end, device=q.device)[:, None]       # (s, 1)
        k_pos = torch.arange(end, device=q.device)[None, :]                     # (1, end)
        allowed = (k_pos <= q_pos) & self.key_mask[:, None, :end]               # (b, s, end)
        allowed = allowed | (k_pos == q_pos)
        return F.scaled_dot_product_attention(q, self.keys[layer][:, :, :end],
                                              self.values[layer][:, :, :end],
                                              attn_mask=allowed[:, None])       # (b, nh, s, hd)

    def advance(self, s: int) -> None:
        """Count s more positions as cached (called once per forward, after every layer)."""
        self.length += s


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float, ops: Ops, sequence_parallel: bool):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.weight.sequence_parallel = self.bias.sequence_parallel = sequence_parallel
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(nn.Module):
    """Dropout on the residual stream: drawn from the tensor-parallel stream when the activation
    is a sequence shard (each rank's shard needs its own mask), else from the default stream,
    identical on every tensor-parallel rank."""

    def __init__(self, p: float, sharded: bool):
        super().__init__()
        self.p, self.sharded = p, sharded

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.sharded:
            with get_rng_tracker().fork():
                return F.dropout(x, self.p, True)
        return F.dropout(x, self.p, True)


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, ops: Ops, tp_group, sequence_parallel: bool, recompute: str):
        super().__init__()
        tp = group_size(tp_group)
        self.n_local_heads, self.head_dim = m.n_heads // tp, m.d_model // m.n_heads
        self.qkv = ColumnParallelLinear(m.d_model, 3 * m.d_model, tp_group=tp_group,
                                        sequence_parallel=sequence_parallel, stride=3)
        self.proj = RowParallelLinear(m.d_model, m.d_model, tp_group=tp_group,
                                      sequence_parallel=sequence_parallel)
        # Selective recompute (Korthikanti et al.) drops the s x s scores and probabilities that
        # eager attention stores; the fused backends never store them, so there is nothing to drop.
        self.dropout_p, self.ops = m.dropout, ops
        self.recompute = recompute == "selective" and ops.attention_backend == "eager"

    def dropout_stream(self, p: float):
        """Where attention dropout draws from: the tensor-parallel stream (the heads are
        sharded, so each rank needs its own masks)."""
        return get_rng_tracker().fork() if p > 0 else contextlib.nullcontext()

    def core(self, q, k, v, document_ids=None):
        """Causal attention on this rank's heads, (b, nh, s, hd) -> (b, nh, s, hd); with
        document_ids (b, s), only within each document."""
        p = self.dropout_p if self.training else 0.0
        if self.ops.attention_backend == "eager":
            scores = q @ k.transpose(-2, -1)                                    # (b, nh, s, s)
            if document_ids is not None:
                check_document_ids(document_ids, q.shape[0], q.shape[2], q.device)
                scores = scores.masked_fill(~document_mask(document_ids), float("-inf"))
            probs = self.ops.softmax(scores, scale=1.0 / math.sqrt(self.head_dim), causal=True)
            if p > 0:
                with self.dropout_stream(p):
                    probs = F.dropout(probs, p, True)
            return probs @ v
        with self.dropout_stream(p):
            return self.ops.attention(q, k, v, causal=True, dropout_p=p, document_ids=document_ids)

    def forward(self, x, cache: KVCache | None = None, document_ids=None):
        qkv = self.qkv(x)             # x (s, b, h) or (s/tp, b, h) -> (s, b, 3 * nh_local * hd)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, 3, self.n_local_heads, self.head_dim)
        if cache is None and self.ops.attention_qkvpacked is not None:
            p = self.dropout_p if self.training else 0.0
            with self.dropout_stream(p):                                        # (b, s, nh, hd)
                y = self.ops.attention_qkvpacked(qkv.transpose(0, 1), causal=True, dropout_p=p,
                                                 document_ids=document_ids)
            return self.proj(y.transpose(0, 1).reshape(s, b, self.n_local_heads * self.head_dim))
        q, k, v = qkv.permute(2, 1, 3, 0, 4)
        if cache is not None:                                   # (b, nh, s, hd) each
            y = cache.attend(self, q, k, v)
        elif self.recompute and self.training:
            y = checkpoint(self.core, q, k, v, document_ids, use_reentrant=False,
                           context_fn=recompute_contexts)
        else:
            y = self.core(q, k, v, document_ids)
        y = y.permute(2, 0, 1, 3).reshape(s, b, self.n_local_heads * self.head_dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, m: ModelConfig, ops: Ops, tp_group, sequence_parallel: bool):
        super().__init__()
        self.fc1 = ColumnParallelLinear(m.d_model, m.ffn_size, tp_group=tp_group,
                                        sequence_parallel=sequence_parallel)
        self.fc2 = RowParallelLinear(m.ffn_size, m.d_model, tp_group=tp_group,
                                     sequence_parallel=sequence_parallel)
        self.ops = ops
        self.approximate = "tanh" if m.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.fc2(self.ops.bias_gelu(self.fc1(x, add_bias=False), self.fc1.bias,
                                           self.approximate))


class Block(nn.Module):
    def __init__(self, m: ModelConfig, ops: Ops, tp_group, sequence_parallel: bool, recompute: str):
        super().__init__()
        sharded_residual = sequence_parallel and group_size(tp_group) > 1
        self.ln1 = LayerNorm(m.d_model, m.layernorm_eps, ops, sequence_parallel)
        self.attn = Attention(m, ops, tp_group, sequence_parallel, recompute)
        self.ln2 = LayerNorm(m.d_model, m.layernorm_eps, ops, sequence_parallel)
        self.mlp = MLP(m, ops, tp_group, sequence_parallel)
        self.drop1 = Dropout(m.dropout, sharded_residual)
        self.drop2 = Dropout(m.dropout, sharded_residual)

    def forward(self, x, cache: KVCache | None = None, document_ids=None):
        x = x + self.drop1(self.attn(self.ln1(x), cache, document_ids))
        return x + self.drop2(self.mlp(self.ln2(x)))


class Embedding(nn.Module):
    """Token + position embeddings and dropout: ids (b, s) -> (s, b, h) or (s/tp, b, h).

    Positions are 0..s-1 for every row, or `positions` (b, s) when given (generation: left-padded
    rows and cached prefixes)."""

    def __init__(self, m: ModelConfig, tp_group, sequence_parallel: bool):
        super().__init__()
        tp = group_size(tp_group)
        self.wte = VocabParallelEmbedding(m.padded_vocab_size(tp), m.d_model, tp_group=tp_group,
                                          sequence_parallel=sequence_parallel)
        self.wpe = nn.Embedding(m.seq_length, m.d_model)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel and tp > 1
        self.drop = Dropout(m.dropout, self.sequence_parallel)

    def forward(self, input_ids, positions=None):
        if input_ids.shape[1] > self.wpe.num_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions but the model has "
                             f"{self.wpe.num_embeddings} (model.seq_length); fix: cut the input "
                             f"to model.seq_length tokens")
        if positions is None:
            positions = self.wpe.weight[:input_ids.shape[1]].unsqueeze(1)    # (s, 1, h)
        else:
            positions = self.wpe(positions).transpose(0, 1)                  # (s, b, h)
        if self.sequence_parallel:
            positions = scatter_to_sequence_parallel_region(positions, self.tp_group)
        return self.drop(self.wte(input_ids) + positions)


class GPTStage(nn.Module):
    """Blocks [first_layer, last_layer) of GPT, with the embedding and/or the head at the ends.

    forward(x, labels=None, loss_mask=None, *, positions=None, document_ids=None, cache=None):
      first stage: x = token ids (b, s); later stages: x = hidden (s, b, h) from the previous one.
      positions (b, s): position ids of the tokens (default 0..s-1); document_ids (b, s): the
      document of each token, non-decreasing along a row (`megagpt.data.documents`): a token
      attends only to the earlier tokens of its own document (default: to every earlier
      token); cache: a `KVCache` that receives this call's keys and values and supplies the
      earlier ones (inference).
      Not the last stage: returns hidden (s, b, h) (or (s/tp, b, h) under sequence parallelism).
      Last stage with labels (b, s), labels[b, j] the token after x[b, j] (already shifted, unlike
      Hugging Face's; -100 leaves a token out): returns (loss_sum, n_tokens), the float32 sum of
      per-token losses times loss_mask (1 where a token counts, 0 where not; other values
      weight it) and the mask's sum, so callers can normalise over micro-batches and
      data-parallel ranks.
      Last stage without labels: this rank's vocabulary slice of the logits, (b, s, V_padded / tp).
    """

    def __init__(self, model: ModelConfig, kernels: KernelsConfig, spec: StageSpec, *,
                 tp_group=None, sequence_parallel: bool = False, recompute: str = "none",
                 device="cpu"):
        super().__init__()
        self.cfg, self.spec, self.tp_group = model, spec, tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.recompute = recompute
        ops = Ops(kernels, device, model.dropout, model.d_model // model.n_heads)
        self.ops = ops
        if spec.pre_process:
            self.embedding = Embedding(model, tp_group, self.sequence_parallel)
        self.layers = nn.ModuleDict({
            str(i): Block(model, ops, tp_group, self.sequence_parallel, recompute)
            for i in range(spec.first_layer, spec.last_layer)})
        if spec.post_process:
            self.final_ln = LayerNorm(model.d_model, model.layernorm_eps, ops, self.sequence_parallel)
            if not spec.pre_process:   # the last stage's copy of the tied embedding
                tp = group_size(tp_group)
                self.output_weight = nn.Parameter(torch.empty(model.padded_vocab_size(tp) // tp,
                                                              model.d_model))
                self.output_weight.tp_dim, self.output_weight.tp_stride = 0, 1
        self.to(device)

    def word_embedding_weight(self) -> nn.Parameter:
        return self.embedding.wte.weight if self.spec.pre_process else self.output_weight

    def forward(self, x, labels=None, loss_mask=None, *, positions=None, document_ids=None,
                cache=None):
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids: not with cache= (generation attends within one "
                             "prompt a row); pass one of the two")
        if self.spec.pre_process:
            x = self.embedding(x, positions)                        # (s, b, h)
        for block in self.layers.values():
            if self.recompute == "full" and self.training:
                x = checkpoint(block, x, None, document_ids, use_reentrant=False,
                               context_fn=recompute_contexts)
            elif document_ids is not None:
                x = block(x, None, document_ids)
            elif cache is None:
                x = block(x)             # tensors only: a block may be a replayed CUDA graph
            else:
                x = block(x, cache)
        if cache is not None:
            cache.advance(x.shape[0])
        if not self.spec.post_process:
            return x
        x = self.final_ln(x)
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = copy_to_tp_region(x, self.tp_group)
        logits = F.linear(x, self.word_embedding_weight())          # (s, b, V_padded / tp)
        if labels is None:
            return logits.transpose(0, 1)
        return self.loss(logits, labels, loss_mask)

    def loss(self, logits, labels, loss_mask):
        """(loss_sum, n_tokens) from logits (s, b, V/tp) and labels / loss_mask (b, s). A label
        of IGNORE_INDEX (-100, Hugging Face's) leaves its token out, as a loss_mask of 0 does."""
        shape = (logits.shape[1], logits.shape[0])
        for name, given in (("labels", labels), ("loss_mask", loss_mask)):
            if given is not None and tuple(given.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(given.shape)} but the tokens are "
                                 f"{shape} (batch, sequence); labels[b, j] is the token after "
                                 f"x[b, j]: model(ids[:, :-1], labels=ids[:, 1:])")
        target = labels.t()
        mask = torch.ones_like(target, dtype=torch.float32) if loss_mask is None else loss_mask.t().float()
        ignored = target == IGNORE_INDEX
        mask = mask.masked_fill(ignored, 0.0)
        check_labels(target, mask, self.cfg.vocab_size)
        # a label left out is never read: one in the padding columns would make its row's loss
        # inf, and inf x 0 NaN
        target = target.masked_fill(mask == 0, 0)
        if group_size(self.tp_group) == 1 and self.ops.cross_entropy_backend == "triton":
            target = target.masked_fill(mask == 0, -100)         # rows masked out are not read
            flat = logits.reshape(-1, logits.shape[-1])        # the padded vocabulary, no copy
            loss_sum = self.ops.cross_entropy(flat, target.reshape(-1), vocab_size=self.cfg.vocab_size,
                                              reduction="sum",     # float32, no device sync
                                              inplace_backward=True,  # nothing reads the logits
                                              weight=mask.reshape(-1))  # a mask need not be 0/1
            return loss_sum, mask.sum()
        losses = vocab_parallel_cross_entropy(logits, target, self.cfg.vocab_size, self.tp_group,
                                              fused=self.ops.cross_entropy_backend == "triton")
        return (losses * mask).sum(), mask.sum()


IGNORE_INDEX = -100     # a label left out of the loss (Hugging Face's and torch's convention)


def loss_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> float:
    """The tokens a micro-batch counts in its loss, as `GPTStage.loss` counts them: the sum of
    its loss_mask (ones when None) over the labels that are not IGNORE_INDEX."""
    kept = labels != IGNORE_INDEX
    return float(kept.sum() if loss_mask is None else loss_mask.masked_fill(~kept, 0).sum())


def check_labels(target: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    """Every label a token counts with (mask not 0) must be a class of the vocabulary: on the CPU
    a ValueError naming it; on a GPU a device-side assert (no synchronisation), as torch's own
    cross-entropy makes. A label outside would otherwise add its log-sum-exp to the loss (the
    vocab-parallel loss finds it on no rank) or infinity (a padding column)."""
    valid = (mask == 0) | ((target >= 0) & (target < vocab_size))
    if target.device.type != "cpu":
        torch._assert_async(valid.all(), f"labels outside [0, model.vocab_size={vocab_size})")
    elif not bool(valid.all()):
        raise ValueError(f"labels hold {int(target[~valid][0])}, outside [0, model.vocab_size="
                         f"{vocab_size}); a label is the id of the next token, or "
                         f"{IGNORE_INDEX} to leave its token out of the loss")


def build_stage(cfg: Config, *, tp_group=None, pp_rank: int = 0, vp_chunk: int = 0,
                device="cpu") -> GPTStage:
    """The model chunk `vp_chunk` of pipeline rank `pp_rank` for this config, initialised."""
    par = cfg.parallel
    spec = stage_spec(cfg.model.n_layers, pp_rank, par.pipeline_parallel_size, vp_chunk,
                      par.virtual_pipeline_size)
    stage = GPTStage(cfg.model, cfg.kernels, spec, tp_group=tp_group,
                     sequence_parallel=par.sequence_parallel, recompute=cfg.training.recompute,
                     device=device)
    init_weights(stage, cfg.model, cfg.training.seed)
    return stage


def canonical_name(name: str) -> str:
    """The layout-independent name of a stage parameter (the output copy is the embedding)."""
    return "embedding.wte.weight" if name == "output_weight" else name


@torch.no_grad()
def init_weights(stage: GPTStage, m: ModelConfig, seed: int) -> None:
    """GPT-2's initialisation, identical in every layout: N(0, init_std) weights, residual
    projections scaled by 1/sqrt(2 * n_layers), zero biases, unit norms; each parameter drawn at
    its full size from a generator seeded by its name and sliced for this rank."""
    tp, tp_rank = group_size(stage.tp_group), group_rank(stage.tp_group)
    norms = {id(mod.weight) for mod in stage.modules() if isinstance(mod, LayerNorm)}
    for name, param in stage.named_parameters():
        name = canonical_name(name)
        if name.endswith(".bias"):
            param.zero_()
            continue
        if id(param) in norms:
            param.fill_(1.0)
            continue
        std = m.init_std
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            std = m.init_std / math.sqrt(2 * m.n_layers)
        dim = getattr(param, "tp_dim", None)
        if name == "embedding.wte.weight":
            full = torch.zeros(m.padded_vocab_size(tp), m.d_model)
            full[:m.vocab_size] = full_init(name, (m.vocab_size, m.d_model), std, seed)
        else:
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp
            full = full_init(name, tuple(shape), std, seed)
        if dim is not None:
            full = shard(full, dim, tp_rank, tp, getattr(param, "tp_stride", 1))
        param.copy_(full)


def local_slice(param: nn.Parameter, full: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's part of a full tensor for `param` (replicated parameters take it whole)."""
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return full
    return shard(full, dim, group_rank(tp_group), group_size(tp_group), getattr(param, "tp_stride", 1))


@torch.no_grad()
def load_full_state_dict(stage: GPTStage, full: dict[str, torch.Tensor]) -> None:
    """Load unsharded tensors keyed by canonical names (the embedding padded to
    `padded_vocab_size(tp)` or unpadded) into this rank's stage, slicing what is sharded."""
    m, tp = stage.cfg, group_size(stage.tp_group)
    missing = []
    for name, param in stage.named_parameters():
        key = canonical_name(name)
        if key not in full:
            missing.append(key)
            continue
        value = full[key]
        if key == "embedding.wte.weight":
            padded = torch.zeros(m.padded_vocab_size(tp), m.d_model, dtype=value.dtype)
            padded[:m.vocab_size] = value[:m.vocab_size]
            value = padded
        value = local_slice(param, value, stage.tp_group)
        if value.shape != param.shape:
            raise ValueError(f"{key}: the tensor for this rank has shape {tuple(value.shape)}, the "
                             f"model expects {tuple(param.shape)}")
        param.copy_(value)
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameter(s) of this stage: {missing[:5]}")


def count_model_parameters(m: ModelConfig) -> int:
    """Parameters of the built single-process model on the meta device, the vocabulary padding
    left out and the tied embedding counted once (so it equals GPT-2's own count)."""
    spec = StageSpec(0, m.n_layers, True, True)
    kernels = KernelsConfig(attention="eager", layernorm="torch", softmax="torch",
                            bias_gelu="torch", cross_entropy="torch")
    with torch.device("meta"):
        model = GPTStage(m, kernels, spec, device="meta")
    padding = (m.padded_vocab_size(1) - m.vocab_size) * m.d_model
    return sum(p.numel() for p in model.parameters()) - padding


@torch.no_grad()
def gather_full_state_dict(stage: GPTStage) -> dict[str, torch.Tensor]:
    """This stage's parameters at full size (gathered over the tensor-parallel group), keyed by
    canonical name, the embedding unpadded. Every tensor-parallel rank gets the result."""
    import torch.distributed as dist

    tp = group_size(stage.tp_group)
    out = {}
    for name, param in stage.named_parameters():
        key, value = canonical_name(name), param.detach()
        dim = getattr(param, "tp_dim", None)
        if dim is not None and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=stage.tp_group)
            value = unshard(parts, dim, getattr(param, "tp_stride", 1))
        if key == "embedding.wte.weight":
            value = value[:stage.cfg.vocab_size]
        out[key] = value.clone()
    return out

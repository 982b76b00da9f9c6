"""The whole model from a checkpoint of any layout, and the shards of any layout from it.

A checkpoint holds one model file per (tp, pp) rank, each `{"chunk<c>": state_dict}` with
parameters named by their global layer number. `full_state_from_checkpoint` gathers them into
one unsharded state dict keyed by canonical names (the embedding unpadded; the last stage's copy
of the tied embedding dropped); `shard_full_state` cuts such a dict for another layout. How each
parameter is split comes from the model itself (`tp_dim`, `tp_stride` on its parameters, read
from a copy built on the meta device), so the two cannot drift apart.
"""
from __future__ import annotations

import torch

from megagpt.config import KernelsConfig, ModelConfig
from megagpt.model.gpt import GPTStage, StageSpec, canonical_name, stage_spec
from megagpt.parallel.random import shard, unshard

_META_KERNELS = KernelsConfig(attention="eager", layernorm="torch", softmax="torch",
                              bias_gelu="torch", cross_entropy="torch")


def _meta_model(m: ModelConfig) -> GPTStage:
    """The whole model of `m` on the meta device (shapes and attributes, no memory)."""
    with torch.device("meta"):
        return GPTStage(m, _META_KERNELS, StageSpec(0, m.n_layers, True, True), device="meta")


def sharding_rules(m: ModelConfig) -> dict[str, tuple[int | None, int]]:
    """Canonical parameter name -> (split dimension or None if replicated, stride)."""
    return {name: (getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1))
            for name, p in _meta_model(m).named_parameters()}


def full_state_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> its shape in a full state dict (the embedding unpadded)."""
    shapes = {name: tuple(p.shape) for name, p in _meta_model(m).named_parameters()}
    shapes["embedding.wte.weight"] = (m.vocab_size, m.d_model)
    return shapes


def model_config_of(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with (from its meta.json)."""
    return ModelConfig(**meta["config"]["model"])


def gather_shards(states: dict, m: ModelConfig, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """{(tp_rank, pp_rank): {"chunk<c>": state}} -> the full state dict (canonical names)."""
    rules = sharding_rules(m)
    parts: dict[str, list] = {}
    for q in range(pp):
        for t in range(tp):
            for chunk_state in states[(t, q)].values():
                for name, value in chunk_state.items():
                    if name == "output_weight":
                        continue   # the last stage's copy of embedding.wte.weight
                    parts.setdefault(name, [None] * tp)[t] = value
    full = {}
    for name, (dim, stride) in rules.items():
        if name not in parts or any(v is None for v in parts[name]):
            raise KeyError(f"the checkpoint has no {name} for every tensor-parallel rank")
        values = parts[name]
        value = values[0] if dim is None else unshard(values, dim, stride)
        if name == "embedding.wte.weight":
            value = value[:m.vocab_size]
        full[name] = value.clone()
    return full


def full_state_from_checkpoint(path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, full unsharded state dict) of the checkpoint in step folder `path`."""
    from megagpt.training.checkpoint import load_model_states

    meta, states = load_model_states(path, verify)
    p = meta["parallel"]
    return meta, gather_shards(states, model_config_of(meta), p["tp"], p["pp"])


def shard_full_state(full: dict[str, torch.Tensor], m: ModelConfig, tp: int, pp: int,
                     vp: int = 1) -> dict[tuple[int, int], dict]:
    """A full state dict -> {(tp_rank, pp_rank): {"chunk<c>": state}} for a layout, each state
    exactly what `GPTStage.state_dict()` holds on that rank (the embedding padded for tp)."""
    rules = sharding_rules(m)
    padded = torch.zeros(m.padded_vocab_size(tp), m.d_model, dtype=full["embedding.wte.weight"].dtype)
    padded[:m.vocab_size] = full["embedding.wte.weight"][:m.vocab_size]
    out = {}
    for q in range(pp):
        for t in range(tp):
            chunks = {}
            for c in range(vp):
                spec = stage_spec(m.n_layers, q, pp, c, vp)
                names = [n for n in rules if _in_stage(n, spec)]
                if spec.post_process and not spec.pre_process:
                    names.append("output_weight")
                state = {}
                for name in names:
                    key = canonical_name(name)
                    value = padded if key == "embedding.wte.weight" else full[key]
                    dim, stride = rules[key]
                    state[name] = value.clone() if dim is None else shard(value, dim, t, tp, stride)
                chunks[f"chunk{c}"] = state
            out[(t, q)] = chunks
    return out


def _in_stage(name: str, spec: StageSpec) -> bool:
    if name.startswith("embedding."):
        return spec.pre_process
    if name.startswith("final_ln."):
        return spec.post_process
    layer = int(name.split(".")[1])
    return spec.first_layer <= layer < spec.last_layer

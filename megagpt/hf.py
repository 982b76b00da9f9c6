"""Hugging Face GPT-2 import and export: `GPT2LMHeadModel` state dicts to ours and back.

GPT-2's linear layers are `Conv1D` modules whose weights are stored (in, out), the transpose of
`nn.Linear`; our fused QKV stacks query, key and value along the output features in the same
order as GPT-2's `c_attn`, so only the transposes and the names change. Our embedding table is
padded (`model.make_vocab_size_divisible_by`); the padding is dropped on export.
"""
from __future__ import annotations

import torch

from megagpt.config import ModelConfig

_LAYER_MAP = {  # ours -> (GPT-2's, transposed)
    "ln1.weight": ("ln_1.weight", False), "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False), "ln2.bias": ("ln_2.bias", False),
    "mlp.fc1.weight": ("mlp.c_fc.weight", True), "mlp.fc1.bias": ("mlp.c_fc.bias", False),
    "mlp.fc2.weight": ("mlp.c_proj.weight", True), "mlp.fc2.bias": ("mlp.c_proj.bias", False),
}
_OUTER_MAP = {"embedding.wte.weight": "transformer.wte.weight",
              "embedding.wpe.weight": "transformer.wpe.weight",
              "final_ln.weight": "transformer.ln_f.weight", "final_ln.bias": "transformer.ln_f.bias"}


def from_hf(hf_state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model) state dict -> our full, unsharded state dict."""
    hf_state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    if not any(k.startswith("transformer.") for k in hf_state):
        hf_state = {f"transformer.{k}": v for k, v in hf_state.items()}
    out = {}
    for ours, theirs in _OUTER_MAP.items():
        out[ours] = hf_state[theirs]
    out["embedding.wpe.weight"] = out["embedding.wpe.weight"][:m.seq_length]
    for i in range(m.n_layers):
        for ours, (theirs, transpose) in _LAYER_MAP.items():
            value = hf_state[f"transformer.h.{i}.{theirs}"]
            out[f"layers.{i}.{ours}"] = value.t().contiguous() if transpose else value
    if out["embedding.wte.weight"].shape[0] != m.vocab_size:
        raise ValueError(f"the Hugging Face embedding has {out['embedding.wte.weight'].shape[0]} "
                         f"rows but model.vocab_size={m.vocab_size}; fix: make config.json's "
                         f"vocab_size match the weights")
    return {k: v.detach().clone() for k, v in out.items()}


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> a GPT2LMHeadModel state dict (padding removed, lm_head tied)."""
    out = {theirs: state[ours] for ours, theirs in _OUTER_MAP.items()}
    out["transformer.wte.weight"] = out["transformer.wte.weight"][:m.vocab_size]
    for i in range(m.n_layers):
        for ours, (theirs, transpose) in _LAYER_MAP.items():
            value = state[f"layers.{i}.{ours}"]
            out[f"transformer.h.{i}.{theirs}"] = value.t() if transpose else value
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config_dict(m: ModelConfig) -> dict:
    """A GPT2Config dict for our architecture (config.json of an exported folder)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": m.vocab_size,
            "n_positions": m.seq_length, "n_embd": m.d_model, "n_layer": m.n_layers,
            "n_head": m.n_heads, "n_inner": m.ffn_hidden_size,
            "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "layer_norm_epsilon": m.layernorm_eps, "initializer_range": m.init_std,
            "tie_word_embeddings": True}

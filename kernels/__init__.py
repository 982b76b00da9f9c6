"""Triton kernels (installed as ``megagpt.kernels``): one file an op, each with its reference.

Public functions (each differentiable; each runs its plain-torch reference where the Triton
kernels cannot run, i.e. on a CPU without ``TRITON_INTERPRET=1``):
    flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, seed=None,
                    document_ids=None)             q/k/v (batch, heads, seq, head_dim)
    flash_attention_qkvpacked(qkv, causal=True, softmax_scale=None, dropout_p=0.0, seed=None,
                              document_ids=None)   qkv (batch, seq, 3, heads, head_dim), any strides
    layer_norm(x, weight, bias, eps=1e-5)                       over the last dimension
    scaled_masked_softmax(x, scale=1.0, causal=False)           over the last dimension
    bias_gelu(x, bias, approximate="tanh")                      GeLU of x + bias: GPT-2's tanh,
                                                                or "none": the exact one (erf)
    cross_entropy(logits, target, ignore_index=-100, vocab_size=None, reduction="mean",
                  inplace_backward=False, weight=None)
                                                                mean (or float32 sum) over non-ignored rows
and the vocab-parallel building blocks `cross_entropy_shard_stats` and `cross_entropy_shard_grad`;
`dropout_keep_mask` gives the attention dropout masks the kernels draw for a seed;
`check_document_ids` checks attention's ``document_ids`` (document masks of packed windows).
Backend choice from the config's ``kernels`` section: `resolve_backend` and `get_op`
(see `dispatch`).
"""
from .bias_gelu import bias_gelu, bias_gelu_reference
from .cross_entropy import (cross_entropy, cross_entropy_reference, cross_entropy_shard_grad,
                            cross_entropy_shard_grad_reference, cross_entropy_shard_stats,
                            cross_entropy_shard_stats_reference)
from .dispatch import BACKENDS, BackendUnavailable, get_op, resolve_backend
from .flash_attention import (check_document_ids, dropout_keep_mask, flash_attention,
                              flash_attention_qkvpacked, flash_attention_reference)
from .layer_norm import layer_norm, layer_norm_reference
from .softmax import scaled_masked_softmax, scaled_masked_softmax_reference

__all__ = [
    "flash_attention", "flash_attention_qkvpacked", "layer_norm", "scaled_masked_softmax",
    "bias_gelu", "cross_entropy",
    "cross_entropy_shard_stats", "cross_entropy_shard_grad",
    "flash_attention_reference", "layer_norm_reference", "scaled_masked_softmax_reference",
    "bias_gelu_reference", "cross_entropy_reference", "cross_entropy_shard_stats_reference",
    "cross_entropy_shard_grad_reference", "dropout_keep_mask", "check_document_ids",
    "BACKENDS", "BackendUnavailable", "get_op", "resolve_backend",
]

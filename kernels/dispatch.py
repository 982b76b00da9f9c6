"""Backend choice: the config's ``kernels`` section, resolved to one function per op and device.

Ops and their backends (the first is the config default):
    attention      auto | triton | flash_attn | sdpa | eager
    layernorm      auto | triton | torch | apex
    softmax        auto | triton | torch
    bias_gelu      auto | triton | torch
    cross_entropy  auto | triton | torch

``auto`` picks Triton where its kernels run (a CUDA device, or the CPU under
``TRITON_INTERPRET=1``), else torch: SDPA for attention, the plain-torch reference for the rest.
``triton`` where the kernels cannot run, and ``flash_attn`` or ``apex`` when the package does not
import or the device is not CUDA, are errors that say what to install or choose instead.
``eager`` is `flash_attention_reference`; ``torch`` is each op's `<op>_reference`. Every backend
runs the same checks of its arguments as the Triton function first (`<op>_torch`, and the
attention backends' `check_qkv`: any head_dim but the Triton kernels'), so a bad input is the
same clear error whichever backend runs.

Every backend of an op has the op's signature:
    attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, document_ids=None),
              q/k/v (batch, heads, seq, head_dim); dropout_p drops attention probabilities
              (from torch's default generator on q's device: every backend draws there);
              document_ids (batch, seq) keeps each document's tokens to themselves
    layernorm(x, weight, bias, eps=1e-5)
    softmax(x, scale=1.0, causal=False)
    bias_gelu(x, bias, approximate="tanh")
    cross_entropy(logits, target, ignore_index=-100, vocab_size=None, reduction="mean",
                  inplace_backward=False, weight=None)
"""
import importlib
from typing import Callable

import torch

from ._utils import HAS_TRITON, triton_runs_on


class BackendUnavailable(RuntimeError):
    """A backend the config chose that this machine cannot run (not installed, or not on this
    device); the message names the setting and what to install or choose instead."""
from .bias_gelu import bias_gelu, bias_gelu_torch
from .cross_entropy import cross_entropy, cross_entropy_torch
from .flash_attention import (check_document_ids, check_dropout_p, check_qkv, document_mask,
                              flash_attention, flash_attention_reference)
from .layer_norm import _check_inputs as check_layer_norm_inputs
from .layer_norm import layer_norm, layer_norm_torch
from .softmax import scaled_masked_softmax, scaled_masked_softmax_torch

BACKENDS = {
    "attention": ("auto", "triton", "flash_attn", "sdpa", "eager"),
    "layernorm": ("auto", "triton", "torch", "apex"),
    "softmax": ("auto", "triton", "torch"),
    "bias_gelu": ("auto", "triton", "torch"),
    "cross_entropy": ("auto", "triton", "torch"),
}


def sdpa_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, document_ids=None):
    """torch.nn.functional.scaled_dot_product_attention on (batch, heads, seq, head_dim). With
    document_ids it takes a (batch, 1, seq, seq) mask, which rules out SDPA's flash backend."""
    check_qkv(q, k, v)
    dropout_p = check_dropout_p(dropout_p)
    if document_ids is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    check_document_ids(document_ids, q.shape[0], q.shape[2], q.device)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=document_mask(document_ids, causal), dropout_p=dropout_p,
        scale=softmax_scale)


def flash_attn_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0,
                         document_ids=None):
    """The flash-attn package's flash_attn_func, which wants (batch, seq, heads, head_dim);
    with document_ids its flash_attn_varlen_func, each document a sequence of its own."""
    check_qkv(q, k, v)
    dropout_p = check_dropout_p(dropout_p)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q has dtype {q.dtype}; the flash_attn backend supports float16 and "
                        "bfloat16 only; choose kernels.attention=triton or sdpa for float32")
    if document_ids is not None:
        return _flash_attn_documents(q, k, v, causal, softmax_scale, dropout_p, document_ids)
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)
    return out.transpose(1, 2)


_VARLEN = [None, None]    # the last document ids seen, and their (cu_seqlens, longest)


def _document_lengths(document_ids):
    """(cu_seqlens, longest) of the documents of (batch, seq) ids, rows flattened one after
    another: int32 offsets of each document's first token and the end, and the longest one's
    length. Reading them waits for the device, so they are kept for the ids object last seen:
    every layer of a micro-batch gets the same one, and pays nothing after the first."""
    if _VARLEN[0] is not document_ids:
        batch, seq = document_ids.shape
        starts = torch.ones(batch, seq, dtype=torch.bool, device=document_ids.device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first = starts.flatten().nonzero().flatten()
        cu_seqlens = torch.cat([first, first.new_tensor([batch * seq])]).to(torch.int32)
        _VARLEN[:] = document_ids, (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    return _VARLEN[1]


def _flash_attn_documents(q, k, v, causal, softmax_scale, dropout_p, document_ids):
    """flash-attn's flash_attn_varlen_func on (batch, heads, seq, head_dim) q, k, v whose
    tokens belong to the documents of `document_ids`: each document attends within itself."""
    from flash_attn import flash_attn_varlen_func

    batch, heads, seq, head_dim = q.shape
    check_document_ids(document_ids, batch, seq, q.device)
    cu_seqlens, longest = _document_lengths(document_ids)

    def tokens(t):                                    # (batch * seq, heads, head_dim)
        return t.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    out = flash_attn_varlen_func(tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens,
                                 longest, longest, dropout_p=dropout_p,
                                 softmax_scale=softmax_scale, causal=causal)
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


def eager_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, document_ids=None):
    """The `eager` backend: `flash_attention_reference` after `check_qkv` and `check_dropout_p`."""
    check_qkv(q, k, v)
    dropout_p = check_dropout_p(dropout_p)
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[0], q.shape[2], q.device)
    return flash_attention_reference(q, k, v, causal, softmax_scale, dropout_p,
                                     document_ids=document_ids)


def apex_layer_norm(x, weight, bias, eps=1e-5):
    """NVIDIA apex's fused layer norm (FusedLayerNorm's function) over the last dimension."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    check_layer_norm_inputs(x, weight, bias)
    return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


_IMPLEMENTATIONS = {
    "attention": {"triton": flash_attention, "flash_attn": flash_attn_attention,
                  "sdpa": sdpa_attention, "eager": eager_attention},
    "layernorm": {"triton": layer_norm, "torch": layer_norm_torch, "apex": apex_layer_norm},
    "softmax": {"triton": scaled_masked_softmax, "torch": scaled_masked_softmax_torch},
    "bias_gelu": {"triton": bias_gelu, "torch": bias_gelu_torch},
    "cross_entropy": {"triton": cross_entropy, "torch": cross_entropy_torch},
}


def _require_package(needs: tuple[str, ...], backend: str, op: str, device: torch.device,
                     install: str):
    """Raise unless every one of ``needs`` (a module, or "module:attribute") imports and
    ``device`` is CUDA, naming what to do instead. The attribute or a compiled module is asked
    for too: flash-attn and apex import without their CUDA extensions and fail at the first
    call."""
    others = ", ".join(b for b in BACKENDS[op] if b != backend     # those that can run there
                       and (b != "triton" or triton_runs_on(device))
                       and (device.type == "cuda" or b not in ("flash_attn", "apex")))
    for need in needs:
        module, _, attribute = need.partition(":")
        try:
            found = importlib.import_module(module)
            if attribute:
                getattr(found, attribute)
        except (ImportError, AttributeError) as err:
            raise BackendUnavailable(f"kernels.{op}={backend} needs `{need.replace(':', '.')}`, "
                                     f"which does not import ({err}); {install}, or choose one "
                                     f"of: {others}") from err
    if device.type != "cuda":
        raise BackendUnavailable(f"kernels.{op}={backend} runs on CUDA devices only, not {device}; "
                           f"choose one of: {others}")


def _require_triton(op: str, device: torch.device):
    """Raise unless the Triton kernels run on ``device``, naming what to do instead."""
    if triton_runs_on(device):
        return
    others = ", ".join(b for b in BACKENDS[op] if b != "triton"   # those that can run there
                       and (device.type == "cuda" or b not in ("flash_attn", "apex")))
    why = ("the `triton` package is not installed" if not HAS_TRITON else
           f"the Triton kernels cannot run on {device}: they need a CUDA GPU, or "
           "TRITON_INTERPRET=1 set before importing megagpt.kernels (slow; for tests)")
    raise BackendUnavailable(f"kernels.{op}=triton: {why}; choose one of: {others}")


def resolve_backend(op: str, choice: str = "auto", device="cpu") -> str:
    """The concrete backend that ``choice`` means for ``op`` on ``device``.

    Raises ValueError for an unknown op or choice (naming the allowed ones) and RuntimeError for a
    backend that cannot run there (saying what to install or choose instead).
    """
    if op not in BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(BACKENDS)}")
    if choice not in BACKENDS[op]:
        raise ValueError(f"kernels.{op}={choice!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS[op])}")
    device = torch.device(device)
    if choice == "auto":
        if triton_runs_on(device):
            return "triton"
        return "sdpa" if op == "attention" else "torch"
    if choice == "triton":
        _require_triton(op, device)
    elif choice == "flash_attn":
        _require_package(("flash_attn:flash_attn_func",), choice, op, device,
                         "install flash-attn 2 with its CUDA extension on a CUDA machine "
                         "(`pip install flash-attn --no-build-isolation`)")
    elif choice == "apex":
        _require_package(("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda"),
                         choice, op, device,
                         "build NVIDIA apex from source with its CUDA extensions")
    return choice


def get_op(op: str, choice: str = "auto", device="cpu") -> Callable:
    """The function implementing ``op`` with backend ``choice`` on ``device`` (see the module
    docstring for the signatures)."""
    return _IMPLEMENTATIONS[op][resolve_backend(op, choice, device)]

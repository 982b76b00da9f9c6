"""Every kernel compiles for a Hopper GPU (sm_90) with each of its GPU configs, no GPU needed.

The interpreter runs kernels as Python, so it accepts code that Triton's compiler rejects (a
plain global float read inside a kernel, a loop-carried value changing type). This test compiles
the kernels ahead of time for ``GPUTarget("cuda", 90, 32)`` in a subprocess without
``TRITON_INTERPRET`` (where the autotuned kernels hold their GPU configs), with every config the
autotuner may choose, for the dtypes, head dims and row widths the model uses; and reads the PTX
where a kernel's speed depends on how it accesses memory. On a machine with
a GPU the other tests compile and run the kernels for real, so it is skipped there.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _compile(fn, signature, constexprs, num_warps, num_stages=3, odd=()):
    """The compiled kernel; its PTX is ``.asm["ptx"]``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # As a launch with aligned tensors and sizes divisible by 16 specialises them (the sizes
    # named in `odd` excepted).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or (signature[name] == "i32"
                                                    and name not in odd)}
    source = ASTSource(fn, signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _check_cross_entropy_vectorised(ce, fwd_signature, grad_signature):
    """With a row width not divisible by 16 (GPT-2's 50257 classes unpadded) the cross-entropy
    kernels still read (and the gradient kernel still writes) the logits as 16-byte vectors."""
    odd = ("n_cols", "width")
    config = dict(BLOCK_V=4096)
    fwd = _compile(ce._cross_entropy_fwd_kernel, fwd_signature, dict(WEIGHTED=False, **config),
                   8, odd=odd).asm["ptx"]
    grad = _compile(ce._grad_kernel, grad_signature, dict(SCALE_PER_ROW=False, **config), 8,
                    odd=odd).asm["ptx"]
    assert "ld.global.v4.b32" in fwd, "the forward reads an odd-width row element by element"
    assert "ld.global.v4.b32" in grad and "st.global.v4.b32" in grad, \
        "the backward reads or writes an odd-width row element by element"


def _compile_configs(tuned, signature, constexprs):
    """Compile ``tuned`` (an `Autotuned` kernel) with each of its GPU configs."""
    for config in tuned.tuner.configs:
        _compile(tuned.kernel, signature, {**constexprs, **config.kwargs}, config.num_warps,
                 config.num_stages)


def _attention(fa, dtype, head_dim, causal, dropout=False, documents=False):
    p = PTR[dtype]
    constexprs = dict(CAUSAL=causal, DROPOUT=dropout, DOCUMENTS=documents, HEAD_DIM=head_dim,
                      **fa._DOT_OPTIONS[dtype])

    def strides(*prefixes):
        return {f"{prefix}stride_{dim}": "i32" for prefix in prefixes for dim in "bhs"}

    # without dropout (documents) the launcher passes q as the (unread) seed (ids) pointer
    sizes = dict(SEED="*i64" if dropout else p, DOCS="*i32" if documents else p, seq_len="i32",
                 n_heads="i32", sm_scale="fp32", threshold="i32", dropout_scale="fp32")
    for name, signature in (
        ("fwd", dict(Q=p, K=p, V=p, O=p, LSE="*fp32", **sizes, **strides("", "o_"))),
        ("dkdv", dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p, **sizes,
                      **strides("", "do_", "g_"))),
        ("dq", dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p, **sizes,
                    **strides("", "do_", "g_"))),
    ):
        _compile_configs(fa._TUNED[name][fa._precision(dtype)], signature, constexprs)
    _compile(fa._attn_bwd_delta_kernel, dict(O=p, DO=p, DELTA="*fp32", seq_len="i32",
                                             n_heads="i32", **strides("o_", "do_")),
             dict(HEAD_DIM=head_dim, BLOCK_M=64), 4)


def main():
    import triton

    def module(name):
        return importlib.import_module(f"megagpt.kernels.{name}")

    assert not module("_utils").KERNELS_INTERPRETED
    fa, ln, sm, bg, ce = (module(n) for n in ("flash_attention", "layer_norm", "softmax",
                                              "bias_gelu", "cross_entropy"))
    bf16 = PTR[torch.bfloat16]
    for dtype, head_dim, causal, dropout, documents in (
            (torch.bfloat16, 64, True, False, False), (torch.bfloat16, 128, False, False, False),
            (torch.float32, 64, True, False, False), (torch.bfloat16, 64, True, True, False),
            (torch.bfloat16, 64, True, False, True), (torch.bfloat16, 128, False, True, True)):
        _attention(fa, dtype, head_dim, causal, dropout, documents)
    for width in (768, 8192, 65536):  # several rows a program; one row; the longest row
        block_n = triton.next_power_of_2(width)
        _compile_configs(ln._fwd_kernel(block_n),
                         dict(X=bf16, W="*fp32", B="*fp32", Y=bf16, STATS="*fp32", n_rows="i32",
                              n_cols="i32", eps="fp32"), dict(BLOCK_N=block_n))
        _compile_configs(ln._bwd_kernel(block_n),
                         dict(X=bf16, W="*fp32", DY=bf16, STATS="*fp32", DX=bf16,
                              PARTIAL="*fp32", n_rows="i32", n_cols="i32",
                              rows_per_program="i32"), dict(BLOCK_N=block_n))
        _compile_configs(sm._fwd_kernel(block_n),
                         dict(X=bf16, Y=bf16, n_rows="i32", n_cols="i32", sq="i32", scale="fp32"),
                         dict(CAUSAL=True, BLOCK_N=block_n))
        _compile_configs(sm._bwd_kernel(block_n),
                         dict(Y=bf16, DY=bf16, DX=bf16, n_rows="i32", n_cols="i32",
                              scale="fp32"), dict(BLOCK_N=block_n))
    for tanh in (True, False):     # GPT-2's tanh GeLU; the exact one (erf)
        _compile_configs(bg._fwd_kernel, dict(X=bf16, BIAS="*fp32", Y=bf16, n_rows="i32",
                                              n_cols="i32"), dict(TANH=tanh))
        _compile_configs(bg._bwd_kernel,
                         dict(X=bf16, BIAS=bf16, DY=bf16, DX=bf16, DBIAS_PARTIAL="*fp32",
                              n_rows="i32", n_cols="i32", rows_per_program="i32"),
                         dict(TANH=tanh))
    ce_fwd = dict(LOGITS=bf16, TARGET="*i64", WEIGHT="*fp32", LOSS="*fp32", LSE="*fp32",
                  N_VALID="*fp32", n_cols="i32", width="i32", ignore_index="i32")
    ce_grad = dict(LOGITS=bf16, TARGET="*i64", LSE="*fp32", SCALE="*fp32", GRAD=bf16,
                   n_cols="i32", width="i32", vocab_start="i32", ignore_index="i32")
    for weighted in (True, False):
        _compile_configs(ce._fwd_kernel, ce_fwd, dict(WEIGHTED=weighted))
    _compile_configs(ce._shard_stats,
                     dict(LOGITS=bf16, TARGET="*i64", STATS="*fp32", n_cols="i32", width="i32",
                          vocab_start="i32"), {})
    for per_row in (True, False):
        _compile_configs(ce._grad, ce_grad, dict(SCALE_PER_ROW=per_row))
    _check_cross_entropy_vectorised(ce, ce_fwd, ce_grad)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile in the "
                                                      "other tests")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is not here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
    main()

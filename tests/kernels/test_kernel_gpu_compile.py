"""Every kernel compiles for a Hopper GPU (sm_90) with its launcher's GPU options, no GPU needed.

The interpreter runs kernels as Python, so it accepts code that Triton's compiler rejects (a
plain global float read inside a kernel, a loop-carried value changing type). This test compiles
the kernels ahead of time for ``GPUTarget("cuda", 90, 32)`` in a subprocess without
``TRITON_INTERPRET``, for the dtypes and head dims the model uses. On a machine with a GPU the
other tests compile and run the kernels for real, so it is skipped there.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _compile(fn, signature, constexprs, num_warps, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # As a launch with aligned tensors and sizes divisible by 16 specialises them.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or signature[name] == "i32"}
    source = ASTSource(fn, signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


def _attention(fa, dtype, head_dim, causal):
    opts = fa._kernel_options(dtype, head_dim)
    p = PTR[dtype]
    common = dict(CAUSAL=causal, UPCAST=opts["upcast"], DOT_PRECISION=opts["dot_precision"],
                  HEAD_DIM=head_dim)
    for kernel, key, signature in (
        (fa._attn_fwd_kernel, "fwd",
         dict(Q=p, K=p, V=p, O=p, LSE="*fp32", seq_len="i32", sm_scale="fp32")),
        (fa._attn_bwd_dkdv_kernel, "dkdv",
         dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p, seq_len="i32",
              sm_scale="fp32")),
        (fa._attn_bwd_dq_kernel, "dq",
         dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p, seq_len="i32",
              sm_scale="fp32")),
    ):
        block_m, block_n, warps, stages = opts[key]
        _compile(kernel, signature, dict(common, BLOCK_M=block_m, BLOCK_N=block_n), warps, stages)
    _compile(fa._attn_bwd_delta_kernel, dict(O=p, DO=p, DELTA="*fp32", n_rows="i32"),
             dict(HEAD_DIM=head_dim, BLOCK_M=64), 4)


def main():
    import triton

    def module(name):
        return importlib.import_module(f"megagpt.kernels.{name}")

    assert not module("_utils").KERNELS_INTERPRETED
    fa, ln, sm, bg, ce = (module(n) for n in ("flash_attention", "layer_norm", "softmax",
                                              "bias_gelu", "cross_entropy"))
    bf16 = PTR[torch.bfloat16]
    for dtype, head_dim, causal in ((torch.bfloat16, 64, True), (torch.bfloat16, 128, False),
                                    (torch.float32, 64, True)):
        _attention(fa, dtype, head_dim, causal)
    block_n = triton.next_power_of_2(1024)
    _compile(ln._layer_norm_fwd_kernel,
             dict(X=bf16, W="*fp32", B="*fp32", Y=bf16, MEAN="*fp32", RSTD="*fp32", n_rows="i32",
                  n_cols="i32", eps="fp32"), dict(BLOCK_M=4, BLOCK_N=block_n), ln._num_warps(4096))
    _compile(ln._layer_norm_bwd_kernel,
             dict(X=bf16, W="*fp32", DY=bf16, MEAN="*fp32", RSTD="*fp32", DX=bf16,
                  DW_PARTIAL="*fp32", DB_PARTIAL="*fp32", n_rows="i32", n_cols="i32",
                  rows_per_program="i32"), dict(BLOCK_N=block_n), ln._bwd_num_warps(block_n))
    _, block_m, block_n, warps = sm._launch_layout(4096, 1024)
    _compile(sm._softmax_fwd_kernel,
             dict(X=bf16, Y=bf16, n_rows="i32", n_cols="i32", sq="i32", scale="fp32"),
             dict(CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n), warps)
    _compile(sm._softmax_bwd_kernel,
             dict(Y=bf16, DY=bf16, DX=bf16, n_rows="i32", n_cols="i32", scale="fp32"),
             dict(BLOCK_M=block_m, BLOCK_N=block_n), warps)
    _compile(bg._bias_gelu_fwd_kernel,
             dict(X=bf16, BIAS="*fp32", Y=bf16, n_elements="i32", n_cols="i32"),
             dict(BLOCK=bg._fwd_block()), 4)
    block_m, block_n, _, _ = bg._bwd_layout(4096, 3072, torch.device("cpu"))
    _compile(bg._bias_gelu_bwd_kernel,
             dict(X=bf16, BIAS=bf16, DY=bf16, DX=bf16, DBIAS_PARTIAL="*fp32", n_rows="i32",
                  n_cols="i32", rows_per_program="i32"), dict(BLOCK_M=block_m, BLOCK_N=block_n), 4)
    block_v = ce._block_v(50257)
    warps = ce._num_warps(block_v)
    _compile(ce._cross_entropy_fwd_kernel,
             dict(LOGITS=bf16, TARGET="*i64", GRAD=bf16, LOSS="*fp32", N_VALID="*i64",
                  n_cols="i32", width="i32", ignore_index="i32"), dict(BLOCK_V=block_v), warps)
    _compile(ce._shard_stats_kernel,
             dict(LOGITS=bf16, TARGET="*i64", MAX="*fp32", SUMEXP="*fp32", TARGET_LOGIT="*fp32",
                  n_cols="i32", width="i32", vocab_start="i32"), dict(BLOCK_V=block_v), warps)
    _compile(ce._shard_grad_kernel,
             dict(LOGITS=bf16, TARGET="*i64", LSE="*fp32", GRAD_ROW="*fp32", GRAD=bf16,
                  n_cols="i32", width="i32", vocab_start="i32", ignore_index="i32"),
             dict(BLOCK_V=block_v), warps)


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

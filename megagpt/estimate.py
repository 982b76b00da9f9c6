"""What a config costs before launch: exact parameter counts and memory per GPU for a layout.

Parameter counts are analytic here (and the validator cross-checks them against the model built
on the meta device); they are exact for the GPT-2 architecture the model builds (the tied
embedding counted once, the vocabulary unpadded, as GPT-2's 124,439,808 is counted).

Memory per GPU (`estimate_memory`) is the peak of training on the pipeline rank that needs the
most, a sum of named terms, each modelled on what the trainer allocates; tools/bench_memory.py
measures it beside the estimate (BENCHMARKS.md, "Memory estimate against measured peak").

States, held for the whole run, of the parameters this GPU holds (its pipeline stage, its
tensor-parallel slice, the padded vocabulary, the output layer's copy of the tied embedding on the
last stage when pp > 1), as megagpt/parallel/data_parallel.py keeps them:
- weights: the model's parameters, 2 bytes each under bf16/fp16 (Megatron's scheme: the module
  itself is 16-bit), 4 under fp32;
- master weights (bf16/fp16 only): the float32 copy the optimizer updates, 4 bytes, sharded
  over data parallelism by ZeRO-1 (4 / dp, Megatron's distributed optimizer);
- gradients: the float32 gradient buckets, 4 bytes (ZeRO-1 reduce-scatters in place). A
  parameter's 16-bit gradient is added into its bucket and freed once autograd hands it over, so
  these are transient (counted below where they meet a peak);
- optimizer: AdamW's two float32 moments, 8 bytes, sharded over data parallelism by ZeRO-1.
Through DeepSpeed (`parallel.deepspeed_config`) the states follow the ZeRO paper's accounting
instead: float32 master partitions (sharded from stage 1, kept under fp32 too), gradients in the
parameters' dtype (sharded from stage 2), parameters (sharded at stage 3); DeepSpeed's own
communication buckets are not counted.

Activations at their peak, the loss of a micro-batch on the last stage, in the activation dtype
(16-bit under bf16/fp16, the residual stream included; float32 under fp32); what each kernel keeps
is in `KeptBytes`, and depends on the device (`kept_bytes`):
- per block and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"): the two layer norms' inputs, the QKV and fc1 inputs and the two dropout
  masks (replicated under tensor parallelism unless sequence parallelism shards them too); q, k
  and v, the attention output, the GeLU's input and output (divided by tp); and what attention
  adds: a flash kernel each row's float32 log-sum-exp (flash-attn also its output, which the
  projection reads through a re-laid copy); eager attention the s x s
  probabilities (with dropout their mask and the dropped copy), which selective recompute drops;
  torch's SDPA on the CPU with dropout falls back to its math path, which keeps those in float32.
  Full recompute keeps each block's input, plus one block's activations while it is recomputed;
- times the micro-batches a stage keeps alive, as the schedules run them: under 1F1B
  min(pp - stage, m) on stage `stage` with m micro-batches a step; interleaved, the warm-up's
  (pp - stage - 1) * 2 + (vp - 1) * pp forwards of one chunk and one more, over vp (Megatron's
  pp * (1 + (pp - 1) / (pp * vp)) on the first stage), or all m micro-batches (and m losses on the
  last stage) when m = pp, where every forward runs before the first backward;
- the first stage: the embedding's dropout mask;
- the last stage: the final layer norm's input and output, the logits (s x b x V_padded / tp)
  and the output layer's weight gradient; with the torch loss also a float32 copy of the logits
  it keeps as the softmax (the larger of that and the weight gradient: the copy becomes the
  logits' gradient). The fused Triton loss keeps the logits themselves and writes their gradient
  over them: no second logits-sized tensor;
- a stage that is not the last (or, interleaved, holds a chunk that is not): the backward of its
  last block, with every micro-batch in flight alive, the gradient received from the next stage
  and the larger of the MLP's two ffn-wide input gradients (the GeLU's backward) and one of them
  with fc2's weight gradient before its bucket takes it (measured on the CPU, PP 2: within 0.1%;
  3.8% under without this term).

Temporaries after the activations are freed, counted when larger: the float32 square of the
largest gradient in the gradient norm; the embedding's gradient as the backward ends, which with
one pipeline stage autograd sums with the output layer's gradient of the same tied weight (held
since the loss) into a third tensor before handing it on; on the CPU, AdamW's two temporaries per
parameter (torch's for-loop implementation; on CUDA it is fused). On the CPU, adding a 16-bit
gradient into its float32 bucket makes a float32 copy of it first (CUDA converts in the kernel).

On CUDA:
- torch's cuBLAS workspaces, allocated through its caching allocator: one per (cuBLAS handle,
  stream), 32 MiB each on Hopper and newer GPUs (the default `CUBLAS_WORKSPACE_CONFIG` ":4096:8";
  8 MiB + 128 KiB before Hopper, where this overestimates by 48 MiB); the forward (the main
  thread) and the backward (autograd's device thread) hold a handle each; and cuBLASLt's
  workspace (1 MiB, `CUBLASLT_WORKSPACE_SIZE`), which the forward's linear layers use for their
  bias. Measured with torch 2.11 on an H200: 32 + 32 + 1 MiB;
- the first step's peak, when it is the larger (small models): the Triton kernels are tuned on
  their first launch (kernels/_utils.py; not under MEGAGPT_AUTOTUNE=0, where each kernel
  launches its first configuration untimed), and Triton's timing flushes the L2 cache
  through a 256 MiB buffer (plus, for the loss's gradient kernel, which writes over the logits,
  a copy of them it restores after each timing); AdamW's moments do not exist yet. Its largest
  instant is taken at the loss with every activation alive (with one stage the loss's gradient
  kernel is tuned first thing in the backward, before the backward's cuBLAS workspace exists; an
  upper bound under pipelining, whose first micro-batch is tuned with fewer activations alive).

Not included: the CUDA context (about 0.5 GB, outside the allocator), allocator fragmentation
and rounding, NCCL's buffers, `training.cuda_graphs` (the captured graphs' own memory pool; off
in every shipped config), the generators' states (kept on the host), and tensors of a few rows
(the loss and token counts, the layer norms' statistics, the batches' token ids).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megagpt.config import Config, ModelConfig

GiB = 1024 ** 3
MiB = 1024 ** 2
CUBLAS_WORKSPACE_BYTES = 32 * MiB      # torch's default per (handle, stream), Hopper and newer
CUBLAS_HANDLES = 2                     # the forward's thread and autograd's device thread
CUBLASLT_WORKSPACE_BYTES = 1 * MiB     # torch's default CUBLASLT_WORKSPACE_SIZE (1024 KiB)
TRITON_BENCH_FLUSH_BYTES = 256 * MiB   # the buffer triton.testing.do_bench clears the L2 cache with
DEVICES = ("cuda", "cpu")


def triton_autotunes() -> bool:
    """Whether the Triton kernels time their configurations on their first launch: unless
    MEGAGPT_AUTOTUNE is off, read as kernels/_utils.py reads it."""
    return os.environ.get("MEGAGPT_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def layer_parameters(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer block held by one tensor-parallel rank."""
    d, f = m.d_model, m.ffn_size
    layernorms = 2 * 2 * d
    attention = (d * 3 * d + 3 * d) // tp + (d * d) // tp + d   # QKV column-parallel, proj row-parallel
    mlp = (d * f + f) // tp + (f * d) // tp + d                 # fc1 column-parallel, fc2 row-parallel
    return layernorms + attention + mlp


def count_parameters(m: ModelConfig) -> int:
    """Total parameters, the tied embedding counted once, the vocabulary unpadded."""
    embeddings = m.vocab_size * m.d_model + m.seq_length * m.d_model
    return embeddings + m.n_layers * layer_parameters(m) + 2 * m.d_model


def stage_parameters(m: ModelConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters one GPU holds on pipeline rank `pp_rank` (all its virtual chunks), padded vocabulary."""
    vocab_shard = m.padded_vocab_size(tp) // tp * m.d_model
    n = (m.n_layers // pp) * layer_parameters(m, tp)
    if pp_rank == 0:
        n += vocab_shard + m.seq_length * m.d_model
    if pp_rank == pp - 1:
        n += 2 * m.d_model
        if pp > 1:
            n += vocab_shard  # the output layer's copy of the tied embedding
    return n


def largest_parameter(m: ModelConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Elements of the largest parameter tensor one GPU holds on pipeline rank `pp_rank`."""
    sizes = [m.d_model * max(3 * m.d_model, m.ffn_size) // tp]     # QKV, fc1 or fc2
    if pp_rank == 0:
        sizes.append(m.seq_length * m.d_model)
    if pp_rank == 0 or pp_rank == pp - 1:
        sizes.append(m.padded_vocab_size(tp) // tp * m.d_model)     # the tied embedding's shard
    return max(sizes)


@dataclass(frozen=True)
class KeptBytes:
    """Bytes per element of what the backward keeps, for a precision and the kernels that run on
    a device (`kept_bytes`).

    act: the activation dtype (2 under bf16/fp16, 4 under fp32);
    attention: what attention keeps besides q, k and v: "flash" (each row's log-sum-exp), "eager"
        (the s x s probabilities) or "math" (torch's SDPA fallback, which the CPU takes with
        dropout: the probabilities, in float32);
    attention_output_copy: the kernel's output is laid out (batch, s, heads, d) and the
        projection reads a re-laid copy (flash-attn; our Triton kernel and torch's SDPA write
        their output in the layout of q, which the projection reads as it is);
    qkv, softmax, probs: q, k and v; the softmax's output; the probabilities the value product
        reads (a copy when the softmax's output has another dtype);
    dropout_mask, score_mask: a dropout mask on the residual stream and on the probabilities: a
        bool on CUDA, the input's dtype on the CPU (which multiplies by a scaled mask);
    gelu_input: the bias-GeLU's input (float32 in the torch reference);
    fused_loss: the Triton cross-entropy (keeps the logits and writes their gradient over them)
        rather than the torch one (a float32 working copy of the logits);
    triton: some op runs a Triton kernel (tuned on its first launch);
    document_mask: the (b, 1, s, s) document mask a layer keeps under data.reset_attention_mask
        (0: none; SDPA keeps it in the activations' dtype, eager attention as a bool; the
        Triton kernels keep only the (b, s) ids, flash-attn the documents' offsets).
    """
    act: int
    attention: str
    attention_output_copy: bool
    qkv: int
    softmax: int
    probs: int
    dropout_mask: int
    score_mask: int
    gelu_input: int
    fused_loss: bool
    triton: bool
    document_mask: int = 0


def kept_bytes(cfg: Config, device: str = "cuda") -> KeptBytes:
    """What the model keeps for its backward on `device` ("cuda" or "cpu") under
    `training.precision` and `kernels`, resolved as megagpt/kernels/dispatch.py does: `auto` is
    Triton on CUDA (SDPA for attention with dropout, whose Triton path is not timed yet, or a
    head size the Triton kernels lack; the two keep the same but for a document mask) and torch
    on the CPU (SDPA for attention)."""
    from megagpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS

    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {', '.join(DEVICES)}")
    k, cuda = cfg.kernels, device == "cuda"
    act = 2 if cfg.training.precision in ("bf16", "fp16") else 4

    def backend(choice: str) -> str:
        return choice if choice != "auto" else ("triton" if cuda else "torch")

    attention = k.attention
    if attention == "auto":      # as the model's Ops: SDPA with dropout or another head size
        head_dim = cfg.model.d_model // cfg.model.n_heads
        attention = ("triton" if cuda and cfg.model.dropout == 0
                     and head_dim in SUPPORTED_HEAD_DIMS else "sdpa")
    if attention == "eager":
        kind = "eager"
    elif attention == "sdpa" and not cuda and cfg.model.dropout > 0:
        kind = "math"      # the CPU's flash kernel has no dropout; the fallback computes in float32
    else:
        kind = "flash"
    math_path = kind == "math"
    probs = 4 if math_path else act
    softmax = [k.softmax] if kind == "eager" else []       # the softmax kernel serves eager attention
    others = [backend(choice) for choice in [k.layernorm, k.bias_gelu, k.cross_entropy] + softmax]
    return KeptBytes(act=act, attention=kind,
                     attention_output_copy=attention == "flash_attn",
                     qkv=4 if math_path else act,
                     softmax=4 if math_path or backend(k.softmax) == "torch" else act,
                     probs=probs, dropout_mask=1 if cuda else act, score_mask=1 if cuda else probs,
                     gelu_input=4 if backend(k.bias_gelu) == "torch" else act,
                     fused_loss=backend(k.cross_entropy) == "triton",
                     triton=cuda and (attention == "triton" or "triton" in others),
                     document_mask=({"sdpa": act, "eager": 1}.get(attention, 0)   # (math: none)
                                    if cfg.data.reset_attention_mask and not math_path else 0))


def activation_bytes_per_layer(m: ModelConfig, micro_batch: int, tp: int, sequence_parallel: bool,
                               recompute: str, kept: KeptBytes) -> float:
    """Activation memory one block keeps for the backward, for one micro-batch.

    Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes in 16-bit with dropout and eager attention
    (the paper's count, masks of 1 byte); tensor parallelism divides 24 of the 34 (the 10 left are
    the layer-norm inputs, the QKV and fc1 inputs and the dropout masks) unless sequence
    parallelism divides them too. What each attention kernel adds is in `KeptBytes` (with
    data.reset_attention_mask, SDPA's and eager attention's (b, 1, s, s) document mask, whole on
    every tensor-parallel rank); full recompute keeps only the block's input. Without dropout no
    masks or dropped copies are kept.
    """
    s, b, h, a, f = m.seq_length, micro_batch, m.d_model, m.n_heads, m.ffn_size
    act, sb, sbh = kept.act, s * b, s * b * h
    if recompute == "full":
        return act * sbh / (tp if sequence_parallel else 1)
    mask = kept.dropout_mask if m.dropout > 0 else 0
    replicated = 4 * act * sbh + 2 * mask * sbh          # 2 norm inputs, QKV and fc1 inputs, 2 masks
    sharded = (3 * kept.qkv + act) * sbh + (kept.gelu_input + act) * sb * f   # q k v, attention
    scores = 0.0                                                               # output, GeLU in/out
    if kept.attention == "flash":
        sharded += 4 * a * sb + (act * sbh if kept.attention_output_copy else 0)
    elif kept.attention == "math" or recompute != "selective":
        scores = attention_score_bytes(m, micro_batch, tp, kept)
    if kept.attention != "eager" or recompute != "selective":   # (selective recomputes eager's)
        scores += kept.document_mask * b * s * s     # one per micro-batch row, not per head
    if sequence_parallel:
        return (replicated + sharded) / tp + scores
    return replicated + sharded / tp + scores


def attention_score_bytes(m: ModelConfig, micro_batch: int, tp: int, kept: KeptBytes) -> float:
    """The s x s tensors eager (or math-path) attention keeps for one block and micro-batch: the
    softmax's output, the probabilities the value product reads (with dropout the dropped copy,
    else a copy only when the dtype changed) and the dropout mask."""
    if m.dropout > 0:
        per_score = kept.softmax + kept.score_mask + kept.probs
    else:
        per_score = kept.softmax + (kept.probs if kept.probs != kept.softmax else 0)
    return per_score * m.n_heads * m.seq_length ** 2 * micro_batch / tp


def micro_batches_in_flight(cfg: Config, pp_rank: int) -> tuple[float, int]:
    """The micro-batches whose activations pipeline rank `pp_rank` keeps at its peak (in units of
    all its layers), and of those, how many the last stage has run the loss for, as
    megagpt/parallel/pipeline.py schedules them."""
    pp, vp = cfg.parallel.pipeline_parallel_size, cfg.parallel.virtual_pipeline_size
    micro_batches = cfg.training.grad_accumulation_steps
    if pp == 1:
        return 1, 1
    if vp == 1:                                   # 1F1B: the warm-up forwards and one more
        return min(pp - pp_rank, micro_batches), 1
    if micro_batches == pp:                       # interleaved, every forward before a backward
        return micro_batches, micro_batches
    steps = micro_batches * vp                    # interleaved: (micro-batch, chunk) steps
    warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, steps)
    return min(warmup + 1, steps) / vp, 1


@dataclass
class MemoryEstimate:
    """Peak memory per GPU, by term, in bytes (see the module docstring for each)."""
    params_per_gpu: int
    weights: float
    master_weights: float
    gradients: float
    optimizer: float
    activations: float             # at their peak, for the configured recompute
    temporaries: float             # after the activations: gradient norm, embedding gradient, AdamW
    workspace: float               # cuBLAS and cuBLASLt workspaces (CUDA)
    first_step: float              # the first step's peak (Triton's tuning, no AdamW moments yet)
    activations_by_setting: dict   # (recompute, sequence_parallel) -> bytes
    pp_rank: int                   # the pipeline rank with the largest total

    @property
    def states(self) -> float:
        """What is held between steps: weights, master weights, gradients, optimizer state."""
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def later_steps(self) -> float:
        """The peak of every step after the first."""
        return self.states + self.workspace + max(self.activations, self.temporaries)

    @property
    def total(self) -> float:
        return max(self.later_steps, self.first_step)


def estimate_memory(cfg: Config, device: str = "cuda") -> MemoryEstimate:
    """Peak memory per GPU (or, with device="cpu", per CPU process) for the configured layout,
    precision, ZeRO stage, recompute and kernels."""
    m, t, par = cfg.model, cfg.training, cfg.parallel
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    dp = max(1, par.data_parallel_size)
    kept = kept_bytes(cfg, device)
    mixed = t.precision in ("bf16", "fp16")
    act = param_b = kept.act
    zero = par.zero_stage
    deepspeed = par.deepspeed_config is not None
    layers_per_rank = m.n_layers // pp
    s, b, h = m.seq_length, t.batch_size, m.d_model
    sb, sbh = s * b, s * b * m.d_model
    vocab_shard = m.padded_vocab_size(tp) // tp
    logits = act * sb * vocab_shard
    # a 16-bit gradient added into its float32 bucket: on the CPU through a float32 copy
    grad_b = param_b + (4 if mixed and device == "cpu" else 0)

    def activations(pp_rank: int, recompute: str, sp: bool) -> float:
        sp_div = tp if sp else 1
        micro_batches, losses = micro_batches_in_flight(cfg, pp_rank)
        per_mb = layers_per_rank * activation_bytes_per_layer(m, b, tp, sp, recompute, kept)
        if pp_rank == 0 and m.dropout > 0:
            per_mb += kept.dropout_mask * sbh / sp_div         # the embedding's dropout mask
        peak_extras = [0.0]
        if pp_rank == pp - 1:
            # what the loss keeps until its backward, and the final norm's input and output. The
            # fused loss keeps the logits and writes their gradient over them; the torch one
            # keeps a float32 softmax (the logits go), which becomes the gradient.
            output_grad = grad_b * vocab_shard * h
            norm_in_out = act * sbh / sp_div + act * sbh
            if kept.fused_loss:
                kept_by_loss, at_loss = logits, logits + output_grad
            else:
                kept_by_loss = 4 * sb * vocab_shard
                at_loss = logits + max(kept_by_loss, output_grad)
            earlier_losses = (losses - 1) * (norm_in_out + kept_by_loss)
            peak_extras.append(earlier_losses + norm_in_out + at_loss)
        # a block's backward holds the gradient it received and, at the GeLU's backward, the
        # MLP's two ffn-wide input gradients; at fc2's, one of them and fc2's weight gradient
        # before its bucket takes it
        ffn_shard, received = m.ffn_size // tp, act * sbh / sp_div
        mlp_grads = max(2 * act * sb * ffn_shard, act * sb * ffn_shard + grad_b * h * ffn_shard)
        if pp_rank < pp - 1 or par.virtual_pipeline_size > 1:
            # a stage that is not the last (or holds a model chunk that is not: interleaved)
            # peaks in the backward of its last block, holding every micro-batch in flight
            peak_extras.append(received + mlp_grads)
        if recompute == "full":
            # one block recomputed, in its backward: all it keeps without recompute, and that
            # working set, less the GeLU's output, which fc2's backward has freed by then
            peak_extras.append(activation_bytes_per_layer(m, b, tp, sp, "none", kept) + received
                               + mlp_grads - act * sb * ffn_shard)
        elif recompute == "selective" and kept.attention == "eager":
            # the recomputed scores, and in their backward the gradients of the probabilities
            # and of the scores, once the block's MLP backward has freed the GeLU's input and
            # output
            peak_extras.append(attention_score_bytes(m, b, tp, kept)
                               + max(0.0, 2 * act * m.n_heads * s * s * b / tp
                                     - (kept.gelu_input + act) * sb * ffn_shard))
        return micro_batches * per_mb + max(peak_extras)

    def temporaries(pp_rank: int) -> float:
        largest = largest_parameter(m, tp, pp, pp_rank) / (dp if zero >= 1 else 1)
        found = [4 * largest]                                  # the gradient norm's square
        if device == "cpu":
            found.append(2 * 4 * largest)                      # AdamW's for-loop temporaries
        if pp_rank == 0:
            found.append(grad_b * vocab_shard * h)             # the embedding's gradient
            if pp == 1:                                        # + the output layer's, and the sum
                found.append(3 * param_b * vocab_shard * h)
        return max(found)

    def tuning(pp_rank: int) -> float:
        """What Triton's tuning of the first step adds at its largest instant."""
        if not (kept.triton and triton_autotunes()):
            return 0.0
        # the loss's gradient kernel writes over the logits: the tuner copies them to restore
        restored = logits if pp_rank == pp - 1 and kept.fused_loss else 0.0
        return TRITON_BENCH_FLUSH_BYTES + restored

    best = None
    for rank in range(pp):
        n = stage_parameters(m, tp, pp, rank)
        if deepspeed:      # the ZeRO paper's accounting
            weights = param_b * n / (dp if zero >= 3 else 1)
            grads = param_b * n / (dp if zero >= 2 else 1)
            master = 0.0 if not mixed and zero == 0 else 4 * n / (dp if zero >= 1 else 1)
        else:
            weights = param_b * n
            master = 4 * n / (dp if zero >= 1 else 1) if mixed else 0.0
            grads = 4 * n
        optim = 8 * n / (dp if zero >= 1 else 1)
        workspace = 0.0
        if device == "cuda":
            workspace = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES + CUBLASLT_WORKSPACE_BYTES
        acts = activations(rank, t.recompute, par.sequence_parallel and tp > 1)
        first_step = 0.0
        if tuning(rank):
            # measured with tp = 1 and one stage: the loss's gradient kernel is tuned first thing
            # in the backward, before the backward's first matrix multiply creates its cuBLAS
            # workspace; with tp > 1 (never measured) the whole workspace counts, an upper bound
            first_workspace = workspace - (CUBLAS_WORKSPACE_BYTES if tp == 1 else 0)
            first_step = weights + master + grads + first_workspace + acts + tuning(rank)
        est = MemoryEstimate(n, weights, master, grads, optim, acts, temporaries(rank), workspace,
                             first_step, {}, rank)
        if best is None or est.total > best.total:
            best = est
    best.activations_by_setting = {
        (rc, sp): activations(best.pp_rank, rc, sp)
        for rc in ("none", "selective", "full") for sp in ((False, True) if tp > 1 else (False,))}
    return best


def parse_memory(text: str) -> float:
    """'80GB', '80', '80GiB' or '81920MB' to bytes (GB here means GiB, as nvidia-smi reports)."""
    units = {"gib": GiB, "gb": GiB, "g": GiB, "mib": 1024 ** 2, "mb": 1024 ** 2, "m": 1024 ** 2}
    s = text.strip().lower()
    for unit, scale in units.items():
        if s.endswith(unit):
            number, factor = s[: -len(unit)], scale
            break
    else:
        number, factor = s, GiB
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory={text!r}: not a size; write e.g. 80GB or 24GB") from None
    if not 0 < value < math.inf:
        raise ValueError(f"--gpu-memory={text!r}: must be a positive, finite size, e.g. 80GB")
    return value * factor


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GB"


def report(cfg: Config, gpu_memory: float, overridden: bool = False) -> tuple[list[str], list[str]]:
    """A human summary of a validated config and the problems the estimates find.

    The parameter count comes from building the model on the meta device (no memory, no init).

    Problems: `model.estimated_parameters` more than 1% off the exact count (with the command
    line's way to fix it too when the config was `overridden` there, where a model's size is
    often changed for a trial); a layout whose estimated memory per GPU exceeds `gpu_memory`
    bytes.
    """
    from megagpt.model.gpt import count_model_parameters   # imports torch and the kernels

    m, t, par = cfg.model, cfg.training, cfg.parallel
    tp, pp, vp, dp = (par.tensor_parallel_size, par.pipeline_parallel_size,
                      par.virtual_pipeline_size, par.data_parallel_size)
    n = count_model_parameters(m)
    problems = []
    if m.estimated_parameters is None:
        check = "model.estimated_parameters not set"
    else:
        off = abs(m.estimated_parameters - n) / n
        check = f"estimated_parameters {m.estimated_parameters:,}: " + ("ok" if off <= 0.01 else
                                                                        f"{off:.1%} off")
        if off > 0.01:
            problems.append(f"model.estimated_parameters={m.estimated_parameters:,}: differs from the "
                            f"exact count by {off:.1%} (more than 1%); fix: set it to {n:,}"
                            + (f" (on the command line: --model.estimated_parameters={n}, or "
                               f"=null to skip the check)" if overridden else ""))
    gbs = t.batch_size * t.grad_accumulation_steps * dp
    est = estimate_memory(cfg)
    fits = est.total <= gpu_memory
    lines = [
        f"model       {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, MLP {m.ffn_size}, "
        f"context {m.seq_length}, vocabulary {m.vocab_size} (padded to {m.padded_vocab_size(tp)})",
        f"parameters  {n:,} ({check})",
        f"layout      world {par.world_size} = tp {tp} x pp {pp} x dp {dp}"
        + (f", {vp} virtual stages per rank" if vp > 1 else "")
        + (", sequence parallel" if par.sequence_parallel and tp > 1 else "")
        + (f", ZeRO-{par.zero_stage}" if par.zero_stage else "")
        + (f", DeepSpeed {par.deepspeed_config}" if par.deepspeed_config else ""),
        f"batch       micro-batch {t.batch_size} x {t.grad_accumulation_steps} accumulation x dp {dp} "
        f"= {gbs} sequences = {gbs * m.seq_length:,} tokens a step; {t.max_steps:,} steps = "
        f"{_count(gbs * m.seq_length * t.max_steps)} tokens",
        f"memory/GPU  {t.precision}, pipeline rank {est.pp_rank} (largest): "
        f"{est.params_per_gpu:,} parameters; weights {_gb(est.weights)}"
        + (f", master weights {_gb(est.master_weights)}" if est.master_weights else "")
        + f", gradients {_gb(est.gradients)}, optimizer {_gb(est.optimizer)}, "
        + (f"activations {_gb(est.activations)} (recompute {t.recompute})"
           if est.activations >= est.temporaries else
           f"temporaries after the backward {_gb(est.temporaries)} (more than the activations, "
           f"{_gb(est.activations)})")
        + f", cuBLAS workspaces {_gb(est.workspace)}"
        + (f"; the first step (Triton's tuning) {_gb(est.first_step)} is the larger"
           if est.first_step > est.later_steps else "")
        + f" = {_gb(est.total)} of {_gb(gpu_memory)}: " + ("fits" if fits else "does NOT fit"),
        "activations by setting: " + ", ".join(
            f"recompute {rc}{' + SP' if sp else ''} {_gb(v)}"
            for (rc, sp), v in est.activations_by_setting.items()),
    ]
    if not fits:
        problems.append(f"memory: the estimate {_gb(est.total)} per GPU exceeds --gpu-memory "
                        f"{_gb(gpu_memory)}; fix: " + ", ".join(_memory_fixes(cfg, est)))
    return lines, problems


def _memory_fixes(cfg, est: MemoryEstimate) -> list[str]:
    """The settings that would lower this config's estimate, each only where it applies."""
    par, t = cfg.parallel, cfg.training
    fixes = []
    if t.batch_size > 1:
        fixes.append("lower training.batch_size (raise grad_accumulation_steps)")
    if t.recompute != "full":
        fixes.append("set training.recompute=full")
    if par.deepspeed_config is not None:
        if par.data_parallel_size > 1 and par.zero_stage < 3:
            fixes.append(f"a higher ZeRO stage in {par.deepspeed_config} (with parallel.zero_stage "
                         f"to match)")
    else:
        if par.data_parallel_size > 1 and par.zero_stage == 0:
            fixes.append("set parallel.zero_stage=1")   # shards over replicas: none with one
        fixes.append("raise tensor/pipeline parallel sizes")
    if est.first_step > est.later_steps:
        fixes.append("MEGAGPT_AUTOTUNE=0 (no tuning of Triton's launch settings in the first step)")
    return fixes or ["a GPU with more memory, or a smaller model (every setting that saves "
                     "memory is already taken)"]

"""What a config costs before launch: exact parameter counts and memory per GPU for a layout.

Parameter counts are analytic here (and the validator cross-checks them against the model built
on the meta device); they are exact for the GPT-2 architecture the model builds (the tied
embedding counted once, the vocabulary unpadded, as GPT-2's 124,439,808 is counted). Memory per
GPU follows Megatron's accounting:

- weights, gradients and optimizer state from the parameters this GPU holds (its pipeline stage,
  its tensor-parallel slice, the padded vocabulary, the output-layer copy of the tied embedding on
  the last stage when pp > 1), as the trainer keeps them: float32 parameters (plus autocast's
  half copies in bf16/fp16), float32 gradients, AdamW's two float32 moments, the moments sharded
  over data parallelism by ZeRO-1;
- activations per micro-batch from Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models"), for each recompute setting, with and without sequence parallelism,
  times the micro-batches a stage keeps alive under 1F1B (pp - stage on stage `stage`; the
  interleaved schedule adds (pp - 1) / (pp * vp)), plus the logits of the last stage and their
  gradient, which the fused loss writes in its forward while the logits are still alive.

Allocator fragmentation and the CUDA context (about 0.5 GB) are not included.
"""
from __future__ import annotations

from dataclasses import dataclass

from megagpt.config import Config, ModelConfig

GiB = 1024 ** 3


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


def activation_bytes_per_layer(m: ModelConfig, micro_batch: int, tp: int, sequence_parallel: bool,
                               recompute: str, flash: bool, bytes_per_value: int = 2) -> float:
    """Activation memory one block keeps for the backward, for one micro-batch.

    Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes in 16-bit with dropout; tensor parallelism
    divides 24 of the 34 (the 10 left are the replicated layer-norm and dropout inputs) unless
    sequence parallelism divides them too. Flash attention and selective recompute drop the
    a*s^2 term; full recompute keeps only each block's input. Without dropout the masks
    (2*s*b*h, plus a*s^2*b in attention) are not stored.
    """
    s, b, h, a = m.seq_length, micro_batch, m.d_model, m.n_heads
    scale = bytes_per_value / 2
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh * scale / (tp if sequence_parallel else 1)
    dropout = m.dropout > 0
    replicated = 10 - (0 if dropout else 2)
    sharded = 24.0
    scores = 0.0 if (flash or recompute == "selective") else (5 if dropout else 4) * a * s * s * b / tp
    if sequence_parallel:
        per_layer = sbh * (replicated + sharded) / tp
    else:
        per_layer = sbh * (replicated + sharded / tp)
    return (per_layer + scores) * scale


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_by_setting: dict   # (recompute, sequence_parallel) -> bytes
    pp_rank: int                   # the pipeline rank with the largest total

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(cfg: Config) -> MemoryEstimate:
    """Peak memory per GPU for the configured layout, precision, ZeRO stage and recompute."""
    m, t, par = cfg.model, cfg.training, cfg.parallel
    tp, pp, vp = par.tensor_parallel_size, par.pipeline_parallel_size, par.virtual_pipeline_size
    dp = max(1, par.data_parallel_size)
    mixed = t.precision in ("bf16", "fp16")
    act_bytes = 2 if mixed else 4
    # Mixed precision runs under autocast over float32 parameters: 4 bytes of weights plus the
    # 2-byte half copies autocast holds during a step, float32 gradients, AdamW's two moments.
    weight_b, grad_b, optim_b = (6, 4, 8) if mixed else (4, 4, 8)
    zero = par.zero_stage
    flash = cfg.kernels.attention != "eager"
    layers_per_rank = m.n_layers // pp

    def activations(pp_rank: int, recompute: str, sp: bool) -> float:
        in_flight = pp - pp_rank if pp > 1 else 1
        if pp > 1 and vp > 1:
            in_flight *= 1 + (pp - 1) / (pp * vp)
        sb = m.seq_length * t.batch_size
        per_mb = layers_per_rank * activation_bytes_per_layer(
            m, t.batch_size, tp, sp, recompute, flash, act_bytes)
        if pp_rank == 0:
            embedding_out = sb * m.d_model * (act_bytes + (1 if m.dropout > 0 else 0))  # + dropout mask
            per_mb += embedding_out / (tp if sp else 1)
        total = in_flight * per_mb
        if pp_rank == pp - 1:
            total += 2 * sb * m.padded_vocab_size(tp) // tp * act_bytes   # logits and their gradient
            total += sb * m.d_model * act_bytes                        # final layer-norm output
        return total

    best = None
    for rank in range(pp):
        n = stage_parameters(m, tp, pp, rank)
        optim = optim_b * n / (dp if zero >= 1 else 1)
        grads = grad_b * n / (dp if zero >= 2 else 1)
        weights = weight_b * n / (dp if zero >= 3 else 1)
        acts = activations(rank, t.recompute, par.sequence_parallel and tp > 1)
        est = MemoryEstimate(n, weights, grads, optim, acts, {}, rank)
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
    if value <= 0:
        raise ValueError(f"--gpu-memory={text!r}: must be positive, e.g. 80GB")
    return value * factor


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GB"


def report(cfg: Config, gpu_memory: float) -> tuple[list[str], list[str]]:
    """A human summary of a validated config and the problems the estimates find.

    The parameter count comes from building the model on the meta device (no memory, no init).

    Problems: `model.estimated_parameters` more than 1% off the exact count; a layout whose
    estimated memory per GPU exceeds `gpu_memory` bytes.
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
                            f"exact count by {off:.1%} (more than 1%); fix: set it to {n:,}")
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
        f"{est.params_per_gpu:,} parameters; weights {_gb(est.weights)}, gradients "
        f"{_gb(est.gradients)}, optimizer {_gb(est.optimizer)}, activations {_gb(est.activations)} "
        f"(recompute {t.recompute}) = {_gb(est.total)} of {_gb(gpu_memory)}: "
        + ("fits" if fits else "does NOT fit"),
        "activations by setting: " + ", ".join(
            f"recompute {rc}{' + SP' if sp else ''} {_gb(v)}"
            for (rc, sp), v in est.activations_by_setting.items()),
    ]
    if not fits:
        problems.append(f"memory: the estimate {_gb(est.total)} per GPU exceeds --gpu-memory "
                        f"{_gb(gpu_memory)}; fix: lower training.batch_size (raise "
                        f"grad_accumulation_steps), set training.recompute=full, parallel.zero_stage=1, "
                        f"or raise tensor/pipeline parallel sizes")
    return lines, problems

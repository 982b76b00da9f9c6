"""One rank's share of the model and one optimizer step: the 3D-parallel core of the trainer.

`Engine(cfg, state, device)` builds this rank's model chunks (its pipeline stage, or vp chunks
under the interleaved schedule, each split over the tensor-parallel group), wraps each in
`DataParallel`, and owns the optimizer and the loss scaler. `train_step(microbatches, lr)` runs:

    schedule (forward/backward of every micro-batch)  ->  gradient reduction (sp, embedding, dp)
    -> fp16 unscale -> global grad norm (skip the step on every rank if it is not finite)
    -> clip -> optimizer step -> ZeRO-1 all-gather

and returns the global mean loss over the tokens of the whole global batch, the same number on
every rank.

Precision is Megatron's: under bf16 or fp16 the model's parameters and activations are 16-bit
(no autocast), while gradients accumulate and are reduced in float32 and the optimizer updates a
float32 master copy (see `DataParallel`); `master_weights()` exposes those masters under the
parameters' names for checkpoints and weight loading.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagpt.config import Config
from megagpt.model.gpt import build_stage, loss_tokens
from megagpt.parallel.data_parallel import DataParallel, global_grad_norm, scale_grads
from megagpt.parallel.pipeline import P2P, get_forward_backward_func
from megagpt.parallel.state import ParallelState
from megagpt.training.optim import build_optimizer, set_lr
from megagpt.training.precision import make_scaler, param_dtype


@dataclass
class StepResult:
    loss: float            # global mean loss of the batch (nan when not finite or no tokens)
    grad_norm: float | None
    skipped: bool
    tokens: float          # loss tokens in the global batch (their summed loss-mask weights)
    overflow: bool = False   # skipped for fp16 gradients the loss scaler can still scale down


def sum_losses(loss_sums: list[torch.Tensor]) -> float:
    """The micro-batches' loss sums, kept as tensors while they run, summed on the host with one
    device sync: the same float64 left-to-right sum of each value as adding them one by one
    with float(loss_sum) after every micro-batch."""
    if not loss_sums:
        return 0.0
    return sum(torch.cat([x.detach().reshape(-1) for x in loss_sums]).double().tolist())


def to_device(microbatches: list[dict], device: torch.device) -> list[dict]:
    """The micro-batches on `device`; from pinned memory (the trainer's loader pins on CUDA)
    without waiting for the copies: the stream orders them before their use."""
    return [{k: v.to(device, non_blocking=v.is_pinned()) for k, v in mb.items()}
            for mb in microbatches]


class Engine:
    """This rank's model chunks, their gradient reduction, the optimizer and the loss scaler."""

    def __init__(self, cfg: Config, state: ParallelState, device: torch.device | str = "cpu",
                 p2p_timeout_s: float | None = None):
        self.cfg, self.state, self.device = cfg, state, torch.device(device)
        par = cfg.parallel
        dtype = param_dtype(cfg.training.precision)
        self.chunks = [build_stage(cfg, tp_group=state.tp_group, pp_rank=state.pp_rank,
                                   vp_chunk=c, device=self.device)
                       for c in range(par.virtual_pipeline_size)]
        self.wrappers = [DataParallel(chunk, dp_group=state.dp_group, tp_group=state.tp_group,
                                      embedding_group=state.embedding_group,
                                      bucket_size_mb=par.bucket_size_mb, zero_stage=par.zero_stage,
                                      param_dtype=dtype)
                         for chunk in self.chunks]
        self.schedule = get_forward_backward_func(state.pp_world_size, par.virtual_pipeline_size)
        m, tp = cfg.model, state.tp_world_size
        seq = m.seq_length // tp if (par.sequence_parallel and tp > 1) else m.seq_length
        pp = state.pp_world_size
        self.p2p = P2P(pp_rank=state.pp_rank, pp_size=pp,
                       prev_rank=state.pp_ranks[(state.pp_rank - 1) % pp],
                       next_rank=state.pp_ranks[(state.pp_rank + 1) % pp],
                       shape=(seq, cfg.training.batch_size, m.d_model), dtype=dtype,
                       device=self.device,   # gloo's exchange waits as long as a collective
                       timeout_s=p2p_timeout_s or 60 * par.distributed_timeout_minutes)
        named = [np for w in self.wrappers for np in w.optimizer_params()]
        self.optimizer = build_optimizer(named, cfg.training, self.device)
        # what the optimizer steps, in its order: checkpoints keep it beside the state
        self.optimizer_layout = [[name, p.numel()] for name, p in named]
        self.scaler = make_scaler(cfg.training.precision)
        zero = any(w.zero for w in self.wrappers)
        self.norm_group = dist.group.WORLD if zero else state.model_parallel_group
        if cfg.training.cuda_graphs:
            self._capture_block_graphs(dtype)

    def _capture_block_graphs(self, dtype: torch.dtype) -> None:
        """training.cuda_graphs: capture every block's forward and backward as CUDA graphs for
        the training micro-batch shape (torch.cuda.make_graphed_callables: a few warm-up runs,
        which also let Triton tune its kernels, then one capture). In training mode a block then
        replays its graph, one launch instead of dozens; in eval mode it runs as usual. The
        graphs read the parameters where they are, so the optimizer's in-place updates and
        loaded checkpoints reach them; config validation rules out what would break that."""
        if self.device.type != "cuda":
            raise ValueError(f"training.cuda_graphs=true needs a CUDA device, but this rank runs "
                             f"on {self.device}; fix: training.cuda_graphs=false")
        m = self.cfg.model
        blocks = tuple(block for chunk in self.chunks for block in chunk.layers.values())
        shape = (m.seq_length, self.cfg.training.batch_size, m.d_model)
        samples = tuple((torch.randn(shape, device=self.device, dtype=dtype, requires_grad=True),)
                        for _ in blocks)
        for chunk in self.chunks:
            chunk.train()
        torch.cuda.make_graphed_callables(blocks, samples)

    @contextlib.contextmanager
    def master_weights(self, first_replica_reads: bool = False):
        """Inside, the chunks' parameters are their float32 masters (see
        `DataParallel.master_weights`): save `chunk.state_dict()` or load weights here. Under
        ZeRO-1 with 16-bit parameters the masters are gathered from the replicas' shards, so
        every data-parallel replica must enter together; `first_replica_reads`: to data-parallel
        rank 0 only, for reading there (a checkpoint's weights)."""
        with contextlib.ExitStack() as stack:
            for w in self.wrappers:
                stack.enter_context(w.master_weights(first_replica_reads))
            yield

    def global_tokens(self, microbatches: list[dict]) -> float:
        """The tokens counted in the loss of a step's micro-batches (the sum of their loss-mask
        weights), summed over replicas (a collective over the data-parallel group)."""
        local = sum(loss_tokens(mb["labels"], mb.get("loss_mask")) for mb in microbatches)
        count = torch.tensor([local], dtype=torch.float64)
        if self.state.dp_world_size > 1:
            dist.all_reduce(count, group=self.state.dp_group)
        return count.item()

    def _global_loss(self, losses: list, tokens: float) -> float:
        """Sum of the last stage's loss sums over micro-batches and replicas / tokens, on every rank."""
        total = torch.zeros(1, dtype=torch.float64)
        if self.state.is_last_stage:
            total += sum_losses([loss_sum for loss_sum, _ in losses])
            if self.state.dp_world_size > 1:
                dist.all_reduce(total, group=self.state.dp_group)
        if self.state.pp_world_size > 1:
            dist.all_reduce(total, group=self.state.pp_group)   # only the last stage is non-zero
        return total.item() / tokens if tokens else math.nan

    def _to_device(self, microbatches):
        return to_device(microbatches, self.device)

    def train_step(self, microbatches: list[dict], lr: float) -> StepResult:
        """One optimizer step over this rank's micro-batches (dicts of tokens, labels, loss_mask).
        A global batch without a token counted in the loss (every loss_mask 0) is skipped before
        its forward: a StepResult with `tokens` 0, and nothing changed."""
        for chunk in self.chunks:
            chunk.train()
        for w in self.wrappers:
            w.zero_grad()
        tokens = self.global_tokens(microbatches)     # before the copy: no device sync
        if not tokens:             # no loss anywhere in the global batch: nothing to learn from
            return StepResult(math.nan, None, True, 0.0)
        microbatches = self._to_device(microbatches)
        losses = self.schedule(self.chunks, microbatches, p2p=self.p2p,
                               loss_scale=self.scaler.scale / tokens,
                               before_last_backward=[w.start_grad_sync for w in self.wrappers])
        for w in self.wrappers:
            w.finish_grad_sync()
        if self.scaler.scale != 1.0:
            scale_grads(self.wrappers, 1.0 / self.scaler.scale)
        loss = self._global_loss(losses, tokens)
        norm = global_grad_norm(self.wrappers, self.state.tp_rank, self.norm_group)
        finite = math.isfinite(norm) and math.isfinite(loss)
        # fp16: scaled gradients beyond float16's range with a finite loss are what the scaler
        # is for, while it can still lower the scale (Megatron never stops a run on these)
        overflow = (not finite and math.isfinite(loss)
                    and self.scaler.scale > getattr(self.scaler, "min_scale", math.inf))
        self.scaler.update(not finite)
        if not finite:
            return StepResult(loss, None, True, tokens, overflow)
        clip = self.cfg.training.grad_clip
        if clip > 0 and norm > clip:
            scale_grads(self.wrappers, clip / (norm + 1e-6))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        for w in self.wrappers:
            w.after_optimizer_step()
        return StepResult(loss, norm, False, tokens)

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> float:
        """The global mean loss of a batch, without gradients."""
        for chunk in self.chunks:
            chunk.eval()
        tokens = self.global_tokens(microbatches)     # before the copy: no device sync
        microbatches = self._to_device(microbatches)
        losses = self.schedule(self.chunks, microbatches, p2p=self.p2p, forward_only=True)
        return self._global_loss(losses, tokens)

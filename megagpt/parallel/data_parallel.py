"""Data parallelism: gradient buckets reduced across replicas, ZeRO-1, and the global grad norm.

`DataParallel(module, ...)` gives every parameter's gradient a place in a flat float32 bucket.
Buckets hold parameters in reverse order (the order the backward produces their gradients) up to
`bucket_size_mb` (the deferred ones below, grouped by kind); on the last micro-batch
(`start_grad_sync()`, which the schedules call before it) a bucket's reduction is launched
asynchronously as soon as its last gradient arrives, so communication overlaps the rest of the
backward; `finish_grad_sync()` launches what is left and waits. Gradients are summed across
replicas: the schedules already scaled each loss by 1 / (tokens in the global batch).

Parameters whose gradients need a step over another group first sit in buckets of their own,
reduced last, after that step (`pre_reduce`: one collective per kind and bucket, on the bucket's
contiguous range of that kind):
- replicated parameters applied to sequence shards (sequence parallelism): summed over the
  tensor-parallel group;
- the other parameters replicated across the tensor-parallel group (layer norms and row-parallel
  biases without sequence parallelism, the position embedding): every replica computes the same
  gradient in exact arithmetic, but kernels may round differently from rank to rank (Triton's
  autotuner can pick different launch settings on each GPU), and replicas updated with gradients
  that differ in the last bit drift apart for good; tensor-parallel rank 0's gradient is
  broadcast to the others, so the replicas stay identical bit for bit;
- the two copies of the tied word embedding (first and last pipeline stage): summed over the
  embedding group so they stay identical.

Mixed precision (`param_dtype` bfloat16 or float16) is Megatron's: the module's parameters
become 16-bit views of a flat bucket buffer, and a float32 master copy of them (`main_buffer`)
is what the optimizer updates. Each micro-batch's 16-bit gradient is added into the float32
gradient bucket as soon as autograd produces it and then dropped, so gradients accumulate and are
reduced in float32; after the optimizer step the master copy is cast into the 16-bit parameters,
one copy per bucket. `master_weights()` lets the rest of the trainer read and write the float32
masters under the parameters' names (checkpoints hold them, so no precision is lost).

ZeRO-1 (`zero_stage=1`), Megatron's distributed optimizer: a reduce-scatter, in place in each
bucket, leaves each replica the summed gradient of its 1/dp of the bucket; the optimizer holds
state for that shard only (`optimizer_params()` are views of it, named after their parameters);
under bf16/fp16 the float32 masters are that shard too (4/dp bytes a parameter, not 4), and after
the step each replica casts its updated shard into the 16-bit parameters and an all-gather, in
place and in 16 bits, brings every replica the rest (under fp32 the parameters are the float32
buckets, gathered the same way). Reading or loading the masters (`master_weights()`) then
gathers them, so every replica must do it together.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from megagpt.parallel.layers import group_rank, group_size
from megagpt.parallel.mappings import all_gather_single, reduce_scatter_single


_PRE_REDUCE_KINDS = ("tp_sum", "tp_copy", "tied_sum")


@dataclass
class Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    grad_buffer: torch.Tensor
    deferred: bool
    main_buffer: torch.Tensor | None = None      # float32 parameters (ZeRO-1 or 16-bit params): flat,
    main_offset: int = 0                         # or only this replica's shard from main_offset on
    model_buffer: torch.Tensor | None = None     # 16-bit parameters, flat (the module's, when 16-bit)
    grad_shard: torch.Tensor | None = None       # ZeRO-1: this replica's reduced gradients (a view)
    ready: int = 0
    work: object = None
    pieces: list = field(default_factory=list)   # ZeRO-1: (name, shard view, param)


class DataParallel:
    """Gradient buffers and their reduction for one model chunk. See the module docstring."""

    def __init__(self, module: nn.Module, *, dp_group=None, tp_group=None, embedding_group=None,
                 bucket_size_mb: float = 25.0, zero_stage: int = 0,
                 param_dtype: torch.dtype = torch.float32):
        if param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"DataParallel: param_dtype={param_dtype} must be torch.float32, "
                             f"torch.bfloat16 or torch.float16")
        self.module, self.dp_group, self.tp_group = module, dp_group, tp_group
        self.param_dtype, self.low_precision = param_dtype, param_dtype != torch.float32
        self.masters: dict[nn.Parameter, nn.Parameter] = {}    # 16-bit param -> float32 master
        self.main_grads: dict[nn.Parameter, torch.Tensor] = {}  # param -> its float32 gradient slot
        self.embedding_group = embedding_group
        self.dp, self.dp_rank = group_size(dp_group), group_rank(dp_group)
        self.zero = zero_stage >= 1 and self.dp > 1
        self.sharded_masters = self.zero and self.low_precision
        self.sync = False
        self.names = {p: n for n, p in module.named_parameters()}
        tp = group_size(tp_group)
        self.tp_src = dist.get_global_rank(tp_group, 0) if tp > 1 else None
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        # the deferred ones grouped by kind, so each kind is one range of its bucket
        deferred = sorted((p for p in params if self._pre_reduce_kind(p)),
                          key=lambda p: _PRE_REDUCE_KINDS.index(self._pre_reduce_kind(p)))
        regular = [p for p in params if not self._pre_reduce_kind(p)]
        limit = max(1, int(bucket_size_mb * 1024 * 1024 / 4))
        self.buckets: list[Bucket] = []
        for group, is_deferred in ((regular, False), (deferred, True)):
            current: list[nn.Parameter] = []
            for p in group:
                current.append(p)
                if sum(q.numel() for q in current) >= limit:
                    self.buckets.append(self._make_bucket(current, is_deferred))
                    current = []
            if current:
                self.buckets.append(self._make_bucket(current, is_deferred))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _pre_reduce_kind(self, p) -> str | None:
        """Which step over another group p's gradient needs before the data-parallel one (see
        the module docstring), or None."""
        if self._is_tied_embedding(p) and group_size(self.embedding_group) > 1:
            return "tied_sum"
        if group_size(self.tp_group) > 1 and not hasattr(p, "tp_dim"):
            return "tp_sum" if getattr(p, "sequence_parallel", False) else "tp_copy"
        return None

    def _is_tied_embedding(self, p) -> bool:
        return self.names[p] in ("embedding.wte.weight", "output_weight")

    def _make_bucket(self, params, deferred) -> Bucket:
        offsets, total = [], 0
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"{self.names[p]}: DataParallel takes the model in float32 (it "
                                f"makes the {self.param_dtype} copies itself), got {p.dtype}")
            offsets.append(total)
            total += p.numel()
        padded = math.ceil(total / self.dp) * self.dp
        device = params[0].device
        bucket = Bucket(params, offsets, torch.zeros(padded, dtype=torch.float32, device=device), deferred)
        shard = padded // self.dp
        lo_shard = self.dp_rank * shard
        if self.sharded_masters:
            bucket.main_buffer = torch.zeros(shard, dtype=torch.float32, device=device)
            bucket.main_offset = lo_shard
        elif self.zero or self.low_precision:
            bucket.main_buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        if self.low_precision:
            bucket.model_buffer = torch.zeros(padded, dtype=self.param_dtype, device=device)
        if self.zero:
            bucket.grad_shard = bucket.grad_buffer[lo_shard:lo_shard + shard]
        for p, off in zip(params, offsets):
            flat = slice(off, off + p.numel())
            self.main_grads[p] = bucket.grad_buffer[flat].view_as(p)
            lo, hi = off, off + p.numel()     # the part of p whose float32 copy this replica holds
            if self.sharded_masters:
                lo, hi = max(off, lo_shard), min(off + p.numel(), lo_shard + shard)
            if bucket.main_buffer is not None and lo < hi:
                _main(bucket, lo, hi).copy_(p.data.reshape(-1)[lo - off:hi - off])
            if self.low_precision:
                weights = p.data
                p.data = bucket.model_buffer[flat].view_as(p)
                p.data.copy_(weights)
                p.grad = None
                if not self.sharded_masters:
                    master = nn.Parameter(bucket.main_buffer[flat].view_as(p))
                    master.grad, master.source = self.main_grads[p], p
                    self.masters[p] = master
            else:
                p.grad = self.main_grads[p]
                if self.zero:
                    p.data = bucket.main_buffer[flat].view_as(p)
            if self.zero:
                lo, hi = max(off, lo_shard), min(off + p.numel(), lo_shard + shard)
                if lo < hi:
                    piece = nn.Parameter(_main(bucket, lo, hi))
                    piece.grad = bucket.grad_shard[lo - lo_shard:hi - lo_shard]
                    piece.source = p
                    bucket.pieces.append((self.names[p], piece, p))
        return bucket

    @contextlib.contextmanager
    def master_weights(self, first_replica_reads: bool = False):
        """Inside, every parameter holds its float32 master (16-bit parameters only; otherwise
        the parameters are the masters): reading `state_dict()` gives full precision, and what is
        loaded or copied into the parameters lands in the masters and is cast into the 16-bit
        parameters on exit.

        Under ZeRO-1 a replica holds only its shard of the masters: on entry they are gathered,
        a bucket at a time, into host memory (every data-parallel replica must enter together),
        and on exit each replica keeps its shard of what the parameters then hold.
        `first_replica_reads`: only data-parallel rank 0 will read them (a checkpoint's weights):
        they are gathered there alone, the other replicas' parameters stay as they are, and
        nothing written inside is kept."""
        if not self.low_precision:
            yield
            return
        if self.sharded_masters and first_replica_reads:
            with self._masters_on_first_replica():
                yield
            return
        full = {id(b): self._gathered_masters(b) if self.sharded_masters else b.main_buffer
                for b in self.buckets}
        model_views = {}
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                model_views[p] = p.data
                p.data = full[id(b)][off:off + p.numel()].view_as(p)
        try:
            yield
        finally:
            for p, view in model_views.items():
                p.data = view
            for b in self.buckets:
                if self.sharded_masters:
                    shard = b.main_buffer.numel()
                    b.main_buffer.copy_(full[id(b)][b.main_offset:b.main_offset + shard])
                b.model_buffer.copy_(full[id(b)])

    @contextlib.contextmanager
    def _masters_on_first_replica(self):
        """master_weights(first_replica_reads=True) under ZeRO-1: a gather to replica 0."""
        dst = dist.get_global_rank(self.dp_group, 0)
        model_views = {}
        for b in self.buckets:
            pieces = ([torch.empty_like(b.main_buffer) for _ in range(self.dp)]
                      if self.dp_rank == 0 else None)
            dist.gather(b.main_buffer, pieces, dst=dst, group=self.dp_group)
            if self.dp_rank == 0:
                whole = torch.cat(pieces).cpu()
                for p, off in zip(b.params, b.offsets):
                    model_views[p] = p.data
                    p.data = whole[off:off + p.numel()].view_as(p)
        try:
            yield
        finally:
            for p, view in model_views.items():
                p.data = view

    def _gathered_masters(self, b: Bucket) -> torch.Tensor:
        """The bucket's float32 masters from every replica's shard, in host memory."""
        whole = torch.empty(b.grad_buffer.numel(), dtype=torch.float32, device=b.main_buffer.device)
        all_gather_single(whole, b.main_buffer, group=self.dp_group)
        return whole.cpu()

    # ---- gradients ----------------------------------------------------------------------

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad_buffer.zero_()
            for p in b.params:
                if self.low_precision:
                    p.grad = None
                elif p.grad is None or p.grad.data_ptr() != self.main_grads[p].data_ptr():
                    p.grad = self.main_grads[p]

    def start_grad_sync(self) -> None:
        """Launch each bucket's reduction as soon as its gradients are complete (last micro-batch)."""
        self.sync = True
        for b in self.buckets:
            b.ready = 0

    def _adopt_grad(self, p) -> None:
        """Make sure p's gradient lives in the bucket: a 16-bit gradient is added into the
        float32 slot and dropped; a float32 one that autograd put in a new tensor is moved there."""
        slot = self.main_grads[p]
        if p.grad is None:
            return
        if self.low_precision:
            slot.add_(p.grad)
            p.grad = None
        elif p.grad.data_ptr() != slot.data_ptr():
            slot.copy_(p.grad)
            p.grad = slot

    def _on_grad_ready(self, p) -> None:
        b = self.bucket_of[p]
        self._adopt_grad(p)
        if not self.sync or b.deferred:
            return
        b.ready += 1
        if b.ready == len(b.params) and b.work is None:
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        if self.dp == 1:
            b.work = True
            return
        if self.zero:
            b.work = reduce_scatter_single(b.grad_shard, b.grad_buffer, group=self.dp_group,
                                           async_op=True)
        else:
            b.work = dist.all_reduce(b.grad_buffer, group=self.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Reduce every gradient: launch what the backward did not, pre-reduce the deferred
        buckets (tensor-parallel replicas, tied embedding), reduce them, wait for all."""
        for b in self.buckets:
            for p in b.params:
                self._adopt_grad(p)
        for b in self.buckets:
            if not b.deferred and b.work is None:
                self._launch(b)
        for b in self.buckets:
            if b.deferred:
                self._pre_reduce(b)
                self._launch(b)
        for b in self.buckets:
            if b.work is not True and b.work is not None:
                b.work.wait()
            b.work = None
        self.sync = False

    def _pre_reduce(self, b: Bucket) -> None:
        """One collective per kind on the bucket's range of that kind (kinds are contiguous)."""
        ranges: dict[str, list[int]] = {}
        for p, off in zip(b.params, b.offsets):
            lo_hi = ranges.setdefault(self._pre_reduce_kind(p), [off, off])
            lo_hi[1] = off + p.numel()
        for kind, (lo, hi) in ranges.items():
            grads = b.grad_buffer[lo:hi]
            if kind == "tp_sum":
                dist.all_reduce(grads, group=self.tp_group)
            elif kind == "tp_copy":
                dist.broadcast(grads, src=self.tp_src, group=self.tp_group)
            else:
                dist.all_reduce(grads, group=self.embedding_group)

    # ---- optimizer interface ------------------------------------------------------------

    def optimizer_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the optimizer steps, all float32 with their float32
        gradients: the parameters, their masters when the parameters are 16-bit, or under ZeRO-1
        the views of this replica's shard (named after the parameter they belong to; masters
        and pieces have `.source`, the module's parameter)."""
        if self.zero:
            return [(name, piece) for b in self.buckets for name, piece, _ in b.pieces]
        return [(self.names[p], self.masters.get(p, p)) for p in self.module.parameters()
                if p.requires_grad]

    def after_optimizer_step(self) -> None:
        """ZeRO-1: every replica casts its updated shard into the parameters (16-bit) and an
        all-gather brings it the others' shards; 16-bit parameters without ZeRO: cast the
        updated masters into them."""
        for b in self.buckets:
            if self.zero:
                flat = b.model_buffer if self.low_precision else b.main_buffer
                shard = flat.numel() // self.dp
                mine = flat[self.dp_rank * shard:(self.dp_rank + 1) * shard]
                if self.low_precision:
                    mine.copy_(b.main_buffer)
                all_gather_single(flat, mine, group=self.dp_group)
            elif self.low_precision:
                b.model_buffer.copy_(b.main_buffer)

    def norm_grads(self, tp_rank: int) -> list[torch.Tensor]:
        """Gradients that count toward the global norm on this rank, each element counted once
        across the whole world: this replica's shard under ZeRO-1; tensor-parallel replicas
        (layer norms, biases of row-parallel layers) on tensor-parallel rank 0 only; the last
        stage's copy of the tied embedding never (the first stage counts it)."""
        def counted(p) -> bool:
            return (hasattr(p, "tp_dim") or tp_rank == 0) and self.names[p] != "output_weight"

        if self.zero:
            return [piece.grad for b in self.buckets for _, piece, p in b.pieces if counted(p)]
        return [self.main_grads[p] for p in self.module.parameters()
                if p in self.main_grads and counted(p)]


def _main(b: Bucket, lo: int, hi: int) -> torch.Tensor:
    """The float32 copy of the bucket's elements [lo, hi) (within this replica's shard when the
    masters are sharded)."""
    return b.main_buffer[lo - b.main_offset:hi - b.main_offset]


def global_grad_norm(wrappers: list[DataParallel], tp_rank: int, norm_group=None) -> float:
    """The global L2 norm of the gradients across tp, pp and dp, each parameter counted once.

    norm_group: the group over which the counted pieces are disjoint and together complete:
    the model-parallel group (tp x pp) without ZeRO (data-parallel replicas hold the same
    gradients), the world under ZeRO-1. Every rank of that group gets the same value, so a
    non-finite norm is seen, and the step skipped, everywhere at once.
    """
    grads = [g for w in wrappers for g in w.norm_grads(tp_rank)]
    # on this rank's device even when it counts nothing, so every rank reduces on one backend
    device = wrappers[0].buckets[0].grad_buffer.device
    if grads and device.type == "cpu":
        # the CPU's float32 norms sum millions of squares one after another (1.8e-4 off on a
        # 6.4M-element gradient, so the logged norm differed from layout to layout): float64
        total = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
        total = total.square().sum().to(torch.float32)
    elif grads:   # a few fused kernels over all of them (foreach), not two a gradient
        total = torch.stack(torch._foreach_norm(grads)).to(device, torch.float32).square().sum()
    else:
        total = torch.zeros((), dtype=torch.float32, device=device)
    if norm_group is not None and group_size(norm_group) > 1:
        dist.all_reduce(total, group=norm_group)
    return total.sqrt().item()


def scale_grads(wrappers: list[DataParallel], factor: float) -> None:
    """Multiply the gradients the optimizer reads (clipping, fp16 unscaling)."""
    for w in wrappers:
        for b in w.buckets:
            (b.grad_shard if w.zero else b.grad_buffer).mul_(factor)

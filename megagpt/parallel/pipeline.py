"""Pipeline parallelism: activations and gradients between stages, and the schedules.

Schedules are plain functions picked by `get_forward_backward_func(pp, vp)`:

- `forward_backward_no_pipelining`: pp = 1; forward and backward each micro-batch in turn
  (gradient accumulation).
- `forward_backward_1f1b`: pp > 1; after a warm-up of pp - rank - 1 forwards each stage
  alternates one forward and one backward, so a stage keeps at most pp - rank micro-batches of
  activations alive (bubble: (pp - 1) / (m + pp - 1) of the step for m micro-batches).
- `forward_backward_interleaved`: pp > 1 with vp model chunks per rank (Megatron's interleaved
  1F1B); the bubble shrinks by vp at the cost of vp times the point-to-point traffic.

Every schedule takes the same arguments (see `forward_backward_no_pipelining`) and returns, on
the last stage, the (loss_sum, n_tokens) of every micro-batch. The last stage back-propagates
`loss_sum * loss_scale`: the caller passes loss_scale = 1 / (tokens in the global batch), times
the fp16 loss scale, so the gradients are those of the global mean loss and data-parallel
replicas sum them.

Once a stage has sent its output, it keeps only the output's place in the autograd graph (a
`GradientEdge`), not its data: the residual add that ends a chunk needs none of it to
back-propagate, so a stage holds one [s, b, h] less per micro-batch in flight (Megatron frees the
same tensor with `deallocate_output_tensor`).

Point-to-point: stages exchange [s, b, h] tensors (or [s/tp, b, h] under sequence parallelism)
of one known shape and dtype, so nothing but the data travels. Sends and receives of one step are
posted together with `batch_isend_irecv`. On the CPU (gloo) they are waited on with a timeout: a
stage whose peer died or never sends raises an error naming the peer instead of hanging. On CUDA
(NCCL) the wait only orders the compute stream after the transfer, so the host keeps queueing
work (a timed wait would block the host until the transfer ends, every exchange a full
synchronisation, and would also fire while a neighbour compiles its kernels in the first step);
a peer that never answers is caught by the process group's timeout (30 minutes in
pretrain_gpt.py) and NCCL's watchdog.
"""
from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megagpt.data.documents import document_inputs


class PipelineNeighbourError(RuntimeError):
    """A neighbouring pipeline stage died or stopped sending (gloo's timed exchange)."""


@dataclass
class P2P:
    """Exchange of activations with the neighbouring pipeline ranks (a ring: with interleaving the
    last rank feeds the first rank's next chunk)."""

    pp_rank: int
    pp_size: int
    prev_rank: int
    next_rank: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    timeout_s: float = 300.0
    requires_grad: bool = True

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post all sends and receives of one step together, then wait for them.

        Returns (from_prev, from_next): received tensors, or None where nothing was asked."""
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.detach().to(self.dtype).contiguous(), self.next_rank))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.detach().to(self.dtype).contiguous(), self.prev_rank))
        if recv_prev:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank))
        if recv_next:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank))
        if ops:
            works = dist.batch_isend_irecv(ops)
            for work in works:
                if self.device.type == "cuda":
                    work.wait()
                    continue
                started = time.monotonic()
                try:
                    work.wait(datetime.timedelta(seconds=self.timeout_s))
                except RuntimeError as e:
                    peers = ([f"activations from rank {self.prev_rank}"] if recv_prev else []) + \
                            ([f"gradients from rank {self.next_rank}"] if recv_next else [])
                    waited = time.monotonic() - started
                    how = (f"within {self.timeout_s:.0f} s; the neighbouring stage stopped sending"
                           if waited >= 0.9 * self.timeout_s else
                           f"after {waited:.0f} s: the neighbouring stage closed the connection "
                           f"(it died)")
                    raise PipelineNeighbourError(
                        f"pipeline rank {dist.get_rank()}: no "
                        f"{' and '.join(peers) or 'acknowledgement'} {how}; see its log "
                        f"({e})") from e
        if from_prev is not None and self.requires_grad:
            from_prev.requires_grad_()
        return from_prev, from_next


@dataclass
class ScheduleState:
    """Per-call bookkeeping shared by the step helpers."""

    chunks: list
    microbatches: list[dict]
    loss_scale: float
    forward_only: bool
    before_last_backward: list | None
    losses: list = field(default_factory=list)
    forwards: list = field(default_factory=list)
    backwards: list = field(default_factory=list)

    def __post_init__(self):
        self.forwards = [0] * len(self.chunks)
        self.backwards = [0] * len(self.chunks)


def _forward_step(st: ScheduleState, chunk_id: int, input_tensor):
    """Run the next micro-batch of one chunk; returns its output (the scaled loss on the last stage)."""
    chunk = st.chunks[chunk_id]
    mb = st.microbatches[st.forwards[chunk_id]]
    st.forwards[chunk_id] += 1
    x = mb["tokens"] if chunk.spec.pre_process else input_tensor
    documents = document_inputs(mb)
    if not chunk.spec.post_process:
        return chunk(x, **documents)
    loss_sum, n_tokens = chunk(x, mb["labels"], mb.get("loss_mask"), **documents)
    st.losses.append((loss_sum.detach(), n_tokens.detach()))
    return loss_sum * st.loss_scale


def _graph_end(output: torch.Tensor) -> torch.autograd.graph.GradientEdge:
    """Where `output` enters the autograd graph; backward from it needs no data of `output`."""
    return torch.autograd.graph.get_gradient_edge(output)


def _backward_step(st: ScheduleState, chunk_id: int, input_tensor, output, output_grad):
    """Back-propagate one micro-batch of one chunk from its output (the loss on the last stage,
    else the `_graph_end` of the sent output); returns the gradient for its input."""
    if st.backwards[chunk_id] == len(st.microbatches) - 1 and st.before_last_backward:
        st.before_last_backward[chunk_id]()
    st.backwards[chunk_id] += 1
    if output_grad is None:
        output.backward()
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    return None if input_tensor is None else input_tensor.grad


def _state(chunks, microbatches, loss_scale, forward_only, before_last_backward):
    return ScheduleState(list(chunks), microbatches, loss_scale, forward_only, before_last_backward)


def forward_backward_no_pipelining(chunks, microbatches, *, p2p=None, loss_scale=1.0,
                                   forward_only=False, before_last_backward=None):
    """Gradient accumulation over micro-batches on one stage.

    chunks: [the model stage] (a list, as the interleaved schedule has several);
    microbatches: dicts with `tokens`, `labels`, `loss_mask` (b, s) each;
    p2p: unused here (the pipelined schedules need it);
    loss_scale: multiplies each micro-batch's loss sum before backward;
    forward_only: evaluation, no backward;
    before_last_backward: per chunk, a callable run just before that chunk's last backward
      (the data-parallel wrapper starts reducing gradient buckets as they fill).
    Returns [(loss_sum, n_tokens)] per micro-batch on the last stage, [] elsewhere.
    """
    st = _state(chunks, microbatches, loss_scale, forward_only, before_last_backward)
    for _ in microbatches:
        if forward_only:
            with torch.no_grad():
                _forward_step(st, 0, None)
        else:
            _backward_step(st, 0, None, _forward_step(st, 0, None), None)
    return st.losses


def forward_backward_1f1b(chunks, microbatches, *, p2p: P2P, loss_scale=1.0, forward_only=False,
                          before_last_backward=None):
    """One forward, one backward (PipeDream-Flush), one chunk per rank. Arguments as
    `forward_backward_no_pipelining`, plus p2p, this rank's `P2P`."""
    st = _state(chunks, microbatches, loss_scale, forward_only, before_last_backward)
    stage = chunks[0]
    first, last = stage.spec.pre_process, stage.spec.post_process
    m = len(microbatches)
    warmup = m if forward_only else min(p2p.pp_size - p2p.pp_rank - 1, m)
    steady = m - warmup
    grad_ctx = torch.no_grad if forward_only else contextlib.nullcontext
    saved = []

    def recv_forward():
        return None if first else p2p.exchange(recv_prev=True)[0]

    with grad_ctx():
        for _ in range(warmup):
            x = recv_forward()
            out = _forward_step(st, 0, x)
            if not last:
                p2p.exchange(send_next=out)
            if not forward_only:
                saved.append((x, out if last else _graph_end(out)))
            del out
        x = recv_forward() if steady else None
        for i in range(steady):
            out = _forward_step(st, 0, x)
            grad_out = None if last else p2p.exchange(send_next=out, recv_next=True)[1]
            saved.append((x, out if last else _graph_end(out)))
            del out
            x0, out0 = saved.pop(0)
            grad_in = _backward_step(st, 0, x0, out0, grad_out)
            if i == steady - 1:
                x = None
                if not first:
                    p2p.exchange(send_prev=grad_in)
            else:
                x = None if first else p2p.exchange(send_prev=grad_in, recv_prev=True)[0]
        if forward_only:
            return st.losses
        for _ in range(warmup):
            x0, out0 = saved.pop(0)
            grad_out = None if last else p2p.exchange(recv_next=True)[1]
            grad_in = _backward_step(st, 0, x0, out0, grad_out)
            if not first:
                p2p.exchange(send_prev=grad_in)
    return st.losses


def forward_backward_interleaved(chunks, microbatches, *, p2p: P2P, loss_scale=1.0,
                                 forward_only=False, before_last_backward=None):
    """Interleaved 1F1B (Megatron): vp chunks per rank, chunk c of rank r being virtual stage
    c * pp + r. Micro-batches must be a multiple of pp. Arguments as the other schedules."""
    st = _state(chunks, microbatches, loss_scale, forward_only, before_last_backward)
    pp_rank, pp = p2p.pp_rank, p2p.pp_size
    vp, m = len(chunks), len(microbatches)
    if m % pp:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({m}) to be "
                         f"a multiple of the pipeline size ({pp})")
    total = m * vp
    first_rank, last_rank = pp_rank == 0, pp_rank == pp - 1
    if forward_only or m == pp:
        warmup = total
    else:
        warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)
    steady = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    inputs = [[] for _ in range(vp)]
    outputs = [[] for _ in range(vp)]
    output_grads = [[] for _ in range(vp)]
    grad_ctx = torch.no_grad if forward_only else contextlib.nullcontext

    def is_last_virtual(c):
        return last_rank and c == vp - 1

    def is_first_virtual(c):
        return first_rank and c == 0

    def forward(c):
        """Run chunk c's next micro-batch; returns the output to send (None after the loss)."""
        if is_first_virtual(c) and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)              # the first stage reads tokens, not a tensor
        out = _forward_step(st, c, inputs[c][-1])
        if forward_only:                        # evaluation keeps nothing for a backward
            inputs[c].pop()
        elif is_last_virtual(c):
            outputs[c].append(out)
        else:
            outputs[c].append(_graph_end(out))
        return None if is_last_virtual(c) else out

    def backward(c):
        if is_last_virtual(c) and not output_grads[c]:
            output_grads[c].append(None)        # the loss has no incoming gradient
        return _backward_step(st, c, inputs[c].pop(0), outputs[c].pop(0), output_grads[c].pop(0))

    with grad_ctx():
        inputs[0].append(None if first_rank else p2p.exchange(recv_prev=True)[0])
        for k in range(warmup):
            c = chunk_of(k, True)
            send = forward(c)
            next_c = chunk_of(k + 1, True)
            recv_prev = not (first_rank and next_c == 0) and k != total - 1
            if k == warmup - 1 and not forward_only and warmup != total:
                x, g = p2p.exchange(send_next=send, recv_prev=recv_prev, recv_next=not last_rank)
                output_grads[vp - 1].append(g)
            else:
                x, _ = p2p.exchange(send_next=send, recv_prev=recv_prev)
            del send
            inputs[next_c].append(x)
        for k in range(steady):
            fk, bk = k + warmup, k
            fc = chunk_of(fk, True)
            send_out = forward(fc)
            bc = chunk_of(bk, False)
            grad_in = backward(bc)
            send_grad = None if is_first_virtual(bc) else grad_in
            if first_rank:
                next_fc = chunk_of(fk - (pp - 1), True)
                recv_prev = next_fc != vp - 1
                next_fc += 1
            else:
                recv_prev, next_fc = True, chunk_of(fk + 1, True)
            if last_rank:
                next_bc = chunk_of(bk - (pp - 1), False)
                recv_next = next_bc != 0
                next_bc -= 1
            else:
                recv_next, next_bc = True, chunk_of(bk + 1, False)
            if k == steady - 1:
                recv_prev = False
            x, g = p2p.exchange(send_next=send_out, send_prev=send_grad, recv_prev=recv_prev,
                                recv_next=recv_next)
            del send_out
            if recv_prev:
                inputs[next_fc].append(x)
            if recv_next:
                output_grads[next_bc].append(g)
        if forward_only:
            return st.losses
        if warmup == total:
            output_grads[vp - 1].append(None if last_rank else p2p.exchange(recv_next=True)[1])
        for k in range(steady, total):
            c = chunk_of(k, False)
            grad_in = backward(c)
            next_c = chunk_of(k + 1, False)
            recv_next = not (last_rank and next_c == vp - 1) and k != total - 1
            _, g = p2p.exchange(send_prev=None if is_first_virtual(c) else grad_in, recv_next=recv_next)
            output_grads[next_c].append(g)
    return st.losses


def get_forward_backward_func(pp: int, vp: int = 1):
    """The schedule for a pipeline of `pp` ranks with `vp` model chunks each."""
    if pp == 1:
        return forward_backward_no_pipelining
    return forward_backward_interleaved if vp > 1 else forward_backward_1f1b

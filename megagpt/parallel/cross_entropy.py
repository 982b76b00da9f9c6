"""Cross-entropy over logits whose vocabulary is split across the tensor-parallel group.

Each rank holds logits [s, b, V/tp] for its vocabulary slice. The loss needs three reductions
over the group, never the full logits: the max (for stability), the target's logit (only the rank
owning the target id has it) and the sum of exponentials. The backward is local:
softmax - one_hot on each rank's slice. Columns at or beyond the real vocabulary (the padding of
the embedding table) are excluded, so the loss equals the unpadded model's.

Two implementations of the same function: plain torch (works on a float32 copy of the slice,
keeps the float32 softmax for the backward), and, with `fused=True`, the Triton kernels'
building blocks (`cross_entropy_shard_stats` / `cross_entropy_shard_grad`), which read the
logits in their own dtype and in place, keep only the logits and each row's log-sum-exp, and
write the gradient over the logits in the backward (nothing else reads them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megagpt.kernels import cross_entropy_shard_grad, cross_entropy_shard_stats
from megagpt.parallel.layers import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab
        logits = logits.float() if logits.dtype != torch.float32 else logits.clone()  # worked in place
        if start + local_vocab > vocab_size:                       # padding columns
            logits[..., max(vocab_size - start, 0):] = float("-inf")
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(logits_max.unsqueeze(-1))

        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            stats = torch.stack([target_logit, sum_exp])
            dist.all_reduce(stats, group=group)
            target_logit, sum_exp = stats[0], stats[1]
        loss = torch.log(sum_exp) - target_logit

        exp.div_(sum_exp.unsqueeze(-1))                            # softmax, kept for backward
        ctx.save_for_backward(exp, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        start = group_rank(group) * logits.shape[-1]
        local_max, sum_exp, target_logit = cross_entropy_shard_stats(logits, target, start,
                                                                     vocab_size=vocab_size)
        global_max = local_max.clone()
        if group_size(group) > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        stats = torch.stack([target_logit, sum_exp * torch.exp(local_max - global_max)])
        if group_size(group) > 1:
            dist.all_reduce(stats, group=group)
        lse = global_max + torch.log(stats[1])
        ctx.save_for_backward(logits.contiguous(), target, lse)
        ctx.start, ctx.vocab_size, ctx.backward_done = start, vocab_size, False
        return lse - stats[0]

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy(fused=True)'s backward ran twice on "
                               "one forward (retain_graph): the first wrote the gradient over the "
                               "logits; compute the loss again")
        ctx.backward_done = True
        logits, target, lse = ctx.saved_tensors
        grad = cross_entropy_shard_grad(logits, target, ctx.start, lse, grad_row=grad_loss.float(),
                                        vocab_size=ctx.vocab_size, out=logits)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 tp_group=None, fused: bool = False) -> torch.Tensor:
    """Per-token loss (float32, shaped like `target`) from vocab-parallel logits.

    logits: (..., V_padded / tp), this rank's vocabulary slice; target: (...) int64 ids in
    [0, vocab_size); vocab_size: the real vocabulary (columns beyond it are padding). Tokens
    that must not count are removed by the caller's loss mask. fused: use the Triton kernels'
    shard statistics and gradient (where they cannot run, their torch references); its backward
    writes the gradient over the logits (no logits-sized buffer), so nothing may read them after
    the backward, and it runs once a forward.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} disagree on the leading dimensions")
    function = _FusedVocabParallelCrossEntropy if fused else _VocabParallelCrossEntropy
    return function.apply(logits, target, vocab_size, tp_group)

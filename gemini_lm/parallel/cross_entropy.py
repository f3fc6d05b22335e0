"""Cross-entropy over logits split along the vocabulary, without gathering them.

Megatron's recipe: three all-reduces of [tokens]-sized tensors over TP (the max for a
stable softmax, the target logit, which lives on one rank, and the sum of exponentials)
instead of one all-gather of [tokens, vocab] logits. The backward is local: the saved
softmax minus the one-hot target, restricted to this rank's vocabulary slice.

Label smoothing follows Megatron: `label_smoothing` is spread over the other V-1 classes,
which equals PyTorch's `F.cross_entropy(label_smoothing=label_smoothing * V / (V - 1))`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gemini_lm.parallel.mappings import all_reduce_tp
from gemini_lm.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                ps: ParallelState, label_smoothing: float) -> torch.Tensor:
        logits = vocab_parallel_logits.float()  # a new tensor unless already fp32
        if logits is vocab_parallel_logits:
            logits = logits.clone()  # we shift it in place below
        partition_vocab = logits.size(-1)
        vocab_size = partition_vocab * ps.tp_size

        logits_max = all_reduce_tp(logits.amax(dim=-1), ps, dist.ReduceOp.MAX)
        logits.sub_(logits_max.unsqueeze(-1))

        # The target logit: only the rank owning the target id contributes it.
        vocab_start = ps.tp_rank * partition_vocab
        outside = (target < vocab_start) | (target >= vocab_start + partition_vocab)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = all_reduce_tp(predicted.masked_fill(outside, 0.0), ps)

        exp_logits = logits.exp()
        sum_exp = all_reduce_tp(exp_logits.sum(dim=-1), ps)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - predicted

        smoothing = 0.0
        if label_smoothing > 0:
            if vocab_size < 2:
                raise ValueError("label smoothing needs a vocabulary of at least 2")
            smoothing = label_smoothing * vocab_size / (vocab_size - 1)
            # Mean log-probability over the whole vocabulary: a sum over every slice.
            sum_log_probs = all_reduce_tp((logits - log_sum_exp.unsqueeze(-1)).sum(dim=-1), ps)
            loss = (1.0 - smoothing) * loss - smoothing * sum_log_probs / vocab_size

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        ctx.smoothing, ctx.vocab_size = smoothing, vocab_size
        ctx.logits_dtype = vocab_parallel_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - (1 - s) * onehot(target) - s / V
        # In place on the saved softmax, like Megatron, to avoid a second [tokens, vocab]
        # buffer; autograd's version check rejects a second backward through this graph.
        grad = softmax
        on_target = (~outside).to(grad.dtype) * (1.0 - ctx.smoothing)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -on_target.unsqueeze(-1))
        if ctx.smoothing > 0:
            grad.sub_(ctx.smoothing / ctx.vocab_size)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 ps: ParallelState, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token loss (fp32, shape of `target`) from logits [..., vocab / tp] split over TP."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, ps, label_smoothing)

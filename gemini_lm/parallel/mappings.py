"""Megatron's four tensor-parallel regions: autograd functions that communicate over TP.

    copy_to_...    fwd identity         bwd all-reduce       (enters a column-parallel op)
    reduce_from_.. fwd all-reduce       bwd identity         (leaves a row-parallel op)
    scatter_to_... fwd split last dim   bwd all-gather
    gather_from_.. fwd all-gather       bwd split last dim

Each is the identity when tp_size == 1. Every real collective is recorded on
`ps.timeline` (kind, "tp", bytes moved) so GEMINI can schedule checkpoint traffic in
the gaps between them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import divide


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce_tp(tensor: torch.Tensor, ps: ParallelState,
                  op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor over the TP group, recorded on the timeline."""
    if ps.tp_size == 1:
        return tensor
    with peer_failures("TP all-reduce"), ps.timeline.span("all_reduce", "tp", _nbytes(tensor)):
        dist.all_reduce(tensor, op=op, group=ps.tp_group)
    return tensor


def _reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    # All-reduce works in place; reduce a fresh contiguous copy so the caller's tensor,
    # which autograd may have saved elsewhere, never changes under it.
    return all_reduce_tp(x.clone(memory_format=torch.contiguous_format), ps)


def _split_last_dim(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    chunk = divide(x.size(-1), ps.tp_size)
    return x.narrow(-1, ps.tp_rank * chunk, chunk).contiguous()


def _gather_last_dim(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    # A list all-gather rather than all_gather_into_tensor: same call on gloo and NCCL
    # across torch versions. Recorded size: the gathered tensor.
    with peer_failures("TP all-gather"), ps.timeline.span("all_gather", "tp", _nbytes(x) * ps.tp_size):
        dist.all_gather(parts, x, group=ps.tp_group)
    return torch.cat(parts, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
        ctx.ps = ps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce(grad, ctx.ps), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
        return _reduce(x, ps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
        ctx.ps = ps
        return _split_last_dim(x, ps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_last_dim(grad, ctx.ps), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
        ctx.ps = ps
        return _gather_last_dim(x, ps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split_last_dim(grad, ctx.ps), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Identity forward; all-reduce the gradient over TP backward."""
    return x if ps.tp_size == 1 else _CopyToModelParallelRegion.apply(x, ps)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-reduce (sum) over TP forward; identity backward."""
    return x if ps.tp_size == 1 else _ReduceFromModelParallelRegion.apply(x, ps)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return x if ps.tp_size == 1 else _ScatterToModelParallelRegion.apply(x, ps)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's chunk of the gradient backward."""
    return x if ps.tp_size == 1 else _GatherFromModelParallelRegion.apply(x, ps)

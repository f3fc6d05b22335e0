"""One training iteration and one evaluation pass.

An iteration: micro-batches with gradient accumulation (the data-parallel all-reduce
runs only on the last one, overlapped with its backward), then the optimizer update,
the LR schedule, the progress counters, and finally the checkpointer's hook — so the
snapshot taken there is the complete state after iteration `iteration`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from gemini_lm.parallel.comm import peer_failures


@dataclass
class StepOutput:
    loss: torch.Tensor          # mean over this rank's micro-batches (not yet reduced over DP)
    update_successful: bool
    grad_norm: float | None
    loss_scale: float | None
    num_zeros_in_grad: int | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(forward_step: Callable, data_iter: Iterator, model, ddp, optimizer, scheduler,
               progress, *, iteration: int, num_micro_batches: int, global_batch_size: int, ps,
               before_update: Callable[[], None], after_update: Callable[[int], None]) -> StepOutput:
    ps.timeline.begin_iteration(iteration)
    model.train()
    ddp.zero_grad_buffer()
    losses = []
    for i in range(num_micro_batches):
        last = i == num_micro_batches - 1
        batch = _to_device(next(data_iter), ps.device)
        with contextlib.nullcontext() if last else ddp.no_sync():
            loss, _ = forward_step(model, batch)
            # Mean over micro-batches here; the DP all-reduce averages over ranks.
            optimizer.scale_loss(loss / num_micro_batches).backward()
        losses.append(loss.detach())
    ddp.finish_grad_sync()
    ps.timeline.mark_update()   # checkpoint traffic that did not fit in the gaps may go now
    before_update()             # the previous snapshot's copies have read the state
    result = optimizer.step(iteration)
    if result.update_successful:
        scheduler.step()
    progress.iteration = iteration
    progress.consumed_samples += global_batch_size
    ps.timeline.end_iteration()
    after_update(iteration)
    return StepOutput(torch.stack(losses).mean(), result.update_successful,
                      None if result.grad_norm is None else float(result.grad_norm),
                      result.loss_scale, result.num_zeros_in_grad)


def reduce_mean_over_dp(value: torch.Tensor, ps) -> float:
    """The global mean of a per-rank mean (every DP rank saw the same number of samples)."""
    t = value.detach().float().reshape(1).clone()
    if ps.dp_size > 1:
        with peer_failures("DP loss all-reduce"):
            dist.all_reduce(t, group=ps.dp_group)
        t /= ps.dp_size
    return float(t)


@torch.no_grad()
def evaluate(forward_step: Callable, data_iter_factory: Callable[[], Iterator], model, *,
             eval_iters: int, num_micro_batches: int, ps) -> float | None:
    """Mean validation loss over the same `eval_iters` global batches every time."""
    data_iter = data_iter_factory()
    if data_iter is None:
        return None
    model.eval()
    losses = []
    try:
        for _ in range(eval_iters * num_micro_batches):
            loss, _ = forward_step(model, _to_device(next(data_iter), ps.device))
            losses.append(loss.float())
    except StopIteration:
        pass
    model.train()
    if not losses:
        return None
    return reduce_mean_over_dp(torch.stack(losses).mean(), ps)

"""Data-parallel gradient sync in the style of megatron/core: flat buffers, buckets, overlap.

Every trainable parameter gets `param.main_grad`, a view into one contiguous gradient
buffer (fp32 by default, whatever the parameter dtype), so bf16/fp16 models accumulate
micro-batches in fp32 and the optimizer reads gradients without another copy.

The buffer is cut into buckets of about `bucket_size_mb`. Parameters are laid out in
reverse registration order, roughly the order backward produces their gradients, so the
buckets fill one after another while backward runs. When the last gradient of a bucket
has been accumulated, its all-reduce is launched asynchronously on the DP group and
overlaps the rest of backward; `finish_grad_sync()` waits for all of them.

With `use_distributed_optimizer` (ZeRO-1, training/distrib_optimizer.py) the parameters
also move into one flat `param_buffer` laid out like the gradient buffer and padded to a
multiple of the DP size: DP rank r owns the contiguous range `shard_range(r)` of both, and
the updated parameters come back with one all-gather into that buffer
(`start_param_sync()`). The gradients are still all-reduced, not reduce-scattered (see
distrib_optimizer.py for why). With `overlap_param_gather` (`--overlap-param-gather`) that
all-gather is launched asynchronously and waited for by `finish_param_sync()`, which a
forward pre-hook on the module calls, as Megatron's does: whatever runs between the update
and the next forward (the GEMINI snapshot, logging, the next batch's loading) overlaps it.
Every other reader of the whole params calls finish_param_sync() itself (distrib_optimizer.py).

Every bucket all-reduce and the param all-gather are recorded on `ps.timeline` (group
"dp"), from the launch to the moment `wait()` returns: the host cannot know they finished
any earlier, so the span errs on the side of "busy", which is the safe side for GEMINI's
traffic scheduler. An overlapped all-gather is recorded where it is waited for, so it
counts as a collective of the iteration whose forward waits (its span then starts before
that iteration did), and every rank sees the same timeline points in program order.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from gemini_lm.errors import PeerLostError
from gemini_lm.parallel import comm
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.state import ParallelState


class _Bucket:
    """Parameters whose gradients are all-reduced together as one slice of the buffer."""

    def __init__(self, index: int, params: list[nn.Parameter], data: torch.Tensor):
        self.index = index
        self.params = params
        self.data = data                      # flat view into the grad buffer
        self.ready: set[int] = set()          # id() of params whose grad is final this step
        self.launched = False
        self.handle = None                    # async work while the all-reduce is in flight
        self.launch_time = 0.0                # time.perf_counter() at launch


class DistributedDataParallel(nn.Module):
    """Wraps `module`; forward is the module's. Gradients end up in `param.main_grad`,
    averaged over the data-parallel group once `finish_grad_sync()` returns.

    Wrap after moving the module to its device and dtype: the buffer and the main_grad
    views are made here, for the parameters as they are now."""

    def __init__(self, module: nn.Module, ps: ParallelState, *, bucket_size_mb: float = 25.0,
                 grad_dtype: torch.dtype = torch.float32, use_distributed_optimizer: bool = False,
                 overlap_param_gather: bool = False):
        super().__init__()
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}")
        if overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs use_distributed_optimizer")
        self.module = module
        self.ps = ps
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("module has no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"parameters live on several devices: {sorted(map(str, devices))}")

        total = sum(p.numel() for p in self.params)
        self.grad_buffer = torch.zeros(total, dtype=grad_dtype, device=self.params[0].device)
        bucket_numel = max(1, int(bucket_size_mb * 2 ** 20) // self.grad_buffer.element_size())

        # Lay params out back to front; close a bucket once it reaches bucket_numel.
        # A parameter is never split across buckets.
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self.param_range: dict[int, tuple[int, int]] = {}   # id(param) -> [start, end) in the buffers
        members: list[nn.Parameter] = []
        start = offset = 0
        for p in reversed(self.params):
            p.main_grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if offset - start >= bucket_numel or offset == total:
                bucket = _Bucket(len(self.buckets), members, self.grad_buffer[start:offset])
                self.buckets.append(bucket)
                self._bucket_of.update({id(q): bucket for q in members})
                members, start = [], offset

        self.param_buffer = self._make_param_buffer(total) if use_distributed_optimizer else None
        self.overlap_param_gather = overlap_param_gather
        self._param_handle = None        # the param all-gather in flight (overlap_param_gather)
        self._param_input = None         # its input, alive until it completes
        self._param_launch_time = 0.0
        if overlap_param_gather:
            # Every forward (training and evaluation alike) waits for the params first.
            module.register_forward_pre_hook(lambda _module, _args: self.finish_param_sync())

        self._sync_enabled = True
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                              for p in self.params]

    @torch.no_grad()
    def _make_param_buffer(self, total: int) -> torch.Tensor:
        """Move every param into one flat buffer (params become views of it), so the
        distributed optimizer's all-gather lands directly in the model."""
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"the distributed optimizer needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.shard_size = -(-total // self.ps.dp_size)   # ceil: the last shard is padded
        buffer = torch.zeros(self.shard_size * self.ps.dp_size, dtype=dtypes.pop(), device=self.params[0].device)
        for p in self.params:
            start, end = self.param_range[id(p)]
            buffer[start:end].copy_(p.detach().reshape(-1))
            p.data = buffer[start:end].view_as(p)
        return buffer

    def shard_range(self, dp_rank: int) -> tuple[int, int]:
        """[start, end) of the buffers that `dp_rank` owns under the distributed optimizer."""
        total = self.grad_buffer.numel()
        return min(dp_rank * self.shard_size, total), min((dp_rank + 1) * self.shard_size, total)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def start_param_sync(self, force_sync: bool = False) -> None:
        """Distributed optimizer: all-gather every DP rank's owned range of param_buffer into
        every rank's buffer, after the ranks updated their ranges. Blocking unless
        overlap_param_gather (and not `force_sync`): then finish_param_sync() waits."""
        if self.ps.dp_size == 1:
            return
        self.finish_param_sync()   # one at a time: a second launch would race the first's writes
        size, rank = self.shard_size, self.ps.dp_rank
        # The input must not alias the output; the clone holds exactly the bytes the
        # all-gather writes back into this rank's own range.
        self._param_input = self.param_buffer[rank * size:(rank + 1) * size].clone()
        self._param_launch_time = time.perf_counter()
        with peer_failures("DP param all-gather"):
            self._param_handle = all_gather_into_tensor(self.param_buffer, self._param_input,
                                                        self.ps.dp_group, async_op=True)
        if force_sync or not self.overlap_param_gather:
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        """Wait for the param all-gather in flight, if any; recorded on the timeline here.
        Idempotent: a no-op when nothing is in flight."""
        handle = self._param_handle
        if handle is None:
            return
        self._param_handle = None
        ok = False
        try:
            comm.wait(handle, "DP param all-gather")
            ok = True
        finally:   # a failed one is recorded, but it is no timeline point (as timeline.span)
            self._param_input = None
            nbytes = self.param_buffer.numel() * self.param_buffer.element_size()
            self.ps.timeline.record("all_gather", "dp", nbytes, self._param_launch_time,
                                    time.perf_counter(), point=ok)

    def abandon_param_sync(self) -> None:
        """A peer failed: the group of an all-gather in flight is about to be destroyed.
        Wait for it first, so that it no longer writes into param_buffer when the restore
        does: it completes, or fails at once because its peer is gone (on CUDA the wait
        orders the current stream after it; the abort then ends it). Its failure is the
        one being recovered from; the restore rewrites every param."""
        handle, self._param_handle = self._param_handle, None
        try:
            if handle is not None:
                comm.wait(handle, "DP param all-gather")
        except PeerLostError:
            pass
        finally:
            self._param_input = None

    @torch.no_grad()
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        # Called by autograd once param.grad holds this backward's complete gradient.
        bucket = self._bucket_of[id(param)]
        if bucket.launched:
            raise RuntimeError(
                "a gradient arrived for a bucket whose all-reduce was already launched: call "
                "zero_grad_buffer() after each step and wrap all but the last micro-batch in no_sync()")
        param.main_grad.add_(param.grad)
        param.grad = None   # main_grad is the gradient from here on; free the temporary
        if not self._sync_enabled:
            return
        bucket.ready.add(id(param))
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.launched = True
        if self.ps.dp_size == 1:
            return
        # Divide before summing, as Megatron does: the sum is then already the mean and a
        # low-precision buffer cannot overflow in the reduction.
        bucket.data.div_(self.ps.dp_size)
        bucket.launch_time = time.perf_counter()
        with peer_failures("DP gradient all-reduce"):
            bucket.handle = dist.all_reduce(bucket.data, group=self.ps.dp_group, async_op=True)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: backward passes inside only accumulate into main_grad."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Launch buckets that are not launched yet (e.g. holding unused params), then wait
        for every all-reduce. Idempotent until the next zero_grad_buffer()."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                comm.wait(bucket.handle, "DP gradient all-reduce")
                self.ps.timeline.record("all_reduce", "dp",
                                        bucket.data.numel() * bucket.data.element_size(),
                                        bucket.launch_time, time.perf_counter())
                bucket.handle = None

    def abandon_grad_sync(self) -> None:
        """A peer failed mid-step: drop the all-reduces in flight (their group is gone)."""
        for bucket in self.buckets:
            bucket.handle = None
        self.zero_grad_buffer()

    def zero_grad_buffer(self) -> None:
        """Zero every main_grad and re-arm the buckets for the next step."""
        if any(b.handle is not None for b in self.buckets):
            raise RuntimeError("zero_grad_buffer() while all-reduces are in flight: "
                               "call finish_grad_sync() first")
        self.grad_buffer.zero_()
        for p in self.params:
            p.grad = None
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.launched = False


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """dist.all_gather_into_tensor; torch 2.13 renamed it all_gather_single (and deprecated
    the old name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)

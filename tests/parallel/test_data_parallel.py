"""DistributedDataParallel: DP=2 equals DP=1 with accumulation; buckets overlap backward."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.timeline import CollectiveTimeline
from tests.dist import run_ranks


GLOBAL_BATCH = 8
BUCKET_MB = 64 * 4 / 2 ** 20   # 64 fp32 elements: one bucket per layer of the model below


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_BATCH, 8, generator=g).to(dtype),
            torch.randn(GLOBAL_BATCH, 4, generator=g).to(dtype))


def _single_process_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


def _train_grads(ddp: DistributedDataParallel, x: torch.Tensor, y: torch.Tensor,
                 micro_batches: int) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over `x` in `micro_batches` accumulation steps."""
    ddp.zero_grad_buffer()
    for i, (xb, yb) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
        last = i == micro_batches - 1
        ddp.ps.timeline.begin_iteration(i)
        with contextlib.nullcontext() if last else ddp.no_sync():
            loss = nn.functional.mse_loss(ddp(xb).float(), yb.float()) / micro_batches
            loss.backward()
        if last:
            ddp.finish_grad_sync()
        ddp.ps.timeline.end_iteration()
    return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}


CONFIGS = [("float32", 1), ("float32", 2), ("bfloat16", 2)]   # (param dtype, micro-batches per rank)


def _dp_run(ps: ParallelState, rank: int, world_size: int, dtype_name: str, micro_batches: int):
    dtype = getattr(torch, dtype_name)
    ps.timeline = CollectiveTimeline()
    ddp = DistributedDataParallel(_model(dtype), ps, bucket_size_mb=BUCKET_MB)
    x, y = _data(dtype)
    n = GLOBAL_BATCH // world_size
    grads = _train_grads(ddp, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n], micro_batches)
    spans = [[(s.kind, s.group, s.nbytes) for s in it.spans] for it in ps.timeline.iterations()]
    bucket_bytes = sorted(b.data.numel() * b.data.element_size() for b in ddp.buckets)
    main_dtypes = {str(p.main_grad.dtype) for p in ddp.module.parameters()}
    # numpy, not tensors: tensors travel through shared memory that dies with the rank
    return {k: v.numpy() for k, v in grads.items()}, spans, bucket_bytes, main_dtypes


def _overlap_run(ps: ParallelState):
    ps.timeline = CollectiveTimeline()
    model = _model()
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=BUCKET_MB)
    # Runs after DDP's own hook: when did each param's gradient become final?
    ready_times: list[float] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: ready_times.append(ps.timeline.now()))
    x, y = _data(torch.float32)
    ps.timeline.begin_iteration(0)
    nn.functional.mse_loss(ddp(x), y).backward()
    backward_done = ps.timeline.now()
    time.sleep(0.05)   # the spans must end at wait(), not before
    ddp.finish_grad_sync()
    ps.timeline.end_iteration()
    spans = ps.timeline.iterations()[-1].spans
    return ([(s.start, s.end) for s in spans if s.group == "dp"], max(ready_times),
            backward_done, len(ddp.buckets))


def _ranks_body(rank: int, world_size: int):
    # One spawn for every multi-rank check: starting ranks costs seconds, the checks do not.
    ps = ParallelState.initialize(tp_size=1)
    return {"dp": {cfg: _dp_run(ps, rank, world_size, *cfg) for cfg in CONFIGS},
            "overlap": _overlap_run(ps)}


@pytest.fixture(scope="module")
def dp2_results(tmp_path_factory):
    return run_ranks(_ranks_body, world_size=2, tmp_path=tmp_path_factory.mktemp("dp2"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name,micro_batches", CONFIGS)
def test_dp2_equals_dp1_with_accumulation(dp2_results, dtype_name, micro_batches):
    dtype = getattr(torch, dtype_name)
    # Reference: one process, the whole global batch as 2 * micro_batches micro-batches.
    ref = DistributedDataParallel(_model(dtype), _single_process_state(), bucket_size_mb=BUCKET_MB)
    assert len(ref.buckets) == 4
    expected = _train_grads(ref, *_data(dtype), micro_batches=2 * micro_batches)

    for result in dp2_results:
        grads, spans, bucket_bytes, main_dtypes = result["dp"][(dtype_name, micro_batches)]
        assert main_dtypes == {"torch.float32"}   # fp32 accumulation even for bf16 params
        for name, g in expected.items():
            torch.testing.assert_close(torch.from_numpy(grads[name]), g, rtol=0, atol=1e-6, msg=name)
        # Micro-batches under no_sync() communicate nothing; the last one all-reduces
        # every bucket exactly once, each recorded as a "dp" span of the bucket's size.
        assert len(spans) == micro_batches
        assert all(s == [] for s in spans[:-1])
        assert sorted(nbytes for kind, group, nbytes in spans[-1]
                      if (kind, group) == ("all_reduce", "dp")) == bucket_bytes
        assert len(spans[-1]) == len(bucket_bytes)


@pytest.mark.slow
def test_buckets_launch_during_backward(dp2_results):
    for result in dp2_results:
        spans, last_ready, backward_done, n_buckets = result["overlap"]
        assert len(spans) == n_buckets == 4
        first_launch = min(start for start, _ in spans)
        # The first bucket went out while backward was still producing gradients.
        assert first_launch < last_ready <= backward_done
        assert all(end >= backward_done + 0.05 for _, end in spans)


def test_dp1_same_buffers_no_communication():
    ps = _single_process_state()
    ddp = DistributedDataParallel(_model(), ps, bucket_size_mb=BUCKET_MB)
    x, y = _data(torch.float32)
    grads = _train_grads(ddp, x, y, micro_batches=1)
    plain = _model()
    nn.functional.mse_loss(plain(x), y).backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in ddp.module.parameters())   # moved into main_grad
    assert all(it.spans == [] for it in ps.timeline.iterations())
    # Every param has a disjoint slice of one buffer, laid out back to front.
    params = list(ddp.module.parameters())
    assert params[-1].main_grad.data_ptr() == ddp.grad_buffer.data_ptr()
    assert sum(b.data.numel() for b in ddp.buckets) == ddp.grad_buffer.numel()
    ddp.zero_grad_buffer()
    assert ddp.grad_buffer.abs().sum() == 0


def test_backward_after_sync_without_zeroing_raises():
    ddp = DistributedDataParallel(_model(), _single_process_state(), bucket_size_mb=BUCKET_MB)
    x, y = _data(torch.float32)
    nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    with pytest.raises(RuntimeError, match="zero_grad_buffer"):
        nn.functional.mse_loss(ddp(x), y).backward()

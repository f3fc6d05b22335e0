"""The four TP region functions against the math they stand for, on 2 gloo ranks."""
import pytest
import torch
from torch.testing import assert_close

from gemini_lm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from gemini_lm.parallel.state import ParallelState
from tests.dist import run_ranks


def _rand(seed: int, *shape) -> torch.Tensor:
    """Reproducible from the seed alone, so any rank can compute any rank's tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _regions_body(rank: int, world_size: int):
    ps = ParallelState.initialize(tp_size=2)
    ps.timeline.begin_iteration(0)

    # copy: fwd identity, bwd sum of every rank's gradient.
    x = _rand(0, 3, 4).requires_grad_()
    y = copy_to_tensor_model_parallel_region(x, ps)
    assert_close(y, x, rtol=0, atol=0)
    y.backward(_rand(10 + rank, 3, 4))
    assert_close(x.grad, _rand(10, 3, 4) + _rand(11, 3, 4))

    # reduce: fwd sum over ranks (input untouched), bwd identity.
    x = _rand(20 + rank, 3, 4).requires_grad_()
    x_before = x.detach().clone()
    y = reduce_from_tensor_model_parallel_region(x, ps)
    assert_close(y, _rand(20, 3, 4) + _rand(21, 3, 4))
    assert_close(x.detach(), x_before, rtol=0, atol=0)
    g = _rand(30 + rank, 3, 4)
    y.backward(g)
    assert_close(x.grad, g, rtol=0, atol=0)

    # scatter: fwd keeps this rank's half of the last dim, bwd all-gathers the halves.
    x = _rand(40, 3, 4).requires_grad_()
    y = scatter_to_tensor_model_parallel_region(x, ps)
    assert_close(y, x.detach()[:, 2 * rank:2 * rank + 2], rtol=0, atol=0)
    y.backward(_rand(50 + rank, 3, 2))
    assert_close(x.grad, torch.cat([_rand(50, 3, 2), _rand(51, 3, 2)], dim=-1), rtol=0, atol=0)

    # gather: fwd concatenates every rank's tensor (non-contiguous input), bwd splits.
    x = _rand(60 + rank, 2, 3).t().requires_grad_()          # [3, 2], a transposed view
    y = gather_from_tensor_model_parallel_region(x, ps)
    expected = torch.cat([_rand(60 + r, 2, 3).t() for r in range(2)], dim=-1)
    assert_close(y, expected, rtol=0, atol=0)
    g = _rand(70, 3, 4)
    y.backward(g)
    assert_close(x.grad, g[:, 2 * rank:2 * rank + 2], rtol=0, atol=0)

    ps.timeline.end_iteration()
    (it,) = ps.timeline.iterations()
    return [(s.kind, s.group, s.nbytes, s.start <= s.end) for s in it.spans]


@pytest.mark.slow
def test_regions_match_math_and_record_tp_collectives(tmp_path):
    spans = run_ranks(_regions_body, world_size=2, tmp_path=tmp_path)
    expected = [
        ("all_reduce", "tp", 3 * 4 * 4, True),   # copy backward
        ("all_reduce", "tp", 3 * 4 * 4, True),   # reduce forward
        ("all_gather", "tp", 3 * 4 * 4, True),   # scatter backward: the gathered bytes
        ("all_gather", "tp", 3 * 4 * 4, True),   # gather forward
    ]
    assert spans == [expected, expected]


def test_regions_are_identity_without_tp():
    ps = ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                       tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])
    ps.timeline.begin_iteration(0)
    x = torch.randn(2, 3, requires_grad=True)
    regions = (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
               scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region)
    for region in regions:
        assert region(x, ps) is x
    ps.timeline.end_iteration()
    assert ps.timeline.iterations()[0].spans == []

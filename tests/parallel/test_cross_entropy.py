"""Vocab-parallel cross-entropy vs F.cross_entropy on the full logits (values and grads)."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gemini_lm.parallel.cross_entropy import vocab_parallel_cross_entropy
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import shard_tensor
from tests.dist import run_ranks

VOCAB = 8


def _rand(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float):
    """PyTorch's loss with Megatron's smoothing convention (mass spread over V-1 classes)."""
    eps = label_smoothing * VOCAB / (VOCAB - 1)
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none",
                           label_smoothing=eps).view(target.shape)


def _check(ps: ParallelState, label_smoothing: float, dtype: torch.dtype, scale: float) -> None:
    full = (scale * _rand(0, 3, 5, VOCAB)).to(dtype).requires_grad_()
    target = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    target[0] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1, 1])  # both ranks' edges
    local = shard_tensor(full.detach(), -1, ps.tp_rank, ps.tp_size).requires_grad_()
    before = local.detach().clone()

    loss = vocab_parallel_cross_entropy(local, target, ps, label_smoothing=label_smoothing)
    want = _reference(full, target, label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert torch.isfinite(loss).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(loss, want, **tol)
    assert_close(local.detach(), before, rtol=0, atol=0)    # the caller's logits are untouched

    g = _rand(2, 3, 5)
    want.backward(g)
    loss.backward(g)
    assert local.grad.dtype == dtype
    assert_close(local.grad, shard_tensor(full.grad, -1, ps.tp_rank, ps.tp_size), **tol)


def _body(rank: int, world_size: int):
    ps = ParallelState.initialize(tp_size=2)
    ps.timeline.begin_iteration(0)
    _check(ps, 0.0, torch.float32, scale=3.0)
    ps.timeline.end_iteration()
    spans = [(s.kind, s.group, s.nbytes) for s in ps.timeline.iterations()[-1].spans]
    _check(ps, 0.1, torch.float32, scale=3.0)
    _check(ps, 0.0, torch.float32, scale=1e4)                # a naive softmax overflows here
    _check(ps, 0.1, torch.bfloat16, scale=3.0)
    return spans


@pytest.mark.slow
def test_vocab_parallel_cross_entropy_matches_full_at_tp2(tmp_path):
    spans = run_ranks(_body, world_size=2, tmp_path=tmp_path)
    expected = [("all_reduce", "tp", 15 * 4)] * 3            # max, target logit, sum of exp
    assert spans == [expected, expected]


def test_tp1_matches_full_and_rejects_bad_smoothing():
    ps = ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                       tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])
    _check(ps, 0.0, torch.float32, scale=3.0)
    _check(ps, 0.2, torch.float32, scale=3.0)
    with pytest.raises(ValueError):
        vocab_parallel_cross_entropy(torch.zeros(2, VOCAB), torch.zeros(2, dtype=torch.long), ps,
                                     label_smoothing=1.0)

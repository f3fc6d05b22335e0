"""Parallel layers at TP=2 against the full nn.Linear / nn.Embedding they shard."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from gemini_lm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import divide, is_tensor_parallel, shard_tensor, unshard_tensors
from tests.dist import run_ranks

SEED = 1234


def _no_tp(rank: int = 0) -> ParallelState:
    """TP=1 view of a rank: layers built with it hold the full weight and never communicate."""
    return ParallelState(rank=rank, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[rank], dp_ranks=[rank])


def _rand(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build_pair(cls, ps, *args, **kwargs):
    """The same layer at TP=1 and at TP=ps.tp_size, each built right after seeding."""
    torch.manual_seed(SEED)
    full = cls(*args, _no_tp(ps.rank), **kwargs)
    torch.manual_seed(SEED)
    return full, cls(*args, ps, **kwargs)


def _all_shards(t: torch.Tensor, ps: ParallelState) -> list[torch.Tensor]:
    shards = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(shards, t.detach().contiguous(), group=ps.tp_group)
    return shards


def _check_column(ps: ParallelState, stride: int, gather_output: bool) -> None:
    r, out_size = ps.tp_rank, 6 * stride
    full, layer = _build_pair(ColumnParallelLinear, ps, 4, out_size, stride=stride,
                              gather_output=gather_output)
    # Same seed => the TP=2 shards are exactly the TP=1 weight.
    assert_close(unshard_tensors(_all_shards(layer.weight, ps), 0, stride), full.weight,
                 rtol=0, atol=0)
    ref = torch.nn.Linear(4, out_size)
    with torch.no_grad():
        ref.weight.copy_(full.weight)
        ref.bias.copy_(_rand(1, out_size))   # a non-zero bias, so its slicing is checked
        layer.bias.copy_(shard_tensor(ref.bias, 0, r, 2, stride))

    x_ref = _rand(2, 3, 5, 4).requires_grad_()
    x = x_ref.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    y, bias = layer(x)
    assert bias is None
    g = _rand(3, *y_ref.shape)
    y_ref.backward(g)
    if gather_output:
        assert_close(y, y_ref)
        y.backward(g)
    else:
        assert_close(y, shard_tensor(y_ref, -1, r, 2, stride))
        y.backward(shard_tensor(g, -1, r, 2, stride))
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.weight.grad, shard_tensor(ref.weight.grad, 0, r, 2, stride))
    assert_close(layer.bias.grad, shard_tensor(ref.bias.grad, 0, r, 2, stride))
    for p in (layer.weight, layer.bias):
        assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, 0, stride)


def _check_row(ps: ParallelState, input_is_parallel: bool) -> None:
    r = ps.tp_rank
    full, layer = _build_pair(RowParallelLinear, ps, 6, 4, input_is_parallel=input_is_parallel)
    assert_close(unshard_tensors(_all_shards(layer.weight, ps), 1), full.weight, rtol=0, atol=0)
    ref = torch.nn.Linear(6, 4)
    with torch.no_grad():
        ref.weight.copy_(full.weight)
        ref.bias.copy_(_rand(4, 4))
        layer.bias.copy_(ref.bias)

    x_ref = _rand(5, 3, 5, 6).requires_grad_()
    x_full = x_ref.detach().clone()
    x = (x_full if not input_is_parallel else shard_tensor(x_full, -1, r, 2)).requires_grad_()
    y_ref = ref(x_ref)
    y, bias = layer(x)
    assert bias is None
    assert_close(y, y_ref)
    g = _rand(6, *y_ref.shape)
    y_ref.backward(g)
    y.backward(g)
    want_x_grad = x_ref.grad if not input_is_parallel else shard_tensor(x_ref.grad, -1, r, 2)
    assert_close(x.grad, want_x_grad)
    assert_close(layer.weight.grad, shard_tensor(ref.weight.grad, 1, r, 2))
    assert_close(layer.bias.grad, ref.bias.grad)
    assert (layer.weight.tensor_model_parallel, layer.weight.partition_dim) == (True, 1)
    assert layer.bias.tensor_model_parallel is False
    assert is_tensor_parallel(layer.weight) and not is_tensor_parallel(layer.bias)

    # skip_bias_add hands the bias back unadded.
    layer.skip_bias_add = True
    y_skip, bias = layer(x.detach())
    assert bias is layer.bias
    assert_close(y_skip + bias, y_ref)


def _check_embedding(ps: ParallelState) -> None:
    r = ps.tp_rank
    full, layer = _build_pair(VocabParallelEmbedding, ps, 10, 4)
    assert_close(unshard_tensors(_all_shards(layer.weight, ps), 0), full.weight, rtol=0, atol=0)
    ref = torch.nn.Embedding(10, 4)
    with torch.no_grad():
        ref.weight.copy_(full.weight)
    ids = torch.tensor([[0, 9, 4, 5], [5, 5, 1, 7]])   # ids on both ranks, some repeated
    y_ref, y = ref(ids), layer(ids)
    assert_close(y, y_ref)
    g = _rand(7, *y_ref.shape)
    y_ref.backward(g)
    y.backward(g)
    assert_close(layer.weight.grad, shard_tensor(ref.weight.grad, 0, r, 2))
    assert (layer.weight.tensor_model_parallel, layer.weight.partition_dim) == (True, 0)


def _mlp_timeline(ps: ParallelState) -> list:
    """A Megatron MLP block (column then row) communicates once forward, once backward."""
    torch.manual_seed(SEED)
    fc1 = ColumnParallelLinear(4, 8, ps)
    fc2 = RowParallelLinear(8, 4, ps)
    ps.timeline.begin_iteration(0)
    h, _ = fc1(_rand(8, 2, 4).requires_grad_())
    y, _ = fc2(F.gelu(h))
    y.sum().backward()
    ps.timeline.end_iteration()
    return [(s.kind, s.group, s.nbytes) for s in ps.timeline.iterations()[-1].spans]


def _layers_body(rank: int, world_size: int):
    ps = ParallelState.initialize(tp_size=2)
    for gather_output in (False, True):
        _check_column(ps, stride=1, gather_output=gather_output)
    _check_column(ps, stride=3, gather_output=False)
    for input_is_parallel in (True, False):
        _check_row(ps, input_is_parallel)
    _check_embedding(ps)
    return _mlp_timeline(ps)


@pytest.mark.slow
def test_parallel_layers_match_full_layers_at_tp2(tmp_path):
    spans = run_ranks(_layers_body, world_size=2, tmp_path=tmp_path)
    expected = [("all_reduce", "tp", 2 * 4 * 4)] * 2   # row fwd reduce, column bwd copy
    assert spans == [expected, expected]


def test_shard_and_unshard_follow_megatron_strides():
    full = torch.arange(12)
    # stride 3 (q, k, v): each part [4 values] is split in two, rank r takes chunk r of each.
    assert shard_tensor(full, 0, 0, 2, stride=3).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_tensor(full, 0, 1, 2, stride=3).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_tensor(full, 0, 1, 2).tolist() == list(range(6, 12))
    w = torch.randn(6, 12)
    for stride in (1, 2, 3):
        shards = [shard_tensor(w, 1, r, 2, stride) for r in range(2)]
        assert_close(unshard_tensors(shards, 1, stride), w, rtol=0, atol=0)
    with pytest.raises(ValueError):
        shard_tensor(full, 0, 0, 5)
    with pytest.raises(ValueError):
        divide(7, 2)


def test_tp1_layers_equal_plain_torch_layers():
    torch.manual_seed(0)
    col = ColumnParallelLinear(4, 6, _no_tp(), skip_bias_add=True)
    assert col.weight.shape == (6, 4) and col.weight.std().item() < 0.1
    x = torch.randn(2, 4)
    y, b = col(x)
    assert_close(y + b, F.linear(x, col.weight, col.bias))
    emb = VocabParallelEmbedding(10, 4, _no_tp())
    ids = torch.tensor([3, 9])
    assert_close(emb(ids), emb.weight[ids])


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError):
        ColumnParallelLinear(4, 6, _no_tp(), stride=4)
    with pytest.raises(ValueError):
        ColumnParallelLinear(4, 6, _no_tp(), stride=3, gather_output=True)

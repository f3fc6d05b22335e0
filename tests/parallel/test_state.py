"""ParallelState.initialize on 4 gloo ranks: rank layout and working TP/DP groups."""
import pytest
import torch
import torch.distributed as dist

from gemini_lm.parallel.state import ParallelState
from tests.dist import run_ranks

pytestmark = pytest.mark.slow   # spawns processes


def _group_sum(value: int, group) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, group=group)
    return int(t.item())


def _body(rank: int, world_size: int):
    with pytest.raises(ValueError):
        ParallelState.initialize(tp_size=3)      # 4 ranks do not split into TP groups of 3
    ps = ParallelState.initialize(tp_size=2)
    # The groups really connect the listed ranks: sum each member's global rank.
    return {
        "tp": (ps.tp_size, ps.tp_rank, ps.tp_ranks, _group_sum(rank, ps.tp_group)),
        "dp": (ps.dp_size, ps.dp_rank, ps.dp_ranks, _group_sum(rank, ps.dp_group)),
        "shard_id": ps.shard_id,
    }


def test_initialize_tp2_on_4_ranks(tmp_path):
    results = run_ranks(_body, world_size=4, tmp_path=tmp_path)
    for r, got in enumerate(results):
        tp_ranks = [r - r % 2, r - r % 2 + 1]
        dp_ranks = [r % 2, r % 2 + 2]
        assert got["tp"] == (2, r % 2, tp_ranks, sum(tp_ranks))
        assert got["dp"] == (2, r // 2, dp_ranks, sum(dp_ranks))
        assert got["shard_id"] == f"tp{r % 2:02d}"

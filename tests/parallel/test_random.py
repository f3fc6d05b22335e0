"""RNG tracker semantics, per-rank seeding, and the bit-exact RNG state round trip."""
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gemini_lm.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    get_rng_state_tensors,
    model_parallel_seed,
    set_rng_state_tensors,
)
from gemini_lm.parallel.state import ParallelState


def _ps(tp_rank: int, dp_rank: int = 0) -> ParallelState:
    return ParallelState(rank=dp_rank * 2 + tp_rank, world_size=4, tp_size=2, tp_rank=tp_rank,
                         dp_size=2, dp_rank=dp_rank, tp_group=None, dp_group=None,
                         tp_ranks=[0, 1], dp_ranks=[tp_rank, tp_rank + 2])


def _draw(tracker: RNGStatesTracker) -> dict:
    """One draw from every generator; the gaussian draws leave numpy/python caches half used."""
    with tracker.fork():
        tp = torch.rand(3)
    return {
        "torch": torch.rand(4), "tracker": tp, "torch_normal": torch.randn(3),
        "numpy": np.random.standard_normal(3), "python": [random.random(), random.gauss(0, 1)],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_rng_state_round_trip_is_bit_exact_through_safetensors():
    tracker = model_parallel_seed(7, _ps(1))
    _draw(tracker)                # odd gaussian counts: numpy and python now cache one
    saved = get_rng_state_tensors(tracker)
    assert saved["rng/numpy/has_gauss"].item() == 1
    assert saved["rng/python/has_gauss_next"].item() == 1
    assert {t.dtype for t in saved.values()} <= {torch.uint8, torch.int64, torch.float64}
    assert f"rng/tracker/{MODEL_PARALLEL_RNG}" in saved
    blob = st_save(saved)         # a snapshot can hold it: plain tensors, no pickle

    first = [_draw(tracker) for _ in range(2)]
    set_rng_state_tensors(st_load(blob), tracker)
    again = [_draw(tracker) for _ in range(2)]
    for a, b in zip(first, again):
        _assert_same(a, b)

    # A fresh tracker (as after a process restart) gets its stream back from the tensors.
    fresh = RNGStatesTracker()
    set_rng_state_tensors(st_load(blob), fresh)
    _assert_same(first[0], _draw(fresh))


def test_restore_rejects_incomplete_or_foreign_state():
    tracker = model_parallel_seed(7, _ps(0))
    saved = get_rng_state_tensors(tracker)
    del saved["rng/numpy/pos"]
    with pytest.raises(KeyError, match="rng/numpy/pos"):
        set_rng_state_tensors(saved, tracker)
    on_cuda = get_rng_state_tensors(tracker)
    on_cuda["rng/torch_cuda"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="saved on CUDA"):
        set_rng_state_tensors(on_cuda, tracker)       # a CPU run cannot take a GPU run's RNG


def test_default_stream_shared_by_all_ranks_tp_stream_per_tp_rank():
    draws = {}
    for tp_rank in (0, 1):
        for dp_rank in (0, 1):
            draws[tp_rank, dp_rank] = _draw(model_parallel_seed(42, _ps(tp_rank, dp_rank)))
    for k in ("torch", "numpy", "python"):            # identical on every rank
        for key in draws:
            assert np.array_equal(np.asarray(draws[key][k]), np.asarray(draws[0, 0][k]))
    assert torch.equal(draws[0, 0]["tracker"], draws[0, 1]["tracker"])   # DP replicas agree
    assert not torch.equal(draws[0, 0]["tracker"], draws[1, 0]["tracker"])
    expected = torch.rand(3, generator=torch.Generator().manual_seed(42 + 2718 + 1))
    assert torch.equal(draws[1, 0]["tracker"], expected)


def test_fork_leaves_default_stream_alone_and_continues_its_own():
    tracker = RNGStatesTracker()
    tracker.add("a", 5)
    torch.manual_seed(0)
    outside = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(2)
    assert torch.equal(torch.rand(2), outside)           # default stream did not move
    with tracker.fork("a"):
        second = torch.rand(2)
    assert torch.equal(torch.cat([first, second]),
                       torch.rand(4, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError):
        tracker.add("a", 6)
    with pytest.raises(ValueError):
        tracker.add("b", 5)
    with pytest.raises(KeyError):
        with tracker.fork("missing"):
            pass
    states = tracker.get_states()
    with tracker.fork("a"):
        torch.rand(1)
    tracker.set_states(states)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(2),
                           torch.rand(6, generator=torch.Generator().manual_seed(5))[4:])

import math
import random

import pytest

from gemini_lm.gemini.schedule import (ScheduleInputs, gaps_from_timelines, iteration_gaps, plan_schedule,
                                       replication_interval, send_time)
from gemini_lm.parallel.timeline import CollectiveSpan, IterationTimeline

MB = 1_000_000


def _inputs(**kw):
    base = dict(gaps=[(0.0, 0.0105)], update_s=0.02, peer_bytes={"p1": 15 * MB},
                buffer_bytes=16 * MB, num_buffers=16, bandwidth=1e9, alpha=0.0, mu=1.0)
    base.update(kw)
    return ScheduleInputs(**base)


def _check_plan(plan):
    """The scheduler's contract, checked from the outside."""
    inp = plan.inputs
    tol = 1e-12
    # every byte of every peer exactly once, in offset order per peer
    for peer, nbytes in inp.peer_bytes.items():
        offset = 0
        for c in (c for c in plan.chunks if c.peer == peer):
            assert c.offset == offset
            offset += c.nbytes
        assert offset == nbytes
    assert all(0 < c.nbytes <= inp.chunk_bytes for c in plan.chunks)
    # chunks in a gap run back to back and end within mu * (gap length)
    for i, (start, end) in enumerate(plan.gaps):
        mine = [c for c in plan.chunks if c.gap_index == i]
        assert len(mine) == plan.gap_chunks[i] and sum(c.nbytes for c in mine) == plan.gap_bytes[i]
        for peer in inp.peer_bytes:   # one sub-buffer per chunk of a route in a gap
            assert sum(1 for c in mine if c.peer == peer) <= inp.num_buffers
        t = start
        for c in mine:
            assert c.planned_start_s == pytest.approx(t, abs=tol)
            assert c.duration_s == pytest.approx(inp.alpha + c.nbytes / inp.bandwidth, rel=1e-12)
            t += c.duration_s
        assert t <= start + inp.mu * (end - start) + tol
        if plan.iterations == 1:
            assert end <= inp.update_s
        # only a peer's last piece may undercut the minimum chunk
        for c in mine:
            last_piece = c.offset + c.nbytes == inp.peer_bytes[c.peer]
            assert c.nbytes >= plan.min_chunk_bytes or last_piece
    # leftovers come after every gap chunk, start at the update, and cost what is predicted
    kinds = [c.gap_index is None for c in plan.chunks]
    assert kinds == sorted(kinds)
    left = [c for c in plan.chunks if c.gap_index is None]
    assert sum(c.nbytes for c in left) == plan.leftover_bytes
    assert plan.predicted_extra_s == pytest.approx(sum(c.duration_s for c in left), abs=tol)
    assert all(c.planned_start_s >= inp.update_s - tol for c in left)
    assert plan.total_bytes == plan.leftover_bytes + sum(plan.gap_bytes)


def test_fills_gap_with_full_chunks_then_a_tail():
    plan = plan_schedule(_inputs())
    _check_plan(plan)
    # 1 MB chunks at 1 GB/s take 1 ms: ten full chunks, then a ~0.5 ms tail
    assert plan.gap_chunks == [11]
    assert [c.nbytes for c in plan.chunks[:10]] == [MB] * 10
    assert plan.gap_bytes[0] == pytest.approx(10.5 * MB, abs=2)
    assert plan.leftover_bytes == 15 * MB - plan.gap_bytes[0]
    assert plan.predicted_extra_s == pytest.approx(plan.leftover_bytes / 1e9)
    assert "MiB" in plan.describe() and "before the update" in plan.describe()


def test_a_gap_holds_at_most_p_chunks_of_a_peer():
    # Room for 10.5 chunks, 4 sub-buffers: 4 chunks of each peer, the rest in the next gap
    # (a sub-buffer is reused only once its chunk completed, seen at a later point).
    plan = plan_schedule(_inputs(buffer_bytes=4 * MB, num_buffers=4, peer_bytes={"a": 3 * MB, "b": 15 * MB},
                                 gaps=[(0.0, 0.0105), (0.011, 0.0125)]))
    _check_plan(plan)
    assert [(c.peer, c.gap_index) for c in plan.chunks[:9]] == [("a", 0)] * 3 + [("b", 0)] * 4 + [("b", 1)] * 2
    assert plan.gap_bytes == [7 * MB, 1_500_000] and plan.leftover_bytes == 18 * MB - 8_500_000


def test_safety_factor_and_alpha_shrink_capacity():
    full = plan_schedule(_inputs())
    safe = plan_schedule(_inputs(mu=0.5))
    costly = plan_schedule(_inputs(alpha=1e-4))
    assert safe.gap_bytes[0] == pytest.approx(full.gap_bytes[0] / 2, abs=2)
    assert costly.gap_chunks[0] < full.gap_chunks[0]
    _check_plan(safe)
    _check_plan(costly)


def test_tail_below_minimum_chunk_is_not_sent_in_the_gap():
    # alpha*B = 100 kB minimum; after 10 chunks 150 us remain, 50 us (50 kB) after alpha: no tail
    inp = _inputs(gaps=[(0.0, 10 * (1e-3 + 1e-4) + 1.5e-4)], alpha=1e-4)
    plan = plan_schedule(inp)
    _check_plan(plan)
    assert plan.min_chunk_bytes == 100_000
    assert plan.gap_chunks == [10] and plan.gap_bytes == [10 * MB]


def test_multiple_peers_in_order():
    plan = plan_schedule(_inputs(peer_bytes={"b": 2_500_000, "a": 3 * MB, "c": 0}))
    _check_plan(plan)
    assert [c.peer for c in plan.chunks] == ["b"] * 3 + ["a"] * 3
    assert plan.chunks[2].nbytes == 500_000  # b's last piece, then a starts at offset 0


@pytest.mark.parametrize("seed", range(40))
def test_random_inputs_keep_the_contract(seed):
    rng = random.Random(seed)
    t, gaps = 0.0, []
    for _ in range(rng.randint(0, 6)):
        t += rng.choice([0.0, rng.uniform(0, 0.01)])
        length = rng.choice([0.0, rng.uniform(0, 0.02), rng.uniform(0, 1e-5)])
        gaps.append((t, t + length))
        t += length
    inp = ScheduleInputs(
        gaps=gaps, update_s=t * rng.uniform(0.5, 1.2) + 1e-3,
        peer_bytes={f"p{i}": rng.choice([0, rng.randint(1, 5000), rng.randint(1, 30 * MB)])
                    for i in range(rng.randint(0, 3))},
        buffer_bytes=rng.choice([8 * MB, 128 * MB, MB]), num_buffers=rng.randint(1, 4),
        bandwidth=rng.choice([1e8, 1e10, 3e6, math.inf]), alpha=rng.choice([0.0, 5e-6, 1e-4]),
        mu=rng.choice([1.0, 0.9, 0.3]))
    plan = plan_schedule(inp)
    _check_plan(plan)


def test_degenerate_inputs():
    # no gaps: everything before the update, alpha per chunk plus bytes / B
    plan = plan_schedule(_inputs(gaps=[], alpha=1e-5))
    _check_plan(plan)
    assert plan.leftover_bytes == 15 * MB and len(plan.chunks) == 15
    assert plan.predicted_extra_s == pytest.approx(15 * 1e-5 + 15e-3)
    # one huge gap: nothing left over
    plan = plan_schedule(_inputs(gaps=[(0.0, 10.0)], update_s=10.0))
    _check_plan(plan)
    assert plan.leftover_bytes == 0 and plan.predicted_extra_s == 0
    # zero bytes
    plan = plan_schedule(_inputs(peer_bytes={"p1": 0}))
    assert plan.chunks == [] and plan.leftover_bytes == 0 and plan.predicted_extra_s == 0
    # zero-length gaps take nothing, even when sending is free
    plan = plan_schedule(_inputs(gaps=[(0.0, 0.0), (0.001, 0.001)], bandwidth=math.inf))
    _check_plan(plan)
    assert plan.gap_chunks == [0, 0] and plan.leftover_bytes == 15 * MB
    # infinite bandwidth, no per-message cost: everything fits in any real gap
    plan = plan_schedule(_inputs(gaps=[(0.0, 1e-9)], bandwidth=math.inf))
    assert plan.leftover_bytes == 0 and plan.gap_chunks == [15]
    # infinite bandwidth with alpha: the gap holds floor(mu * length / alpha) full chunks
    plan = plan_schedule(_inputs(gaps=[(0.0, 3.5e-3)], bandwidth=math.inf, alpha=1e-3))
    _check_plan(plan)
    assert plan.gap_chunks == [3] and plan.min_chunk_bytes == MB
    # time after the update belongs to the next checkpoint
    plan = plan_schedule(_inputs(gaps=[(0.0, 0.004), (0.005, 0.05)], update_s=0.008))
    _check_plan(plan)
    assert plan.gaps == [(0.0, 0.004), (0.005, 0.008)] and plan.gap_bytes[1] == pytest.approx(3 * MB, abs=2)


@pytest.mark.parametrize("bad", [dict(mu=0.0), dict(mu=1.5), dict(bandwidth=0), dict(alpha=-1.0),
                                 dict(gaps=[(0.0, 0.01), (0.005, 0.02)]), dict(gaps=[(0.02, 0.01)]),
                                 dict(gaps=[(-0.01, 0.01)]), dict(num_buffers=0),
                                 dict(buffer_bytes=2, num_buffers=4), dict(peer_bytes={"p": -1})])
def test_bad_inputs(bad):
    with pytest.raises(ValueError):
        plan_schedule(_inputs(**bad))


def test_replication_interval():
    # 15 MB at 1 GB/s take 15 ms: within mu=1 of a 30 ms iteration (the gaps and the
    # update's start carry it); 45 ms of traffic need two iterations, 61 ms three.
    assert replication_interval(_inputs(), 0.03) == 1
    assert replication_interval(_inputs(peer_bytes={"p": 45 * MB}), 0.03) == 2
    assert replication_interval(_inputs(peer_bytes={"p": 61 * MB}), 0.03) == 3
    assert replication_interval(_inputs(peer_bytes={"p": 0}), 0.03) == 1
    # mu shrinks what an iteration may carry; alpha counts once per chunk (1 MB chunks)
    assert replication_interval(_inputs(mu=0.25), 0.03) == 2
    assert replication_interval(_inputs(alpha=1e-3), 0.03) == 1       # 15 + 15 ms = 30 ms
    assert replication_interval(_inputs(alpha=1.1e-3), 0.03) == 2
    with pytest.raises(ValueError):
        replication_interval(_inputs(mu=0), 0.03)


@pytest.mark.parametrize("seed", range(10))
def test_replication_interval_is_smallest_that_fits(seed):
    rng = random.Random(seed)
    inp = _inputs(peer_bytes={"a": rng.randint(1, 40 * MB), "b": rng.randint(0, 40 * MB)},
                  alpha=rng.choice([0.0, 2e-5]), mu=rng.uniform(0.3, 1.0))
    it = rng.uniform(0.005, 0.05)
    j = replication_interval(inp, it)
    assert send_time(inp) <= inp.mu * j * it * (1 + 1e-12)
    assert j == 1 or send_time(inp) > inp.mu * (j - 1) * it


def _timeline(iteration, spans, duration=0.1):
    return IterationTimeline(iteration, 0.0, [CollectiveSpan("all_reduce", "dp", 8, s, e) for s, e in spans],
                             duration)


def test_iteration_gaps_merges_overlapping_collectives():
    it = _timeline(0, [(0.015, 0.03), (0.01, 0.02), (0.05, 0.06), (0.06 + 1e-6, 0.07)])
    assert iteration_gaps(it) == [(0.0, 0.01), (0.03, 0.05)]
    assert iteration_gaps(it, update_start_s=0.09) == [(0.0, 0.01), (0.03, 0.05), (0.07, 0.09)]
    assert iteration_gaps(_timeline(1, [(0.0, 0.01), (0.02, 0.03)])) == [(0.01, 0.02)]
    assert iteration_gaps(_timeline(2, [])) == []
    assert iteration_gaps(_timeline(3, []), update_start_s=0.05) == [(0.0, 0.05)]


def test_gaps_from_timelines_median_and_outliers():
    rng = random.Random(0)
    its = []
    for i in range(9):
        j = [rng.uniform(-1e-3, 1e-3) for _ in range(4)]
        its.append(_timeline(i, [(0.010 + j[0], 0.030 + j[1]), (0.050 + j[2], 0.060 + j[3])],
                             duration=0.1 + j[0]))
    # two outliers with an extra collective in the middle of the second gap
    its += [_timeline(9 + i, [(0.01, 0.03), (0.039, 0.041), (0.05, 0.06)]) for i in range(2)]
    gaps, spread = gaps_from_timelines(its, update_start_s=0.08)
    assert len(gaps) == 3
    expect = [(0.0, 0.010), (0.030, 0.050), (0.060, 0.080)]
    for (s, e), (es, ee) in zip(gaps, expect):
        assert s == pytest.approx(es, abs=1e-3) and e == pytest.approx(ee, abs=1e-3)
    assert all(a[1] <= b[0] for a, b in zip(gaps, gaps[1:]))
    assert spread.iterations_total == 11 and spread.iterations_used == 9
    assert spread.gap_count_histogram == {3: 9, 4: 2}
    assert len(spread.length_iqr_s) == 3 and 0 < max(spread.length_iqr_s) < 4e-3
    assert spread.duration_median_s == pytest.approx(0.1, abs=1e-3)
    assert "9/11 iterations" in spread.describe()
    # the schedule accepts them as they are
    _check_plan(plan_schedule(_inputs(gaps=gaps, update_s=0.08)))


def test_gaps_from_timelines_tie_and_empty():
    its = [_timeline(0, [(0.01, 0.02)]), _timeline(1, [(0.01, 0.02), (0.03, 0.04)])]
    gaps, spread = gaps_from_timelines(its)
    assert gaps == [(0.0, 0.01)] and spread.iterations_used == 1  # tie: fewer gaps wins
    gaps, spread = gaps_from_timelines([])
    assert gaps == [] and spread.iterations_total == 0

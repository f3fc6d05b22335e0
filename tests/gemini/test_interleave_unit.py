"""Single-process tests of the traffic scheduler (which snapshots travel, in which chunks,
at which timeline point).

The scheduler plans from a profile of iterations; here that profile is written out
(collectives at fixed offsets) so the plan is exact.
"""
import math

import pytest

from gemini_lm.config import GeminiConfig
from gemini_lm.gemini.interleave import TrafficScheduler
from gemini_lm.parallel.timeline import CollectiveSpan, CollectiveTimeline, IterationTimeline

PROFILE = 3
MIB = 2**20
ALPHA, BANDWIDTH = 1e-4, 1e8            # 100 us per message, 100 MB/s
# Each profiled iteration: TP all-reduces at 10-20 ms and 50-60 ms, update at 100 ms, end at 120 ms.
SPANS = [(0.010, 0.020), (0.050, 0.060)]
GAPS = [(0.0, 0.010), (0.020, 0.050), (0.060, 0.100)]
POINTS = [0, 1, 2]    # where each gap begins: at the start, after the 1st, after the 2nd collective
UPDATE_S, ITERATION_S = 0.100, 0.120


class _Profile:
    """The profiled iterations a TrafficScheduler reads (CollectiveTimeline.iterations())."""

    def __init__(self, n: int = PROFILE):
        self._its = []
        for i in range(1, n + 1):
            it = IterationTimeline(i, t0=float(i))
            it.spans = [CollectiveSpan("all_reduce", "tp", 1024, s, e) for s, e in SPANS]
            it.update_start, it.duration = UPDATE_S, ITERATION_S
            self._its.append(it)

    def iterations(self) -> list[IterationTimeline]:
        return list(self._its)



def _plan(ts, peer_bytes, iteration):
    """One sender planning alone from its own profile, as the agreement would on one rank:
    if it is time and something was measured."""
    p = ts.local_profile() if ts.wants_plan(iteration) else None
    if p is not None and p.bandwidth > 0:
        ts.adopt(p, {None: peer_bytes}, None)

def _scheduler(interleave: str = "on", logs: list | None = None) -> TrafficScheduler:
    gcfg = GeminiConfig(gemini_interleave=interleave, gemini_profile_iters=PROFILE,
                        gemini_buffer_mb=4, gemini_sub_buffers=4, gemini_gap_safety=0.8)
    return TrafficScheduler(gcfg, _Profile(), log=(logs if logs is not None else []).append)


def _measured(ts: TrafficScheduler) -> TrafficScheduler:
    """One eager snapshot's timings: the header costs ALPHA, 1 MiB chunks move at BANDWIDTH."""
    ts.observe(ALPHA, [(MIB, ALPHA + MIB / BANDWIDTH)] * 3 + [(100, 0.5)])   # tiny chunk: ignored
    return ts


def _check_covers(chunks, nbytes: int) -> None:
    offset = 0
    for off, n, _ in chunks:
        assert off == offset and n > 0
        offset += n
    assert offset == nbytes


# ---- which snapshots travel ---------------------------------------------------------------
def test_every_snapshot_has_a_peer_copy_from_the_first_iteration():
    ts = _scheduler()
    # While profiling, snapshots travel with the blocking schedule: never a window in which
    # a lost machine has no copy anywhere, and no traffic inside the profiled iterations.
    assert [ts.replicate(i) for i in range(1, PROFILE + 1)] == [True] * PROFILE
    assert [ts.blocking(i) for i in range(1, PROFILE + 1)] == [True] * PROFILE
    assert [ts.replicate(i) for i in range(PROFILE + 1, PROFILE + 6)] == [True] * 5
    assert not any(ts.blocking(i) for i in range(PROFILE + 1, PROFILE + 6))
    # The blocking baseline has nothing to profile: every snapshot travels and is waited for.
    off = _scheduler("off")
    assert off.replicate(1) and off.replicate(2) and off.blocking(1) and off.blocking(50)


# ---- measurements -------------------------------------------------------------------------
def test_alpha_and_bandwidth_from_observed_sends():
    ts = _scheduler()
    assert ts.alpha == 0.0 and ts.bandwidth == math.inf
    _measured(ts)
    assert ts.alpha == pytest.approx(ALPHA)
    assert ts.bandwidth == pytest.approx(BANDWIDTH)
    assert len(ts.bandwidth_samples) == 3           # the 100-byte chunk says nothing about B


def test_measurements_stop_once_planned_or_unused():
    ts = _measured(_scheduler())
    _plan(ts, {"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is not None
    kept = (len(ts.alpha_samples), len(ts.bandwidth_samples))
    for _ in range(100):                               # every later snapshot of a long run
        ts.observe(ALPHA, [(MIB, ALPHA + MIB / BANDWIDTH)] * 4)
    assert (len(ts.alpha_samples), len(ts.bandwidth_samples)) == kept
    off = _measured(_scheduler("off"))                 # the blocking baseline never plans
    assert off.alpha_samples == [] and off.bandwidth_samples == []


# ---- chunks before a plan exists ----------------------------------------------------------
def test_eager_chunks_before_a_plan():
    ts = _scheduler()
    nbytes = 3 * ts.chunk_bytes + 12345
    chunks = ts.chunks("m1", nbytes, iteration=PROFILE + 1)
    _check_covers(chunks, nbytes)
    assert ts.chunk_bytes == MIB
    assert [n for _, n, _ in chunks] == [MIB] * 3 + [12345]
    assert all(when is None for _, _, when in chunks)   # no plan: everything goes at once
    assert ts.chunks("m1", 0, iteration=PROFILE + 1) == []


def test_no_plan_and_no_gated_chunk_while_profiling():
    # Profiled snapshots travel with the blocking schedule and supply the measurements;
    # a plan made then would gate a chunk on an iteration the waiting step cannot reach.
    ts = _measured(_scheduler())
    for it in range(1, PROFILE + 1):
        _plan(ts, {"m1": 8 * 10**6}, it)
        assert ts.plan is None
        assert all(when is None for _, _, when in ts.chunks("m1", 8 * 10**6, it))
    _plan(ts, {"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is not None
    assert all(when is None for _, _, when in ts.chunks("m1", 8 * 10**6, PROFILE))   # a late one still goes at once


def test_no_plan_without_measurements_or_with_interleaving_off():
    ts = _scheduler()
    _plan(ts, {"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is None                            # nothing measured yet
    ts.observe(ALPHA, [(MIB, ALPHA + MIB / BANDWIDTH)])
    _plan(ts, {"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is None                            # one bandwidth sample is not enough
    off = _measured(_scheduler("off"))
    _plan(off, {"m1": 8 * 10**6}, PROFILE + 1)
    assert off.plan is None
    assert all(when is None for _, _, when in off.chunks("m1", 8 * 10**6, 5))


# ---- a checkpoint that fits in one iteration ---------------------------------------------
def test_plan_fills_the_gaps_of_the_next_iteration_and_leaves_the_rest_for_its_update():
    logs: list[str] = []
    ts = _measured(_scheduler(logs=logs))
    nbytes = 8 * 10**6          # 80 ms to send: more than the gaps offer (64 ms), less than mu*120 ms
    assert ts.replicate(PROFILE + 1)
    _plan(ts, {"m1": nbytes, "m2": 10**6}, PROFILE + 1)
    assert ts.plan is not None and ts.every == 1
    assert [line for line in logs if "interleaving plan" in line]
    assert not [line for line in logs if "every" in line and "iterations" in line]

    k = 7
    for peer, size in (("m1", nbytes), ("m2", 10**6)):
        chunks = ts.chunks(peer, size, iteration=k)
        _check_covers(chunks, size)
        assert all(n <= ts.chunk_bytes for _, n, _ in chunks)
    chunks = ts.chunks("m1", nbytes, iteration=k)
    in_gaps = [c for c in chunks if c[2][1] is not None]
    leftover = [c for c in chunks if c[2][1] is None]
    assert in_gaps and leftover
    assert chunks == in_gaps + leftover                       # gap chunks first, then the rest
    assert all(when[0] == k + 1 for _, _, when in in_gaps)    # snapshot k travels during k+1 ...
    assert all(when == (k + 1, None) for _, _, when in leftover)  # ... the rest when its update begins
    points = [when[1] for _, _, when in in_gaps]
    assert points == sorted(points)
    # each chunk goes at the timeline point its gap begins at: the iteration's start, or
    # once the collective before the gap returned
    assert set(points) <= set(POINTS) and len(set(points)) > 1, points
    m2_leftover = [n for _, n, when in ts.chunks("m2", 10**6, iteration=k) if when[1] is None]
    assert sum(n for _, n, _ in leftover) + sum(m2_leftover) == ts.plan.leftover_bytes
    assert ts.replicate(PROFILE + 2) and ts.replicate(PROFILE + 3)   # every snapshot travels


# ---- a checkpoint too big for one iteration -----------------------------------------------
def test_a_checkpoint_slower_than_an_iteration_goes_every_j_iterations():
    logs: list[str] = []
    ts = _measured(_scheduler(logs=logs))
    nbytes = 20 * 10**6         # ~200 ms to send, mu * iteration = 96 ms: j = 3
    first = PROFILE + 1
    assert ts.replicate(first)
    _plan(ts, {"m1": nbytes}, PROFILE + 1)
    send_s = math.ceil(nbytes / ts.chunk_bytes) * ALPHA + nbytes / BANDWIDTH
    j = math.ceil(send_s / (0.8 * ITERATION_S))
    assert j == 3 and ts.every == j and ts.plan.iterations == j
    assert [line for line in logs if f"replicating every {j} iterations" in line]
    assert [ts.replicate(i) for i in range(first + 1, first + 2 * j + 1)] == [False, False, True] * 2

    k = first
    chunks = ts.chunks("m1", nbytes, iteration=k)
    _check_covers(chunks, nbytes)
    in_gaps = [c for c in chunks if c[2][1] is not None]
    leftover = [c for c in chunks if c[2][1] is None]
    assert chunks == in_gaps + leftover
    assert {when[0] for _, _, when in in_gaps} == {k + 1, k + 2, k + 3}   # spread over j iterations
    waits = [when for _, _, when in in_gaps]
    assert waits == sorted(waits)
    for it, point in waits:    # points of their own iteration, where its gaps begin
        assert point in POINTS, (it, point)
    assert all(when == (k + j, None) for _, _, when in leftover)   # before update k+j


def test_the_cadence_restarts_at_the_planned_snapshot():
    # Planned on the second replicated snapshot: its chunks are spread over the next j
    # iterations, so the next replicated snapshot (which waits for them) must be j later.
    # Counting from the first snapshot instead had the trainer wait for an iteration
    # that could only begin after the wait: a deadlock.
    ts = _measured(_scheduler())
    first = PROFILE + 1
    assert ts.replicate(first)                     # eager (no plan yet)
    assert ts.replicate(first + 1)
    _plan(ts, {"m1": 20 * 10**6}, first + 1)  # j = 3, planned on snapshot first + 1
    assert ts.every == 3
    assert [ts.replicate(i) for i in range(first + 2, first + 8)] == [False, False, True] * 2

"""Single-process tests of the traffic scheduler (which snapshots travel, in which chunks,
at which timeline point) and of CollectiveTimeline.wait_until.

The scheduler plans from a profile of iterations; here that profile is written out
(collectives at fixed offsets) so the plan is exact. The waits use real threads and a
real timeline, with timings of tens of milliseconds.
"""
import math
import threading
import time

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
    ts.maybe_plan({"m1": 8 * 10**6}, PROFILE + 1)
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
        ts.maybe_plan({"m1": 8 * 10**6}, it)
        assert ts.plan is None
        assert all(when is None for _, _, when in ts.chunks("m1", 8 * 10**6, it))
    ts.maybe_plan({"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is not None
    assert all(when is None for _, _, when in ts.chunks("m1", 8 * 10**6, PROFILE))   # a late one still goes at once


def test_no_plan_without_measurements_or_with_interleaving_off():
    ts = _scheduler()
    ts.maybe_plan({"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is None                            # nothing measured yet
    ts.observe(ALPHA, [(MIB, ALPHA + MIB / BANDWIDTH)])
    ts.maybe_plan({"m1": 8 * 10**6}, PROFILE + 1)
    assert ts.plan is None                            # one bandwidth sample is not enough
    off = _measured(_scheduler("off"))
    off.maybe_plan({"m1": 8 * 10**6}, PROFILE + 1)
    assert off.plan is None
    assert all(when is None for _, _, when in off.chunks("m1", 8 * 10**6, 5))


# ---- a checkpoint that fits in one iteration ---------------------------------------------
def test_plan_fills_the_gaps_of_the_next_iteration_and_leaves_the_rest_for_its_update():
    logs: list[str] = []
    ts = _measured(_scheduler(logs=logs))
    nbytes = 8 * 10**6          # 80 ms to send: more than the gaps offer (64 ms), less than mu*120 ms
    assert ts.replicate(PROFILE + 1)
    ts.maybe_plan({"m1": nbytes, "m2": 10**6}, PROFILE + 1)
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
    ts.maybe_plan({"m1": nbytes}, PROFILE + 1)
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
    ts.maybe_plan({"m1": 20 * 10**6}, first + 1)  # j = 3, planned on snapshot first + 1
    assert ts.every == 3
    assert [ts.replicate(i) for i in range(first + 2, first + 8)] == [False, False, True] * 2


# ---- CollectiveTimeline.wait_until --------------------------------------------------------
class _Waiter:
    """wait_until on a thread; records when it returned and what."""

    def __init__(self, timeline: CollectiveTimeline, *args, **kwargs):
        self.result, self.returned_at = None, None
        self.thread = threading.Thread(target=self._run, args=(timeline, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, timeline, args, kwargs):
        self.result = timeline.wait_until(*args, **kwargs)
        self.returned_at = time.perf_counter()

    def join(self, timeout: float = 60.0):
        """Generous: a loaded machine may not run the thread for a while. Returning before the
        event a test has not caused yet is what tells the reason, not how fast it returned."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "wait_until did not return"
        return self.result


def _collective(tl):
    tl.record("all_reduce", "tp", 64, time.perf_counter(), time.perf_counter())


def test_wait_until_returns_when_the_iteration_reaches_a_point():
    tl = CollectiveTimeline()
    tl.begin_iteration(4)
    early = _Waiter(tl, 5, 0)               # iteration 5 has not begun yet
    time.sleep(0.05)
    assert early.thread.is_alive()
    tl.begin_iteration(5)
    assert early.join() is True             # point 0: the iteration's start
    late = _Waiter(tl, 5, 2)
    _collective(tl)
    time.sleep(0.05)
    assert late.thread.is_alive()           # one collective returned: point 1, not 2
    _collective(tl)
    assert late.join() is True
    assert _Waiter(tl, 5, 1).join() is True                   # a point already past
    tl.end_iteration()
    assert _Waiter(tl, 5, 99).join() is True                  # the iteration is over


def test_wait_until_the_update_mark():
    tl = CollectiveTimeline()
    tl.begin_iteration(1)
    w = _Waiter(tl, 1, None)
    time.sleep(0.05)
    assert w.thread.is_alive()              # collectives and gaps go by: still waiting
    _collective(tl)
    time.sleep(0.02)
    assert w.thread.is_alive()
    tl.mark_update()
    assert w.join() is True
    assert _Waiter(tl, 1, None).join() is True                # already marked


def test_wait_until_returns_when_a_later_iteration_starts():
    tl = CollectiveTimeline()
    tl.begin_iteration(1)
    for_update = _Waiter(tl, 1, None)
    far_offset = _Waiter(tl, 1, 30)
    time.sleep(0.05)
    assert for_update.thread.is_alive() and far_offset.thread.is_alive()
    tl.end_iteration()
    tl.begin_iteration(2)
    assert for_update.join() is True and far_offset.join() is True
    assert _Waiter(tl, 1, 30).join() is True


def test_release_waiters_frees_everyone():
    tl = CollectiveTimeline()
    tl.begin_iteration(1)
    waiters = [_Waiter(tl, 3, None), _Waiter(tl, 2, 0), _Waiter(tl, 1, None)]
    time.sleep(0.05)
    assert all(w.thread.is_alive() for w in waiters)
    tl.release_waiters()
    assert [w.join() for w in waiters] == [True] * 3
    assert _Waiter(tl, 9, None).join() is True                # and whoever comes later


def test_wait_until_times_out():
    # On threads (_Waiter), so a wait that ignored its timeout fails the test instead of hanging it.
    tl = CollectiveTimeline()
    t0 = time.perf_counter()
    nothing = _Waiter(tl, 1, None, timeout=0.05)               # no iteration at all
    assert nothing.join() is False and nothing.returned_at - t0 >= 0.05
    tl.begin_iteration(1)
    # No collective will return: returning at all (and False) means the timeout ended it.
    t0 = time.perf_counter()
    far = _Waiter(tl, 1, 3600, timeout=0.05)
    assert far.join() is False and far.returned_at - t0 >= 0.05
    assert _Waiter(tl, 1, None, timeout=0.0).join() is False

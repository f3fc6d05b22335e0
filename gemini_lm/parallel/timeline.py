"""In-memory timeline of training collectives, one record list per iteration.

GEMINI's traffic scheduler places checkpoint chunks in the idle gaps between training
collectives, so every TP and DP collective records when it started and ended, relative
to the start of its iteration. Only the newest `keep` iterations are kept.

*Points* are the places in an iteration where the training thread may issue checkpoint
traffic itself (gemini/exchange.py): point 0 when the iteration begins, point i once the
i-th collective of the iteration has returned, and None when the optimizer update begins.
The same program order on every rank gives every rank the same points, whatever the
timing; `on_point(iteration, point)` is called at each.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CollectiveSpan:
    kind: str        # "all_reduce", "all_gather", ...
    group: str       # "tp" or "dp"
    nbytes: int
    start: float     # seconds since the iteration started
    end: float


@dataclass
class IterationTimeline:
    iteration: int
    t0: float                      # time.perf_counter() at the iteration start
    spans: list = field(default_factory=list)
    duration: float | None = None      # set by end_iteration()
    points: int = 0                    # collectives returned so far (the current point)
    update_start: float | None = None  # seconds since t0 when the optimizer update began


class CollectiveTimeline:
    def __init__(self, keep: int = 64):
        self._done: collections.deque[IterationTimeline] = collections.deque(maxlen=keep)
        self._current: IterationTimeline | None = None
        self._lock = threading.Lock()  # DP bucket hooks may complete on another thread
        # The threaded (nccl) replicator waits on this for "iteration i reached point p" /
        # "its update began".
        self._changed = threading.Condition()
        self._last_iteration = 0          # newest iteration begun
        self._last_update = 0             # newest iteration whose update began
        self._released = False
        self.enabled = True
        self.on_point = None              # Callable[[int, int | None], None]: the checkpoint exchange

    def _point(self, cur: IterationTimeline, point: int | None) -> None:
        hook = self.on_point
        if hook is not None:
            hook(cur.iteration, point)

    def begin_iteration(self, iteration: int) -> None:
        with self._changed:
            self._current = IterationTimeline(iteration, time.perf_counter())
            self._last_iteration = iteration
            self._changed.notify_all()
        self._point(self._current, 0)

    def mark_update(self) -> None:
        """The optimizer update of the current iteration begins now."""
        cur = self._current
        if cur is None:
            return
        with self._changed:
            cur.update_start = time.perf_counter() - cur.t0
            self._last_update = cur.iteration
            self._changed.notify_all()
        self._point(cur, None)

    def end_iteration(self) -> None:
        cur = self._current
        if cur is None:
            return
        cur.duration = time.perf_counter() - cur.t0
        with self._lock:
            self._done.append(cur)
        self._current = None

    def wait_until(self, iteration: int, point: int | None, timeout: float | None = None) -> bool:
        """Block until `iteration` reached `point` (None: its update began), or a later
        iteration has begun. False on timeout."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._changed:
            while True:
                if self._last_iteration > iteration or self._released:
                    return True
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    return False
                if self._last_iteration == iteration:
                    cur = self._current
                    if point is None:
                        if self._last_update >= iteration:
                            return True
                    elif cur is None or cur.iteration != iteration or cur.points >= point:
                        return True   # reached, or the iteration is over
                self._changed.wait(remaining)

    def now(self) -> float:
        """Seconds since the current iteration began (0 outside an iteration)."""
        cur = self._current
        return 0.0 if cur is None else time.perf_counter() - cur.t0

    def record(self, kind: str, group: str, nbytes: int, start_abs: float, end_abs: float,
               point: bool = True) -> None:
        """Record a collective given absolute perf_counter() start/end times; called by the
        training thread once it returned (`point`: it succeeded, so the next point is reached)."""
        cur = self._current
        if cur is None:
            return
        if self.enabled:
            span = CollectiveSpan(kind, group, int(nbytes), start_abs - cur.t0, end_abs - cur.t0)
            with self._lock:
                cur.spans.append(span)
        if point:
            with self._changed:
                cur.points += 1
                self._changed.notify_all()
            self._point(cur, cur.points)

    @contextlib.contextmanager
    def span(self, kind: str, group: str, nbytes: int):
        start, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        finally:   # a failed collective is recorded, but no traffic goes at it
            self.record(kind, group, nbytes, start, time.perf_counter(), point=ok)

    def release_waiters(self) -> None:
        """Training is over: no iteration will come, so nobody should wait for one."""
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def resume(self) -> None:
        """Training goes on after a recovery: waiters wait again; the iteration counters
        restart from the rolled-back iteration."""
        with self._changed:
            self._released = False
            self._last_iteration = self._last_update = 0
            self._current = None

    def iterations(self) -> list[IterationTimeline]:
        with self._lock:
            return list(self._done)

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
        self.enabled = True
        self.on_point = None              # Callable[[int, int | None], None]: the checkpoint exchange

    def _point(self, cur: IterationTimeline, point: int | None) -> None:
        hook = self.on_point
        if hook is not None:
            hook(cur.iteration, point)

    def begin_iteration(self, iteration: int) -> None:
        self._current = IterationTimeline(iteration, time.perf_counter())
        self._point(self._current, 0)

    def mark_update(self) -> None:
        """The optimizer update of the current iteration begins now."""
        cur = self._current
        if cur is None:
            return
        cur.update_start = time.perf_counter() - cur.t0
        self._point(cur, None)

    def end_iteration(self) -> None:
        cur = self._current
        if cur is None:
            return
        cur.duration = time.perf_counter() - cur.t0
        with self._lock:
            self._done.append(cur)
        self._current = None

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
            cur.points += 1
            self._point(cur, cur.points)

    @contextlib.contextmanager
    def span(self, kind: str, group: str, nbytes: int):
        start, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        finally:   # a failed collective is recorded, but no traffic goes at it
            self.record(kind, group, nbytes, start, time.perf_counter(), point=ok)

    def iterations(self) -> list[IterationTimeline]:
        with self._lock:
            return list(self._done)

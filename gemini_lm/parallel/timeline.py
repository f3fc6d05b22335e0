"""In-memory timeline of training collectives, one record list per iteration.

GEMINI's traffic scheduler places checkpoint chunks in the idle gaps between training
collectives, so every TP and DP collective records when it started and ended, relative
to the start of its iteration. Only the newest `keep` iterations are kept.
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
    duration: float | None = None  # set by end_iteration()


class CollectiveTimeline:
    def __init__(self, keep: int = 64):
        self._done: collections.deque[IterationTimeline] = collections.deque(maxlen=keep)
        self._current: IterationTimeline | None = None
        self._lock = threading.Lock()  # DP bucket hooks may complete on another thread
        self.enabled = True

    def begin_iteration(self, iteration: int) -> None:
        self._current = IterationTimeline(iteration, time.perf_counter())

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

    def record(self, kind: str, group: str, nbytes: int, start_abs: float, end_abs: float) -> None:
        """Record a collective given absolute perf_counter() start/end times."""
        cur = self._current
        if cur is None or not self.enabled:
            return
        span = CollectiveSpan(kind, group, int(nbytes), start_abs - cur.t0, end_abs - cur.t0)
        with self._lock:
            cur.spans.append(span)

    @contextlib.contextmanager
    def span(self, kind: str, group: str, nbytes: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(kind, group, nbytes, start, time.perf_counter())

    def iterations(self) -> list[IterationTimeline]:
        with self._lock:
            return list(self._done)

"""Console logging: every line carries its rank; one filter decides what reaches the console.

    log = get_logger(__name__)
    log.info("...")                                 # printed by global rank 0 only
    log.info("...", extra=ALL_RANKS)                # printed by every rank
    log.warning("...")                              # every rank, on stderr

`setup_logging(rank)` is called once per process, when the rank is known (before it,
the rank shows as "-"). INFO goes to stdout, WARNING and above to stderr, each record as
one write, so lines from threads and ranks never interleave mid-line.
"""
from __future__ import annotations

import logging
import sys

ROOT = "gemini_lm"
ALL_RANKS = {"all_ranks": True}


class _RankFilter(logging.Filter):
    """Adds the rank to each record; drops INFO (and below) from ranks other than 0."""

    def __init__(self):
        super().__init__()
        self.rank: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = "-" if self.rank is None else self.rank
        if record.levelno >= logging.WARNING or getattr(record, "all_ranks", False):
            return True
        return self.rank in (None, 0)


class _MaxLevel(logging.Filter):
    def __init__(self, below: int):
        super().__init__()
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.below


class _StdStream(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at the time (tests and tools swap them)."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value):
        pass


_filter = _RankFilter()


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if getattr(root, "_gemini_configured", False):
        return root
    fmt = logging.Formatter("[rank %(rank)s] %(message)s")
    out = _StdStream("stdout")
    out.addFilter(_MaxLevel(logging.WARNING))
    err = _StdStream("stderr")
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
        h.addFilter(_filter)
        root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False   # an embedding application's root handlers would print it twice
    root._gemini_configured = True
    return root


def setup_logging(rank: int | None) -> None:
    """Tell the console which rank this process is (None: not known yet)."""
    _install()
    _filter.rank = rank


def get_logger(name: str) -> logging.Logger:
    _install()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")

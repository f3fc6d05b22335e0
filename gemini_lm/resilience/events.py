"""Failure and injection events: one JSON line each, appended by whichever process saw it.

    <log-dir>/failures.jsonl     a worker detected a failure (collective error, hang, SIGTERM)
    <log-dir>/injections.jsonl   a tool injected one (tools/inject_failure.py, local_cluster --inject)

Any process may append: every line goes out in one O_APPEND write(2), so concurrent
writers and a process killed mid-way leave whole lines, never interleaved halves.
The recovery timeline (timeline.py) joins these with the restore record.
"""
from __future__ import annotations

import json
import os
import time

FAILURES = "failures.jsonl"
INJECTIONS = "injections.jsonl"


def append_jsonl(path: str, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list[dict]:
    """Whole lines only: a line still being written by another process is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def record_failure(log_dir: str, *, cause: str, rank: int, machine: str, iteration: int,
                   detail: str = "") -> dict:
    """`iteration`: the last iteration this rank completed before the failure."""
    event = {"time": time.time(), "cause": cause, "rank": rank, "machine": machine,
             "pid": os.getpid(), "iteration": iteration, "detail": detail[:500],
             "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}
    os.makedirs(log_dir, exist_ok=True)
    append_jsonl(os.path.join(log_dir, FAILURES), event)
    return event


def record_injection(log_dir: str, event: dict) -> dict:
    event = {"time": time.time(), **event}
    os.makedirs(log_dir, exist_ok=True)
    append_jsonl(os.path.join(log_dir, INJECTIONS), event)
    return event

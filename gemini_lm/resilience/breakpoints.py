"""Injection breakpoints: freeze a worker inside a checkpoint window so a failure hits it there.

A snapshot of a tiny model is written in well under a millisecond, far too short to hit
from outside by polling. So `--during WINDOW` works in two steps:

1. the injector writes <log-dir>/inject/arm.<pid>.json {"during": WINDOW} and sends the
   worker SIGUSR1 (the FailureHandler's signal thread calls `arm()`);
2. the next time the worker is inside WINDOW it writes hit.<pid>.json and SIGSTOPs
   itself there. The injector then delivers the real failure (SIGKILL of the worker or
   of its whole machine, SIGTERM, or leaves it stopped for a hang) with real signals.

Windows (the points are hooked once, at attach; unarmed, each costs a None check):
- snapshot: the payload is in the slot, the commit record not yet written;
- replication: on a sender, the header of a snapshot went out, its payload not yet; on
  a receiver, the whole payload arrived, the replica is not committed;
- persist: the persister thread has been handed a snapshot and is about to write it.
(The checkpointer calls the hook at each: Checkpointer.set_window_hook.)
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from gemini_lm.checkpoint.protocol import Checkpointer

WINDOWS = ("snapshot", "replication", "persist")


def arm_path(log_dir: str, pid: int) -> str:
    return os.path.join(log_dir, "inject", f"arm.{pid}.json")


def hit_path(log_dir: str, pid: int) -> str:
    return os.path.join(log_dir, "inject", f"hit.{pid}.json")


class Breakpoints:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.armed: str | None = None

    def arm(self) -> None:
        path = arm_path(self.log_dir, os.getpid())
        try:
            with open(path) as f:
                window = json.load(f)["during"]
            os.remove(path)
        except (OSError, ValueError, KeyError):
            return
        if window in WINDOWS:
            self.armed = window

    def attach(self, checkpointer: Checkpointer) -> None:
        checkpointer.set_window_hook(self.point)

    def point(self, window: str, iteration: int | None) -> None:
        if self.armed != window:
            return
        self.armed = None
        tmp = hit_path(self.log_dir, os.getpid()) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"time": time.time(), "during": window, "iteration": iteration,
                       "thread": threading.current_thread().name}, f)
        os.replace(tmp, hit_path(self.log_dir, os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)   # the injector takes it from here

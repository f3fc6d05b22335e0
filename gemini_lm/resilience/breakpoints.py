"""Injection breakpoints: freeze a worker inside a checkpoint window so a failure hits it there.

A snapshot of a tiny model is written in well under a millisecond, far too short to hit
from outside by polling. So `--during WINDOW` works in two steps:

1. the injector writes <log-dir>/inject/arm.<pid>.json {"during": WINDOW, "iteration": N}
   and sends the worker SIGUSR1 (the FailureHandler's signal thread calls `arm()`);
2. the first time the worker is inside WINDOW for an iteration >= N (any iteration if N
   is null) it writes hit.<pid>.json and SIGSTOPs itself there. The injector then
   delivers the real failure (SIGKILL of the worker or of its whole machine, SIGTERM,
   or leaves it stopped for a hang) with real signals.

The worker decides where to stop, so a slow injector on a busy machine still hits the
iteration it asked for, as long as it arms before the worker gets there.

Windows, in the order a snapshot goes through them:
- copy: half of the state is copied into the slot, the rest not yet (a torn payload);
- snapshot: the payload is in the slot, the commit record not yet written;
- send: on a sender, the header of a snapshot went out to a peer, its payload not yet;
- receive: on a receiver, the whole payload arrived, the replica is not committed;
- persist: one shard's file is in <save>/iter_N.partial/, the checkpoint not finalized.
(The checkpointer calls the hook at each: Checkpointer.set_window_hook.) The hook is set
only while armed: unarmed, a window costs the checkpointer one None check.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from gemini_lm.checkpoint.protocol import Checkpointer

WINDOWS = ("copy", "snapshot", "send", "receive", "persist")


def arm_path(log_dir: str, pid: int) -> str:
    return os.path.join(log_dir, "inject", f"arm.{pid}.json")


def hit_path(log_dir: str, pid: int) -> str:
    return os.path.join(log_dir, "inject", f"hit.{pid}.json")


class Breakpoints:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.armed: tuple[str, int | None] | None = None    # (window, from iteration)
        self._checkpointer: Checkpointer | None = None
        self._lock = threading.Lock()

    def arm(self) -> None:
        path = arm_path(self.log_dir, os.getpid())
        try:
            with open(path) as f:
                spec = json.load(f)
            os.remove(path)
            window, from_iteration = spec["during"], spec.get("iteration")
        except (OSError, ValueError, KeyError, TypeError):
            return
        if window not in WINDOWS or not (from_iteration is None or isinstance(from_iteration, int)):
            return
        with self._lock:
            self.armed = (window, from_iteration)
            if self._checkpointer is not None:
                self._checkpointer.set_window_hook(self.point)

    def attach(self, checkpointer: Checkpointer) -> None:
        with self._lock:
            self._checkpointer = checkpointer
            if self.armed is not None:
                checkpointer.set_window_hook(self.point)

    def point(self, window: str, iteration: int | None) -> None:
        with self._lock:
            armed = self.armed
            if armed is None or armed[0] != window:
                return
            if armed[1] is not None and iteration is not None and iteration < armed[1]:
                return
            self.armed = None
            self._checkpointer.set_window_hook(None)
        tmp = hit_path(self.log_dir, os.getpid()) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"time": time.time(), "during": window, "iteration": iteration,
                       "thread": threading.current_thread().name}, f)
        os.replace(tmp, hit_path(self.log_dir, os.getpid()))
        # Directed at this thread, the stop takes effect before the call returns; sent to the
        # process (os.kill), the kernel may hand it to another thread, and on a busy machine
        # this one could go on (and commit) until that thread runs. The others stop with it.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)   # the injector takes it from here

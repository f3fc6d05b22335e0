"""FailureHandler: turns a failure seen inside a worker into "record it, exit EXIT_RESTART".

torchrun restarts a worker group when a worker exits non-zero; restarting *is* recovering
(the checkpointer restores from memory at start-up). So a worker's only job on a failure
is to notice it fast, leave a trace and get out of the way:

- a peer failure (errors.PeerFailure, raised where it is detected: a torch.distributed
  call that failed, a replication stream that broke; or torch's own DistError types)
  → a failure event in <log-dir>/failures.jsonl and os._exit(EXIT_RESTART). No
  clean-up: draining replication or joining process groups with a dead peer can hang,
  and the snapshots live in shared memory, which outlives the process anyway.
- a watchdog thread: no completed iteration for --gemini-hang-timeout seconds (a peer is
  frozen, or this rank is stuck) → the same. It starts after restore, so a slow start-up
  does not trip it. Under a supervisor (in-place recovery) it first raises an alarm on the
  status page instead: the supervisors then kill whichever child is frozen, which fails
  the blocked collectives here and recovers in place; only if nothing moves for another
  hang timeout does it exit for the full restart. It also heartbeats the status page.
- SIGTERM (a preemption notice, or torchrun stopping the group): the checkpointer's
  flush() writes the newest complete snapshot to --save if newer than the checkpoint there,
  then exit EXIT_RESTART. Not 0: a worker that exits 0 tells its agent it finished, and a
  lone worker's agent would then leave the job. When the agent itself is shutting down
  the code is ignored anyway. Without a launcher (a plain `python pretrain_gpt.py`: no
  TORCHELASTIC_* variables) nobody restarts it, so the last line says how to resume
  (rerun the same command) and how to free the memory store it leaves behind.

Signals are received through signal.set_wakeup_fd by a thread, not by a Python-level
handler: the main thread may sit in a C++ collective for a long time, and Python runs
signal handlers only between bytecodes of the main thread.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from gemini_lm.checkpoint.protocol import Checkpointer
from gemini_lm.errors import EXIT_RESTART, PeerFailure, UsageError
from gemini_lm.log import ALL_RANKS, get_logger
from gemini_lm.resilience.breakpoints import Breakpoints
from gemini_lm.resilience.events import record_failure
from gemini_lm.resilience.status import TRAINING, StatusPage

log = get_logger(__name__)

# torch's own typed errors for a failed backend, network or store (NCCL, TCPStore).
_TORCH_PEER_ERRORS = tuple(getattr(dist, n) for n in ("DistBackendError", "DistNetworkError", "DistStoreError")
                           if hasattr(dist, n))


def under_launcher() -> bool:
    """torchrun (or an agent like it) runs this worker and restarts it when it exits 75."""
    return any(k.startswith("TORCHELASTIC_") for k in os.environ)


def is_peer_failure(exc: BaseException) -> bool:
    """A failure recovery can fix (a dead or hung peer), as opposed to a bug: by type only."""
    return isinstance(exc, (PeerFailure, ConnectionError, TimeoutError) + _TORCH_PEER_ERRORS)


class FailureHandler:
    def __init__(self, log_dir: str, rank: int, machine: str, hang_timeout_s: float,
                 flush_timeout_s: float = 20.0, status: StatusPage | None = None,
                 exit_code: int = EXIT_RESTART):
        """`exit_code`: what fail() exits with — EXIT_RESTART (torchrun restarts the workers)
        or, for a supervised process of in-place recovery, EXIT_REFORK (its supervisor
        re-forks it warm and it rejoins the next generation)."""
        self.log_dir, self.rank, self.machine, self.status = log_dir, rank, machine, status
        self.exit_code = exit_code
        self.hang_timeout_s, self.flush_timeout_s = hang_timeout_s, flush_timeout_s
        self.rendezvous_done_at = time.time()   # built right after init_process_group
        self.iteration = 0                      # last completed iteration
        self.checkpointer: Checkpointer | None = None
        self.breakpoints = Breakpoints(log_dir)
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._old_wakeup_fd: int | None = None
        self._old_handlers: dict = {}
        self._install_signals()

    # ---- wiring -----------------------------------------------------------------------
    def attach(self, checkpointer: Checkpointer) -> None:
        """After restore: SIGTERM can flush its snapshots, injection breakpoints can hook it."""
        self.checkpointer = checkpointer
        self.breakpoints.attach(checkpointer)

    @contextlib.contextmanager
    def guard(self):
        """Collective failures inside the block exit the process for a restart."""
        try:
            yield
        except BaseException as exc:
            self.handle(exc)
            raise

    def handle(self, exc: BaseException) -> None:
        """Exit EXIT_RESTART for a collective failure; otherwise record it and return."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit, UsageError)):
            return
        if is_peer_failure(exc):
            self.fail("collective_error", f"{type(exc).__name__}: {exc}")
        record_failure(self.log_dir, cause="exception", rank=self.rank, machine=self.machine,
                       iteration=self.iteration, detail=f"{type(exc).__name__}: {exc}")

    def fail(self, cause: str, detail: str = "") -> None:
        """Record the failure and exit now, without clean-up (see the module docstring)."""
        with self._exiting:   # one exit path wins (watchdog vs. main thread vs. SIGTERM)
            record_failure(self.log_dir, cause=cause, rank=self.rank, machine=self.machine,
                           iteration=self.iteration, detail=detail)
            if self.exit_code != EXIT_RESTART:
                then = f"exiting {self.exit_code} for a warm re-fork"
            elif under_launcher():
                then = f"exiting {self.exit_code} for a restart"
            else:
                then = f"stopped (exit {self.exit_code}): no launcher restarts it; {self._resume_hint()}"
            log.warning(f"{cause} after iteration {self.iteration}: {detail[:200]}; {then}", extra=ALL_RANKS)
            sys.stdout.flush()
            os._exit(self.exit_code)

    def _resume_hint(self) -> str:
        """How to go on without a launcher, and what the memory store costs meanwhile."""
        hint = "to resume, rerun the same command"
        try:
            memory = None if self.checkpointer is None else self.checkpointer.memory_store()
        except Exception:  # noqa: BLE001 - only a hint: the exit must happen regardless
            memory = None
        if memory is not None:
            path, nbytes = memory
            hint += (f" (it restores from the memory store {path}, {nbytes / 1e6:.1f} MB, kept until then); "
                     f"to free that memory instead: rm -rf {os.path.dirname(path)}")
        return hint

    # ---- watchdog ---------------------------------------------------------------------
    def progress(self, iteration: int) -> None:
        self.iteration = iteration
        self._last_progress = now = time.monotonic()
        if self.status is not None:
            self.status.set(iteration=iteration, progress=now)

    def restarted_clock(self, rank: int) -> None:
        """A recovery or a phase change is progress too (its own duration is bounded by
        the same hang timeout); `rank`: this process's rank from now on."""
        self.rank = rank
        self._last_progress = time.monotonic()

    def start_watchdog(self) -> None:
        self._last_progress = time.monotonic()
        watch = self.hang_timeout_s > 0 or self.status is not None
        if watch and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="gemini-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        # Supervised: a fast tick, so the supervisor can tell a frozen process by its heartbeat.
        period = 0.1 if self.status is not None else min(1.0, self.hang_timeout_s / 10)
        while not self._stop.wait(period):
            now = time.monotonic()
            idle = now - self._last_progress
            if self.status is not None:
                self.status.set(heartbeat=now)
                if self.hang_timeout_s <= 0:
                    continue
                if idle > self.hang_timeout_s and self.status.get("alarm") < 0 \
                        and self.status.get("phase") == TRAINING:
                    self.status.set(alarm=self.status.get("generation"))   # the supervisors act
                    record_failure(self.log_dir, cause="hang", rank=self.rank, machine=self.machine,
                                   iteration=self.iteration, detail=f"no completed iteration for {idle:.1f}s "
                                   f"(--gemini-hang-timeout {self.hang_timeout_s:g}): alarm raised")
                    log.warning(f"no completed iteration for {idle:.1f}s: hang alarm raised", extra=ALL_RANKS)
                if idle <= 2 * self.hang_timeout_s:
                    continue
            if self.hang_timeout_s > 0 and idle > self.hang_timeout_s:
                # Where every thread is stuck (training, replication, commit) is what an
                # operator needs to tell a dead peer from a local deadlock.
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self.fail("hang", f"no completed iteration for {idle:.1f}s "
                                  f"(--gemini-hang-timeout {self.hang_timeout_s:g})")

    # ---- signals ----------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return   # set_wakeup_fd only works there; an embedded caller keeps its own handling
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            # The Python-level handler does nothing: the thread below acts on the wakeup byte.
            self._old_handlers[sig] = signal.signal(sig, lambda *_: None)
        self._old_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._signal_loop, args=(reader,), name="gemini-signals",
                         daemon=True).start()

    def _signal_loop(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == signal.SIGTERM:
                    self._on_sigterm()
                elif signum == signal.SIGUSR1:
                    self.breakpoints.arm()

    def _on_sigterm(self) -> None:
        self.exit_code = EXIT_RESTART   # a preemption or torchrun stopping us: never re-fork
        detail = "SIGTERM"
        try:
            flushed = None if self.checkpointer is None else self.checkpointer.flush(self.flush_timeout_s)
            if flushed is not None:
                detail += f"; flushed iteration {flushed} to --save"
        except Exception as exc:  # noqa: BLE001 - the exit must happen regardless
            detail += f"; flush failed: {exc!r}"
        self.fail("sigterm", detail)

    def close(self) -> None:
        self._stop.set()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_wakeup_fd = None
            for s in self._sockets:
                s.close()

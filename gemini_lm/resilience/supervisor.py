"""The supervisor: each torchrun worker slot imports everything once and forks the training process.

    torchrun agent ──▶ supervisor (this) ──fork──▶ training child
                        single-threaded, never a process group, never CUDA

A training child that dies of a signal (SIGKILL, a segfault) is re-forked in tens of
milliseconds, warm: torch, the project and its first kernels are already loaded, so the
replacement builds its model and joins the next generation (membership.py) in well under
a second; torchrun never sees a worker die. Otherwise the child's exit is the slot's:
0 done, 2 bad input, EXIT_RESTART the full restart (the cold path), anything else a bug —
except EXIT_REFORK: the child saw a peer fail before it could recover in place (during
its set-up), and is re-forked like a dead one.

Every `poll_s` the supervisor also, through the job store:
- heartbeats (hb/<slot>): a machine whose supervisors stop is declared lost;
- relays its child's hang alarm (hang/g<G>), and SIGKILLs its own child when an alarm is
  up and the child's heartbeat is stale (a frozen process: nothing else can unblock the
  peers' gloo operations — on gloo no abort reaches an operation in flight);
- SIGKILLs its child when it stays behind the newest generation for `stale_s` (blocked in a
  collective or a process-group set-up with peers that moved on): it is re-forked warm.

The supervisor never starts a thread and forks only after its warm-up ran torch on one
intra-op thread (a child would hang in a pool its parent left behind; numpy's OpenBLAS
pool re-initializes itself after a fork).

SIGTERM (torchrun stopping the group, a preemption): the child gets it too (same process
group) and flushes its newest snapshot; the supervisor SIGCONTs it (a frozen child would
never act on it), waits up to `grace_s`, then SIGKILLs it. It never re-forks then.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from gemini_lm.errors import EXIT_REFORK, EXIT_RESTART, EXIT_USAGE, UsageError
from gemini_lm.resilience import job_store
from gemini_lm.resilience.events import record_failure
from gemini_lm.resilience.procs import TRAINING_NAME
from gemini_lm.resilience.status import DONE, RECOVERING, SPARE, TRAINING, StatusPage

_QUICK_DEATH_S = 5.0       # a child dying this soon after its fork, _CRASH_LOOP times in a row: give up
_CRASH_LOOP = 5


@dataclass
class ChildContext:
    """What a forked training child knows about its slot and its predecessor."""
    slot: int
    machine: str
    local_rank: int
    status: StatusPage
    incarnation: int             # 0: the slot's first child in this round
    previous_generation: int     # the generation its predecessor was in (-1: none)
    predecessor_was_member: bool  # its predecessor trained: its death must start a new generation


class Supervisor:
    def __init__(self, *, slot: int, machine: str, local_rank: int, log_dir: str, multi_rank: bool,
                 poll_s: float = 0.05, store_every_s: float = 0.1, stale_s: float = 1.5,
                 frozen_s: float = 1.0, grace_s: float = 30.0, store_lost_s: float = 3.0):
        self.slot, self.machine, self.local_rank, self.log_dir = slot, machine, local_rank, log_dir
        self.multi_rank = multi_rank
        self.poll_s, self.store_every_s, self.stale_s = poll_s, store_every_s, stale_s
        self.frozen_s, self.grace_s, self.store_lost_s = frozen_s, grace_s, store_lost_s
        self.stopping = False
        self._killed = False         # this supervisor killed its current child
        self.keeper = None           # pid of the job-store keeper this slot hosts
        self.store = None
        self.status = StatusPage()

    # ---- set-up -------------------------------------------------------------------------
    def start(self, timeout) -> None:
        """Before the first fork: die with the agent, host the job store if this slot must, connect."""
        if "TORCHELASTIC_RUN_ID" in os.environ:
            job_store.die_with_parent()   # a SIGKILLed agent must not leave workers training
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        if self.multi_rank:
            self.keeper = job_store.start_keeper_if_needed(self.slot)
            self.store = job_store.connect(timeout)
            self.store.set(f"machine/{self.slot}", self.machine)
            self.store.add(f"hb/{self.slot}", 1)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    # ---- the fork loop ------------------------------------------------------------------
    def run(self, child_main: Callable[[ChildContext], int]) -> int:
        incarnation, quick_deaths = 0, 0
        generation, was_member = -1, False
        while True:
            self.status.reset(generation=generation, member=int(was_member))
            ctx = ChildContext(self.slot, self.machine, self.local_rank, self.status, incarnation,
                               generation, was_member)
            forked_at = time.monotonic()
            pid = os.fork()
            if pid == 0:
                self._child(child_main, ctx)
            self._killed = False
            how, value = self._watch(pid)
            if how == "store_lost":
                return EXIT_RESTART
            if how == "exit" and (value != EXIT_REFORK or self.stopping):
                if value == 0 and self.keeper is not None:
                    time.sleep(2.0)   # the job store dies with us: let the others read "done" first
                return value
            st = self.status.snapshot()
            if how == "signal":
                if self.stopping or value in (signal.SIGTERM, signal.SIGINT):
                    return 128 + value
                record_failure(self.log_dir, cause="worker_died", rank=st["rank"], machine=self.machine,
                               iteration=max(st["iteration"], 0),
                               detail=f"training process {pid} (slot {self.slot}) killed by "
                                      f"{signal.Signals(value).name}; re-forked warm")
            # Only deaths we did not cause count toward a crash loop (a stranded child we
            # killed is re-forked as often as it takes).
            quick = time.monotonic() - forked_at < _QUICK_DEATH_S and not self._killed
            quick_deaths = quick_deaths + 1 if quick else 0
            if quick_deaths >= _CRASH_LOOP:
                print(f"[slot {self.slot}] the training process died {quick_deaths} times within "
                      f"{_QUICK_DEATH_S:g}s of its start: giving up on re-forking", file=sys.stderr, flush=True)
                return EXIT_RESTART
            generation, was_member = st["generation"], bool(st["member"])
            incarnation += 1

    def _child(self, child_main, ctx: ChildContext) -> None:
        code = 1
        try:
            job_store.die_with_parent()
            job_store.set_process_name(TRAINING_NAME)   # how tools tell it from its supervisor
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = child_main(ctx)
        except UsageError as exc:   # bad input found by the training process: one line, as run_cli does
            print(f"error: {exc}", file=sys.stderr)
            code = EXIT_USAGE
        except KeyboardInterrupt:
            code = 130
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a bug: say where, exit non-zero
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)

    def _watch(self, pid: int) -> tuple[str, int]:
        """Until the child ends: ("exit", code), ("signal", signum) or ("store_lost", 0)."""
        fd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        next_store, behind_since, store_failing_since, term_at = 0.0, None, None, None
        try:
            while not poller.poll(int(self.poll_s * 1000)):
                now = time.monotonic()
                if self.stopping and term_at is None:
                    term_at = now
                    for sig in (signal.SIGCONT, signal.SIGTERM):   # a frozen child must wake to act
                        _kill(pid, sig)
                if term_at is not None:
                    if now - term_at > self.grace_s:
                        _kill(pid, signal.SIGKILL)
                    continue
                if self.store is None or now < next_store:
                    continue
                next_store = now + self.store_every_s
                try:
                    behind_since = self._tend(pid, now, behind_since)
                    store_failing_since = None
                except RuntimeError:   # the store host is gone: nothing can be agreed any more
                    store_failing_since = store_failing_since or now
                    if now - store_failing_since > self.store_lost_s:
                        _kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        return "store_lost", 0
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(fd)
        if os.WIFSIGNALED(status):
            return "signal", os.WTERMSIG(status)
        code = os.waitstatus_to_exitcode(status)
        return "exit", code if code in (0, EXIT_USAGE, EXIT_RESTART) else code

    def _tend(self, pid: int, now: float, behind_since: float | None) -> float | None:
        """One store round: heartbeat, relay a hang alarm, free a frozen or stranded child."""
        s, st = self.store, self.status.snapshot()
        if st["phase"] == DONE:
            return None   # finishing: the store (its keeper may already be gone) is no longer needed
        s.add(f"hb/{self.slot}", 1)
        generation = int(s.get("gen")) if s.check(["gen"]) else 0
        if st["alarm"] >= 0 and not s.check([f"hang/g{st['alarm']}"]):
            s.set(f"hang/g{st['alarm']}", str(self.slot))
        mine = st["generation"]
        if st["phase"] in (TRAINING, RECOVERING) and mine >= 0 and s.check([f"hang/g{mine}"]) \
                and now - st["heartbeat"] > self.frozen_s:
            self._kill_child(pid)    # frozen while its peers wait for it
            return None
        if st["phase"] in (TRAINING, RECOVERING, SPARE) and 0 <= mine < generation:
            behind_since = behind_since or now
            if now - behind_since > self.stale_s:
                self._kill_child(pid)   # stranded in an old generation: a warm re-fork rejoins
                return None
            return behind_since
        return None


    def _kill_child(self, pid: int) -> None:
        self._killed = True
        _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

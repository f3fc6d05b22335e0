"""Recovery reports: one complete recovery.jsonl record per recovery, written by rank 0.

The restore record (gemini/restore.py) knows the retrieval phases but not what came
before (the failure, its detection, the restart) or after (the first iteration). So the
training loop hands it to a RecoveryReporter that holds it back and writes it once the
first iteration after the restore completes, joined with:

- injections.jsonl: the newest injection since the previous recovery (kind, time);
- failures.jsonl: the first failure event since then (detection time, cause) and the
  newest iteration any rank had completed before it;
- this process: its start time (the agent restarted workers), the end of rendezvous;
- metrics.jsonl: the last iteration logged before the restart.

Phases, as timestamps (`*_at`, seconds since the epoch) and durations (`*_s`), by the
path the recovery took (`path`):
- restart (torchrun restarted the workers): injected → detected → workers started →
  rendezvous done → restore started → retrieved → loaded → first iteration completed;
- inplace (survivors kept running, a warm process replaced the dead one): injected →
  detected → aborted (this rank dropped its groups) → re-formed (the next generation's
  groups exist) → loaded → first iteration completed, plus replacement_ready_at (the
  replacement registered) where a replacement took part.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from gemini_lm.log import get_logger
from gemini_lm.resilience.events import FAILURES, INJECTIONS, read_jsonl

log = get_logger(__name__)


def process_start_time(pid: int | str = "self") -> float:
    """When a process was created (for a worker: the agent's restart), from /proc; now if unknown.

    Its start in clock ticks since boot, against /proc/uptime read at the same moment: the
    boot time in /proc/stat has whole seconds only, which put up to a second of "restart"
    into the next phase.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            now, uptime = time.time(), float(f.read().split()[0])
        return now - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def _last_logged_iteration(metrics_path: str) -> int | None:
    last = None
    for rec in read_jsonl(metrics_path):
        if "loss" in rec:
            last = max(last or 0, rec["iteration"])
    return last


# Written by rank 0 when a run finishes cleanly (training/report.py), removed when the next
# run of the same log dir starts: its presence says the previous run was not interrupted.
FINISHED = "summary.json"


def is_restart(log_dir: str) -> bool:
    """A restart of an interrupted run: torchrun restarted it, or the log dir holds metrics
    of a run that did not finish cleanly. A first start, or a new run of a job whose
    previous run finished, is not."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return True
    return (os.path.exists(os.path.join(log_dir, "metrics.jsonl"))
            and not os.path.exists(os.path.join(log_dir, FINISHED)))


class RecoveryReporter:
    """Turns the checkpointer's restore record into a console line now and a complete
    recovery.jsonl record after the first iteration. `write_record(record)` writes it
    (the metrics logger: rank 0 only); `metrics_path` tells what was logged before."""

    def __init__(self, write_record: Callable[[dict], None], metrics_path: str, log_dir: str,
                 rendezvous_done_at: float, enabled: bool):
        self.write_record, self.metrics_path, self.log_dir = write_record, metrics_path, log_dir
        self.rendezvous_done_at, self.enabled = rendezvous_done_at, enabled
        self.workers_started_at = process_start_time()
        self.pending: dict | None = None

    def restored(self, record: dict | None) -> None:
        """The restore's record (None: this checkpointer reports none). Nothing restored is a
        recovery only for a restart of an interrupted run, and then says so loudly (nothing at
        all, or only corrupt copies in memory); a first start, or a new run after a finished
        one, gets one plain line and no record."""
        if record is None:
            return
        if record["source"] == "none":
            corrupt = record.get("corrupt_copies") or 0
            if not corrupt and not is_restart(self.log_dir):
                log.info("starting from iteration 0")
                return
            if self.enabled:
                found = f"only {corrupt} corrupt copies" if corrupt else "no checkpoint"
                log.warning(f"GEMINI found {found} in memory and none on disk: "
                            "STARTING FRESH FROM ITERATION 0")
        else:
            log.info(f"recovery: iteration {record['iteration']} from {record['source']} "
                     f"({record['bytes_moved'] / 2**20:.1f} MiB moved) in {record['restore_s']:.2f}s")
        self.pending = dict(record)
        self.pending["last_logged_iteration"] = _last_logged_iteration(self.metrics_path)

    def first_iteration_done(self, iteration: int) -> dict | None:
        """Complete and write the pending record (rank 0 writes; others just drop it)."""
        if self.pending is None:
            return None
        rec = complete_record(self.pending, self.log_dir, first_iteration=iteration,
                              first_iteration_at=time.time(),
                              workers_started_at=self.workers_started_at,
                              rendezvous_done_at=self.rendezvous_done_at)
        self.pending = None
        if self.enabled:
            self.write_record(rec)
            log.info(summary_line(rec))
        return rec


def _since_previous_recovery(log_dir: str) -> float:
    prev = read_jsonl(os.path.join(log_dir, "recovery.jsonl"))
    return max((r.get("first_iteration_at") or r.get("time") or 0.0 for r in prev), default=0.0)


def complete_record(restore: dict, log_dir: str, *, first_iteration: int, first_iteration_at: float,
                    workers_started_at: float, rendezvous_done_at: float) -> dict:
    after = _since_previous_recovery(log_dir)
    restore_started = restore.get("started_at", rendezvous_done_at)
    injections = [e for e in read_jsonl(os.path.join(log_dir, INJECTIONS))
                  if after < e["time"] <= restore_started]
    failures = [e for e in read_jsonl(os.path.join(log_dir, FAILURES))
                if after < e["time"] <= restore_started]
    injection = injections[-1] if injections else None
    detection = min(failures, key=lambda e: e["time"]) if failures else None
    retrieved_at = restore_started + restore.get("agree_s", 0.0) + restore.get("retrieve_s", 0.0)
    loaded_at = restore.get("time", retrieved_at)
    reached = [v for v in [restore.get("last_logged_iteration")] + [e["iteration"] for e in failures]
               if v is not None]
    before = max(reached) if reached else None
    start = injection["time"] if injection else detection["time"] if detection else workers_started_at
    rec = {
        **restore,
        "path": restore.get("path", "restart"),
        "failure_kind": injection["kind"] if injection else detection["cause"] if detection else "unknown",
        "failure_cause": detection["cause"] if detection else None,
        "injected_at": injection["time"] if injection else None,
        "detected_at": detection["time"] if detection else None,
        "workers_started_at": workers_started_at,
        "rendezvous_done_at": rendezvous_done_at,
        "restore_started_at": restore_started,
        "retrieved_at": retrieved_at,
        "loaded_at": loaded_at,
        "first_iteration": first_iteration,
        "first_iteration_at": first_iteration_at,
        "iteration_before_failure": before,
        "iterations_lost": max(0, before - restore["iteration"]) if before is not None else None,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        "failure_events": len(failures),
    }
    rec.update(phase_durations(rec, start))
    return rec


PHASES = {"restart": ("detect_s", "restart_s", "rendezvous_s", "setup_s", "retrieval_s", "first_iteration_s"),
          "inplace": ("detect_s", "abort_s", "reform_s", "retrieval_s", "first_iteration_s")}


def phase_durations(rec: dict, start: float) -> dict:
    """Consecutive phases of the record's path; a phase whose start is unknown is folded
    into the next one."""
    if rec.get("path") == "inplace":
        marks = [("detect_s", rec["detected_at"]), ("abort_s", rec.get("aborted_at")),
                 ("reform_s", rec.get("reformed_at")), ("retrieval_s", rec["loaded_at"]),
                 ("first_iteration_s", rec["first_iteration_at"])]
    else:
        marks = [("detect_s", rec["detected_at"]), ("restart_s", rec["workers_started_at"]),
                 ("rendezvous_s", rec["rendezvous_done_at"]), ("setup_s", rec["restore_started_at"]),
                 ("retrieval_s", rec["loaded_at"]), ("first_iteration_s", rec["first_iteration_at"])]
    out, prev = {}, start
    for name, t in marks:
        if t is None:
            out[name] = None
            continue
        out[name] = max(0.0, t - prev)
        prev = max(prev, t)
    out["recovery_s"] = rec["first_iteration_at"] - start
    if rec.get("replacement_ready_at") is not None:
        out["replacement_ready_s"] = max(0.0, rec["replacement_ready_at"] - start)
    return out


def summary_line(rec: dict) -> str:
    def s(key):
        return "-" if rec.get(key) is None else f"{rec[key]:.2f}s"
    lost = rec.get("iterations_lost")
    path = rec.get("path", "restart")
    phases = ", ".join(f"{p[:-2].replace('_', ' ')} {s(p)}" for p in PHASES[path])
    return (f"recovery ({path}): {rec['failure_kind']} -> iteration {rec['iteration']} from {rec['source']} "
            f"in {rec['recovery_s']:.2f}s ({phases}); {'?' if lost is None else lost} iteration(s) lost")


"""What the console says at the two ends of a run: where its outputs go, and what it did.

A clean finish also writes `<log-dir>/summary.json` (recovery_report.FINISHED). Its presence
tells the next run of the same log dir that this one was not interrupted, so that run is not
taken for a recovery; that next run removes it when it starts.
"""
from __future__ import annotations

import json
import os
import time

from gemini_lm.checkpoint.naming import iter_dir_name
from gemini_lm.checkpoint.persistent import latest_iteration
from gemini_lm.config import Config
from gemini_lm.log import get_logger
from gemini_lm.resilience.events import read_jsonl
from gemini_lm.resilience.recovery_report import FINISHED

log = get_logger(__name__)


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def free_hint(memory: tuple[str, int]) -> str:
    """'<path> (98.2 MB; free it with rm -rf <job dir>)': the store of this machine, and the
    job's directory above it (every machine of the job on this host)."""
    path, nbytes = memory
    return f"{path} ({mb(nbytes)}; free it with `rm -rf {os.path.dirname(path)}`)"


def outputs_line(cfg: Config, memory: tuple[str, int] | None) -> str:
    c = cfg.checkpoint
    parts = [f"metrics {os.path.join(cfg.logging.log_dir, 'metrics.jsonl')}"]
    if c.save:
        every = f"every {c.save_interval} iterations and " if c.save_interval else ""
        parts.append(f"checkpoints {c.save} ({every}at the end)")
    else:
        parts.append("no checkpoints on disk (--save)")
    if memory is not None:
        parts.append(f"memory store {memory[0]} ({mb(memory[1])})")
    return "outputs: " + "; ".join(parts)


def run_started(log_dir: str) -> None:
    """Rank 0, once the restore has been reported: the previous run's summary goes."""
    path = os.path.join(log_dir, FINISHED)
    try:
        with open(path) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        return
    log.info(f"{log_dir} holds a run that finished at iteration {prev.get('iteration')}: this run appends "
             f"to its metrics.jsonl (another --log-dir keeps runs apart)")
    os.unlink(path)


def run_finished(cfg: Config, *, first_iteration: int, iteration: int, started_at: float,
                 loss: float | None, valid_loss: float | None, memory: tuple[str, int] | None) -> dict:
    """Rank 0, after a clean finish: the summary (printed, and written to summary.json)."""
    log_dir, c = cfg.logging.log_dir, cfg.checkpoint
    recoveries = len(read_jsonl(os.path.join(log_dir, "recovery.jsonl")))
    kept = memory is not None and cfg.gemini.gemini_keep_store
    saved = latest_iteration(c.save) if c.save else None
    summary = {"time": time.time(), "first_iteration": first_iteration, "iteration": iteration,
               "elapsed_s": time.time() - started_at, "loss": loss, "valid_loss": valid_loss,
               "log_dir": log_dir, "recoveries": recoveries,
               "checkpoint": os.path.join(c.save, iter_dir_name(saved)) if saved is not None else None,
               "memory_store": memory[0] if kept else None}
    tmp = os.path.join(log_dir, "." + FINISHED + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(log_dir, FINISHED))   # whole or absent
    losses = "" if loss is None else f"; final loss {loss:.4f}"
    if valid_loss is not None:
        losses += f", validation {valid_loss:.4f}"
    log.info(f"done: iterations {first_iteration} -> {iteration} in {summary['elapsed_s']:.1f}s{losses}")
    where = [f"metrics {os.path.join(log_dir, 'metrics.jsonl')}",
             f"{recoveries} recovery record(s) in recovery.jsonl" if recoveries else "no recoveries",
             f"checkpoint {summary['checkpoint']}" if saved is not None else "no checkpoint on disk (--save)"]
    if memory is not None:
        where.append(f"memory store kept at {free_hint(memory)}" if kept else "memory store freed")
    log.info("outputs: " + "; ".join(where))
    return summary

"""Failure injection into a local cluster (tools/local_cluster.py writes <log-dir>/cluster.json).

Kinds and targets:
    worker:N    SIGKILL the worker with global rank N (a software failure)
    machine:N   SIGKILL machine slot N's agent and workers, wipe its memory store (hardware failure)
    hang:N      SIGSTOP the worker with global rank N (a frozen process)
    sigterm:N   SIGTERM the worker with global rank N (a preemption notice)

A machine slot keeps its number when a replacement takes it over. Options:
    @iteration=N            wait until an iteration >= N is logged after the injection is armed
                            (metrics.jsonl; use --log-interval 1 for precision)
    @during=copy|snapshot|send|receive|persist
                            pause the target inside that window first (resilience/breakpoints.py),
                            with @iteration=N at the first checkpoint of an iteration >= N: the
                            target is armed as soon as it trains (an iteration is logged) and
                            stops there itself. For machine:N the machine's lowest-rank worker
                            is paused

Every delivered injection is appended to <log-dir>/injections.jsonl with its time.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable

from gemini_lm.errors import UsageError
from gemini_lm.resilience import procs
from gemini_lm.resilience.breakpoints import WINDOWS, arm_path, hit_path
from gemini_lm.resilience.events import record_injection

KINDS = ("worker", "machine", "hang", "sigterm")


@dataclass(frozen=True)
class Injection:
    kind: str
    target: int
    at_iteration: int | None = None
    during: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Injection":
        """'KIND:TARGET[@iteration=N][@during=WINDOW]'."""
        head, *opts = spec.split("@")
        kind, sep, target = head.partition(":")
        if kind not in KINDS or not sep or not target.isdigit():
            raise UsageError(f"--inject {spec!r}: expected KIND:N with KIND one of {', '.join(KINDS)}")
        kw: dict = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "iteration" and value.isdigit():
                kw["at_iteration"] = int(value)
            elif key == "during" and value in WINDOWS:
                kw["during"] = value
            else:
                raise UsageError(f"--inject {spec!r}: unknown option {opt!r} "
                                 f"(iteration=N or during={'|'.join(WINDOWS)})")
        return cls(kind, int(target), **kw)


def read_cluster(log_dir: str) -> dict:
    path = os.path.join(log_dir, "cluster.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: is tools/local_cluster.py running with --log-dir {log_dir}?") from None


def metrics_size(log_dir: str) -> int:
    try:
        return os.path.getsize(os.path.join(log_dir, "metrics.jsonl"))
    except OSError:
        return 0


def wait_for_iteration(log_dir: str, iteration: int, offset: int, timeout_s: float,
                       poll_s: float = 0.02) -> int:
    """Wait until metrics.jsonl, past byte `offset`, logs an iteration >= `iteration`."""
    path = os.path.join(log_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout_s
    pending = b""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        offset += len(data)
        *lines, pending_tail = (pending + data).split(b"\n")
        pending = pending_tail
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec.get("iteration", -1) >= iteration:
                return rec["iteration"]
        time.sleep(poll_s)
    raise TimeoutError(f"iteration {iteration} not logged within {timeout_s:.0f}s")


def _worker_pid(cluster: dict, rank: int) -> dict:
    for w in procs.workers(cluster["cluster_id"], cluster["log_dir"]):
        if w["rank"] == rank:
            return w
    raise UsageError(f"no live worker with rank {rank} in cluster {cluster['cluster_id']}")


def _machine(cluster: dict, slot: int) -> dict:
    live = [m for m in cluster["machines"] if m["slot"] == slot and m["state"] in ("starting", "running")]
    if not live:
        raise UsageError(f"machine slot {slot} has no running machine")
    return live[-1]


def kill_machine(cluster: dict, machine: dict) -> list[int]:
    """SIGKILL an agent and every process of its machine, then wipe its memory store."""
    killed = []
    procs.signal_group(machine["agent_pid"], signal.SIGKILL)
    killed.append(machine["agent_pid"])
    for pid, env in procs.cluster_processes(cluster["cluster_id"]).items():
        # the agent itself may still be listed (not yet reaped): each pid once
        if env.get("GEMINI_MACHINE_ID") == machine["id"] and pid not in killed:
            procs.signal_group(pid, signal.SIGKILL)
            killed.append(pid)
    wipe_machine_store(cluster["store_root"], machine["id"])
    return killed


def wipe_machine_store(store_root: str, machine_id: str) -> None:
    """Its memory is gone, as on real hardware: <store_root>/<job>/<machine>/."""
    for path in glob.glob(os.path.join(store_root, "*", machine_id)):
        shutil.rmtree(path, ignore_errors=True)


def pause_in_window(log_dir: str, pid: int, window: str, from_iteration: int | None, timeout_s: float) -> dict:
    """Arm worker `pid` to stop in `window` at an iteration >= `from_iteration`; wait until it
    has (it is then SIGSTOPped); what it recorded there (time, window, iteration, thread)."""
    arm = arm_path(log_dir, pid)
    os.makedirs(os.path.dirname(arm), exist_ok=True)
    with open(arm + ".tmp", "w") as f:
        json.dump({"during": window, "iteration": from_iteration}, f)
    os.replace(arm + ".tmp", arm)
    os.kill(pid, signal.SIGUSR1)
    hit = hit_path(log_dir, pid)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(hit):
        if time.monotonic() > deadline or not procs.is_alive(pid):
            raise TimeoutError(f"worker {pid} did not reach the {window} window within {timeout_s:.0f}s")
        time.sleep(0.005)
    # The hit is written just before the worker stops itself: wait until all its threads have.
    while not procs.is_stopped(pid):
        if time.monotonic() > deadline or not procs.is_alive(pid):
            raise TimeoutError(f"worker {pid} did not stop in the {window} window within {timeout_s:.0f}s")
        time.sleep(0.005)
    with open(hit) as f:
        info = json.load(f)
    os.remove(hit)
    return info


def inject(log_dir: str, inj: Injection, *, offset: int | None = None, timeout_s: float = 600.0,
           source: str = "inject_failure", on_paused: Callable[[dict], None] | None = None) -> dict:
    """Wait for the trigger, deliver the failure, record it; returns the injections.jsonl event.

    `offset`: metrics.jsonl bytes already there (only iterations logged after count).
    `on_paused(event)`: with `during`, called while the target is stopped inside the
    window, before the failure is delivered (to look at the stores at that moment).
    """
    offset = metrics_size(log_dir) if offset is None else offset
    if inj.during is not None:
        wait_for_iteration(log_dir, 0, offset, timeout_s)   # training runs: its signal handling is set up
    elif inj.at_iteration is not None:
        wait_for_iteration(log_dir, inj.at_iteration, offset, timeout_s)
    cluster = read_cluster(log_dir)
    event: dict = {**asdict(inj), "source": source}
    if inj.kind == "machine":
        machine = _machine(cluster, inj.target)
        mine = [w for w in procs.workers(cluster["cluster_id"], cluster["log_dir"]) if w["machine"] == machine["id"]]
        victim = mine[0] if mine else None   # its lowest training rank (or a spare)
    else:
        victim = _worker_pid(cluster, inj.target)
        machine = None
    if inj.during is not None and victim is not None:
        event["window"] = pause_in_window(log_dir, victim["pid"], inj.during, inj.at_iteration, timeout_s)
    if victim is not None:
        event["victim_rank"], event["victim_pid"] = victim["rank"], victim["pid"]
    if on_paused is not None and "window" in event:
        on_paused(dict(event, machine=machine["id"] if machine else victim["machine"]))
    event["time"] = time.time()   # when the failure is delivered: before anyone can detect it
    if inj.kind == "machine":
        event["machine"] = machine["id"]
        event["killed_pids"] = kill_machine(cluster, machine)
    elif inj.kind == "worker":
        procs.signal_pid(victim["pid"], signal.SIGKILL)
    elif inj.kind == "hang":
        procs.signal_pid(victim["pid"], signal.SIGSTOP)   # already stopped if paused in a window
    elif inj.kind == "sigterm":
        procs.signal_pid(victim["pid"], signal.SIGTERM)
        procs.signal_pid(victim["pid"], signal.SIGCONT)   # resume it if paused, so it can handle it
    if victim is not None and inj.kind != "machine":
        event["machine"] = victim["machine"]
    return record_injection(log_dir, event)

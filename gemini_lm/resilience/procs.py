"""Finding and signalling the processes of a local cluster through /proc (Linux).

Every process of a cluster — agents, workers, anything they start — carries
GEMINI_CLUSTER_ID in its environment, so the cluster and the injection tool find them
by that mark, whoever their parent is now (a SIGKILLed agent's workers are re-parented),
and clean-up can prove that nothing is left behind.
"""
from __future__ import annotations

import json
import os
import signal

CLUSTER_ENV = "GEMINI_CLUSTER_ID"


def process_env(pid: int) -> dict[str, str] | None:
    """The environment a process started with, or None if it is gone or not ours."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def is_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_stopped(pid: int) -> bool:
    """Every thread of the process is stopped (SIGSTOP: state T)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(s in ("T", "t") for s in states)


def cluster_processes(cluster_id: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process marked with this cluster id."""
    out = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        env = process_env(int(name))
        if env and env.get(CLUSTER_ENV) == cluster_id and is_alive(int(name)):
            out[int(name)] = env
    return out


def comm(pid: int) -> str:
    """The process's name (prctl PR_SET_NAME; the training process calls itself TRAINING_NAME)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a pid and its start time name one
    process for good, where a pid alone may have been reused since it was written down."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


TRAINING_NAME = "gemini-train"   # comm of a supervisor's training child (resilience/supervisor.py)


def workers(cluster_id: str, log_dir: str | None = None) -> list[dict]:
    """The processes that train, sorted by training rank (spares, rank None, last).

    torchrun sets RANK for its workers (not for agents). Under in-place recovery a worker
    is a supervisor whose forked child (named TRAINING_NAME) trains; the child's training
    rank may differ from torchrun's RANK (its slot) once a spare took over a lost rank, so
    it is read from <log-dir>/workers/slot<k>.json, which the child writes.
    """
    env_of = {pid: env for pid, env in cluster_processes(cluster_id).items()
              if "RANK" in env and "TORCHELASTIC_RUN_ID" in env}
    children = {pid for pid in env_of if comm(pid) == TRAINING_NAME}
    supervised = {parent(pid) for pid in children}
    found = []
    for pid, env in env_of.items():
        if pid in supervised or (pid not in children and parent(pid) in env_of):
            continue   # a supervisor (its child trains) or a helper it forked (the store keeper)
        slot = int(env["RANK"])
        rank = slot
        if pid in children and log_dir is not None:
            try:
                with open(os.path.join(log_dir, "workers", f"slot{slot}.json")) as f:
                    published = json.load(f)
                rank = published["rank"] if published.get("pid") == pid else None
            except (OSError, ValueError, KeyError):
                rank = None   # not trained yet: a spare
        found.append({"pid": pid, "rank": rank, "slot": slot, "local_rank": int(env.get("LOCAL_RANK", 0)),
                      "machine": env.get("GEMINI_MACHINE_ID"), "supervisor_pid": parent(pid) if pid in children else None,
                      "restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", 0))})
    return sorted(found, key=lambda w: (w["rank"] is None, w["rank"] if w["rank"] is not None else w["slot"]))


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def signal_group(pid: int, sig: int) -> bool:
    """Signal the process group led by `pid` (torchrun starts each worker in its own)."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return signal_pid(pid, sig)


def kill_all(cluster_id: str) -> list[int]:
    """SIGKILL every process of the cluster (and SIGCONT is not needed: SIGKILL wakes stopped ones)."""
    pids = list(cluster_processes(cluster_id))
    for pid in pids:
        signal_pid(pid, signal.SIGKILL)
    return pids

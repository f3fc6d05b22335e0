"""The job store: the key-value store in-place recovery coordinates through.

It must outlive any training process, so it is never hosted by one (with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torchrun's own worker store lives in rank 0's
`init_process_group` and dies with it). Where it comes from, first match:

1. GEMINI_JOB_STORE=host:port — a TCPStore hosted off the training machines
   (tools/local_cluster.py hosts one and sets this);
2. the torchrun agent's store, when torchrun shares it (TORCHELASTIC_USE_AGENT_STORE);
3. a store keeper process that the supervisor of slot 0 forks before anything else,
   on torchrun's MASTER_ADDR:MASTER_PORT (it dies with machine 0: losing that machine then
   means the cold path).

Every key lives under gemini_lm/<run id>/<round>/ (round_prefix), so a cold restart
never reads a key an earlier round wrote.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import signal

import torch.distributed as dist

from gemini_lm.resilience.listen import serve_store

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when our parent (the thread that forked us) dies; exit
    at once if it already has (the race between fork and prctl)."""
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def set_process_name(name: str) -> None:
    """/proc/<pid>/comm (15 bytes): tools tell a supervisor's processes apart by it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def round_prefix() -> str:
    """One per torchrun rendezvous round. Without a shared agent store torchrun picks a new
    MASTER_PORT every round, for every agent alike. With one (the static rendezvous) the
    port stays and every agent restarts in lockstep, so its restart count tells the rounds
    apart; restart counts are per agent, so they cannot be used otherwise (a replacement
    machine's agent starts from 0)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    rnd = os.environ.get("MASTER_PORT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rnd += "." + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"gemini_lm/{run}/{rnd}"


def _address() -> tuple[str, int, bool]:
    """(host, port, whether slot 0 must host it)."""
    if os.environ.get("GEMINI_JOB_STORE"):
        host, _, port = os.environ["GEMINI_JOB_STORE"].rpartition(":")
        return host, int(port), False
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), hosted


def start_keeper_if_needed(slot: int) -> int | None:
    """On slot 0, fork the process that hosts the job store when nobody else does; its pid.
    Call before any thread exists in this process (a TCPStore server is a thread)."""
    host, port, hosted = _address()
    if not hosted or slot != 0:
        return None
    pid = os.fork()
    if pid:
        return pid
    try:   # the keeper: host the store until our supervisor dies
        die_with_parent()
        set_process_name("gemini-keeper")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        store = serve_store(host, port, datetime.timedelta(seconds=60))   # on MASTER_ADDR only
        while store is not None:   # it serves for as long as it is referenced
            signal.pause()
    finally:
        os._exit(0)


def connect(timeout: datetime.timedelta) -> dist.Store:
    """A new client of the job store, scoped to this round (one per process: never share a
    store client across fork)."""
    host, port, _ = _address()
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    return dist.PrefixStore(round_prefix() + "/", store)

"""Helpers for end-to-end failure tests: run tools/local_cluster.py and check what it left."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

from gemini_lm.resilience import procs
from gemini_lm.resilience.events import read_jsonl
from gemini_lm.resilience.injection import Injection, inject
from tests.e2e import ROOT, read_losses, read_recoveries, tiny_gpt_args

TRAIN_ITERS = 16


def train_args(corpus: str, log_dir: str, *extra: str) -> list[str]:
    # TP=2 over 2 machines x 1 worker: each machine holds one shard, so a lost machine's
    # shard exists only as its peer's replica (with DP instead, every machine holds all).
    return tiny_gpt_args(corpus, log_dir, "--train-iters", str(TRAIN_ITERS),
                         "--tensor-model-parallel-size", "2",
                         "--gemini-profile-iters", "2",   # blocking replication, interleaved from iteration 3
                         *extra)


def run_cluster(log_dir: str, corpus: str, *, machines: int = 2, procs_per_machine: int = 1,
                injections: tuple[str, ...] = (), cluster_flags: tuple[str, ...] = (),
                train_flags: tuple[str, ...] = (), timeout_s: float = 150.0,
                drive: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run the cluster to the end. `drive()`, if given, runs in this process while the
    cluster trains (a test injecting failures itself); if it raises, the cluster is stopped."""
    if "--save" not in train_flags:   # the final state is saved and compared with the reference's
        train_flags = ("--save", os.path.join(log_dir, "ckpt"), *train_flags)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"),
           "--machines", str(machines), "--procs-per-machine", str(procs_per_machine),
           "--replacement-delay", "0.5", "--max-restarts", "4", "--timeout", str(timeout_s - 10),
           *cluster_flags, *[a for i in injections for a in ("--inject", i)],
           "--", "pretrain_gpt.py", *train_args(corpus, log_dir, "--distributed-timeout-seconds", "20",
                                                  *train_flags)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        if drive is not None:
            drive()
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:
        proc.send_signal(signal.SIGINT)   # the cluster kills everything it started
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if out.returncode != 0:
        raise AssertionError(f"cluster exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                             f"{cluster_logs(log_dir, 3000)}")
    return out


@contextlib.contextmanager
def killed_at_exit(proc: subprocess.Popen):
    """The block with `proc` (a cluster) running; if it still runs when the block ends, however
    it ends, it is killed and reaped: a failed test leaves no cluster behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def failure_event(log_dir: str, cause: str) -> dict | None:
    """The first failure event of `cause` in failures.jsonl, or None yet."""
    return next((f for f in read_jsonl(os.path.join(log_dir, "failures.jsonl")) if f["cause"] == cause), None)


def sigterm_while_a_peer_hangs(cmd: list[str], log_dir: str) -> dict:
    """Run `cmd` (local_cluster.py, one machine of two workers, --max-restarts 0): freeze rank 1
    at iteration 5, so rank 0 blocks in its next data-parallel collective, then SIGTERM rank 0.
    Rank 0's "sigterm" failure event (its detail says what it flushed); the cluster is stopped."""
    cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with killed_at_exit(cluster):
        inject(log_dir, Injection("hang", 1, at_iteration=5), offset=0, timeout_s=100, source="test")
        inject(log_dir, Injection("sigterm", 0), timeout_s=100, source="test")
        event = wait_for(lambda: failure_event(log_dir, "sigterm"), 60, "the SIGTERM failure event")
        cluster.send_signal(signal.SIGINT)   # and the frozen rank 1 with it
        cluster.wait(timeout=60)
    return event


def wait_for(predicate, timeout_s: float, what: str):
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def cluster_logs(log_dir: str, tail: int | None = None) -> str:
    """The agents' stderr, which their workers share: every worker's log lines."""
    logs = ""
    for path in sorted(glob.glob(os.path.join(log_dir, "cluster", "*.log"))):
        text = open(path, errors="replace").read()
        logs += f"\n--- {os.path.basename(path)}\n" + (text[-tail:] if tail else text)
    return logs


def cluster_state(log_dir: str) -> dict:
    with open(os.path.join(log_dir, "cluster.json")) as f:
        return json.load(f)


def assert_nothing_left(log_dir: str, finished: bool = True, save_dirs: tuple[str, ...] = ()) -> None:
    """No process of the cluster alive; after a finished run, nothing the workers should
    have cleaned up: no snapshot left in shared memory (the cluster lists what was there
    when the last worker had exited, before it removes the root), no half-written
    checkpoint directory or temporary file under --save, no unconsumed injection file."""
    state = cluster_state(log_dir)
    assert procs.cluster_processes(state["cluster_id"]) == {}
    if not finished:
        return
    assert state["state"] == "done", state["state"]
    assert state["store_left"] == [], f"the workers left in their memory stores: {state['store_left'][:10]}"
    for save in (os.path.join(log_dir, "ckpt"), *save_dirs):
        left = [n for n in os.listdir(save) if n.endswith(".partial") or ".tmp" in n] if os.path.isdir(save) else []
        assert left == [], f"half-written files under {save}: {left}"
    inject_dir = os.path.join(log_dir, "inject")
    assert not os.path.isdir(inject_dir) or os.listdir(inject_dir) == [], os.listdir(inject_dir)


def assert_no_corrupt_copy_offered(log_dir: str) -> None:
    """A crash at any point leaves every committed copy complete: recovery never had to
    skip one as corrupt (restore.py logs each it skips)."""
    logs = cluster_logs(log_dir)
    assert "corrupt copy" not in logs, [line for line in logs.splitlines() if "corrupt copy" in line][:3]


def store_of(log_dir: str, machine: str, shards: tuple[str, ...] | None = None) -> dict[str, list[int]]:
    """shard -> committed iterations in `machine`'s memory store now, each checksum-verified
    (a record whose payload is torn, or pinned by a writer, fails here). Only `shards` if
    given: those no running process writes meanwhile."""
    from gemini_lm.gemini.store import MemoryStore

    state = cluster_state(log_dir)
    path = os.path.join(state["store_root"], state["job_id"], machine)
    assert os.path.isdir(path), f"{machine} has no memory store"
    from gemini_lm.gemini.store_view import StaleRecordError

    store = MemoryStore(state["store_root"], state["job_id"], machine)
    try:
        # A live writer (a receiver taking a slot for a header that arrived before its sender
        # stopped) may lock a slot between our listing and our open, then unlink its record: a
        # moment, so look again. A record that stays pinned by a writer is a torn copy still
        # offered: that fails, after 2 s.
        for attempt in range(20):
            try:
                out: dict[str, list[int]] = {}
                for rec in store.records():
                    if shards is not None and rec.shard not in shards:
                        continue
                    with store.open(rec, verify=True):
                        out.setdefault(rec.shard, []).append(rec.iteration)
                return out
            except StaleRecordError:
                if attempt == 19:
                    raise
                time.sleep(0.1)
    finally:
        store.close()


def assert_same_losses(reference: dict[int, float], log_dir: str) -> list[tuple[int, float]]:
    """Every logged loss — re-runs after a recovery included — equals the failure-free run's, bit for bit.

    An iteration may be missing only if it completed (and was checkpointed) but was not
    yet logged when the failure hit: between the last logged and the recovered iteration.
    """
    got = read_losses(log_dir)
    unlogged = set()
    for rec in read_recoveries(log_dir):
        unlogged |= set(range((rec["last_logged_iteration"] or 0) + 1, rec["iteration"] + 1))
    missing = set(range(1, TRAIN_ITERS + 1)) - {i for i, _ in got}
    assert missing <= unlogged, f"iterations never logged: {sorted(missing - unlogged)}"
    diff = [(i, loss, reference[i]) for i, loss in got if loss != reference[i]]
    assert not diff, f"losses differ from the failure-free run: {diff[:5]}"
    return got


def final_weights(save_dir: str) -> dict:
    """Every tensor of the final persistent checkpoint (weights, optimizer, RNG, data position)."""
    from safetensors.torch import load_file

    out = {}
    for tp in range(2):
        path = os.path.join(save_dir, f"iter_{TRAIN_ITERS:07d}", f"tp_rank_{tp:02d}.safetensors")
        out.update({f"tp{tp}/{k}": v for k, v in load_file(path).items()})
    return out


def assert_same_final_state(reference_save: str, save_dir: str) -> None:
    import torch

    ref, got = final_weights(reference_save), final_weights(save_dir)
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"final state differs from the failure-free run in {differ[:5]}"

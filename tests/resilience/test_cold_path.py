"""The cold (restart) path: no window without a peer copy, and the failures a plain torchrun
launch must survive. Real torchrun machines on one host, real signals, compared bit for bit
with a failure-free run (2 machines x 1 worker, TP=2 across them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gemini_lm.resilience import procs
from gemini_lm.resilience.events import record_injection
from gemini_lm.resilience.injection import wait_for_iteration
from tests.e2e import ROOT, read_losses, read_recoveries, tiny_gpt_args
from tests.resilience.cluster import (assert_nothing_left, assert_same_final_state, assert_same_losses,
                                     cluster_state, run_cluster)

pytestmark = pytest.mark.slow   # spawns processes


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory) -> str:
    log_dir = str(tmp_path_factory.mktemp("reference"))
    run_cluster(log_dir, byte_corpus)
    return log_dir


def test_a_machine_lost_at_iteration_2_recovers_from_its_peer(byte_corpus, reference, tmp_path):
    # Iteration 2 is inside the profiling iterations (--gemini-profile-iters 2): snapshots
    # then travel with the blocking schedule, so the peer already holds one.
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("machine:1@iteration=2",), cluster_flags=("--spares", "1"))
    [rec] = read_recoveries(log_dir)
    assert rec["source"] == "peer" and rec["failure_kind"] == "machine"
    assert rec["iteration"] >= 1 and rec["iterations_lost"] <= 1
    assert [m["state"] for m in cluster_state(log_dir)["machines"]] == ["done", "dead", "done"]
    assert_same_losses(dict(read_losses(reference)), log_dir)
    assert_same_final_state(f"{reference}/ckpt", f"{log_dir}/ckpt")
    assert_nothing_left(log_dir)


# ---- plain torchrun, as the README launches it (static rendezvous) ---------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(byte_corpus, log_dir: str, cluster_id: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, procs.CLUSTER_ENV: cluster_id, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "pretrain_gpt.py",
           *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "16", "--gemini-profile-iters", "2",
                          "--gemini-store-dir", os.path.join(log_dir, "shm"), "--save",
                          os.path.join(log_dir, "ckpt"), "--distributed-timeout-seconds", "30", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _training_pid(log_dir: str, rank: int) -> int:
    return json.load(open(os.path.join(log_dir, "workers", f"slot{rank}.json")))["pid"]


def test_a_frozen_worker_under_plain_torchrun_recovers_bit_for_bit(byte_corpus, tmp_path):
    ref = str(tmp_path / "ref")
    p = _torchrun(byte_corpus, ref, "ref-" + tmp_path.name)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    log_dir = str(tmp_path / "run")
    p = _torchrun(byte_corpus, log_dir, "run-" + tmp_path.name, "--gemini-hang-timeout", "3")
    try:
        wait_for_iteration(log_dir, 6, 0, timeout_s=200)
        t = time.time()
        os.kill(_training_pid(log_dir, 1), signal.SIGSTOP)
        record_injection(log_dir, {"time": t, "kind": "hang", "target": 1})
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    [rec] = read_recoveries(log_dir)
    assert (rec["path"], rec["failure_kind"], rec["source"]) == ("inplace", "hang", "local")
    assert_same_losses(dict(read_losses(ref)), log_dir)
    a, b = (load_file(os.path.join(d, "ckpt", "iter_0000016", "tp_rank_00.safetensors")) for d in (ref, log_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_workers_do_not_outlive_a_killed_agent(byte_corpus, tmp_path):
    log_dir, cid = str(tmp_path / "run"), "agent-" + tmp_path.name
    p = _torchrun(byte_corpus, log_dir, cid, "--train-iters", "100000")
    try:
        wait_for_iteration(log_dir, 3, 0, timeout_s=200)
        assert len(procs.cluster_processes(cid)) >= 5       # agent, 2 supervisors, 2 training processes
        p.send_signal(signal.SIGKILL)                        # the agent only
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while procs.cluster_processes(cid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert procs.cluster_processes(cid) == {}, "workers outlived their agent"
    finally:
        procs.kill_all(cid)
    store = os.path.join(log_dir, "shm")
    slots = [f for _, _, files in os.walk(store) for f in files if f.endswith(".commit.json")]
    assert slots, "the memory store must stay for the restart"

"""In-place recovery end to end: real torchrun machines, real signals, every failure kind,
each run compared loss by loss and tensor by tensor with one failure-free run.

2 training machines x 1 worker, TP=2 across them (a lost machine's shard then exists only
as its peer's replica), 16 iterations of a tiny GPT; --spares adds warm spare machines.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from gemini_lm.resilience import procs
from gemini_lm.resilience.events import read_jsonl
from gemini_lm.resilience.injection import wait_for_iteration
from tests.e2e import ROOT, read_losses, read_recoveries
from tests.resilience.cluster import (assert_nothing_left, assert_same_final_state,
                                     assert_same_losses, cluster_state, killed_at_exit, run_cluster,
                                     train_args)

pytestmark = pytest.mark.slow   # spawns processes


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory) -> str:
    log_dir = str(tmp_path_factory.mktemp("reference"))
    run_cluster(log_dir, byte_corpus, train_flags=("--no-gemini-inplace",))
    return log_dir


def _continued_exactly(reference: str, log_dir: str) -> None:
    assert_same_losses(dict(read_losses(reference)), log_dir)
    assert_same_final_state(os.path.join(reference, "ckpt"), os.path.join(log_dir, "ckpt"))
    assert_nothing_left(log_dir)


def _one(log_dir: str) -> dict:
    recs = read_recoveries(log_dir)
    assert len(recs) == 1, recs
    return recs[0]


def test_worker_kill_is_recovered_in_place(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("worker:1@iteration=6",))
    rec = _one(log_dir)
    assert (rec["path"], rec["source"], rec["failure_kind"]) == ("inplace", "local", "worker")
    assert rec["iterations_lost"] <= 1 and rec["first_iteration"] == rec["iteration"] + 1
    for phase in ("detect_s", "abort_s", "reform_s", "retrieval_s", "first_iteration_s", "replacement_ready_s"):
        assert rec[phase] is not None and rec[phase] >= 0, phase
    # torchrun never saw a worker die: no agent restarted anything
    assert all(m["state"] == "done" for m in cluster_state(log_dir)["machines"])
    assert rec["restart_count"] == 0
    _continued_exactly(reference, log_dir)


@pytest.mark.parametrize("transport", ["auto", "gloo-staged"])   # gloo-staged: the nccl path's code
def test_machine_kill_is_taken_over_by_a_warm_spare(byte_corpus, reference, tmp_path, transport):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("machine:1@iteration=6",), cluster_flags=("--spares", "1"),
                train_flags=("--gemini-transport", transport))
    rec = _one(log_dir)
    assert (rec["path"], rec["source"], rec["failure_kind"]) == ("inplace", "peer", "machine")
    assert rec["bytes_moved"] > 0 and rec["iterations_lost"] <= 1
    state = cluster_state(log_dir)
    assert [m["state"] for m in state["machines"]] == ["done", "dead", "done"]
    assert state["replacements"] == []          # nobody joined the rendezvous: no restart
    _continued_exactly(reference, log_dir)


def test_hung_worker_is_killed_by_its_supervisor_and_recovered_in_place(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("hang:1@iteration=6",),
                train_flags=("--gemini-hang-timeout", "3"))
    rec = _one(log_dir)
    assert (rec["path"], rec["source"], rec["failure_kind"]) == ("inplace", "local", "hang")
    # The watchdog's timeout first: counted from when rank 0 began waiting, which may be a
    # moment before rank 1 stopped.
    assert rec["detected_at"] - rec["injected_at"] >= 2.0
    causes = [f["cause"] for f in read_jsonl(os.path.join(log_dir, "failures.jsonl"))]
    assert "worker_died" in causes                                  # its own supervisor killed it
    _continued_exactly(reference, log_dir)


def test_a_second_kill_during_the_reformation(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", "2",
           "--timeout", "200", "--", "pretrain_gpt.py",
           *train_args(byte_corpus, log_dir, "--save", os.path.join(log_dir, "ckpt"),
                       "--distributed-timeout-seconds", "20")]
    cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with killed_at_exit(cluster):
        wait_for_iteration(log_dir, 6, 0, timeout_s=120)
        state = json.load(open(os.path.join(log_dir, "cluster.json")))
        victims = {w["rank"]: w["pid"] for w in procs.workers(state["cluster_id"], log_dir)}
        t0 = time.time()
        os.kill(victims[1], signal.SIGKILL)
        time.sleep(0.05)                    # rank 0 is now dropping its groups and re-forming
        os.kill(victims[0], signal.SIGKILL)
        with open(os.path.join(log_dir, "injections.jsonl"), "a") as f:   # for the recovery record
            f.write(json.dumps({"time": t0, "kind": "worker", "target": 1}) + "\n")
        assert cluster.wait(timeout=200) == 0, cluster.stderr.read()[-3000:]
    recs = read_recoveries(log_dir)
    assert recs and all(r["path"] == "inplace" and r["source"] == "local" for r in recs), recs
    _continued_exactly(reference, log_dir)


def test_a_lost_spare_changes_nothing_then_no_spare_means_the_full_restart(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, cluster_flags=("--spares", "1"),
                injections=("machine:2@iteration=3", "machine:1@iteration=8"))
    rec = _one(log_dir)                     # the spare's loss is not a recovery
    assert (rec["path"], rec["source"], rec["failure_kind"]) == ("restart", "peer", "machine")
    state = cluster_state(log_dir)
    assert [r["dead"] for r in state["replacements"]] == ["m2", "m1"]   # the cold path needs every node
    _continued_exactly(reference, log_dir)


@pytest.mark.parametrize("flags, env", [
    (("--gemini-spares", "1"), {}),                                                  # no torchrun: one machine
    (("--gemini-spares", "2"), {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}),         # 2 machines, both spares
    (("--gemini-spares", "1", "--no-gemini-inplace"), {}),
])
def test_spares_the_launch_cannot_provide_are_one_line_and_exit_2(byte_corpus, tmp_path, flags, env):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--data-path", byte_corpus,
                          "--tokenizer-type", "ByteLevelTokenizer", "--log-dir", str(tmp_path / "log"), *flags],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: --gemini-spares"), out.stderr
    assert not (tmp_path / "log").exists()


def test_tp2_dp2_on_two_machines_of_two_workers(byte_corpus, tmp_path):
    # A rank that never talks to the dead one (another TP group) must notice and recover too.
    flags = ("--global-batch-size", "8")
    ref = str(tmp_path / "ref")
    run_cluster(ref, byte_corpus, procs_per_machine=2, train_flags=flags)
    log_dir = str(tmp_path / "run")
    run_cluster(log_dir, byte_corpus, procs_per_machine=2, train_flags=flags, injections=("worker:3@iteration=6",))
    rec = _one(log_dir)
    # Each machine holds both TP shards (its DP copy): the replacement of rank 3 restores from its
    # own machine's copy, or from the other machine's when that one is an iteration newer (rank 3
    # was killed before committing its snapshot of that iteration).
    assert (rec["path"], rec["failure_kind"]) == ("inplace", "worker") and rec["source"] in ("local", "peer")
    assert rec["iterations_lost"] <= 1
    assert_same_losses(dict(read_losses(ref)), log_dir)
    for tp in range(2):   # every tensor of both TP shards' final state
        a, b = (load_file(os.path.join(d, "ckpt", "iter_0000016", f"tp_rank_{tp:02d}.safetensors")) for d in (ref, log_dir))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert_nothing_left(log_dir)

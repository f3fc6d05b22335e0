"""End to end: real torchrun machines on one host, real signals, recovery checked bit for bit.

Every run is 2 machines x 1 worker with TP=2 across them, 16 iterations of a tiny GPT,
so one failure-free run is the reference for every logged loss and the final state.
"""
from __future__ import annotations

import os

import pytest

from gemini_lm.resilience.events import read_jsonl
from tests.e2e import read_losses, read_recoveries
from tests.resilience.cluster import (assert_nothing_left, assert_same_final_state, assert_same_losses,
                                     cluster_state, run_cluster)

pytestmark = pytest.mark.slow   # spawns processes


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory) -> str:
    """The failure-free run's log dir (its final checkpoint is in <log-dir>/ckpt)."""
    log_dir = str(tmp_path_factory.mktemp("reference"))
    run_cluster(log_dir, byte_corpus)
    assert_nothing_left(log_dir)
    assert read_recoveries(log_dir) == []
    return log_dir


def assert_continued_exactly(reference: str, log_dir: str, save_dir: str | None = None) -> None:
    assert_same_losses(dict(read_losses(reference)), log_dir)
    assert_same_final_state(os.path.join(reference, "ckpt"), save_dir or os.path.join(log_dir, "ckpt"))


def _one_recovery(log_dir: str) -> dict:
    recs = read_recoveries(log_dir)
    assert len(recs) == 1, recs
    return recs[0]


def test_worker_kill_recovers_from_local_memory(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("worker:1@iteration=6",))
    rec = _one_recovery(log_dir)
    assert rec["source"] == "local" and rec["failure_kind"] == "worker" and rec["path"] == "inplace"
    assert rec["iteration"] >= 5 and rec["iterations_lost"] <= 1   # at most one iteration lost
    assert rec["injected_at"] <= rec["detected_at"] <= rec["reformed_at"] <= rec["loaded_at"] \
        <= rec["first_iteration_at"]
    assert rec["first_iteration"] == rec["iteration"] + 1
    injections = read_jsonl(os.path.join(log_dir, "injections.jsonl"))
    assert [i["kind"] for i in injections] == ["worker"] and injections[0]["victim_rank"] == 1
    assert any(f["cause"] == "collective_error" for f in read_jsonl(os.path.join(log_dir, "failures.jsonl")))
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_machine_kill_recovers_from_peer_onto_replacement(byte_corpus, reference, tmp_path):
    # The full restart (cold path): a fresh machine joins and torchrun restarts every worker.
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("machine:1@iteration=6",), cluster_flags=("--spares", "1"),
                train_flags=("--no-gemini-inplace",))
    rec = _one_recovery(log_dir)
    assert rec["source"] == "peer" and rec["failure_kind"] == "machine" and rec["bytes_moved"] > 0
    assert rec["path"] == "restart" and rec["injected_at"] <= rec["detected_at"] <= rec["workers_started_at"] \
        <= rec["rendezvous_done_at"] <= rec["loaded_at"] <= rec["first_iteration_at"]
    state = cluster_state(log_dir)
    assert [m["state"] for m in state["machines"]] == ["done", "dead", "done"]
    assert state["replacements"][0]["dead"] == "m1" and state["replacements"][0]["new"] == "m2"
    assert state["replacements"][0]["from_spare"]
    [event] = read_jsonl(os.path.join(log_dir, "injections.jsonl"))
    assert len(event["killed_pids"]) == len(set(event["killed_pids"])) >= 2   # the agent and its worker, once each
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_whole_group_lost_falls_back_to_persistent_checkpoint(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path / "logs")
    save = str(tmp_path / "ckpt")
    run_cluster(log_dir, byte_corpus, injections=("machine:0@iteration=7", "machine:1@iteration=7"),
                cluster_flags=("--spares", "2"), train_flags=("--save", save, "--save-interval", "4"))
    rec = _one_recovery(log_dir)
    assert rec["source"] == "persistent" and rec["iteration"] == 4
    assert rec["iterations_lost"] >= 3
    assert_continued_exactly(reference, log_dir, save)
    assert_nothing_left(log_dir)


@pytest.mark.parametrize("window", ["snapshot", "replication"])
def test_kill_inside_a_checkpoint_window_recovers_consistently(byte_corpus, reference, tmp_path, window):
    log_dir = str(tmp_path)
    # Small transfer chunks: a snapshot goes out in several sends, so "replication" is mid-stream.
    run_cluster(log_dir, byte_corpus, injections=(f"worker:0@iteration=6@during={window}",),
                train_flags=("--gemini-buffer-mb", "0.25"))
    event = read_jsonl(os.path.join(log_dir, "injections.jsonl"))[0]
    assert event["window"]["during"] == window
    rec = _one_recovery(log_dir)
    assert rec["source"] in ("local", "peer")
    assert rec["iteration"] >= 5
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_hung_worker_is_detected_by_the_watchdog(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("hang:1@iteration=6",),
                train_flags=("--gemini-hang-timeout", "3"))
    failures = read_jsonl(os.path.join(log_dir, "failures.jsonl"))
    assert any(f["cause"] == "hang" and f["rank"] == 0 for f in failures), failures
    rec = _one_recovery(log_dir)
    assert rec["failure_kind"] == "hang" and rec["source"] == "local"
    assert rec["detected_at"] - rec["injected_at"] >= 3.0
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)

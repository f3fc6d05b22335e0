"""End to end: real torchrun machines on one host, real signals, recovery checked bit for bit.

Every run is 2 machines x 1 worker with TP=2 across them, 16 iterations of a tiny GPT,
so one failure-free run is the reference for every logged loss and the final state.

The window tests stop a worker inside a checkpoint window (resilience/breakpoints.py: the
worker stops itself there, so the iteration does not depend on timing), look at the
memory stores and --save while it is stopped, then deliver the failure. What recovery
must return follows from the protocol:
- a shard's snapshot of iteration k is committed (visible) only once its payload is
  complete; the writer drains the commit of k-1 before it starts k, and a sender's
  replica of k-1 is acknowledged by its receiver before it starts k, so k-1 is complete
  on both machines when k begins;
- a replica is committed on its receiver only after its last chunk;
- recovery takes the newest iteration complete for every shard somewhere in memory,
  else the newest complete persistent checkpoint (its tracker moves last).
"""
from __future__ import annotations

import os
import time

import pytest

from gemini_lm.checkpoint.persistent import latest_iteration, list_iterations
from gemini_lm.resilience.events import read_jsonl
from tests.e2e import read_losses, read_recoveries
from tests.resilience.cluster import (assert_no_corrupt_copy_offered, assert_nothing_left,
                                     assert_same_final_state, assert_same_losses, cluster_state, run_cluster,
                                     store_of)

pytestmark = pytest.mark.slow   # spawns processes

# Replicate every snapshot (the automatic interval may choose fewer): then a writer's next
# snapshot waits for its previous replica's acknowledgement, the rule the windows rely on.
EVERY = ("--gemini-replication-interval", "1")


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


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _inject(log_dir: str, spec: str, on_paused) -> dict:
    """Inject from this process (as tools/inject_failure.py does), looking at the stopped target first."""
    from gemini_lm.resilience.injection import Injection, inject

    return inject(log_dir, Injection.parse(spec), offset=0, timeout_s=100, source="test", on_paused=on_paused)


def test_worker_kill_recovers_from_local_memory(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("worker:1@iteration=6",))
    rec = _one_recovery(log_dir)
    assert rec["source"] == "local" and rec["failure_kind"] == "worker"
    # Iteration 6 was logged before the kill, so its snapshot was copied and 5's committed;
    # the kill may land after 7's commit but before its log line.
    assert 5 <= rec["iteration"] <= rec["iteration_before_failure"] + 1 and rec["iterations_lost"] <= 1
    assert rec["injected_at"] <= rec["detected_at"] <= rec["workers_started_at"] <= rec["rendezvous_done_at"] \
        <= rec["loaded_at"] <= rec["first_iteration_at"]
    assert rec["first_iteration"] == rec["iteration"] + 1
    injections = read_jsonl(os.path.join(log_dir, "injections.jsonl"))
    assert [i["kind"] for i in injections] == ["worker"] and injections[0]["victim_rank"] == 1
    assert any(f["cause"] == "collective_error" for f in read_jsonl(os.path.join(log_dir, "failures.jsonl")))
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_machine_kill_recovers_from_peer_onto_replacement(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("machine:1@iteration=6",), cluster_flags=("--spares", "1"))
    rec = _one_recovery(log_dir)
    assert rec["source"] == "peer" and rec["failure_kind"] == "machine" and rec["bytes_moved"] > 0
    state = cluster_state(log_dir)
    assert [m["state"] for m in state["machines"]] == ["done", "dead", "done"]
    assert state["replacements"][0]["dead"] == "m1" and state["replacements"][0]["new"] == "m2"
    assert state["replacements"][0]["from_spare"]
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


@pytest.mark.parametrize("window", ["copy", "snapshot"])
def test_worker_killed_inside_its_snapshot_recovers_the_one_before(byte_corpus, reference, tmp_path, window):
    """copy: half the state is in the slot (a torn payload); snapshot: all of it, not committed.
    Either way snapshot k never became visible, k-1 is complete: recovery is local at k-1."""
    log_dir = str(tmp_path)
    seen = {}

    def while_stopped(event):   # rank 0 is stopped: nothing writes m0's store
        seen["k"] = event["window"]["iteration"]
        seen["m0"] = store_of(log_dir, "m0")   # every record there verifies: none points at the torn slot

    run_cluster(log_dir, byte_corpus, train_flags=EVERY,
                drive=lambda: _inject(log_dir, f"worker:0@iteration=6@during={window}", while_stopped))
    k = seen["k"]
    assert k >= 6 and max(seen["m0"]["tp00"]) == k - 1, seen
    rec = _one_recovery(log_dir)
    assert (rec["source"], rec["iteration"]) == ("local", k - 1)
    assert_no_corrupt_copy_offered(log_dir)
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_machine_killed_while_sending_its_replica_recovers_the_previous_replica(byte_corpus, reference, tmp_path):
    """m0 stops after the header of tp00's snapshot k went to m1, before any payload; then m0
    is lost. m1's half-received replica of k must never be used: recovery is from m1's
    replica of k-1, onto the replacement."""
    log_dir = str(tmp_path)
    seen = {}

    def while_stopped(event):   # only rank 0 sends tp00 to m1: its replicas there are frozen
        seen["k"] = event["window"]["iteration"]
        seen["m1"] = store_of(log_dir, "m1", shards=("tp00",))

    run_cluster(log_dir, byte_corpus, cluster_flags=("--spares", "1"), train_flags=EVERY,
                drive=lambda: _inject(log_dir, "machine:0@iteration=6@during=send", while_stopped))
    k = seen["k"]
    assert k >= 6 and max(seen["m1"]["tp00"]) == k - 1, seen
    rec = _one_recovery(log_dir)
    assert (rec["source"], rec["iteration"], rec["failure_kind"]) == ("peer", k - 1, "machine")
    assert_no_corrupt_copy_offered(log_dir)
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_receiver_killed_before_committing_a_replica_recovers_locally(byte_corpus, reference, tmp_path):
    """Rank 1 stops with tp00's replica of k fully received on m1 but not committed, and is
    killed. The replica must not be visible; m0 still holds tp00's k itself, and nothing can
    commit while rank 1 is stopped (rank 0's next snapshot waits for m1's acknowledgement),
    so recovery is local at the newest iteration both shards had in memory at that moment."""
    log_dir = str(tmp_path)
    seen = {}

    def while_stopped(event):
        seen["k"] = event["window"]["iteration"]
        seen["stores"] = {m: store_of(log_dir, m) for m in ("m0", "m1")}

    run_cluster(log_dir, byte_corpus, train_flags=EVERY,
                drive=lambda: _inject(log_dir, "worker:1@iteration=6@during=receive", while_stopped))
    k, stores = seen["k"], seen["stores"]
    assert k >= 6 and max(stores["m1"]["tp00"]) == k - 1 and max(stores["m0"]["tp00"]) == k, seen
    common = set.intersection(*({it for s in stores.values() for it in s.get(shard, [])}
                                for shard in ("tp00", "tp01")))
    rec = _one_recovery(log_dir)
    assert (rec["source"], rec["iteration"]) == ("local", max(common))
    assert rec["iteration"] in (k - 1, k)
    assert_no_corrupt_copy_offered(log_dir)
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_whole_cluster_lost_while_persisting_falls_back_to_the_previous_checkpoint(byte_corpus, reference,
                                                                                  tmp_path):
    """Checkpoints every 4 iterations. Rank 0 stops with its shard of iteration 8 in
    iter_0000008.partial/, and both machines are lost: memory is gone, and the previous
    checkpoint must still be the newest complete one on disk, the one recovery loads; the
    half-written directory is never loaded, and is replaced when 8 is persisted again."""
    from gemini_lm.resilience.injection import kill_machine, read_cluster

    log_dir, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    seen = {}

    def while_stopped(event):
        seen["k"] = event["window"]["iteration"]
        seen["tracker"], seen["complete"] = latest_iteration(save), list_iterations(save)
        seen["listing"] = sorted(os.listdir(save))
        partial = os.path.join(save, f"iter_{seen['k']:07d}.partial")
        seen["partial"] = sorted(os.listdir(partial))
        # Rank 1 (not stopped) completes its shard of k there: the crash then leaves a stale
        # shard whose sidecar says "done", which the re-run of k must not take for its own.
        _wait_for(lambda: os.path.exists(os.path.join(partial, "tp_rank_01.json")), 60, "rank 1's shard")
        cluster = read_cluster(log_dir)
        kill_machine(cluster, next(m for m in cluster["machines"] if m["id"] == "m1"))   # then m0 goes

    run_cluster(log_dir, byte_corpus, cluster_flags=("--spares", "2"),
                train_flags=("--save", save, "--save-interval", "4"),
                drive=lambda: _inject(log_dir, "machine:0@iteration=5@during=persist", while_stopped))
    k = seen["k"]   # 8, unless the injector armed rank 0 only after that persist began
    assert k % 4 == 0 and k >= 8
    assert seen["tracker"] == k - 4 and seen["complete"] == list(range(4, k, 4)), seen
    assert f"iter_{k:07d}" not in seen["listing"] and "tp_rank_00.safetensors" in seen["partial"], seen
    rec = _one_recovery(log_dir)
    assert (rec["source"], rec["iteration"], rec["memory_iteration"]) == ("persistent", k - 4, None)
    assert rec["iterations_lost"] >= 3
    # Iteration k was persisted again by the new run alone: nothing of the crashed run in it.
    again = os.path.join(save, f"iter_{k:07d}")
    assert all(os.path.getmtime(os.path.join(again, n)) > rec["restore_started_at"] for n in os.listdir(again))
    assert_continued_exactly(reference, log_dir, save)
    assert_nothing_left(log_dir, save_dirs=(save,))


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

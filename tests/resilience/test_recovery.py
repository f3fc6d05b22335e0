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
import signal
import time

import pytest

from gemini_lm.checkpoint.persistent import latest_iteration, list_iterations
from gemini_lm.resilience.events import read_jsonl
from tests.e2e import read_losses, read_recoveries
from tests.resilience.cluster import (assert_no_corrupt_copy_offered, assert_nothing_left,
                                     assert_same_final_state, assert_same_losses, cluster_state, run_cluster,
                                     store_of, wait_for)

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


def _inject_in_turn(log_dir: str, *steps) -> None:
    """(spec, on_paused) pairs, each once the failure before it has been recovered from. The
    target arms itself for an iteration >= N as soon as it trains again, so a slow injector
    on a busy machine does not change where the failure lands (only, if very late, later)."""
    from gemini_lm.resilience.injection import Injection, inject, metrics_size

    for i, (spec, on_paused) in enumerate(steps):
        if i:
            wait_for(lambda: len(read_recoveries(log_dir)) >= i, 120, f"recovery {i}")
        inject(log_dir, Injection.parse(spec), offset=metrics_size(log_dir) if i else 0, timeout_s=100,
               source="test", on_paused=on_paused)


def _paused(seen: list, log_dir: str, machines=None, shards=None):
    """An on_paused that records the window's iteration and the stores of `machines` (default:
    the stopped worker's machine) as they are while it is stopped."""
    def look(event):
        ms = machines or [event["machine"]]
        seen.append({"k": event["window"]["iteration"], "event": event,
                     "stores": {m: store_of(log_dir, m, shards) for m in ms}})
    return look


def test_workers_killed_inside_their_snapshots_recover_the_one_before(byte_corpus, reference, tmp_path):
    """Rank 0 is killed half-way through copying its snapshot k (a torn payload), then, once
    recovered, rank 1 with its snapshot k' written but not committed. Neither snapshot ever
    became visible, every record left points at a complete payload, and k-1 (k'-1) was
    complete everywhere: recovery is local, one iteration back, each time."""
    log_dir = str(tmp_path)
    seen: list = []
    run_cluster(log_dir, byte_corpus, train_flags=EVERY, timeout_s=240,
                drive=lambda: _inject_in_turn(log_dir, ("worker:0@iteration=6@during=copy", _paused(seen, log_dir)),
                                              ("worker:1@iteration=11@during=snapshot", _paused(seen, log_dir))))
    (copy, snap), recs = seen, read_recoveries(log_dir)
    assert copy["k"] >= 6 and snap["k"] >= 11, seen
    # Only the stopped worker writes its machine's store, and every record there verified.
    assert max(copy["stores"]["m0"]["tp00"]) == copy["k"] - 1, seen
    assert max(snap["stores"]["m1"]["tp01"]) == snap["k"] - 1, seen
    assert [(r["source"], r["iteration"], r["failure_kind"]) for r in recs] == \
        [("local", copy["k"] - 1, "worker"), ("local", snap["k"] - 1, "worker")]
    first = recs[0]   # in place (the default), its phases in order
    assert [r["path"] for r in recs] == ["inplace", "inplace"]
    assert first["injected_at"] <= first["detected_at"] <= first["reformed_at"] <= first["loaded_at"] \
        <= first["first_iteration_at"]
    assert first["first_iteration"] == first["iteration"] + 1 and first["iterations_lost"] == 1
    injections = read_jsonl(os.path.join(log_dir, "injections.jsonl"))
    assert [(i["kind"], i["victim_rank"]) for i in injections] == [("worker", 0), ("worker", 1)]
    assert any(f["cause"] == "collective_error" for f in read_jsonl(os.path.join(log_dir, "failures.jsonl")))
    assert_no_corrupt_copy_offered(log_dir)
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_replicas_interrupted_by_a_machine_loss_and_a_receiver_kill(byte_corpus, reference, tmp_path):
    """1. m0 stops after the header of tp00's snapshot k went to m1, before any payload, and
    is lost. m1's half-received replica of k must never be used: recovery is from m1's
    replica of k-1, onto a spare machine.
    2. Then rank 1 (tp01) stops with tp00's replica of k' fully received but not committed,
    and is killed. The replica must not be visible; tp00's own machine still holds k' (a
    replica is sent only once committed), and nothing can commit while rank 1 is stopped
    (rank 0's next snapshot waits for its acknowledgement): recovery is local, at the
    newest iteration both shards had in memory at that moment.
    The full restart (--no-gemini-inplace; the in-place path has tests/resilience/test_inplace.py):
    a fresh machine joins and torchrun restarts every worker."""
    log_dir = str(tmp_path)
    sent: list = []
    received: list = []

    def look_at_both(event):
        # Rank 1's machine: only rank 1 writes there. The other live machine (m0 is gone by
        # now): tp00 only, which rank 0 cannot snapshot again; its replicas of tp01 may still
        # take a header rank 1 sent just before it stopped.
        receiver = event["machine"]
        (sender,) = [m["id"] for m in cluster_state(log_dir)["machines"]
                     if m["state"] == "running" and m["id"] != receiver]
        received.append({"k": event["window"]["iteration"], "receiver": receiver, "sender": sender,
                         "stores": {receiver: store_of(log_dir, receiver),
                                    sender: store_of(log_dir, sender, ("tp00",))}})

    run_cluster(log_dir, byte_corpus, cluster_flags=("--spares", "1"), train_flags=EVERY + ("--no-gemini-inplace",),
                timeout_s=240,
                drive=lambda: _inject_in_turn(
                    log_dir,
                    # only rank 0 sends tp00 to m1: the replicas there are frozen while it is stopped
                    ("machine:0@iteration=6@during=send", _paused(sent, log_dir, ["m1"], ("tp00",))),
                    ("worker:1@iteration=11@during=receive", look_at_both)))
    (send,), (recv,) = sent, received
    recs = read_recoveries(log_dir)
    assert send["k"] >= 6 and max(send["stores"]["m1"]["tp00"]) == send["k"] - 1, sent
    assert (recs[0]["source"], recs[0]["iteration"], recs[0]["failure_kind"]) == ("peer", send["k"] - 1, "machine")
    assert recs[0]["bytes_moved"] > 0 and [r["path"] for r in recs] == ["restart", "restart"]
    assert recs[0]["injected_at"] <= recs[0]["detected_at"] <= recs[0]["workers_started_at"] \
        <= recs[0]["rendezvous_done_at"] <= recs[0]["loaded_at"] <= recs[0]["first_iteration_at"]
    state = cluster_state(log_dir)
    assert [m["state"] for m in state["machines"]] == ["dead", "done", "done"]
    assert [(r["dead"], r["new"], r["from_spare"]) for r in state["replacements"]] == [("m0", "m2", True)]

    k, stores, receiver, sender = recv["k"], recv["stores"], recv["receiver"], recv["sender"]
    assert k >= 11 and max(stores[receiver]["tp00"]) == k - 1 and max(stores[sender]["tp00"]) == k, received
    common = set.intersection(*({it for st in stores.values() for it in st.get(shard, [])}
                                for shard in ("tp00", "tp01")))
    assert (recs[1]["source"], recs[1]["iteration"], recs[1]["failure_kind"]) == ("local", max(common), "worker")
    assert recs[1]["iteration"] in (k - 1, k)
    machine_kill = read_jsonl(os.path.join(log_dir, "injections.jsonl"))[0]
    assert len(machine_kill["killed_pids"]) == len(set(machine_kill["killed_pids"])) >= 2   # agent and worker, once each
    assert_no_corrupt_copy_offered(log_dir)
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)


def test_whole_cluster_lost_while_persisting_falls_back_to_the_previous_checkpoint(byte_corpus, reference,
                                                                                  tmp_path):
    """Checkpoints every 4 iterations. Rank 0 stops with its shard of iteration 8 in
    iter_0000008.partial/ (rank 1 has written all of its own there), and both machines are
    lost: memory is gone, and the previous checkpoint must still be the newest complete one
    on disk, the one recovery loads. When the new run persists 8 again, nothing of the
    crashed run's half-written directory may count: with rank 1 now stopped after writing
    its shard but before declaring it done, the checkpoint must not be finalized."""
    from gemini_lm.resilience import procs
    from gemini_lm.resilience.injection import kill_machine, read_cluster

    log_dir, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    seen = {}

    def while_stopped(event):
        k = seen["k"] = event["window"]["iteration"]   # 8, unless rank 0 was armed only after that persist
        assert k % 4 == 0 and k >= 8
        assert latest_iteration(save) == k - 4 and list_iterations(save) == list(range(4, k, 4))
        listing = sorted(os.listdir(save))
        assert f"iter_{k:07d}" not in listing and f"iter_{k:07d}.partial" in listing, listing
        partial = os.path.join(save, f"iter_{k:07d}.partial")
        assert "tp_rank_00.safetensors" in os.listdir(partial)
        # Rank 1 (not stopped) completes its shard of k there: the crash then leaves a stale
        # shard whose sidecar says "done".
        wait_for(lambda: os.path.exists(os.path.join(partial, "tp_rank_01.json")), 60, "rank 1's shard")
        cluster = read_cluster(log_dir)
        kill_machine(cluster, next(m for m in cluster["machines"] if m["id"] == "m1"))   # then m0 goes

    def rank_1_is_slow(event):
        k = seen["again"] = event["window"]["iteration"]
        seen["rank_1"] = event["victim_pid"]
        partial, final = os.path.join(save, f"iter_{k:07d}.partial"), os.path.join(save, f"iter_{k:07d}")
        # Rank 0 writes its shard of k and declares it done; a finalizer that counted the
        # crashed run's sidecar of rank 1 would then finalize at once (it polls every 50 ms).
        wait_for(lambda: os.path.exists(os.path.join(partial, "tp_rank_00.json")) or os.path.exists(final),
                  10, "rank 0's shard")
        time.sleep(1.5)   # rank 0's collectives wait for rank 1 up to --distributed-timeout-seconds 20
        seen["finalized_without_rank_1"] = os.path.exists(final)

    def drive():
        _inject_in_turn(log_dir, ("machine:0@iteration=5@during=persist", while_stopped),
                        ("hang:1@iteration=5@during=persist", rank_1_is_slow))
        procs.signal_pid(seen["rank_1"], signal.SIGCONT)

    run_cluster(log_dir, byte_corpus, cluster_flags=("--spares", "2"),
                # the full restart: every machine is lost, nothing is left to recover in place
                train_flags=("--save", save, "--save-interval", "4", "--no-gemini-inplace"), timeout_s=240,
                drive=drive)
    k = seen["k"]
    rec = _one_recovery(log_dir)
    assert (rec["source"], rec["iteration"], rec["memory_iteration"]) == ("persistent", k - 4, None)
    assert rec["iterations_lost"] >= 3
    assert seen["again"] == k and not seen["finalized_without_rank_1"], seen
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
    # The watchdog counts from when rank 0 began waiting, which may be a moment before rank 1
    # stopped: detection comes at most that moment earlier than the 3 s timeout after the stop.
    assert rec["detected_at"] - rec["injected_at"] >= 2.0
    assert_continued_exactly(reference, log_dir)
    assert_nothing_left(log_dir)

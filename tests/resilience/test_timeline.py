"""Pure pieces of failure handling: the recovery record, failure classification, --inject specs."""
from __future__ import annotations

import os

import pytest

from gemini_lm.errors import PeerLostError, ReplicationError
from gemini_lm.errors import UsageError
from gemini_lm.resilience.events import append_jsonl, read_jsonl, record_failure, record_injection
from gemini_lm.resilience.handler import is_peer_failure
from gemini_lm.resilience.injection import Injection
from gemini_lm.resilience.recovery_report import complete_record, summary_line


def _restore(**kw) -> dict:
    rec = {"time": 110.5, "source": "peer", "iteration": 7, "agree_s": 0.1, "retrieve_s": 0.2,
           "load_s": 0.2, "started_at": 110.0, "last_logged_iteration": 8}
    rec.update(kw)
    return rec


def test_record_joins_injection_failures_and_phases(tmp_path):
    log = str(tmp_path)
    append_jsonl(os.path.join(log, "recovery.jsonl"), {"first_iteration_at": 50.0, "time": 49.0})
    append_jsonl(os.path.join(log, "injections.jsonl"), {"time": 40.0, "kind": "worker"})   # earlier recovery's
    append_jsonl(os.path.join(log, "injections.jsonl"), {"time": 100.0, "kind": "machine"})
    append_jsonl(os.path.join(log, "failures.jsonl"), {"time": 100.4, "cause": "collective_error", "iteration": 9})
    append_jsonl(os.path.join(log, "failures.jsonl"), {"time": 100.2, "cause": "collective_error", "iteration": 8})
    rec = complete_record(_restore(), log, first_iteration=8, first_iteration_at=111.0,
                          workers_started_at=102.0, rendezvous_done_at=106.0)
    assert rec["failure_kind"] == "machine" and rec["injected_at"] == 100.0 and rec["detected_at"] == 100.2
    assert rec["iteration_before_failure"] == 9 and rec["iterations_lost"] == 2   # a rank had completed 9
    assert rec["retrieved_at"] == pytest.approx(110.3)
    phases = [rec[k] for k in ("detect_s", "restart_s", "rendezvous_s", "setup_s", "retrieval_s",
                               "first_iteration_s")]
    assert phases == pytest.approx([0.2, 1.8, 4.0, 4.0, 0.5, 0.5])
    assert rec["recovery_s"] == pytest.approx(sum(phases)) == pytest.approx(11.0)
    assert "machine -> iteration 7 from peer in 11.00s" in summary_line(rec)


def test_record_without_injection_starts_at_detection(tmp_path):
    log = str(tmp_path)
    append_jsonl(os.path.join(log, "failures.jsonl"), {"time": 105.0, "cause": "hang", "iteration": 7})
    rec = complete_record(_restore(last_logged_iteration=7), log, first_iteration=8, first_iteration_at=111.0,
                          workers_started_at=106.0, rendezvous_done_at=107.0)
    assert rec["failure_kind"] == "hang" and rec["injected_at"] is None and rec["iterations_lost"] == 0
    assert rec["detect_s"] == 0.0 and rec["recovery_s"] == pytest.approx(6.0)


def test_events_are_whole_lines(tmp_path):
    log = str(tmp_path)
    record_failure(log, cause="sigterm", rank=3, machine="m1", iteration=12, detail="x" * 2000)
    record_injection(log, {"kind": "worker", "target": 3})
    with open(os.path.join(log, "failures.jsonl"), "ab") as f:
        f.write(b'{"cause": "half a li')   # a writer killed mid-line
    (failure,) = read_jsonl(os.path.join(log, "failures.jsonl"))
    assert failure["rank"] == 3 and len(failure["detail"]) == 500 and failure["pid"] == os.getpid()
    assert read_jsonl(os.path.join(log, "injections.jsonl"))[0]["kind"] == "worker"


def test_peer_failures_are_told_from_bugs_by_type_alone():
    assert is_peer_failure(PeerLostError("TP all-reduce: connection closed"))
    assert is_peer_failure(ReplicationError("stream broke"))
    assert is_peer_failure(TimeoutError("store get timed out"))
    # The text of a message never decides: a bug that mentions NCCL or gloo stays a bug.
    assert not is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert not is_peer_failure(RuntimeError("NCCL error: invalid usage (a bug in the caller)"))
    assert not is_peer_failure(ValueError("connection closed"))


def test_inject_specs():
    assert Injection.parse("machine:1@iteration=30") == Injection("machine", 1, 30, None)
    assert Injection.parse("worker:0@during=send@iteration=5") == Injection("worker", 0, 5, "send")
    assert Injection.parse("machine:1@iteration=7@during=copy") == Injection("machine", 1, 7, "copy")
    for bad in ("worker", "worker:x", "meteor:1", "hang:1@during=lunch", "sigterm:2@at=5",
                "worker:0@during=replication"):
        with pytest.raises(UsageError):
            Injection.parse(bad)

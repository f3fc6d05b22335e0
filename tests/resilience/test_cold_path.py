"""The cold (restart) path: no window without a peer copy, and the failures a plain torchrun
launch must survive. Real torchrun machines on one host, real signals, compared bit for bit
with a failure-free run (2 machines x 1 worker, TP=2 across them)."""
from __future__ import annotations

import pytest

from tests.e2e import read_losses, read_recoveries
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

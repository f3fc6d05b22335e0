"""The cluster tool by hand: inject_failure.py against a running cluster, SIGTERM flushes the
newest snapshot to --save, Ctrl-C leaves nothing behind; bad flags exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gemini_lm.checkpoint.persistent import latest_iteration
from gemini_lm.resilience.events import read_jsonl
from tests.e2e import ROOT, read_recoveries, tiny_gpt_args
from tests.resilience.cluster import assert_nothing_left

pytestmark = pytest.mark.slow   # spawns processes

CLUSTER = os.path.join(ROOT, "tools", "local_cluster.py")
INJECT = os.path.join(ROOT, "tools", "inject_failure.py")


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_by_hand_flushes_to_save_then_ctrl_c_cleans_up(byte_corpus, tmp_path):
    log_dir, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    cmd = [sys.executable, CLUSTER, "--machines", "1", "--", "pretrain_gpt.py",
           *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "100000", "--save", save)]
    out_path = tmp_path / "out.txt"   # a file, not a pipe: the training's lines must never block
    with open(out_path, "w") as out_file:
        cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=out_file, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(log_dir, "cluster.json")), 30, "cluster.json")
        out = subprocess.run([sys.executable, INJECT, "--log-dir", log_dir, "--kind", "sigterm",
                              "--target", "0", "--at-iteration", "5"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        rec = _wait_for(lambda: read_recoveries(log_dir), 60, "a recovery record")[0]
        assert rec["failure_kind"] == "sigterm" and rec["source"] == "local"
        failure = next(f for f in read_jsonl(os.path.join(log_dir, "failures.jsonl")) if f["cause"] == "sigterm")
        flushed = int(failure["detail"].split("flushed iteration ")[1].split()[0])
        # The preemption notice left the newest committed snapshot on disk, complete and
        # finalized (no --save-interval: nothing else writes there before the end). Iteration
        # 5's snapshot may still be committing off the training thread when the signal lands.
        assert flushed >= 4 and latest_iteration(save) == flushed
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(timeout=30) == 130
    finally:
        if cluster.poll() is None:
            cluster.kill()
            cluster.wait()
    assert_nothing_left(log_dir)
    # The cluster's summary: the failure injected by hand, the recovery recorded, where the logs are.
    summary = out_path.read_text().split("local_cluster: interrupted after ")[1].splitlines()
    assert "1 failure(s) injected, 1 recovery(ies) recorded" in summary[0]
    assert "injected sigterm:0 (rank 0)" in summary[1]
    assert "recovery (restart): sigterm -> iteration" in summary[2]
    assert summary[3] == f"  logs: {log_dir} (metrics.jsonl, recovery.jsonl, failures.jsonl, cluster.json, cluster/)"


@pytest.mark.parametrize("flags", [["--inject", "meteor:1"], ["--inject", "worker:1@during=lunch"],
                                   ["--machines", "0"]])
def test_bad_flags_exit_2_with_one_line(flags, tmp_path):
    out = subprocess.run([sys.executable, CLUSTER, *flags, "--", "pretrain_gpt.py", "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1

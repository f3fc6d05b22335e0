"""The cluster tool by hand: inject_failure.py against a running cluster, SIGTERM flushes the
newest snapshot to --save (byte for byte the snapshot in memory, and only if newer than what
--save holds), Ctrl-C leaves nothing behind; bad flags exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from gemini_lm.checkpoint.persistent import latest_iteration, list_iterations, read_manifest
from gemini_lm.checkpoint.snapshot import read_metadata
from gemini_lm.gemini.store import MemoryStore
from tests.e2e import ROOT, read_recoveries, tiny_gpt_args
from tests.resilience.cluster import (assert_nothing_left, failure_event, killed_at_exit, sigterm_while_a_peer_hangs,
                                      wait_for)

pytestmark = pytest.mark.slow   # spawns processes

CLUSTER = os.path.join(ROOT, "tools", "local_cluster.py")
INJECT = os.path.join(ROOT, "tools", "inject_failure.py")


def _tree(directory) -> dict[str, bytes]:
    """Every file under `directory` with its bytes."""
    out = {}
    for d, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_sigterm_by_hand_keeps_a_newer_checkpoint_then_ctrl_c_cleans_up(byte_corpus, tmp_path):
    # --save already holds a checkpoint newer than anything this run will have in memory
    # (a longer earlier run's): the preemption flush must leave it alone, not move the
    # tracker back. (--load is elsewhere, so that checkpoint is not loaded.)
    log_dir, save, load = str(tmp_path / "logs"), tmp_path / "ckpt", tmp_path / "empty"
    (save / "iter_1000000").mkdir(parents=True)
    (save / "iter_1000000" / "manifest.json").write_text(json.dumps({"iteration": 1000000}))
    (save / "latest_checkpointed_iteration.txt").write_text("1000000\n")
    load.mkdir()
    before = _tree(save)
    cmd = [sys.executable, CLUSTER, "--machines", "1", "--", "pretrain_gpt.py",
           *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "100000", "--save", str(save),
                          "--load", str(load))]
    out_path = tmp_path / "out.txt"   # a file, not a pipe: the training's lines must never block
    with open(out_path, "w") as out_file:
        cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=out_file, stderr=subprocess.PIPE, text=True)
    with killed_at_exit(cluster):
        wait_for(lambda: os.path.exists(os.path.join(log_dir, "cluster.json")), 30, "cluster.json")
        out = subprocess.run([sys.executable, INJECT, "--log-dir", log_dir, "--kind", "sigterm",
                              "--target", "0", "--at-iteration", "5"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.splitlines()[-1])["kind"] == "sigterm"
        rec = wait_for(lambda: read_recoveries(log_dir), 60, "a recovery record")[0]
        assert rec["failure_kind"] == "sigterm" and rec["source"] == "local"
        assert failure_event(log_dir, "sigterm")["detail"] == "SIGTERM"   # nothing flushed
        assert _tree(save) == before
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(timeout=30) == 130
    assert_nothing_left(log_dir, finished=False)
    # The cluster's summary: the failure injected by hand, the recovery recorded, where the logs are.
    summary = out_path.read_text().split("local_cluster: interrupted after ")[1].splitlines()
    assert "1 failure(s) injected, 1 recovery(ies) recorded" in summary[0]
    assert "injected sigterm:0 (rank 0)" in summary[1]
    assert "recovery (restart): sigterm -> iteration" in summary[2]
    assert summary[3] == f"  logs: {log_dir} (metrics.jsonl, recovery.jsonl, failures.jsonl, cluster.json, cluster/)"


def test_sigterm_flushes_the_newest_snapshot_byte_for_byte(byte_corpus, tmp_path):
    """DP=2 on one machine: rank 0 snapshots and persists. Rank 1 is frozen first, so rank 0
    blocks in its next data-parallel all-reduce and commits at most the snapshot in flight;
    then rank 0 gets SIGTERM, flushes and exits. Nothing restarts it (--max-restarts 0), so
    the snapshot it flushed is still in the memory store, to compare with the files."""
    log_dir, save, shm = str(tmp_path / "logs"), str(tmp_path / "ckpt"), str(tmp_path / "shm")
    cmd = [sys.executable, CLUSTER, "--machines", "1", "--procs-per-machine", "2", "--max-restarts", "0",
           "--job-id", "flush", "--", "pretrain_gpt.py",
           *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "100000", "--save", save,
                          "--gemini-store-dir", shm)]
    event = sigterm_while_a_peer_hangs(cmd, log_dir)
    assert event["rank"] == 0 and "flushed iteration " in event["detail"], event
    flushed = int(event["detail"].split("flushed iteration ")[1].split()[0])
    assert flushed >= 5
    assert latest_iteration(save) == flushed and list_iterations(save) == [flushed]
    assert not [n for n in os.listdir(save) if n.endswith(".partial")]
    store = MemoryStore(shm, "flush", "m0")
    [rec] = [r for r in store.records("tp00") if r.iteration == flushed]
    newest = max(r.iteration for r in store.records("tp00"))
    assert newest - 1 <= flushed <= newest   # the newest committed then: a commit in flight may land after
    assert read_manifest(save, flushed)["shards"]["tp00"]["checksum"] == rec.checksum
    path = os.path.join(save, f"iter_{flushed:07d}", "tp_rank_00.safetensors")
    with store.open(rec, verify=True) as view, safe_open(path, "pt") as disk:
        memory = view.tensors()
        assert disk.metadata() == read_metadata(view.buffer)
        assert set(disk.keys()) == set(memory)   # weights, Adam moments, schedule, RNG, data position
        for k in memory:
            assert torch.equal(disk.get_tensor(k), memory[k]), k
    store.wipe()


@pytest.mark.parametrize("flags", [["--inject", "meteor:1"], ["--inject", "worker:1@during=lunch"],
                                   ["--machines", "0"]])
def test_bad_flags_exit_2_with_one_line(flags, tmp_path):
    out = subprocess.run([sys.executable, CLUSTER, *flags, "--", "pretrain_gpt.py", "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1

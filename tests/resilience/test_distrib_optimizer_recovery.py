"""GEMINI with --use-distributed-optimizer: real machines, real signals, bit for bit.

DP=2 over 2 machines x 1 worker (TP=1): each machine's snapshot holds an optimizer slice
no other rank has (and no params: they follow from the slices), so a lost machine's slice
exists only as its peer's replica.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from gemini_lm.checkpoint.persistent import latest_iteration, list_iterations
from gemini_lm.gemini.store import MemoryStore
from tests.e2e import ROOT, read_losses, read_recoveries, run_pretrain
from tests.resilience.cluster import (TRAIN_ITERS, assert_nothing_left, assert_same_losses, run_cluster,
                                      sigterm_while_a_peer_hangs, train_args)

pytestmark = pytest.mark.slow   # spawns processes

FLAGS = ("--use-distributed-optimizer", "--tensor-model-parallel-size", "1")


def _final_state(save_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(save_dir, f"iter_{TRAIN_ITERS:07d}", "tp_rank_00.safetensors"))


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory) -> str:
    log_dir = str(tmp_path_factory.mktemp("reference"))
    run_cluster(log_dir, byte_corpus, train_flags=FLAGS)
    assert read_recoveries(log_dir) == []
    return log_dir


def _assert_continued_exactly(reference: str, log_dir: str, save_dir: str | None = None) -> None:
    assert_same_losses(dict(read_losses(reference)), log_dir)
    ref, got = _final_state(os.path.join(reference, "ckpt")), _final_state(save_dir or os.path.join(log_dir, "ckpt"))
    assert ref.keys() == got.keys()
    assert any(k.startswith("optimizer/exp_avg/") for k in got)   # gathered, DP-independent
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"final state differs from the failure-free run in {differ[:5]}"
    assert_nothing_left(log_dir)


@pytest.mark.parametrize("extra", [(), ("--overlap-param-gather",)], ids=["sync", "overlap_param_gather"])
def test_worker_kill_recovers_its_slice_from_local_memory(byte_corpus, reference, tmp_path, extra):
    """With --overlap-param-gather the survivor may hold an all-gather in flight when its peer
    dies: it is waited for (or fails) before the group goes, and the run still continues as
    the failure-free one without the flag."""
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("worker:1@iteration=6",), train_flags=(*FLAGS, *extra))
    recs = read_recoveries(log_dir)
    assert len(recs) == 1 and recs[0]["source"] == "local" and recs[0]["failure_kind"] == "worker"
    assert recs[0]["path"] == "inplace"   # the survivor rolled back its own slice in place
    assert recs[0]["iterations_lost"] <= 1
    _assert_continued_exactly(reference, log_dir)


def test_machine_kill_recovers_its_slice_from_the_peer(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("machine:1@iteration=6",), cluster_flags=("--spares", "1"),
                train_flags=(*FLAGS, "--no-gemini-inplace"))
    recs = read_recoveries(log_dir)
    assert len(recs) == 1 and recs[0]["source"] == "peer" and recs[0]["failure_kind"] == "machine"
    assert recs[0]["bytes_moved"] > 0
    _assert_continued_exactly(reference, log_dir)


def test_whole_group_lost_falls_back_to_the_gathered_persistent_checkpoint(byte_corpus, reference, tmp_path):
    log_dir, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    run_cluster(log_dir, byte_corpus, injections=("machine:0@iteration=7", "machine:1@iteration=7"),
                cluster_flags=("--spares", "2"), train_flags=(*FLAGS, "--save", save, "--save-interval", "4"))
    recs = read_recoveries(log_dir)
    assert len(recs) == 1 and recs[0]["source"] == "persistent" and recs[0]["iteration"] == 4
    _assert_continued_exactly(reference, log_dir, save)


def test_sigterm_flushes_the_gathered_layout_that_loads_at_dp1_and_dp2(byte_corpus, reference, tmp_path):
    """DP=2 on one machine, so its store holds both slices. Rank 1 is frozen at iteration 5
    (rank 0 then blocks in a DP collective), then rank 0 gets SIGTERM: its flush puts the
    gathered checkpoint together from the two slices without a collective. Loaded at DP=1
    and at DP=2, it continues exactly as the failure-free run."""
    log_dir, save, shm = str(tmp_path / "logs"), str(tmp_path / "ckpt"), str(tmp_path / "shm")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", "1",
           "--procs-per-machine", "2", "--max-restarts", "0", "--job-id", "flushdo", "--", "pretrain_gpt.py",
           *train_args(byte_corpus, log_dir, *FLAGS, "--save", save, "--gemini-store-dir", shm)]
    try:
        event = sigterm_while_a_peer_hangs(cmd, log_dir)
    finally:
        MemoryStore(shm, "flushdo", "m0").wipe()
    assert event["rank"] == 0 and "flushed iteration " in event["detail"], event
    flushed = int(event["detail"].split("flushed iteration ")[1].split()[0])
    assert flushed >= 4
    assert latest_iteration(save) == flushed and list_iterations(save) == [flushed]
    assert not [n for n in os.listdir(save) if n.endswith(".partial")]

    ref = dict(read_losses(reference))
    for world in (1, 2):
        cont, cont_save = str(tmp_path / f"dp{world}"), str(tmp_path / f"ckpt_dp{world}")
        run_pretrain(tmp_path, train_args(byte_corpus, cont, "--no-gemini", *FLAGS, "--load", save,
                                          "--save", cont_save), world)
        got = read_losses(cont)
        assert [i for i, _ in got] == list(range(flushed + 1, TRAIN_ITERS + 1)), (world, got)
        assert all(loss == ref[i] for i, loss in got), (world, [(i, loss, ref[i]) for i, loss in got])
        want, have = _final_state(os.path.join(reference, "ckpt")), _final_state(cont_save)
        assert want.keys() == have.keys()
        differ = [k for k in want if not torch.equal(want[k], have[k])]
        assert not differ, (world, differ[:5])

"""GEMINI with --use-distributed-optimizer: real machines, real signals, bit for bit.

DP=2 over 2 machines x 1 worker (TP=1): each machine's snapshot holds an optimizer slice
no other rank has, so a lost machine's slice exists only as its peer's replica.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.e2e import read_losses, read_recoveries
from tests.resilience.cluster import TRAIN_ITERS, assert_nothing_left, assert_same_losses, run_cluster

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


def test_worker_kill_recovers_its_slice_from_local_memory(byte_corpus, reference, tmp_path):
    log_dir = str(tmp_path)
    run_cluster(log_dir, byte_corpus, injections=("worker:1@iteration=6",), train_flags=FLAGS)
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

"""The distributed optimizer's SIGTERM flush picks one iteration every DP slice of its TP shard
has in this machine's store, and writes nothing (one line saying why) when a slice is elsewhere.
The flush itself, end to end with a real SIGTERM: tests/resilience/test_distrib_optimizer_recovery.py."""
import os

import pytest
import torch

from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.flush import flush_slices, pick_iteration
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.parallel.state import ParallelState

STATE = {"w": torch.zeros(16)}
LAYOUT = SnapshotLayout.build(STATE, {"format": "test"})


def _commit(store: MemoryStore, shard: str, *iterations: int) -> None:
    for it in iterations:
        w = store.begin_write(shard, LAYOUT.nbytes, LAYOUT.layout_hash)
        LAYOUT.write(STATE, w.buffer)
        store.commit(w, it)


@pytest.fixture
def store(tmp_path):
    s = MemoryStore(str(tmp_path / "shm"), "job", "m0")
    yield s
    s.close()


def test_the_newest_iteration_every_slice_has(store):
    _commit(store, "tp00dp00", 5, 6)
    _commit(store, "tp00dp01", 4, 5)   # a replica one behind
    assert pick_iteration(store, 0, 1, 2) == (5, [])


def test_prefers_the_iteration_the_other_tp_shard_has_too(store):
    _commit(store, "tp00dp00", 5, 6)
    _commit(store, "tp00dp01", 5, 6)
    _commit(store, "tp01dp00", 4, 5)
    _commit(store, "tp01dp01", 5, 7)
    assert pick_iteration(store, 0, 2, 2) == (5, [])
    assert pick_iteration(store, 1, 2, 2) == (5, [])


def test_a_slice_held_only_elsewhere_writes_nothing_and_says_which(store, tmp_path, capsys):
    _commit(store, "tp00dp00", 5, 6)
    assert pick_iteration(store, 0, 1, 2) == (None, ["tp00dp01"])
    ps = ParallelState(rank=0, world_size=2, tp_size=1, tp_rank=0, dp_size=2, dp_rank=0,
                       tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0, 1])
    save = tmp_path / "ckpt"
    save.mkdir()
    assert flush_slices(store, None, ps, str(save), None, 5.0) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "tp00dp01 not in this machine's memory store" in lines[0], lines
    assert os.listdir(save) == []

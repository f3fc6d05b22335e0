"""Modelled remote storage (--persistent-bandwidth-mbs): a throttled shard file really takes
size / bandwidth to write and to read (within 20%), and its bytes round-trip intact.

Each timed case moves 2.8 MB at 8 MB/s (0.35 s expected): long enough that scheduling
noise on a loaded machine stays well inside 20%, short enough for the fast tier.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from gemini_lm.checkpoint.files import Throttle, read_file_bytes, write_file_atomic
from gemini_lm.checkpoint.persistent import finalize_from_sidecars, read_shard, write_shard_with_sidecar
from gemini_lm.checkpoint.snapshot import SnapshotLayout

NBYTES, MBS = 2_800_000, 8.0
EXPECTED_S = NBYTES / (MBS * 1e6)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("direction", ["write", "read"])
def test_throttled_transfer_takes_size_over_bandwidth(tmp_path, direction):
    payload = os.urandom(NBYTES)
    path = str(tmp_path / "shard.bin")
    throttle = Throttle.from_mbs(MBS)
    if direction == "write":
        _, took = _timed(write_file_atomic, path, payload, throttle)
        back = read_file_bytes(path)
    else:
        write_file_atomic(path, payload)
        back, took = _timed(read_file_bytes, path, throttle)
        _, fast_s = _timed(read_file_bytes, path)
        assert fast_s < EXPECTED_S / 4   # the time above is the model's, not the disk's
    assert back == payload
    assert EXPECTED_S * 0.99 <= took <= EXPECTED_S * 1.2, f"{direction}: {took:.3f}s, expected {EXPECTED_S:.3f}s"


def test_a_throttled_shard_round_trips_through_the_checkpoint_format(tmp_path):
    tensors = {"w": torch.randn(NBYTES // 8), "train/iteration": torch.tensor([7])}
    layout = SnapshotLayout.build(tensors, {"format": "test"})
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.write(tensors, buf)
    save, throttle = str(tmp_path), Throttle.from_mbs(MBS * 2)   # half the time: 0.2 s each way
    write_shard_with_sidecar(os.path.join(save, "iter_0000007.partial"), 0, memoryview(buf.numpy()), throttle)
    finalize_from_sidecars(save, 7, 1, {}, keep=None, timeout_s=5)
    (back, _), read_s = _timed(read_shard, save, 7, 0, 1, throttle)
    assert read_s >= layout.nbytes / (MBS * 2e6)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)

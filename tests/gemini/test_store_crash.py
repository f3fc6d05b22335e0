"""The store across real process deaths: SIGKILL mid-write, and a SIGKILLed reader's pin."""
import pytest
import os
import select
import signal
import subprocess
import sys
import time

import torch

from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.store import MemoryStore

pytestmark = pytest.mark.slow   # spawns processes

JOB, MACHINE, SHARD = "job", "m0", "tp00"
CHUNKS = 8


def _state(iteration: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(iteration)
    return {"master": torch.randn(256, 1024, generator=g),          # 1 MiB: many pages, several chunks
            "exp_avg": torch.randn(256, 256, generator=g).to(torch.bfloat16),
            "iteration": torch.tensor(iteration)}


def _layout() -> SnapshotLayout:
    return SnapshotLayout.build(_state(0), {"format": "crash-test"})


def _image(iteration: int) -> bytes:
    layout = _layout()
    buf = bytearray(layout.nbytes)
    layout.write(_state(iteration), buf)
    return bytes(buf)


def _child_writer(root: str) -> None:
    """Commit iteration 1, then write iteration 2 slowly, announcing when it is half done."""
    store, layout = MemoryStore(root, JOB, MACHINE), _layout()
    w = store.begin_write(SHARD, layout.nbytes, layout.layout_hash)
    layout.write(_state(1), w.buffer)
    store.commit(w, 1)
    image = torch.frombuffer(bytearray(_image(2)), dtype=torch.uint8)
    w = store.begin_write(SHARD, layout.nbytes, layout.layout_hash)
    step = -(-layout.nbytes // CHUNKS)
    for i in range(CHUNKS):                   # the way replicas arrive from a peer: chunk by chunk
        w.buffer[i * step:(i + 1) * step].copy_(image[i * step:(i + 1) * step])
        if i == CHUNKS // 2:
            print("mid-write", flush=True)
            time.sleep(60)                    # the parent kills us here
    store.commit(w, 2)


def _child_reader(root: str) -> None:
    """Pin the newest snapshot and hold it until killed."""
    view = MemoryStore(root, JOB, MACHINE).open_latest(SHARD)
    print(f"pinned {view.record.slot} {view.record.iteration}", flush=True)
    time.sleep(60)


def _spawn(fn: str, root: str) -> subprocess.Popen:
    code = f"from tests.gemini.test_store_crash import {fn}; {fn}({root!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not report in time"
    line = proc.stdout.readline().strip()
    assert line, f"child exited with {proc.wait()}"
    return line


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()


def test_sigkill_mid_write_leaves_previous_snapshot(tmp_path):
    root = str(tmp_path / "shm")
    child = _spawn("_child_writer", root)
    try:
        assert _read_line(child) == "mid-write"
    finally:
        _kill(child)

    store = MemoryStore(root, JOB, MACHINE)
    records = store.records()
    assert [(r.slot, r.iteration) for r in records] == [("a", 1)]
    # The kill really landed mid-write: slot b holds the first half of iteration 2 only.
    layout, partial = _layout(), open(os.path.join(store.path, f"{SHARD}.b.bin"), "rb").read()
    step = -(-layout.nbytes // CHUNKS)
    half = (CHUNKS // 2 + 1) * step
    assert partial[:half] == _image(2)[:half] and partial[half:] != _image(2)[half:]
    with store.open(store.latest(SHARD)) as view:
        assert bytes(view.buffer) == _image(1)
    # The dead writer's lock died with it: the next snapshot takes the torn slot.
    w = store.begin_write(SHARD, layout.nbytes, layout.layout_hash)
    assert w.slot == "b"
    layout.write(_state(2), w.buffer)
    store.commit(w, 2)
    with store.open_latest(SHARD) as view:
        assert view.record.iteration == 2 and bytes(view.buffer) == _image(2)
    store.close()


def test_reader_in_another_process_pins_until_it_dies(tmp_path):
    root = str(tmp_path / "shm")
    store, layout = MemoryStore(root, JOB, MACHINE), _layout()

    def snapshot(it: int) -> str:
        w = store.begin_write(SHARD, layout.nbytes, layout.layout_hash)
        layout.write(_state(it), w.buffer)
        return store.commit(w, it).slot

    assert [snapshot(1), snapshot(2)] == ["a", "b"]
    reader = _spawn("_child_reader", root)
    try:
        assert _read_line(reader) == "pinned b 2"
        assert [snapshot(3), snapshot(4), snapshot(5)] == ["a", "c", "a"]   # b stays as the reader saw it
        with store.open(next(r for r in store.records() if r.slot == "b")) as view:
            assert bytes(view.buffer) == _image(2)
    finally:
        _kill(reader)
    assert [snapshot(6), snapshot(7)] == ["b", "a"]      # the pin died with the reader; back to two slots
    assert sorted(f for f in os.listdir(store.path) if f.endswith(".bin")) == [f"{SHARD}.a.bin", f"{SHARD}.b.bin"]
    store.close()

import json
import os
import shutil
import stat
import tempfile

import pytest
import torch
from safetensors import safe_open

from gemini_lm.checkpoint.checksum import CorruptSnapshotError, checksum
from gemini_lm.checkpoint.files import write_file_atomic
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.errors import UsageError
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.store_layout import CommitRecord
from gemini_lm.gemini.store_view import StaleRecordError


def _state(iteration: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(iteration)
    return {"w": torch.randn(64, 64, generator=g).to(torch.bfloat16),
            "exp_avg": torch.randn(64, 64, generator=g),
            "iteration": torch.tensor(iteration)}


LAYOUT = SnapshotLayout.build(_state(0), {"format": "test"})


def _snapshot(store: MemoryStore, iteration: int, shard: str = "tp00", **kw) -> CommitRecord:
    w = store.begin_write(shard, LAYOUT.nbytes, LAYOUT.layout_hash)
    LAYOUT.write(_state(iteration), w.buffer)
    return store.commit(w, iteration, **kw)


def _expected_bytes(iteration: int) -> bytes:
    buf = bytearray(LAYOUT.nbytes)
    LAYOUT.write(_state(iteration), buf)
    return bytes(buf)


def _files(store: MemoryStore) -> list[str]:
    return sorted(os.listdir(store.path))


@pytest.fixture
def store(tmp_path):
    s = MemoryStore(str(tmp_path / "shm"), "job1", "machine0")
    yield s
    s.close()


def test_directory_and_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        store = MemoryStore(str(tmp_path / "shm"), "job1", "machine0")
        _snapshot(store, 1)
        _snapshot(store, 2)
    finally:
        os.umask(old)
    for d in (os.path.dirname(store.path), store.path):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert _files(store) == ["tp00.a.bin", "tp00.a.commit.json", "tp00.b.bin", "tp00.b.commit.json"]
    for name in _files(store):
        assert stat.S_IMODE(os.stat(os.path.join(store.path, name)).st_mode) == 0o600, name
    store.close()


@pytest.mark.parametrize("job,machine", [("a/b", "m"), ("..", "m"), ("job", ""), ("job", "m/../x"), ("job", "m x")])
def test_rejects_ids_that_are_not_plain_names(tmp_path, job, machine):
    with pytest.raises(UsageError):
        MemoryStore(str(tmp_path), job, machine)


def test_rejects_bad_shard_ids(store):
    for shard in ("tp.00", "../x", ""):
        with pytest.raises(UsageError):
            store.begin_write(shard, LAYOUT.nbytes, LAYOUT.layout_hash)


def test_slots_alternate_and_both_stay_visible(store):
    slots = [_snapshot(store, it).slot for it in range(1, 6)]
    assert slots == ["a", "b", "a", "b", "a"]
    assert [(r.slot, r.iteration) for r in store.records()] == [("b", 4), ("a", 5)]
    latest = store.latest("tp00")
    assert (latest.iteration, latest.source, latest.job_id) == (5, "local", "job1")
    assert latest.layout_hash == LAYOUT.layout_hash and latest.nbytes == LAYOUT.nbytes
    assert latest.checksum == checksum(_expected_bytes(5))
    assert store.latest("tp01") is None


def test_begin_write_uncommits_its_slot_first(store):
    _snapshot(store, 1)
    _snapshot(store, 2)
    w = store.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash)
    assert w.slot == "a" and [r.iteration for r in store.records()] == [2]   # iteration 1's record is gone
    with pytest.raises(RuntimeError, match="in progress"):
        store.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash)
    store.abort(w)
    assert [r.iteration for r in store.records()] == [2]
    assert store.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash).slot == "a"


def test_open_verifies_and_returns_the_snapshot(store):
    rec = _snapshot(store, 3)
    with store.open(rec) as view:
        assert bytes(view.buffer) == _expected_bytes(3)
        assert view.buffer.readonly
        t = view.tensors()
        assert torch.equal(t["exp_avg"], _state(3)["exp_avg"]) and int(t["iteration"]) == 3
        del t


def test_flipped_byte_raises_corrupt_snapshot(store):
    rec = _snapshot(store, 1)
    path = os.path.join(store.path, "tp00.a.bin")
    with open(path, "r+b") as f:
        f.seek(LAYOUT.nbytes - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptSnapshotError, match="checksum"):
        store.open(rec)
    store.open(rec, verify=False).close()


def test_multiple_shards_and_inventory(store):
    _snapshot(store, 7, shard="tp00")
    _snapshot(store, 7, shard="tp01", source="machine3")
    _snapshot(store, 8, shard="tp00")
    assert store.shards() == ["tp00", "tp01"]
    inv = json.loads(json.dumps(store.inventory()))
    assert sorted((d["shard"], d["iteration"], d["source"], d["machine_id"]) for d in inv) == [
        ("tp00", 7, "local", "machine0"), ("tp00", 8, "local", "machine0"), ("tp01", 7, "machine3", "machine0")]
    assert CommitRecord.from_dict(inv[0]) in store.records()


def test_a_fresh_store_sees_committed_snapshots(tmp_path, store):
    _snapshot(store, 4)
    store.close()
    again = MemoryStore(os.path.dirname(os.path.dirname(store.path)), "job1", "machine0")
    with again.open(again.latest("tp00")) as view:
        assert bytes(view.buffer) == _expected_bytes(4)
    assert _snapshot(again, 5).slot == "b"
    again.close()


def test_pinned_slot_is_not_reused_and_spare_is_reclaimed(store):
    _snapshot(store, 1)                         # a
    _snapshot(store, 2)                         # b
    view = store.open(store.latest("tp00"))     # pins b (iteration 2)
    assert _snapshot(store, 3).slot == "a"
    assert _snapshot(store, 4).slot == "c"      # b is pinned: a spare instead of waiting
    assert bytes(view.buffer) == _expected_bytes(2)
    assert [(r.slot, r.iteration) for r in store.records()] == [("b", 2), ("a", 3), ("c", 4)]
    view.close()
    assert _snapshot(store, 5).slot == "b"      # reusable again; the oldest slot goes back into service
    assert _snapshot(store, 6).slot == "c"
    assert [f for f in _files(store) if f.endswith(".bin")] == ["tp00.b.bin", "tp00.c.bin"]
    assert [(r.slot, r.iteration) for r in store.records()] == [("b", 5), ("c", 6)]


def test_stale_record_is_detected(store):
    old = _snapshot(store, 1)
    _snapshot(store, 2)
    _snapshot(store, 3)                         # reuses old's slot
    with pytest.raises(StaleRecordError):
        store.open(old)
    with store.open_latest("tp00") as view:
        assert view.record.iteration == 3


def test_resizing_a_slot_for_a_new_layout(store):
    _snapshot(store, 1)
    small = SnapshotLayout.build({"x": torch.arange(10)}, {})
    w = store.begin_write("tp00", small.nbytes, small.layout_hash)
    small.write({"x": torch.arange(10)}, w.buffer)
    rec = store.commit(w, 2)
    assert os.path.getsize(os.path.join(store.path, "tp00.b.bin")) == small.nbytes
    with store.open(rec) as view:
        assert torch.equal(view.tensors()["x"], torch.arange(10))


def test_persisting_a_slot_is_copying_the_file(store, tmp_path):
    rec = _snapshot(store, 9)
    path = str(tmp_path / "iter_0000009.safetensors")
    with store.open(rec) as view:
        write_file_atomic(path, view.buffer)
    assert checksum(open(path, "rb").read()) == rec.checksum
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta == {"format": "test"} and int(tensors["iteration"]) == 9
    assert torch.equal(tensors["w"], _state(9)["w"])


def test_wipe_removes_the_machine(tmp_path):
    root = str(tmp_path / "shm")
    other = MemoryStore(root, "job1", "machine1")
    store = MemoryStore(root, "job1", "machine0")
    _snapshot(store, 1)
    store.wipe()
    assert not os.path.exists(store.path) and os.path.isdir(other.path)
    other.wipe()
    assert not os.path.exists(root)             # the job directory went with its last machine, then the empty root
    assert MemoryStore(root, "job1", "machine0").records() == []


def test_prepare_sizes_both_slots_without_committing(store):
    store.prepare("tp00", LAYOUT.nbytes)
    assert [f for f in _files(store)] == ["tp00.a.bin", "tp00.b.bin"]
    assert all(os.path.getsize(os.path.join(store.path, f)) == LAYOUT.nbytes for f in _files(store))
    assert store.records() == []
    _snapshot(store, 1)
    store.prepare("tp00", LAYOUT.nbytes)        # leaves the committed slot alone
    with store.open(store.latest("tp00")) as view:
        assert bytes(view.buffer) == _expected_bytes(1)


def test_commit_from_a_background_thread(store):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for it in range(1, 5):
            if pending is not None:
                pending.result()                # the next snapshot waits for the previous commit
            w = store.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash)
            LAYOUT.write(_state(it), w.buffer)
            pending = pool.submit(store.commit, w, it)
        rec = pending.result()
    assert (rec.iteration, rec.slot) == (4, "b")
    with store.open(rec) as view:
        assert bytes(view.buffer) == _expected_bytes(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_pinned_slots_take_cuda_state(tmp_path, where, capsys):
    """On tmpfs the writer's slots are page-locked; where the driver refuses (a disk
    filesystem) the store says so once and works unpinned. Replica slots are never pinned."""
    if where == "tmpfs" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    root = tempfile.mkdtemp(dir="/dev/shm") if where == "tmpfs" else str(tmp_path / "shm")
    try:
        store = MemoryStore(root, "job1", "machine0", pin_memory=True)
        state = {k: v.cuda() for k, v in _state(2).items()}
        w = store.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash)
        assert w.buffer.is_pinned() == (where == "tmpfs")
        LAYOUT.write(state, w.buffer)
        rec = store.commit(w, 2)
        with store.open(rec) as view:
            assert bytes(view.buffer) == _expected_bytes(2)
        torch.ones(1, device="cuda").add_(1)   # no CUDA error left pending by a refused registration
        replica = store.begin_write("tp01", LAYOUT.nbytes, LAYOUT.layout_hash, pin=False)
        assert not replica.buffer.is_pinned()
        store.abort(replica)
        assert ("could not page-lock" in capsys.readouterr().out) == (where == "disk")
        store.wipe()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_slot_payload_file_is_a_safetensors_file(store):
    import safetensors.torch
    _snapshot(store, 6)
    loaded = safetensors.torch.load_file(os.path.join(store.path, "tp00.a.bin"))
    assert set(loaded) == set(_state(6)) and torch.equal(loaded["w"], _state(6)["w"])

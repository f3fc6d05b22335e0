import json
import os
import struct

import pytest
import safetensors
import safetensors.torch
from safetensors.torch import load as load_safetensors_bytes
import torch

from gemini_lm.checkpoint.checksum import CorruptSnapshotError
from gemini_lm.checkpoint.snapshot import (
    DATA_ALIGN, SnapshotFormatError, SnapshotLayout, load_into, read_metadata, read_tensors)
from gemini_lm.checkpoint.files import file_metadata, read_file_bytes, tensors_from_bytes, write_file_atomic

META = {"format": "gemini-snapshot-1", "config": '{"hidden_size": 8}'}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "model.b": torch.randn(7, generator=g).to(torch.float16),
        "optim.master": torch.randn(5, 3, generator=g),
        "optim.exp_avg_sq": torch.rand(4, 4, generator=g, dtype=torch.float64),
        "optim.step": torch.tensor(12345678901, dtype=torch.int64),
        "data.position": torch.tensor([3, -1], dtype=torch.int32),
        "rng.torch": torch.randint(0, 256, (37,), generator=g, dtype=torch.uint8),
        "scaler.found_inf": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "transposed": torch.randn(3, 4, generator=g).t(),   # non-contiguous source
    }


def _written(state, meta=META):
    layout = SnapshotLayout.build(state, meta)
    buf = bytearray(layout.nbytes)
    layout.write(state, buf)
    return layout, buf


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_every_dtype():
    state = _state()
    layout, buf = _written(state)
    assert len(buf) == layout.nbytes
    _assert_same(read_tensors(buf), state)
    _assert_same(read_tensors(bytes(buf)), state)          # read-only buffer
    _assert_same(layout.read(buf), state)
    assert read_metadata(buf) == META


def test_a_write_interrupted_midway_is_torn_then_completes():
    """The failure-injection `copy` window: when `midway` runs, part of the new state is in
    the buffer and part is still the old one; afterwards all of it is the new one."""
    old, new = _state(0), _state(1)
    layout, buf = _written(old)
    seen = {}

    def midway():
        now = layout.read(bytes(buf))
        seen["new"] = {k for k in new if new[k].numel() and torch.equal(now[k], new[k])}
        seen["old"] = {k for k in old if old[k].numel() and torch.equal(now[k], old[k])}

    assert layout.write(new, buf, midway=midway) is None
    nonempty = {k for k in new if new[k].numel()}
    assert seen["new"] - seen["old"] and seen["old"] - seen["new"], seen   # torn: some of each
    assert seen["new"] | seen["old"] == nonempty, seen
    _assert_same(read_tensors(buf), new)


def test_layout_is_aligned_and_gap_free():
    layout, buf = _written(_state())
    n = struct.unpack("<Q", bytes(buf[:8]))[0]
    assert (8 + n) % DATA_ALIGN == 0 and len(layout.header) == 8 + n
    pos = 8 + n
    for name, e in layout.entries.items():
        assert e.offset == pos and e.offset % e.dtype.itemsize == 0, name
        pos += e.nbytes
    assert pos == layout.nbytes


def test_readable_by_safetensors_library(tmp_path):
    state = _state()
    _, buf = _written(state)
    path = tmp_path / "snap.safetensors"
    path.write_bytes(buf)
    _assert_same(safetensors.torch.load_file(str(path)), {k: v.contiguous() for k, v in state.items()})
    _assert_same(load_safetensors_bytes(bytes(buf)), state)   # safetensors' own parser, no pickle
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == META
        assert torch.equal(f.get_tensor("optim.master"), state["optim.master"])


def test_reads_files_written_by_safetensors_library():
    state = {k: v.contiguous() for k, v in _state().items()}
    data = safetensors.torch.save(state, metadata={"k": "v"})
    _assert_same(read_tensors(data), state)
    assert SnapshotLayout.parse(data).metadata == {"k": "v"}


def test_load_into_restores_in_place():
    _, buf = _written(_state(0))
    dst = {k: v.clone() for k, v in _state(1).items()}
    ptrs = {k: v.data_ptr() for k, v in dst.items()}
    load_into(dst, buf)
    _assert_same(dst, _state(0))
    assert ptrs == {k: v.data_ptr() for k, v in dst.items()}
    del dst["optim.step"]
    with pytest.raises(ValueError, match="optim.step"):
        load_into(dst, buf)


def test_layout_hash_stable_and_sensitive():
    base = SnapshotLayout.build(_state(0), META)
    assert SnapshotLayout.build(_state(7), META).layout_hash == base.layout_hash   # values do not matter
    _, buf = _written(_state(3))
    assert SnapshotLayout.parse(buf).layout_hash == base.layout_hash
    variants = []
    s = _state(); s["optim.master"] = s["optim.master"].double(); variants.append((s, META))
    s = _state(); s["model.b"] = torch.zeros(8, dtype=torch.float16); variants.append((s, META))
    s = _state(); s["renamed"] = s.pop("rng.torch"); variants.append((s, META))
    variants.append((_state(), dict(META, format="gemini-snapshot-2")))
    for state, meta in variants:
        assert SnapshotLayout.build(state, meta).layout_hash != base.layout_hash


def test_write_rejects_mismatched_state():
    layout = SnapshotLayout.build(_state(), META)
    buf = bytearray(layout.nbytes)
    s = _state(); s["model.b"] = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="model.b"):
        layout.write(s, buf)
    s = _state(); del s["empty"]
    with pytest.raises(ValueError, match="missing"):
        layout.write(s, buf)
    with pytest.raises(ValueError, match="bytes"):
        layout.write(_state(), bytearray(layout.nbytes + 1))
    with pytest.raises(ValueError, match="read-only"):
        layout.write(_state(), bytes(layout.nbytes))


def test_write_into_tensor_and_mmap(tmp_path):
    import mmap
    state = _state()
    layout = SnapshotLayout.build(state, META)
    out = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.write(state, out)
    path = tmp_path / "m.bin"
    path.write_bytes(b"\0" * layout.nbytes)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), layout.nbytes) as mm:
        layout.write(state, mm)
        assert mm[:] == out.numpy().tobytes()
    _assert_same(safetensors.torch.load_file(str(path)), {k: v.contiguous() for k, v in state.items()})


def test_parse_rejects_malformed_buffers():
    _, buf = _written(_state())
    with pytest.raises(SnapshotFormatError):
        read_tensors(buf[:-1])                      # truncated data
    with pytest.raises(SnapshotFormatError):
        read_tensors(buf[:5])
    with pytest.raises(SnapshotFormatError):
        read_tensors(struct.pack("<Q", 10**12) + bytes(buf[8:]))
    bad = bytearray(buf)
    bad[8] = ord("[")                               # header no longer a JSON object
    with pytest.raises(SnapshotFormatError):
        read_tensors(bad)
    body = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    with pytest.raises(SnapshotFormatError, match="gap"):
        read_tensors(struct.pack("<Q", len(body)) + body + bytes(8))
    with pytest.raises(CorruptSnapshotError):       # the common base the store and recovery catch
        read_tensors(buf[:-1])


def test_persisted_file_is_a_safetensors_file(tmp_path):
    """A slot's bytes written to disk are read back by the safetensors library itself."""
    state = _state()
    _, buf = _written(state)
    path = str(tmp_path / "tp_rank_00.safetensors")
    write_file_atomic(path, buf)
    assert os.listdir(tmp_path) == ["tp_rank_00.safetensors"]   # no temporary file left
    _assert_same(tensors_from_bytes(read_file_bytes(path)), state)
    assert file_metadata(path) == META


def test_atomic_write_keeps_the_old_file_when_it_fails(tmp_path):
    path = str(tmp_path / "manifest.json")
    write_file_atomic(path, b"old")

    class Exploding:   # a buffer whose bytes cannot be taken: the write fails midway
        pass
    with pytest.raises(TypeError):
        write_file_atomic(path, Exploding())
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["manifest.json"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_into_pinned_buffer():
    state = {k: v.cuda() for k, v in _state().items()}
    layout = SnapshotLayout.build(state, META)
    for out in (torch.empty(layout.nbytes, dtype=torch.uint8).pin_memory(),
                torch.empty(layout.nbytes, dtype=torch.uint8)):
        layout.write(state, out)
        _assert_same(read_tensors(out), {k: v.cpu() for k, v in state.items()})
    dst = {k: torch.zeros_like(v) for k, v in state.items()}
    load_into(dst, out)
    _assert_same({k: v.cpu() for k, v in dst.items()}, {k: v.cpu() for k, v in state.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_snapshot_holds_the_state_as_of_the_call():
    state = {k: v.cuda() for k, v in _state().items()}
    state["on_host"] = torch.arange(5)                           # host tensors are copied at once
    layout = SnapshotLayout.build(state, META)
    out = torch.empty(layout.nbytes, dtype=torch.uint8).pin_memory()
    big = torch.randn(4096, 4096, device="cuda")
    for v in state.values():       # queued before the call on the current stream: must be included
        if v.is_cuda and v.is_floating_point():
            v.add_(1)
    big @ big                      # keep the current stream busy past the call
    expected = {k: v.cpu() for k, v in state.items()}
    side = torch.cuda.Stream()
    done = layout.write(state, out, stream=side)
    assert isinstance(done, torch.cuda.Event)
    torch.cuda.current_stream().wait_event(done)                 # what Checkpointer.before_update does
    for v in state.values():
        if v.is_cuda and v.is_floating_point():
            v.mul_(0)
    done.synchronize()
    _assert_same(read_tensors(out), expected)


def test_write_refuses_a_misaligned_buffer():
    layout = SnapshotLayout.build(_state(), META)
    backing = bytearray(layout.nbytes + 1)
    with pytest.raises(ValueError, match="misaligned"):
        layout.write(_state(), memoryview(backing)[1:])

"""The snapshot format: a rank's whole training state laid out as one safetensors file.

Every in-memory slot and every persisted checkpoint is byte for byte a valid
safetensors file, so it can be inspected with `safetensors.safe_open` and loaded
without pickle. The names, dtypes and shapes of the state are fixed for a run, so the
layout is computed once (`SnapshotLayout.build`) and each snapshot is one pass of
`copy_` into views of a preallocated buffer.

    [8-byte little-endian header length n][n bytes of JSON, space padded][tensor data]

The JSON is padded so the data section starts on a DATA_ALIGN boundary, and tensors
are ordered by element size (largest first, otherwise in the caller's order), so
every tensor sits at an offset aligned to its element size while the data stays
gap-free, as the safetensors validator requires.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
import warnings
from typing import Mapping, NamedTuple

import torch

from gemini_lm.checkpoint.checksum import CorruptSnapshotError, as_memoryview

DATA_ALIGN = 4096          # data starts on a page: cheap to map, register or O_DIRECT
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit

# torch dtype <-> safetensors dtype string.
_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TO_ST[getattr(torch, _name)] = _st
_FROM_ST: dict[str, torch.dtype] = {v: k for k, v in _TO_ST.items()}

assert sys.byteorder == "little", "safetensors stores little-endian data"


class SnapshotFormatError(CorruptSnapshotError):
    """The bytes are not a well-formed snapshot (bad header, offsets or size)."""


class Entry(NamedTuple):
    offset: int               # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def as_byte_tensor(buf, writable: bool = False) -> torch.Tensor:
    """A flat uint8 CPU tensor over `buf` (a uint8 tensor, or anything with the buffer protocol)."""
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("a snapshot buffer must be a contiguous uint8 CPU tensor")
        return buf.reshape(-1)
    mv = as_memoryview(buf)
    if writable and mv.readonly:
        raise ValueError("cannot write a snapshot into a read-only buffer")
    with warnings.catch_warnings():
        # Views of read-only buffers are only ever read; torch warns regardless.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=torch.uint8)


def _view(data: torch.Tensor, e: Entry, writable: bool = False) -> torch.Tensor:
    """The tensor `e` inside the flat uint8 tensor `data`, without copying."""
    raw = data[e.offset:e.offset + e.nbytes]
    if raw.storage_offset() % e.dtype.itemsize or raw.data_ptr() % e.dtype.itemsize:
        if writable:
            raise ValueError(f"buffer at {data.data_ptr():#x} leaves {e.dtype} tensors misaligned")
        raw = raw.clone()   # reading a foreign file with a misaligned tensor: copy rather than fail
    return raw.view(e.dtype).view(e.shape)


class SnapshotLayout:
    """Where each named tensor lives in a snapshot file; computed once per run."""

    def __init__(self, header: bytes, entries: dict[str, Entry], metadata: dict[str, str]):
        self.header = header                  # length prefix + padded JSON: bytes before the data
        self.entries = entries                # name -> Entry, in file order
        self.metadata = metadata
        self.nbytes = len(header) + sum(e.nbytes for e in entries.values())
        self.layout_hash = hashlib.sha256(header).hexdigest()[:16]
        self._header_tensor = torch.frombuffer(bytearray(header), dtype=torch.uint8)

    def difference(self, ours: "SnapshotLayout") -> str:
        """How this (a found snapshot's) layout differs from `ours`, for a person: the model
        config fields first, then the tensor-parallel size, then the first differing tensor."""
        def config(layout):
            try:
                return json.loads(layout.metadata.get("model_config", "{}"))
            except ValueError:
                return {}
        there, here = config(self), config(ours)
        fields = [k for k in sorted(there.keys() | here.keys()) if there.get(k) != here.get(k)]
        if fields:
            return "; ".join(f"{k} {there.get(k)} there, {here.get(k)} here" for k in fields[:3])
        if self.metadata.get("tp_size") != ours.metadata.get("tp_size"):
            return f"tensor-parallel size {self.metadata.get('tp_size')} there, {ours.metadata.get('tp_size')} here"
        for name in sorted(self.entries.keys() | ours.entries.keys()):
            a, b = self.entries.get(name), ours.entries.get(name)
            if a is None or b is None or (a.dtype, a.shape) != (b.dtype, b.shape):
                def spec(e):
                    return "absent" if e is None else f"{str(e.dtype).replace('torch.', '')} {list(e.shape)}"
                return f"{name}: {spec(a)} there, {spec(b)} here"
        return "the same tensors, other metadata"

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> "SnapshotLayout":
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        specs = []
        for i, (name, t) in enumerate(tensors.items()):
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                raise TypeError(f"{name}: expected a dense tensor, got {type(t).__name__}")
            if t.dtype not in _TO_ST:
                raise TypeError(f"{name}: dtype {t.dtype} has no safetensors equivalent")
            specs.append((-t.dtype.itemsize, i, name, t.dtype, tuple(t.shape), t.numel() * t.dtype.itemsize))
        specs.sort()   # largest elements first keeps every tensor naturally aligned

        header_obj: dict = {"__metadata__": dict(sorted(metadata.items()))}
        rel_offsets, pos = [], 0
        for _, _, name, dtype, shape, nbytes in specs:
            header_obj[name] = {"dtype": _TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            rel_offsets.append(pos)
            pos += nbytes
        body = json.dumps(header_obj, separators=(",", ":"), ensure_ascii=False).encode()
        padded = _round_up(8 + len(body), DATA_ALIGN) - 8
        header = struct.pack("<Q", padded) + body + b" " * (padded - len(body))
        start = len(header)
        entries = {name: Entry(start + rel, nbytes, dtype, shape)
                   for (_, _, name, dtype, shape, nbytes), rel in zip(specs, rel_offsets)}
        return cls(header, entries, dict(header_obj["__metadata__"]))

    @classmethod
    def parse(cls, buf) -> "SnapshotLayout":
        """The layout of an existing snapshot/safetensors buffer, validated like the safetensors library does."""
        mv = as_memoryview(buf)
        if len(mv) < 8:
            raise SnapshotFormatError(f"{len(mv)} bytes is too short for a snapshot")
        n = struct.unpack_from("<Q", mv, 0)[0]
        if n > MAX_HEADER_BYTES or 8 + n > len(mv):
            raise SnapshotFormatError(f"header length {n} does not fit a {len(mv)}-byte buffer")
        try:
            obj = json.loads(bytes(mv[8:8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SnapshotFormatError(f"header is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise SnapshotFormatError("header is not a JSON object")
        metadata = obj.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SnapshotFormatError("__metadata__ must map strings to strings")
        start, items = 8 + n, []
        for name, spec in obj.items():
            try:
                dtype = _FROM_ST[spec["dtype"]]
                shape = tuple(int(s) for s in spec["shape"])
                begin, end = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SnapshotFormatError(f"{name}: malformed header entry {spec!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if min(shape, default=0) < 0 or end - begin != numel * dtype.itemsize:
                raise SnapshotFormatError(f"{name}: offsets {begin}..{end} do not hold {dtype} {list(shape)}")
            items.append((begin, end, name, dtype, shape))
        items.sort(key=lambda x: (x[0], x[1]))
        pos = 0
        for begin, end, name, _, _ in items:
            if begin != pos:
                raise SnapshotFormatError(f"{name}: data starts at {begin}, expected {pos} (gap or overlap)")
            pos = end
        if start + pos != len(mv):
            raise SnapshotFormatError(f"data ends at byte {start + pos} but the buffer has {len(mv)}")
        entries = {name: Entry(start + b, e - b, dtype, shape) for b, e, name, dtype, shape in items}
        return cls(bytes(mv[:start]), entries, metadata)

    def write(self, tensors: Mapping[str, torch.Tensor], out, stream=None, midway=None):
        """Copy header and every tensor (any device) into `out`, a writable buffer of `nbytes`.

        The per-step hot path: every tensor copied straight into its view of `out`, no staging.
        CUDA sources are copied device-to-host asynchronously when `out` is pinned. Without
        `stream`, this synchronizes, so `out` is complete when it returns (and None is
        returned). With a side `stream` (a torch.cuda.Stream) the copies are queued there
        after the work already queued on the current stream, and a CUDA event is returned:
        `out` is complete once it has fired, and the caller must not modify the CUDA
        sources before then (make the current stream wait on it).

        `midway()` (failure injection only, else None) is called with half of the tensors
        copied and the rest not: the copy then runs synchronously, in two calls.
        """
        dst = as_byte_tensor(out, writable=True)
        if dst.numel() != self.nbytes:
            raise ValueError(f"buffer has {dst.numel()} bytes, layout needs {self.nbytes}")
        if tensors.keys() != self.entries.keys():
            missing, extra = self.entries.keys() - tensors.keys(), tensors.keys() - self.entries.keys()
            raise ValueError(f"state does not match the layout: missing {sorted(missing)}, extra {sorted(extra)}")
        srcs, dsts = [], []
        for name, e in self.entries.items():
            src = tensors[name]
            if src.dtype != e.dtype or src.shape != e.shape:
                raise ValueError(f"{name}: got {src.dtype} {list(src.shape)}, layout has {e.dtype} {list(e.shape)}")
            srcs.append(src)
            dsts.append(_view(dst, e, writable=True))
        dst[:len(self.header)].copy_(self._header_tensor)
        # One call for all copies: per-tensor Python dispatch was ~15% of a 64 MB snapshot.
        # Host sources are copied by the CPU, synchronously, in the same call.
        non_blocking = torch.cuda.is_available() and dst.is_pinned()
        devices = {s.device for s in srcs if s.is_cuda}
        if midway is not None:
            return self._write_in_halves(dsts, srcs, devices, non_blocking, midway)
        if stream is None or not devices:
            torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)
            for device in devices:
                torch.cuda.synchronize(device)
            return None
        if len(devices) > 1 or stream.device not in devices:
            raise ValueError(f"a side stream on {stream.device} cannot copy state from {sorted(map(str, devices))}")
        stream.wait_stream(torch.cuda.current_stream(stream.device))   # the update's results first
        with torch.cuda.stream(stream):
            torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)
            return stream.record_event()

    @staticmethod
    def _write_in_halves(dsts, srcs, devices, non_blocking: bool, midway) -> None:
        half = len(dsts) // 2
        for part in ((dsts[:half], srcs[:half]), (dsts[half:], srcs[half:])):
            torch._foreach_copy_(*part, non_blocking=non_blocking)
            for device in devices:
                torch.cuda.synchronize(device)
            if midway is not None:
                midway()
                midway = None
        return None

    def read(self, buf) -> dict[str, torch.Tensor]:
        """Zero-copy views of the tensors in `buf`, which must have been written with this layout."""
        data = as_byte_tensor(buf)
        if data.numel() != self.nbytes or not torch.equal(data[:len(self.header)], self._header_tensor):
            raise SnapshotFormatError("buffer was not written with this layout")
        return {name: _view(data, e) for name, e in self.entries.items()}


def read_tensors(buf) -> dict[str, torch.Tensor]:
    """Zero-copy views of every tensor in a snapshot/safetensors buffer (any writer).

    The views share memory with `buf`: they are valid while it is, and must not be
    written when `buf` is read-only (e.g. a mapped slot).
    """
    return SnapshotLayout.parse(buf).read(buf)


def read_metadata(buf) -> dict[str, str]:
    return SnapshotLayout.parse(buf).metadata


def load_into(tensors_dst: Mapping[str, torch.Tensor], buf) -> None:
    """Restore a snapshot in place: copy each tensor of `buf` into the same-named existing tensor."""
    src = read_tensors(buf)
    if tensors_dst.keys() != src.keys():
        missing, extra = src.keys() - tensors_dst.keys(), tensors_dst.keys() - src.keys()
        raise ValueError(f"snapshot does not match the state: not in state {sorted(missing)}, "
                         f"not in snapshot {sorted(extra)}")
    for name, dst in tensors_dst.items():
        s = src[name]
        if dst.dtype != s.dtype or dst.shape != s.shape:
            raise ValueError(f"{name}: snapshot has {s.dtype} {list(s.shape)}, state has {dst.dtype} {list(dst.shape)}")
        dst.copy_(s)

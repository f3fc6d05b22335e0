"""Files on durable storage: atomic writes, and persisted snapshots read with safetensors.

A persisted shard is byte for byte a snapshot slot, i.e. a safetensors file, so it is read
with the safetensors library (no pickle, no parser of ours); only the in-memory slots use
our zero-copy reader (snapshot.read_tensors), which maps them without a copy.

A `Throttle` paces reads and writes to a given bandwidth: a model of remote persistent
storage (the paper's baselines write to storage at 20 Gbps for a whole cluster), so a
benchmark on a local disk can compare against it. It is passed explicitly to the calls
that move shard files; None (the default) is the disk's own speed.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from gemini_lm.checkpoint.checksum import as_memoryview


@dataclass(frozen=True)
class Throttle:
    """Reads and writes paced to `bytes_per_s` (per process): each transfer goes in chunks of
    about `chunk_s` seconds' worth, and after each one it sleeps until the time since the
    transfer began is at least the bytes moved so far / bandwidth."""
    bytes_per_s: float
    chunk_s: float = 0.02

    @classmethod
    def from_mbs(cls, mbs: float | None) -> "Throttle | None":
        """--persistent-bandwidth-mbs (MB/s, 10^6 bytes); None or 0: no throttle."""
        return cls(mbs * 1e6) if mbs else None

    @property
    def chunk_bytes(self) -> int:
        return int(min(16 << 20, max(64 << 10, self.bytes_per_s * self.chunk_s)))

    def pace(self, t0: float, nbytes: int) -> None:
        """Sleep until `nbytes` moved since `t0` (time.perf_counter) took their modelled time."""
        delay = t0 + nbytes / self.bytes_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def describe(exc: BaseException) -> str:
    """A write error in a few words for one line: 'No space left on device: <file>', not a repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def _write_all(f, data: memoryview, throttle: Throttle | None) -> None:
    if throttle is None:
        f.write(data)
        return
    t0, step = time.perf_counter(), throttle.chunk_bytes
    for start in range(0, len(data), step):
        f.write(data[start:start + step])
        throttle.pace(t0, min(start + step, len(data)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data, throttle: Throttle | None = None) -> None:
    """Write `data` (bytes or any buffer) to `path` durably and atomically: tmp, fsync, rename.
    A crash leaves either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write_all(f, as_memoryview(data), throttle)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_file_bytes(path: str, throttle: Throttle | None = None) -> bytes:
    with open(path, "rb") as f:
        if throttle is None:
            return f.read()
        t0, step, chunks, done = time.perf_counter(), throttle.chunk_bytes, [], 0
        while chunk := f.read(step):
            chunks.append(chunk)
            done += len(chunk)
            throttle.pace(t0, done)
        return b"".join(chunks)


def tensors_from_bytes(payload: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file held in memory (copies: the bytes may go)."""
    return load_safetensors_bytes(payload)


def file_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read without loading its tensors."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}

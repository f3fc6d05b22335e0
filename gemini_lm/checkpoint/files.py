"""Files on durable storage: atomic writes, and persisted snapshots read with safetensors.

A persisted shard is byte for byte a snapshot slot, i.e. a safetensors file, so it is read
with the safetensors library (no pickle, no parser of ours); only the in-memory slots use
our zero-copy reader (snapshot.read_tensors), which maps them without a copy.
"""
from __future__ import annotations

import contextlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from gemini_lm.checkpoint.checksum import as_memoryview


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data) -> None:
    """Write `data` (bytes or any buffer) to `path` durably and atomically: tmp, fsync, rename.
    A crash leaves either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(as_memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tensors_from_bytes(payload: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file held in memory (copies: the bytes may go)."""
    return load_safetensors_bytes(payload)


def file_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read without loading its tensors."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}

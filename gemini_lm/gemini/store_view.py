"""The reader's side of the memory store: a committed slot pinned while it is read.

A reader (persistence, a peer fetching a replica, recovery) takes LOCK_SH on the payload
and then re-reads the commit record: if it is unchanged the payload is committed and
stays untouched until the reader closes it, however long that takes, because a writer
never takes a slot a reader holds (store.py). A reader that loses the race gets
StaleRecordError and asks the store for the latest record again.
"""
from __future__ import annotations

import fcntl
import mmap
import os

import torch

from gemini_lm.checkpoint.checksum import verify as verify_checksum
from gemini_lm.checkpoint.snapshot import read_tensors
from gemini_lm.gemini.store_layout import CommitRecord, payload_name, read_record
from gemini_lm import safefs


class StaleRecordError(RuntimeError):
    """The slot was reused after its record was read; ask `latest()` again."""


class SnapshotView:
    """A committed slot pinned for reading; the writer will not reuse it until `close()`.

    `buffer` is a read-only memoryview of the whole safetensors payload. Tensors from
    `tensors()` are views of it: copy them (or use snapshot.load_into) and never write
    them; they are invalid after close().
    """

    def __init__(self, record: CommitRecord, fd: int, mm: mmap.mmap):
        self.record = record
        self._fd, self._mm = fd, mm
        self.buffer = memoryview(mm)

    def tensors(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.buffer)

    def close(self) -> None:
        if self._fd < 0:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        try:
            self.buffer.release()
            self._mm.close()
        except BufferError:
            pass   # tensors of it are still alive; the mapping is freed with them
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "SnapshotView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pin(dir_fd: int | None, where: str, job_id: str, record: CommitRecord, verify: bool) -> SnapshotView:
    """Pin `record`'s slot in the machine directory `dir_fd` (None: the store is gone; `where`:
    its path, for messages). Raises StaleRecordError if the slot was reused meanwhile and
    CorruptSnapshotError if, with `verify`, its bytes do not match the record's checksum."""
    name = payload_name(record.shard, record.slot)
    try:
        if dir_fd is None:
            raise FileNotFoundError(name)
        fd = safefs.open_file(dir_fd, name, os.O_RDONLY, os.path.join(where, name))
    except FileNotFoundError:
        raise StaleRecordError(f"{record.shard}.{record.slot}: payload is gone") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StaleRecordError(f"{record.shard}.{record.slot}: being rewritten") from None
        if read_record(dir_fd, where, job_id, record.shard, record.slot) != record:
            raise StaleRecordError(f"{record.shard}.{record.slot}: no longer holds iteration {record.iteration}")
        view = SnapshotView(record, fd, mmap.mmap(fd, record.nbytes, access=mmap.ACCESS_READ))
    except BaseException:
        os.close(fd)
        raise
    if verify:
        try:
            verify_checksum(view.buffer, record.checksum,
                            what=f"{where}/{record.shard}.{record.slot} iteration {record.iteration}")
        except BaseException:
            view.close()
            raise
    return view

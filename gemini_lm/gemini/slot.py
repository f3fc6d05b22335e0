"""Slot: a writer's mapping of one payload file of the store, optionally page-locked.

Kept between snapshots, so a snapshot is one copy into memory that is already mapped,
sized and faulted in. On CUDA the mapping can be registered with the driver (pinned),
so device-to-host copies into it run asynchronously at full speed; where the driver
refuses (a store on a disk filesystem rather than tmpfs) the slot works unpinned.
"""
from __future__ import annotations

import fcntl
import mmap
import os

import torch


def clear_cuda_error() -> None:
    """A failed runtime call leaves its error pending for this thread, and the next kernel
    launch check would raise it: consume it with a launch whose check we expect to fail."""
    try:
        torch.empty(1, device="cuda").zero_()
    except RuntimeError:
        pass


class Slot:
    def __init__(self, fd: int):
        self.fd = fd
        self.size = -1
        self.mm: mmap.mmap | None = None
        self.buffer: torch.Tensor | None = None   # writable uint8 view of the whole mapping
        self.pinned = False

    def map(self, nbytes: int, pin: bool = False) -> bool:
        """Size and map the (uncommitted) file, faulting its pages in now rather than
        mid-snapshot; with `pin`, page-lock it. False only if pinning was refused."""
        if self.mm is not None and self.size == nbytes:
            return True
        self.unmap()
        os.ftruncate(self.fd, nbytes)
        os.posix_fallocate(self.fd, 0, nbytes)   # out of memory shows here as ENOSPC, not SIGBUS mid-copy
        self.mm = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.buffer[::mmap.PAGESIZE].zero_()     # one write per page; the slot holds no committed data
        self.size = nbytes
        return self._pin() if pin else True

    def _pin(self) -> bool:
        err = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.size, 1))  # portable
        if err != 0:
            clear_cuda_error()
            return False
        self.pinned = True
        return True

    def unmap(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
        self.buffer = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass   # a caller still holds a view; the mapping goes when that view does
            self.mm = None
        self.size = -1

    def close(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)   # the mapping may keep the file description alive
        self.unmap()
        os.close(self.fd)

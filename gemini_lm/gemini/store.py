"""MemoryStore: a machine's GEMINI snapshots in shared memory, outliving its workers.

The files (tmpfs by default, so "disk" is CPU memory) and their commit records are
store_layout.py's; the reader's pinned view is store_view.py's. Writers and readers
coordinate with flock(2) on the payload file, which the kernel drops when a process dies:

- A writer (one per shard per machine, the caller ensures it) takes LOCK_EX on the
  slot it rewrites: never the one holding the newest committed iteration, and never
  one a reader holds.
- A reader takes LOCK_SH and then re-reads the record (store_view.pin), so a slot it
  holds stays untouched until it closes it.
- If readers pin the only reusable slot, the writer uses a spare slot ("c", ...)
  rather than wait, so training never blocks on a slow reader; spares are deleted
  again once unpinned, so a shard steadily occupies two slots.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from dataclasses import dataclass

import torch

from gemini_lm.checkpoint.checksum import checksum as compute_checksum
from gemini_lm.errors import UsageError
from gemini_lm.gemini.slot import Slot
from gemini_lm.gemini.store_layout import (SHARD_ID, SLOT_NAMES, CommitRecord, check_id, payload_name,
                                           payload_slots, read_record, record_name, recorded_slots,
                                           unlink, write_record)
from gemini_lm.gemini.store_view import SnapshotView, StaleRecordError, pin
from gemini_lm.log import get_logger
from gemini_lm import safefs

log = get_logger(__name__)


@dataclass
class WriteHandle:
    """An uncommitted slot being filled: write `nbytes` bytes into `buffer`, then commit."""
    shard: str
    slot: str
    nbytes: int
    layout_hash: str
    buffer: torch.Tensor      # writable uint8 view of the mapped payload file
    done: bool = False


class MemoryStore:
    def __init__(self, root: str, job_id: str, machine_id: str, pin_memory: bool = False):
        """`pin_memory`: page-lock the writer's slot mappings for CUDA (needs a GPU)."""
        check_id("job id", job_id)
        check_id("machine id", machine_id)
        if pin_memory and not torch.cuda.is_available():
            raise UsageError("pinned snapshot slots need CUDA")
        self.job_id, self.machine_id, self.pin_memory = job_id, machine_id, pin_memory
        self.root, self._warned_pin = root, False
        self.path = os.path.join(root, job_id, machine_id)
        self._fds: list[int] | None = None   # [parent of root, root, job, machine] (safefs)
        self._dir(create=True)   # a path that is no private directory fails here, before any write
        self._slots: dict[tuple[str, str], Slot] = {}
        self._writing: dict[str, WriteHandle] = {}
        self._lock = threading.RLock()   # writer bookkeeping; commits may come from another thread

    # ---- paths and records ------------------------------------------------------------
    def _dir(self, create: bool = False) -> int | None:
        """The machine directory's descriptor: every name in it is opened relative to it, so
        nothing above it is looked up again (a directory swapped for a link later is never
        followed). None if it does not exist and `create` is False (reading a wiped store)."""
        if self._fds is None:
            for attempt in range(3):
                try:
                    self._fds = safefs.open_private_dir(self.root, create=create,
                                                        below=(self.job_id, self.machine_id))
                    break
                except FileNotFoundError:
                    if not create:
                        return None
                    if attempt == 2:   # another job's wipe removed the empty root under our feet, thrice
                        raise UsageError(f"GEMINI store {self.path}: kept disappearing while created") from None
                except OSError as exc:
                    raise UsageError(f"GEMINI store {self.path}: {exc.strerror}") from None
            for fd in self._fds[2:]:
                safefs.tighten(fd)   # our own job and machine directories: owner-only
        return self._fds[-1]

    def payload_path(self, record: CommitRecord) -> str:
        """The file holding `record`'s bytes (for tools and tests that inspect or damage it)."""
        return os.path.join(self.path, payload_name(record.shard, record.slot))

    def _read_record(self, shard: str, slot: str) -> CommitRecord | None:
        dfd = self._dir()
        return None if dfd is None else read_record(dfd, self.path, self.job_id, shard, slot)

    def _listdir(self) -> list[str]:
        dfd = self._dir()
        return [] if dfd is None else os.listdir(dfd)

    def records(self, shard: str | None = None) -> list[CommitRecord]:
        """Every committed slot (older iterations too), sorted by shard then iteration."""
        out = []
        for rec_shard, slot in recorded_slots(self._listdir(), shard):
            rec = self._read_record(rec_shard, slot)
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: (r.shard, r.iteration, r.time))

    def latest(self, shard: str) -> CommitRecord | None:
        recs = self.records(shard)
        return recs[-1] if recs else None

    def shards(self) -> list[str]:
        return sorted({r.shard for r in self.records()})

    def inventory(self) -> list[dict]:
        """What this machine holds, as JSON-able dicts to publish to the other ranks."""
        return [dict(r.to_dict(), machine_id=self.machine_id) for r in self.records()]

    def nbytes(self) -> int:
        """Bytes of shared memory this machine's store occupies (every slot, replicas too)."""
        total = 0
        for name in self._listdir():
            try:
                total += os.stat(os.path.join(self.path, name)).st_size
            except FileNotFoundError:
                pass
        return total

    # ---- writing --------------------------------------------------------------------
    def _slot(self, shard: str, slot: str) -> Slot:
        s = self._slots.get((shard, slot))
        if s is None:
            name = payload_name(shard, slot)
            fd = safefs.open_or_create_file(self._dir(create=True), name, os.O_RDWR, os.path.join(self.path, name))
            s = self._slots[(shard, slot)] = Slot(fd)
        return s

    def _map(self, s: Slot, nbytes: int, pin: bool = True) -> None:
        if not s.map(nbytes, pin=self.pin_memory and pin) and not self._warned_pin:
            self._warned_pin = True
            log.warning(f"GEMINI could not page-lock its slots in {self.root} (a tmpfs such as /dev/shm "
                        "can be): snapshots copy off the GPU synchronously")

    def _reusable_slots(self, shard: str) -> list[str]:
        """Slots a writer may take, oldest iteration first; spare names last."""
        records = self.records(shard)
        committed = {r.slot: r.iteration for r in records}
        newest = records[-1].slot if records else None
        names = payload_slots(self._listdir(), shard)
        for name in SLOT_NAMES:
            if len(names) >= 2:
                break
            names.add(name)
        order = sorted(names - {newest}, key=lambda n: (committed.get(n, -1), n))
        return order + [n for n in SLOT_NAMES if n not in names]

    def begin_write(self, shard: str, nbytes: int, layout_hash: str, pin: bool = True) -> WriteHandle:
        """Take a slot for a new snapshot of `shard` and un-commit it; fill `.buffer`, then commit().
        `pin=False`: never page-lock it (a replica from a peer: no device reads or writes it,
        and registering memory mid-training can stall the device)."""
        check_id("shard id", shard, SHARD_ID)
        with self._lock:
            if shard in self._writing:
                raise RuntimeError(f"{shard}: a write is already in progress")
            for slot in self._reusable_slots(shard):
                s = self._slot(shard, slot)
                try:
                    fcntl.flock(s.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue   # pinned by a reader
            else:
                raise RuntimeError(f"{shard}: every slot is pinned by readers")
            try:
                unlink(self._dir(create=True), record_name(shard, slot))   # from here on a crash leaves no record for this slot
                self._map(s, nbytes, pin)
            except BaseException:
                fcntl.flock(s.fd, fcntl.LOCK_UN)
                raise
            w = self._writing[shard] = WriteHandle(shard, slot, nbytes, layout_hash, s.buffer)
            return w

    def commit(self, w: WriteHandle, iteration: int, checksum: str | None = None,
               source: str = "local") -> CommitRecord:
        """Publish a completely written slot; computes the checksum unless the caller has it.

        The training state is no longer involved once the slot is written, so the caller
        may commit from a background thread (taking the checksum off the training step);
        the next begin_write of the shard must wait for that commit.
        """
        if w.done or self._writing.get(w.shard) is not w:
            raise RuntimeError(f"{w.shard}.{w.slot}: not an open write")
        s = self._slots[(w.shard, w.slot)]
        if checksum is None:
            checksum = compute_checksum(s.mm)
        rec = CommitRecord(shard=w.shard, slot=w.slot, iteration=int(iteration), checksum=checksum,
                           nbytes=w.nbytes, job_id=self.job_id, layout_hash=w.layout_hash,
                           source=source, time=time.time())
        with self._lock:
            write_record(self._dir(create=True), self.path, rec)
            self._finish(w, s)
            self._reclaim_spares(w.shard)
        return rec

    def abort(self, w: WriteHandle) -> None:
        """Give up a write; the slot stays uncommitted."""
        with self._lock:
            if not w.done and self._writing.get(w.shard) is w:
                self._finish(w, self._slots[(w.shard, w.slot)])

    def _finish(self, w: WriteHandle, s: Slot) -> None:
        fcntl.flock(s.fd, fcntl.LOCK_UN)
        w.done = True
        del self._writing[w.shard]

    def _reclaim_spares(self, shard: str) -> None:
        """Back to two slots: delete slots other than the two newest that no reader pins."""
        names = payload_slots(self._listdir(), shard)
        if len(names) <= 2:
            return
        keep = {r.slot for r in self.records(shard)[-2:]}
        for slot in sorted(names - keep):
            if len(names) <= 2:
                break
            s = self._slot(shard, slot)
            try:
                fcntl.flock(s.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            unlink(self._dir(create=True), record_name(shard, slot))
            unlink(self._dir(create=True), payload_name(shard, slot))
            s.close()   # closing drops the lock
            del self._slots[(shard, slot)]
            names.discard(slot)

    def discard(self, shard: str, slot: str) -> None:
        """Un-commit a slot (e.g. a snapshot newer than the iteration a recovery agreed on,
        left by the failed timeline). Its payload is reused by the next write."""
        check_id("shard id", shard, SHARD_ID)
        with self._lock:
            if self._dir() is not None:
                unlink(self._dir(create=True), record_name(shard, slot))

    def prepare(self, shard: str, nbytes: int) -> None:
        """Create and pre-fault both slots of `shard` ahead of the first snapshot (optional)."""
        check_id("shard id", shard, SHARD_ID)
        with self._lock:
            committed = {r.slot for r in self.records(shard)}
            for slot in SLOT_NAMES[:2]:
                if slot in committed or (shard in self._writing and self._writing[shard].slot == slot):
                    continue
                s = self._slot(shard, slot)
                fcntl.flock(s.fd, fcntl.LOCK_EX)
                try:
                    self._map(s, nbytes)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    # At start-up this is the user's choice of store, not a failure to recover from.
                    st = os.statvfs(self.root)
                    raise UsageError(f"--gemini-store-dir {self.root}: no room for two slots of "
                                     f"{nbytes / 2**20:.1f} MiB (shard {shard}; the filesystem holds "
                                     f"{st.f_blocks * st.f_frsize / 2**20:.1f} MiB in all)") from None
                finally:
                    fcntl.flock(s.fd, fcntl.LOCK_UN)

    # ---- reading --------------------------------------------------------------------
    def writer_mapping(self, record: CommitRecord) -> torch.Tensor | None:
        """This process's own mapping of `record`'s slot if it wrote it (None otherwise):
        page-locked on CUDA, so a device can DMA from it. Read it only while a view of
        the record is open (the view keeps the writer off the slot)."""
        with self._lock:
            s = self._slots.get((record.shard, record.slot))
            if s is None or s.buffer is None or s.size != record.nbytes:
                return None
            return s.buffer

    def open(self, record: CommitRecord, verify: bool = True) -> SnapshotView:
        """Pin a committed slot for reading; raises StaleRecordError if it was reused meanwhile
        and CorruptSnapshotError if its bytes do not match the record's checksum."""
        return pin(self._dir(), self.path, self.job_id, record, verify)

    def open_latest(self, shard: str, verify: bool = True, attempts: int = 10) -> SnapshotView | None:
        """Pin the newest committed snapshot of `shard`, or None if there is none."""
        for _ in range(attempts):
            rec = self.latest(shard)
            if rec is None:
                return None
            try:
                return self.open(rec, verify)
            except StaleRecordError:
                continue   # the writer moved on; a newer record exists now
        raise StaleRecordError(f"{shard}: slots kept changing during {attempts} attempts")

    # ---- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Unmap this process's slots; the snapshots stay in shared memory."""
        with self._lock:
            for w in list(self._writing.values()):
                self.abort(w)
            for s in self._slots.values():
                s.close()
            self._slots.clear()
            for fd in self._fds or ():
                os.close(fd)
            self._fds = None

    def wipe(self) -> None:
        """Delete this machine's snapshots (clean finish, or its memory is lost with the hardware),
        then the job directory and the root if that leaves them empty (other jobs' stay)."""
        self.close()
        try:
            parent, root, job = safefs.open_private_dir(self.root, create=False, below=(self.job_id,))
        except FileNotFoundError:
            return
        try:
            safefs.remove_tree(job, self.machine_id)
            if safefs.remove_empty_dir(root, self.job_id):
                safefs.remove_empty_dir(parent, os.path.basename(os.path.abspath(self.root)))
        finally:
            for fd in (parent, root, job):
                os.close(fd)

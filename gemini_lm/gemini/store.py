"""MemoryStore: a machine's GEMINI snapshots in shared memory, outliving its workers.

Layout on disk (tmpfs by default, so "disk" is CPU memory):

    <root>/<job_id>/<machine_id>/          mode 0o700
        tp00.a.bin   tp00.a.commit.json     slot "a": payload + commit record, mode 0o600
        tp00.b.bin   tp00.b.commit.json     slot "b"

A payload is exactly a safetensors file (see snapshot.py), so persisting it is copying
the file. A commit record is written atomically (tmp + rename) only after its payload
is complete, and a writer removes a slot's record before touching its payload, so a
crash at any point leaves every surviving record pointing at a complete payload.

Writers and readers coordinate with flock(2) on the payload file, which the kernel
drops when a process dies:

- A writer (one per shard per machine, the caller ensures it) takes LOCK_EX on the
  slot it rewrites: never the one holding the newest committed iteration, and never
  one a reader holds.
- A reader (persistence, a peer fetching a replica, recovery) takes LOCK_SH and then
  re-reads the record: if it is unchanged the payload is committed and stays
  untouched until the reader closes it, however long that takes. A reader that
  loses the race gets StaleRecordError and asks for the latest record again.
- If readers pin the only reusable slot, the writer uses a spare slot ("c", ...)
  rather than wait, so training never blocks on a slow reader; spares are deleted
  again once unpinned, so a shard steadily occupies two slots.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import re
import shutil
import stat
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch

from gemini_lm.checkpoint.checksum import checksum as compute_checksum
from gemini_lm.checkpoint.checksum import verify as verify_checksum
from gemini_lm.checkpoint.snapshot import read_tensors
from gemini_lm.errors import UsageError
from gemini_lm.gemini.slot import Slot
from gemini_lm.log import get_logger

log = get_logger(__name__)

SLOT_NAMES = "abcdefgh"        # "a"/"b" in steady state, the rest only while readers pin slots
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")   # no dots: they separate file-name fields


class StaleRecordError(RuntimeError):
    """The slot was reused after its record was read; ask `latest()` again."""


@dataclass(frozen=True)
class CommitRecord:
    shard: str
    slot: str
    iteration: int
    checksum: str
    nbytes: int
    job_id: str
    layout_hash: str
    source: str         # "local", or the machine id the replica came from
    time: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CommitRecord":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class WriteHandle:
    """An uncommitted slot being filled: write `nbytes` bytes into `buffer`, then commit."""
    shard: str
    slot: str
    nbytes: int
    layout_hash: str
    buffer: torch.Tensor      # writable uint8 view of the mapped payload file
    done: bool = False


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


def _check_id(kind: str, value: str, pattern: re.Pattern = _ID) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"invalid {kind} {value!r}: use letters, digits, '_', '-' (no path separators)")


def _make_private_dir(path: str) -> None:
    """Create `path` owner-only, or check that the existing one is a directory we own."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)   # mkdir's mode is filtered by the umask
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a directory owned by this user") from None
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()   # no fsync: on tmpfs there is nothing below the page cache
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class MemoryStore:
    def __init__(self, root: str, job_id: str, machine_id: str, pin_memory: bool = False):
        """`pin_memory`: page-lock the writer's slot mappings for CUDA (needs a GPU)."""
        _check_id("job id", job_id)
        _check_id("machine id", machine_id)
        if pin_memory and not torch.cuda.is_available():
            raise UsageError("pinned snapshot slots need CUDA")
        self.job_id, self.machine_id, self.pin_memory = job_id, machine_id, pin_memory
        self.root, self._warned_pin = root, False
        self.path = os.path.join(root, job_id, machine_id)
        os.makedirs(root, mode=0o700, exist_ok=True)   # may be shared by users; below it is private
        for p in (os.path.join(root, job_id), self.path):
            _make_private_dir(p)
        self._slots: dict[tuple[str, str], Slot] = {}
        self._writing: dict[str, WriteHandle] = {}
        self._lock = threading.RLock()   # writer bookkeeping; commits may come from another thread

    # ---- paths and records ------------------------------------------------------------
    def payload_path(self, record: CommitRecord) -> str:
        """The file holding `record`'s bytes (for tools and tests that inspect or damage it)."""
        return self._payload_path(record.shard, record.slot)

    def _payload_path(self, shard: str, slot: str) -> str:
        return os.path.join(self.path, f"{shard}.{slot}.bin")

    def _record_path(self, shard: str, slot: str) -> str:
        return os.path.join(self.path, f"{shard}.{slot}.commit.json")

    def _read_record(self, shard: str, slot: str) -> CommitRecord | None:
        """The slot's record if it is intact and matches its payload file, else None."""
        try:
            with open(self._record_path(shard, slot)) as f:
                rec = CommitRecord.from_dict(json.load(f))
            size = os.stat(self._payload_path(shard, slot)).st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ok = (rec.shard, rec.slot, rec.job_id, rec.nbytes) == (shard, slot, self.job_id, size)
        return rec if ok else None

    def _listdir(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except FileNotFoundError:
            return []

    def _slot_names(self, shard: str) -> set[str]:
        return {n.split(".")[1] for n in self._listdir()
                if n.startswith(shard + ".") and n.endswith(".bin") and n.count(".") == 2}

    def records(self, shard: str | None = None) -> list[CommitRecord]:
        """Every committed slot (older iterations too), sorted by shard then iteration."""
        out = []
        for name in self._listdir():
            parts = name.split(".")
            if len(parts) == 4 and parts[2:] == ["commit", "json"] and shard in (None, parts[0]):
                rec = self._read_record(parts[0], parts[1])
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
            fd = os.open(self._payload_path(shard, slot), os.O_RDWR | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
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
        names = self._slot_names(shard)
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
        _check_id("shard id", shard, _SHARD_ID)
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
                _unlink(self._record_path(shard, slot))   # from here on a crash leaves no record for this slot
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
            _write_json_atomic(self._record_path(w.shard, w.slot), rec.to_dict())
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
        names = self._slot_names(shard)
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
            _unlink(self._record_path(shard, slot))
            _unlink(self._payload_path(shard, slot))
            s.close()   # closing drops the lock
            del self._slots[(shard, slot)]
            names.discard(slot)

    def discard(self, shard: str, slot: str) -> None:
        """Un-commit a slot (e.g. a snapshot newer than the iteration a recovery agreed on,
        left by the failed timeline). Its payload is reused by the next write."""
        _check_id("shard id", shard, _SHARD_ID)
        with self._lock:
            _unlink(self._record_path(shard, slot))

    def prepare(self, shard: str, nbytes: int) -> None:
        """Create and pre-fault both slots of `shard` ahead of the first snapshot (optional)."""
        _check_id("shard id", shard, _SHARD_ID)
        with self._lock:
            committed = {r.slot for r in self.records(shard)}
            for slot in SLOT_NAMES[:2]:
                if slot in committed or (shard in self._writing and self._writing[shard].slot == slot):
                    continue
                s = self._slot(shard, slot)
                fcntl.flock(s.fd, fcntl.LOCK_EX)
                try:
                    self._map(s, nbytes)
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
        try:
            fd = os.open(self._payload_path(record.shard, record.slot), os.O_RDONLY)
        except FileNotFoundError:
            raise StaleRecordError(f"{record.shard}.{record.slot}: payload is gone") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StaleRecordError(f"{record.shard}.{record.slot}: being rewritten") from None
            if self._read_record(record.shard, record.slot) != record:
                raise StaleRecordError(f"{record.shard}.{record.slot}: no longer holds iteration {record.iteration}")
            view = SnapshotView(record, fd, mmap.mmap(fd, record.nbytes, access=mmap.ACCESS_READ))
        except BaseException:
            os.close(fd)
            raise
        if verify:
            try:
                verify_checksum(view.buffer, record.checksum,
                       what=f"{self.path}/{record.shard}.{record.slot} iteration {record.iteration}")
            except BaseException:
                view.close()
                raise
        return view

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

    def wipe(self) -> None:
        """Delete this machine's snapshots (clean finish, or its memory is lost with the hardware)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.path))   # the job directory, once no machine is left in it
        except OSError:
            pass

"""The memory store's files: how they are named, and the commit record that marks a slot complete.

    <root>/<job_id>/<machine_id>/          mode 0o700
        tp00.a.bin   tp00.a.commit.json     slot "a": payload + commit record, mode 0o600
        tp00.b.bin   tp00.b.commit.json     slot "b"

A payload is exactly a safetensors file (see snapshot.py), so persisting it is copying
the file. A commit record is written atomically (tmp + rename) only after its payload
is complete, and a writer removes a slot's record before touching its payload, so a
crash at any point leaves every surviving record pointing at a complete payload.

Every name is opened relative to the machine directory's descriptor (safefs), never
through a path. store.py holds the protocol that writes and pins these files.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass, fields

from gemini_lm.errors import UsageError
from gemini_lm import safefs

SLOT_NAMES = "abcdefgh"        # "a"/"b" in steady state, the rest only while readers pin slots
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")   # no dots: they separate file-name fields


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


def check_id(kind: str, value: str, pattern: re.Pattern = ID) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"invalid {kind} {value!r}: use letters, digits, '_', '-' (no path separators)")


def payload_name(shard: str, slot: str) -> str:
    return f"{shard}.{slot}.bin"


def record_name(shard: str, slot: str) -> str:
    return f"{shard}.{slot}.commit.json"


def recorded_slots(names: list[str], shard: str | None = None) -> list[tuple[str, str]]:
    """(shard, slot) of every commit record among the directory entries `names`."""
    out = []
    for name in names:
        parts = name.split(".")
        if len(parts) == 4 and parts[2:] == ["commit", "json"] and shard in (None, parts[0]):
            out.append((parts[0], parts[1]))
    return out


def payload_slots(names: list[str], shard: str) -> set[str]:
    """The slots of `shard` that have a payload file among the directory entries `names`."""
    return {n.split(".")[1] for n in names
            if n.startswith(shard + ".") and n.endswith(".bin") and n.count(".") == 2}


def read_record(dir_fd: int, where: str, job_id: str, shard: str, slot: str) -> CommitRecord | None:
    """The slot's record if it is intact and matches its payload file, else None.
    `where`: the machine directory's path, for messages."""
    name, payload = record_name(shard, slot), payload_name(shard, slot)
    try:
        fd = safefs.open_file(dir_fd, name, os.O_RDONLY, os.path.join(where, name))
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd) as f:
            rec = CommitRecord.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    st = safefs.lstat_entry(dir_fd, payload)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{os.path.join(where, payload)}: not a regular file; the store never follows a link")
    ok = (rec.shard, rec.slot, rec.job_id, rec.nbytes) == (shard, slot, job_id, st.st_size)
    return rec if ok else None


def write_record(dir_fd: int, where: str, rec: CommitRecord) -> None:
    """Write, then rename over the record's name: a fresh file (O_EXCL), never one planted at
    the tmp name."""
    name = record_name(rec.shard, rec.slot)
    tmp = "." + name + ".tmp"
    what = os.path.join(where, name)
    safefs.remove_file(dir_fd, tmp, what)     # a crashed writer's leftover
    fd = safefs.create_file(dir_fd, tmp, os.O_WRONLY, what)
    with os.fdopen(fd, "w") as f:
        json.dump(rec.to_dict(), f)
        f.flush()   # no fsync: on tmpfs there is nothing below the page cache
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)   # replaces a name, follows nothing


def unlink(dir_fd: int, name: str) -> None:
    assert dir_fd is not None   # never a name relative to the working directory
    try:
        os.unlink(name, dir_fd=dir_fd)   # unlink never follows a link: it removes the name
    except FileNotFoundError:
        pass

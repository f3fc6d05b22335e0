"""The memory stores on this host: what tools/gemini_store.py lists and removes, and what a
run that ends without freeing its store reports.

A crashed run keeps its store on purpose (the next start resumes from it), so stores can
outlive everyone who knew about them. Each is `<root>/<job>/<machine>/`; its holders are the
live processes with a file of it open or mapped (read from /proc). Only our own plain
directories are looked at — links and other users' directories are skipped — and removal
goes through MemoryStore.wipe, which never follows a link either.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from gemini_lm.gemini.store import MemoryStore

DEFAULT_ROOT = "/dev/shm/gemini_lm"   # --gemini-store-dir's default


@dataclass
class StoreInfo:
    root: str
    job: str
    machine: str
    iteration: int | None    # newest committed iteration of any shard, None if nothing committed
    nbytes: int              # memory it occupies (allocated blocks)
    age_s: float             # since anything in it last changed
    holders: list[int]       # live processes with one of its files open or mapped

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.job, self.machine)


def _own_dirs(path: str) -> list[str]:
    """Names of the plain directories of ours directly in `path` (no links, nothing else's)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False)
                  and e.stat(follow_symlinks=False).st_uid == os.getuid())


def usage(path: str) -> tuple[int, float]:
    """(bytes allocated, newest mtime) of the regular files directly in `path`."""
    total, newest = 0, 0.0
    try:
        for e in os.scandir(path):
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
                newest = max(newest, st.st_mtime)
    except OSError:
        pass
    return total, newest


def holders(path: str) -> list[int]:
    """Live processes with a file under `path` open (/proc/<pid>/fd) or mapped (/proc/<pid>/maps)."""
    inside = os.path.realpath(path)
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = [os.readlink(f"/proc/{name}/fd/{fd}") for fd in os.listdir(f"/proc/{name}/fd")]
            with open(f"/proc/{name}/maps") as f:
                maps = [line.split(maxsplit=5)[-1].strip() for line in f if "/" in line]
        except OSError:
            continue   # gone, or not ours to read
        if any(t == inside or t.startswith(inside + "/") for t in fds + maps):
            out.append(int(name))
    return out


def list_stores(root: str) -> list[StoreInfo]:
    out = []
    now = time.time()
    for job in _own_dirs(root):
        for machine in _own_dirs(os.path.join(root, job)):
            path = os.path.join(root, job, machine)
            nbytes, mtime = usage(path)
            try:
                store = MemoryStore(root, job, machine)
                try:
                    records = store.records()
                finally:
                    store.close()   # or this process would count as its holder
            except Exception:  # noqa: BLE001 - a name the store refuses, a damaged record: listed without
                records = []
            out.append(StoreInfo(root, job, machine, max((r.iteration for r in records), default=None),
                                 nbytes, now - mtime if mtime else 0.0, holders(path)))
    return out


def remove(info: StoreInfo) -> None:
    """Delete one machine's store (and the job directory and root if that empties them)."""
    MemoryStore(info.root, info.job, info.machine).wipe()


def describe_size(nbytes: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"

"""Persister: writes committed in-memory snapshots to `--save` without blocking training.

The training thread only hands over a commit record; a background thread pins the slot
(the store's reader lock keeps the writer off it), copies the bytes — already a
safetensors file — into `<save>/iter_XXXXXXX.partial/`, and drops a small sidecar with
the file's size and checksum. The finalizer (global rank 0) waits until every
tensor-parallel shard's sidecar is there, then writes the manifest, renames the
directory into place and moves the tracker last (checkpoint/persistent.py:
write_shard_file, write_sidecar, finalize_from_sidecars), so a crash at any point leaves the
previous checkpoint intact. `--save` must be a filesystem every writer sees (as in
Megatron). Shard writes go through `throttle` (--persistent-bandwidth-mbs).

If a persist is still running when the next one is due, the new one is skipped and
counted: persistence is a fallback, it must never slow training down.

A persist that fails (any OSError: a full disk, EIO, a lost permission, a deleted
directory) is counted in `failures`, its `.partial` directory is removed, and training
goes on from memory: the next save point writes a newer state, which is the retry. The
Checkpointer keeps the memory store when the final persist failed (see its close()).
"""
from __future__ import annotations

import queue
import threading
import time

from gemini_lm.checkpoint.files import Throttle, describe
from gemini_lm.checkpoint.persistent import (discard_partial, finalize_from_sidecars, partial_dir, write_shard_file,
                                             write_sidecar)
from gemini_lm.log import get_logger

log = get_logger(__name__)


class Persister:
    def __init__(self, store, save_dir: str, tp_rank: int, tp_size: int, *, finalizer: bool,
                 keep: int | None, manifest: dict, finalize_timeout_s: float = 600.0, window_hook=None,
                 throttle: Throttle | None = None):
        """`manifest`: what the finalizer's manifest.json records beside the shards (TrainState.manifest).
        `window_hook(window, iteration)` runs inside the persist window, once this shard's
        file is in the `.partial` directory (failure injection)."""
        self.store, self.save_dir, self.tp_rank, self.tp_size = store, save_dir, tp_rank, tp_size
        self.throttle = throttle
        self.finalizer, self.keep, self.manifest = finalizer, keep, manifest
        self.finalize_timeout_s = finalize_timeout_s
        self.skipped = 0
        self.last_persist_s: float | None = None
        self.last_iteration: int | None = None
        self.error: BaseException | None = None   # the latest attempt's, None once one succeeds
        self.failures = 0
        self.window_hook = window_hook
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._loop, name="gemini-persist", daemon=True)
        self._thread.start()

    def submit(self, record) -> bool:
        """Queue the persist of a committed record; False (and skipped) if one is still running."""
        try:
            self._jobs.put_nowait(record)
            return True
        except queue.Full:
            self.skipped += 1
            return False

    def _loop(self) -> None:
        while True:
            rec = self._jobs.get()
            try:
                if rec is None:
                    return
                t0 = time.perf_counter()
                self.persist(rec)
                self.last_persist_s = time.perf_counter() - t0
                self.last_iteration = rec.iteration
                if self.error is not None:
                    log.warning(f"GEMINI persist of iteration {rec.iteration} to {self.save_dir} succeeded "
                                f"after {self.failures} failed attempt(s)")
                self.error = None
            except BaseException as exc:  # noqa: BLE001 - reported, training goes on from memory
                self.error = exc
                self.failures += 1
                discard_partial(self.save_dir, rec.iteration)
                log.warning(f"GEMINI persist of iteration {rec.iteration} to {self.save_dir} failed "
                            f"({describe(exc)}); the state stays in memory, retried at the next save point")
            finally:
                self._jobs.task_done()

    def persist(self, rec, finalize_timeout_s: float | None = None) -> None:
        """Write one shard (and, on the finalizer, the whole checkpoint). Runs on the thread,
        or on the SIGTERM flush (Checkpointer.flush) with its own deadline."""
        partial = partial_dir(self.save_dir, rec.iteration)
        with self.store.open(rec, verify=False) as view:   # checksum was checked when written
            entry = write_shard_file(partial, self.tp_rank, view.buffer, self.throttle, known_checksum=rec.checksum)
        if self.window_hook is not None:   # the shard is in the .partial directory, nothing says it is complete
            self.window_hook("persist", rec.iteration)
        write_sidecar(partial, self.tp_rank, entry)
        if self.finalizer:
            finalize_from_sidecars(self.save_dir, rec.iteration, self.tp_size, self.manifest, self.keep,
                                   finalize_timeout_s or self.finalize_timeout_s)

    def wait(self) -> None:
        self._jobs.join()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

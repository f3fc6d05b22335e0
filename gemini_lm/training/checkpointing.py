"""Persistent checkpoints without GEMINI: a save every --save-interval, blocking or asynchronous.

The directory format (one safetensors file per tensor-parallel shard, manifest, tracker)
is checkpoint/persistent.py's; GEMINI's persister writes the same files from memory.
Data-parallel replicas hold identical shards, so only DP rank 0 of each TP rank writes.

    blocking (default)   save_checkpoint: every writer writes its shard, the entries are
                         gathered with a collective, rank 0 writes the manifest
    --async-save         AsyncSaver: the state is copied into a CPU buffer at the save
                         point (the only stall: the paper's t_ckpt), then written by a
                         background thread, which runs no collective

Every shard read and write goes through --persistent-bandwidth-mbs's Throttle, if any.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.files import Throttle, describe
from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.persistent import (check_writable, discard_partial, finalize_checkpoint,
                                             finalize_from_sidecars, latest_iteration, load_checkpoint, partial_dir,
                                             write_shard_file, write_shard_with_sidecar)
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.log import get_logger
from gemini_lm.parallel.comm import peer_failures

log = get_logger(__name__)


def save_checkpoint(save_dir: str, iteration: int, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str], ps, keep: int | None = None, manifest: dict | None = None,
                    throttle: Throttle | None = None) -> None:
    """Blocking collective save of every rank's state (the path used without GEMINI).
    `manifest`: what manifest.json records beside the shards (default: the metadata).
    A write error on any rank is an OSError on every rank alike (they must leave the
    collectives together), and its `.partial` directory is removed."""
    partial = partial_dir(save_dir, iteration)
    entry = None
    if ps.dp_rank == 0:
        layout = SnapshotLayout.build(tensors, metadata)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.write(tensors, buf)
        try:
            entry = (ps.tp_rank, write_shard_file(partial, ps.tp_rank, memoryview(buf.numpy()), throttle))
        except OSError as exc:
            entry = (ps.tp_rank, {"error": describe(exc)})
    entries = [None] * ps.world_size
    with peer_failures("checkpoint save"):
        dist.all_gather_object(entries, entry)
    outcome = [None]   # rank 0's verdict: None, or what failed
    if ps.rank == 0:
        shards = {shard_id(r): e for r, e in (x for x in entries if x is not None)}
        outcome = [next((e["error"] for e in shards.values() if "error" in e), None)]
        try:
            if outcome[0] is None:
                finalize_checkpoint(save_dir, iteration, ps.tp_size, shards, manifest or {"metadata": metadata},
                                    keep)
        except OSError as exc:
            outcome = [describe(exc)]
        if outcome[0] is not None:
            discard_partial(save_dir, iteration)
    with peer_failures("checkpoint save"):
        dist.broadcast_object_list(outcome, src=0)   # also the barrier: every writer is done
    if outcome[0] is not None:
        raise OSError(f"checkpoint of iteration {iteration} to {save_dir} failed ({outcome[0]})")


class AsyncSaver:
    """Megatron's --async-save: copy now, write in the background, same directory format.

    save() copies the state into one reusable CPU buffer (DP rank 0 of each TP rank) and
    starts a thread that writes the shard and its sidecar; global rank 0's thread then
    waits for every TP shard's sidecar and writes manifest, directory and tracker
    (persistent.write_shard_with_sidecar / finalize_from_sidecars, as GEMINI's persister).
    No collective runs on the thread, so nothing races the training thread's collectives.

    Never two saves in flight: a save due while the previous one is still writing first
    waits for it (that wait counts as blocking time). The one buffer is then free to
    reuse (no second copy of the state in memory), each finalizer assembles one iteration
    at a time and the tracker only moves forward; storage too slow for --save-interval
    shows up as stall instead of a queue that grows without bound.
    """

    def __init__(self, save_dir: str, ps, keep: int | None, manifest: dict, throttle: Throttle | None,
                 finalize_timeout_s: float = 600.0):
        self.save_dir, self.ps, self.keep, self.manifest = save_dir, ps, keep, manifest
        self.throttle, self.finalize_timeout_s = throttle, finalize_timeout_s
        self.writer, self.finalizer = ps.dp_rank == 0, ps.rank == 0
        self.window_hook = None
        self._layout: SnapshotLayout | None = None
        self._buf: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s: float | None = None
        self.last_iteration: int | None = None
        self.failures = 0
        self.error: OSError | None = None   # the latest write's, None once one succeeds

    def save(self, iteration: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
        """Wait for the previous save, copy the state, start writing it; seconds of each."""
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        if self.writer:
            if self._layout is None:
                self._layout = SnapshotLayout.build(tensors, metadata)
                self._buf = torch.empty(self._layout.nbytes, dtype=torch.uint8)
            self._layout.write(tensors, self._buf)   # synchronous: complete when it returns
        if self.writer or self.finalizer:
            self._thread = threading.Thread(target=self._write, args=(iteration,), name="async-save", daemon=True)
            self._thread.start()
        return {"wait_s": t1 - t0, "copy_s": time.perf_counter() - t1}

    def _write(self, iteration: int) -> None:
        t0 = time.perf_counter()
        try:
            if self.window_hook is not None:
                self.window_hook("persist", iteration)
            if self.writer:
                write_shard_with_sidecar(partial_dir(self.save_dir, iteration), self.ps.tp_rank,
                                         memoryview(self._buf.numpy()), self.throttle)
            if self.finalizer:
                finalize_from_sidecars(self.save_dir, iteration, self.ps.tp_size, self.manifest, self.keep,
                                       self.finalize_timeout_s)
            self.last_write_s = time.perf_counter() - t0
            self.last_iteration, self.error = iteration, None
        except OSError as exc:   # storage, not a bug: counted, cleaned up, the next save retries
            self.failures, self.error = self.failures + 1, exc
            discard_partial(self.save_dir, iteration)
            log.warning(f"checkpoint of iteration {iteration} to {self.save_dir} failed ({describe(exc)}); "
                        f"retried at the next save point")
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Until the save in flight (if any) is written; re-raises its error here unless it was
        a write error (those are counted in `failures`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def join(self, timeout_s: float) -> None:
        """Wait at most `timeout_s` for the write in flight; from any thread (the SIGTERM flush),
        so it changes nothing: wait() still reaps the write and its error."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)


class PersistentCheckpointer:
    """The checkpointer face (checkpoint.protocol.Checkpointer) without GEMINI."""

    def __init__(self, cfg, state, ps):
        self.cfg, self.state, self.ps = cfg.checkpoint, state, ps
        self.throttle = Throttle.from_mbs(self.cfg.persistent_bandwidth_mbs)
        self._stats: dict = {}
        self.failures, self.error = 0, None   # blocking saves' write errors (AsyncSaver counts its own)
        self.saver = AsyncSaver(self.cfg.save, ps, self.cfg.save_keep, state.manifest, self.throttle) \
            if self.cfg.async_save and self.cfg.save else None
        if self.cfg.save:
            check_writable(self.cfg.save)

    def restore(self) -> dict | None:
        """Loads --load's newest checkpoint; its recovery record (source "persistent"), or
        None when there is none (a fresh start: nothing to report)."""
        t0 = time.time()
        it = load_checkpoint(self.cfg.load, self.state, self.ps.tp_rank, self.ps.tp_size, self.throttle)
        t1 = time.time()
        if it is None:
            log.info("no checkpoint to load: starting from iteration 0")
            return None
        log.info(f"loaded persistent checkpoint {self.cfg.load} at iteration {it} in {t1 - t0:.2f}s")
        # The fields of gemini/restore.py's record, so the RecoveryReporter times it alike.
        return {"time": t1, "source": "persistent", "iteration": it, "memory_iteration": None,
                "persistent_iteration": it, "bytes_moved": 0, "peer_ranks": [], "agree_s": 0.0,
                "retrieve_s": 0.0, "load_s": t1 - t0, "restore_s": t1 - t0, "started_at": t0, "machine_count": None}

    def memory_store(self) -> None:
        return None

    def before_update(self) -> None:
        pass   # a save has copied (async) or written (blocking) the state before after_step returns

    def after_step(self, iteration: int) -> None:
        c = self.cfg
        if c.save and c.save_interval and iteration % c.save_interval == 0:
            self.save(iteration)

    def save(self, iteration: int) -> None:
        t0 = time.perf_counter()
        if self.saver is not None:
            parts = self.saver.save(iteration, self.state.tensors(gathered=True), self.state.metadata)
            self._stats = {"persist_blocking_s": time.perf_counter() - t0, "persist_wait_s": parts["wait_s"],
                           "persist_copy_s": parts["copy_s"]}
            return
        try:
            save_checkpoint(self.cfg.save, iteration, self.state.tensors(gathered=True), self.state.metadata,
                            self.ps, keep=self.cfg.save_keep, manifest=self.state.manifest, throttle=self.throttle)
            self.error = None
        except OSError as exc:   # every rank alike; training goes on, the next save point retries
            self.failures, self.error = self.failures + 1, exc
            if self.ps.rank == 0:
                log.warning(f"{exc}; retried at the next save point")
        self._stats = {"persist_blocking_s": time.perf_counter() - t0}

    def stats(self) -> dict:
        out = dict(self._stats)
        if self.saver is not None and self.saver.last_write_s is not None:
            out["persist_write_s"] = self.saver.last_write_s   # the latest background write, finished
        failures = self.saver.failures if self.saver is not None else self.failures
        if failures:
            out["persist_failures"] = failures   # cumulative; wandb plots it
        return out

    def flush(self, timeout_s: float) -> int | None:
        return None   # a save is collective: it cannot run from a signal thread; --save-interval it is

    def wait_background(self, timeout_s: float) -> None:
        """Wait at most `timeout_s` for an --async-save write in flight (any thread may call it)."""
        if self.saver is not None:
            self.saver.join(timeout_s)

    def set_window_hook(self, hook) -> None:
        if self.saver is not None:
            self.saver.window_hook = hook   # the background write is the "persist" window

    def close(self, iteration: int, clean: bool) -> str | None:
        """A clean finish leaves the final state on disk; if it cannot, the one-line message
        (without GEMINI there is no other copy: the run must not exit 0)."""
        c = self.cfg
        if not clean:
            return None   # an async write in flight dies with the process; the previous checkpoint stays
        if self.saver is not None:
            self.saver.wait()
            with peer_failures("checkpoint close"):
                dist.barrier()   # every finalizer is done: all ranks read the same tracker below
        if not c.save or _tracked(c.save) == iteration:
            return None
        self.save(iteration)   # always leave the final state on disk
        if self.saver is not None:
            self.saver.wait()
            with peer_failures("checkpoint close"):
                dist.barrier()   # the finalizer is done: every rank reads the same tracker
        done = _tracked(c.save)
        if done == iteration:
            return None
        err = self.saver.error if self.saver is not None else self.error
        why = f" ({describe(err)})" if err is not None else ""
        newest = f"iteration {done}" if done is not None else "none"
        return (f"training finished, but its final state (iteration {iteration}) could not be written to "
                f"--save {c.save}{why}; without GEMINI there is no other copy: the newest checkpoint there is "
                f"{newest}")


def _tracked(save_dir: str) -> int | None:
    """The tracker's iteration; None when there is none or it cannot be read (a failed disk)."""
    try:
        return latest_iteration(save_dir)
    except OSError:
        return None

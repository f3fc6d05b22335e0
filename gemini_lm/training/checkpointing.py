"""Persistent checkpoints without GEMINI: a blocking, collective save every --save-interval.

The directory format (one safetensors file per tensor-parallel shard, manifest, tracker)
is checkpoint/persistent.py's; GEMINI's persister writes the same files from memory.
Data-parallel replicas hold identical shards, so only DP rank 0 of each TP rank writes.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.persistent import (check_writable, finalize_checkpoint, latest_iteration,
                                             load_checkpoint, partial_dir, write_shard_file)
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.log import get_logger
from gemini_lm.parallel.comm import peer_failures

log = get_logger(__name__)


def save_checkpoint(save_dir: str, iteration: int, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str], ps, keep: int | None = None, manifest: dict | None = None) -> None:
    """Blocking collective save of every rank's state (the path used without GEMINI).
    `manifest`: what manifest.json records beside the shards (default: the metadata)."""
    partial = partial_dir(save_dir, iteration)
    entry = None
    if ps.dp_rank == 0:
        layout = SnapshotLayout.build(tensors, metadata)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.write(tensors, buf)
        entry = (ps.tp_rank, write_shard_file(partial, ps.tp_rank, memoryview(buf.numpy())))
    entries = [None] * ps.world_size
    with peer_failures("checkpoint save"):
        dist.all_gather_object(entries, entry)
    if ps.rank == 0:
        shards = {shard_id(r): e for r, e in (x for x in entries if x is not None)}
        finalize_checkpoint(save_dir, iteration, ps.tp_size, shards, manifest or {"metadata": metadata}, keep)
    with peer_failures("checkpoint save"):
        dist.barrier()


class PersistentCheckpointer:
    """The checkpointer face (checkpoint.protocol.Checkpointer) without GEMINI."""

    def __init__(self, cfg, state, ps):
        self.cfg, self.state, self.ps = cfg.checkpoint, state, ps
        self.last_save_s: float | None = None
        if self.cfg.save:
            check_writable(self.cfg.save)

    def restore(self) -> None:
        """Loads --load's newest checkpoint; no recovery record (returns None)."""
        t0 = time.perf_counter()
        it = load_checkpoint(self.cfg.load, self.state, self.ps.tp_rank, self.ps.tp_size)
        if it is None:
            log.info("no checkpoint to load: starting from scratch")
        else:
            log.info(f"loaded persistent checkpoint {self.cfg.load} at iteration {it} "
                          f"in {time.perf_counter() - t0:.2f}s")

    def before_update(self) -> None:
        pass   # saves are synchronous: nothing still reads the state

    def after_step(self, iteration: int) -> None:
        c = self.cfg
        if c.save and c.save_interval and iteration % c.save_interval == 0:
            self.save(iteration)

    def save(self, iteration: int) -> None:
        t0 = time.perf_counter()
        save_checkpoint(self.cfg.save, iteration, self.state.tensors(), self.state.metadata,
                        self.ps, keep=self.cfg.save_keep, manifest=self.state.manifest)
        self.last_save_s = time.perf_counter() - t0

    def stats(self) -> dict:
        return {} if self.last_save_s is None else {"persist_blocking_s": self.last_save_s}

    def flush(self, timeout_s: float) -> int | None:
        return None   # a save is collective: it cannot run from a signal thread; --save-interval it is

    def set_window_hook(self, hook) -> None:
        pass          # no background windows to inject into

    def close(self, iteration: int, clean: bool) -> None:
        c = self.cfg
        if clean and c.save and latest_iteration(c.save) != iteration:
            self.save(iteration)   # always leave the final state on disk

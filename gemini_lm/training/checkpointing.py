"""Persistent checkpoints: one safetensors file per tensor-parallel shard, no pickle.

    <save>/latest_checkpointed_iteration.txt     tracker (Megatron's name), written last
    <save>/iter_0000100/tp_rank_00.safetensors   exactly the bytes of a GEMINI snapshot slot
    <save>/iter_0000100/manifest.json            iteration, TP size, per-file checksums

A checkpoint directory is assembled under `iter_XXXXXXX.partial/` and renamed into place
only when every shard is in and the manifest is written; the tracker moves after it. A
crash at any point leaves the previous checkpoint as the newest complete one.

Data-parallel replicas hold identical shards, so only DP rank 0 of each TP rank writes.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from gemini_lm.errors import UsageError
from gemini_lm.gemini.checksum import checksum
from gemini_lm.gemini.snapshot import SnapshotLayout, read_tensors, write_file_atomic

TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_file_name(tp_rank: int) -> str:
    return f"tp_rank_{tp_rank:02d}.safetensors"


def check_writable(save_dir: str) -> None:
    """Fail at start-up, not after an hour of training, when --save cannot be written."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_probe_{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--save {save_dir}: not writable ({exc.strerror})") from None


def write_shard_file(partial_dir: str, tp_rank: int, payload) -> dict:
    """Write one shard's snapshot bytes (a safetensors file) and describe it for the manifest."""
    os.makedirs(partial_dir, exist_ok=True)
    write_file_atomic(os.path.join(partial_dir, shard_file_name(tp_rank)), payload)
    return {"file": shard_file_name(tp_rank), "nbytes": len(payload), "checksum": checksum(payload)}


def finalize_checkpoint(save_dir: str, iteration: int, tp_size: int, shards: dict, extra: dict,
                        keep: int | None) -> str:
    """Manifest, rename `.partial` into place, then the tracker; prune to the newest `keep`."""
    final = os.path.join(save_dir, iter_dir_name(iteration))
    partial = final + ".partial"
    manifest = {"format": "gemini_lm/1", "iteration": iteration, "tp_size": tp_size,
                "shards": shards, "time": time.time(), **extra}
    write_file_atomic(os.path.join(partial, "manifest.json"), json.dumps(manifest, indent=1).encode())
    if os.path.exists(final):  # re-saving the same iteration (e.g. after recovery)
        shutil.rmtree(final)
    os.replace(partial, final)
    write_file_atomic(os.path.join(save_dir, TRACKER), f"{iteration}\n".encode())
    if keep:
        prune(save_dir, keep)
    return final


def prune(save_dir: str, keep: int) -> None:
    its = sorted(list_iterations(save_dir))
    for it in its[:-keep]:
        shutil.rmtree(os.path.join(save_dir, iter_dir_name(it)), ignore_errors=True)


def list_iterations(save_dir: str) -> list[int]:
    out = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        if name.startswith("iter_") and name[5:].isdigit() and \
                os.path.exists(os.path.join(save_dir, name, "manifest.json")):
            out.append(int(name[5:]))
    return sorted(out)


def latest_iteration(load_dir: str | None) -> int | None:
    """The tracker's iteration, or None when there is no checkpoint."""
    if not load_dir:
        return None
    path = os.path.join(load_dir, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise UsageError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def read_manifest(load_dir: str, iteration: int) -> dict:
    path = os.path.join(load_dir, iter_dir_name(iteration), "manifest.json")
    try:
        return json.load(open(path))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable checkpoint manifest ({exc})") from None


def read_shard(load_dir: str, iteration: int, tp_rank: int, tp_size: int) -> tuple[dict, bytes]:
    """Verified tensors of one shard of a persistent checkpoint."""
    manifest = read_manifest(load_dir, iteration)
    try:
        saved_tp = manifest["tp_size"]
        entry = manifest["shards"][f"tp{tp_rank:02d}"] if saved_tp == tp_size else None
        nbytes, expected = (entry["nbytes"], entry["checksum"]) if entry else (None, None)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration}: manifest.json lacks {exc}") from None
    if saved_tp != tp_size:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration} has tensor-parallel size "
                         f"{saved_tp}, this run uses {tp_size}")
    path = os.path.join(load_dir, iter_dir_name(iteration), entry["file"])
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as exc:
        raise UsageError(f"{path}: unreadable checkpoint file ({exc.strerror})") from None
    if len(payload) != nbytes or checksum(payload) != expected:
        raise UsageError(f"{path}: checksum mismatch, the checkpoint file is corrupt or truncated")
    return read_tensors(payload), payload


def save_checkpoint(save_dir: str, iteration: int, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str], ps, keep: int | None = None, manifest: dict | None = None) -> None:
    """Blocking collective save of every rank's state (the path used without GEMINI).
    `manifest`: what manifest.json records beside the shards (default: the metadata)."""
    partial = os.path.join(save_dir, iter_dir_name(iteration) + ".partial")
    entry = None
    if ps.dp_rank == 0:
        layout = SnapshotLayout.build(tensors, metadata)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.write(tensors, buf)
        entry = (ps.tp_rank, write_shard_file(partial, ps.tp_rank, memoryview(buf.numpy())))
    entries = [None] * ps.world_size
    dist.all_gather_object(entries, entry)
    if ps.rank == 0:
        shards = {f"tp{r:02d}": e for r, e in (x for x in entries if x is not None)}
        finalize_checkpoint(save_dir, iteration, ps.tp_size, shards, manifest or {"metadata": metadata}, keep)
    dist.barrier()


def load_checkpoint(load_dir: str | None, state, ps) -> int | None:
    """Restore `state` from the newest persistent checkpoint; the iteration, or None if none."""
    iteration = latest_iteration(load_dir)
    if iteration is None:
        return None
    tensors, _ = read_shard(load_dir, iteration, ps.tp_rank, ps.tp_size)
    try:
        state.load(tensors)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration} does not fit this model: {exc}") from None
    return iteration


class PersistentCheckpointer:
    """The checkpointer's face without GEMINI: blocking saves every --save-interval."""

    def __init__(self, cfg, state, ps, logger):
        self.cfg, self.state, self.ps, self.logger = cfg.checkpoint, state, ps, logger
        self.last_save_s: float | None = None
        if self.cfg.save:
            check_writable(self.cfg.save)

    def restore(self) -> None:
        t0 = time.perf_counter()
        it = load_checkpoint(self.cfg.load, self.state, self.ps)
        if it is None:
            self.logger.console("no checkpoint to load: starting from scratch")
        else:
            self.logger.console(f"loaded persistent checkpoint {self.cfg.load} at iteration {it} "
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

    def close(self, iteration: int, clean: bool) -> None:
        c = self.cfg
        if clean and c.save and latest_iteration(c.save) != iteration:
            self.save(iteration)   # always leave the final state on disk

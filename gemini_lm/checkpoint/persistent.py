"""The persistent checkpoint directory: one safetensors file per tensor-parallel shard.

    <save>/latest_checkpointed_iteration.txt     tracker (Megatron's name), written last
    <save>/iter_0000100/tp_rank_00.safetensors   exactly the bytes of a GEMINI snapshot slot
    <save>/iter_0000100/manifest.json            iteration, TP size, per-file checksums

A checkpoint directory is assembled under `iter_XXXXXXX.partial/` and renamed into place
only when every shard is in and the manifest is written; the tracker moves after it. A
crash at any point leaves the previous checkpoint as the newest complete one. Writers:
the GEMINI persister (from a committed slot, in the background) and the blocking
collective save of the non-GEMINI path (training/checkpointing.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time

from gemini_lm.checkpoint.checksum import checksum
from gemini_lm.checkpoint.files import file_metadata, read_file_bytes, tensors_from_bytes, write_file_atomic
from gemini_lm.checkpoint.naming import (FORMAT, MANIFEST, PARTIAL_SUFFIX, TRACKER, iter_dir_name,
                                         parse_iter_dir_name, shard_file_name, shard_id)
from gemini_lm.errors import UsageError


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


def partial_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, iter_dir_name(iteration) + PARTIAL_SUFFIX)


def remove_partial_dirs(save_dir: str) -> list[str]:
    """Delete the `.partial` directories a crashed run left in `save_dir`; their names.
    Only when no writer of this job can be running (start-up): a stale shard or sidecar
    must never be mixed into a checkpoint of the run that writes that iteration again."""
    removed = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        if name.endswith(PARTIAL_SUFFIX) and parse_iter_dir_name(name[:-len(PARTIAL_SUFFIX)]) is not None:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            removed.append(name)
    return sorted(removed)


def write_shard_file(partial: str, tp_rank: int, payload) -> dict:
    """Write one shard's snapshot bytes (a safetensors file) and describe it for the manifest."""
    os.makedirs(partial, exist_ok=True)
    write_file_atomic(os.path.join(partial, shard_file_name(tp_rank)), payload)
    return {"file": shard_file_name(tp_rank), "nbytes": len(payload), "checksum": checksum(payload)}


def finalize_checkpoint(save_dir: str, iteration: int, tp_size: int, shards: dict, extra: dict,
                        keep: int | None) -> str:
    """Manifest, rename `.partial` into place, then the tracker; prune to the newest `keep`.
    `shards`: shard id -> write_shard_file()'s entry; `extra`: recorded beside them."""
    final = os.path.join(save_dir, iter_dir_name(iteration))
    partial = partial_dir(save_dir, iteration)
    manifest = {"format": FORMAT, "iteration": iteration, "tp_size": tp_size,
                "shards": shards, "time": time.time(), **extra}
    write_file_atomic(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1).encode())
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
    """Iterations with a complete directory (its manifest written), oldest first."""
    out = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        it = parse_iter_dir_name(name)
        if it is not None and os.path.exists(os.path.join(save_dir, name, MANIFEST)):
            out.append(it)
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
    path = os.path.join(load_dir, iter_dir_name(iteration), MANIFEST)
    try:
        return json.load(open(path))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable checkpoint manifest ({exc})") from None


def read_shard(load_dir: str, iteration: int, tp_rank: int, tp_size: int) -> tuple[dict, dict]:
    """(tensors, metadata) of one shard of a persistent checkpoint, verified against the manifest."""
    manifest = read_manifest(load_dir, iteration)
    try:
        saved_tp = manifest["tp_size"]
        entry = manifest["shards"][shard_id(tp_rank)] if saved_tp == tp_size else None
        nbytes, expected = (entry["nbytes"], entry["checksum"]) if entry else (None, None)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration}: manifest.json lacks {exc}") from None
    if saved_tp != tp_size:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration} has tensor-parallel size "
                         f"{saved_tp}, this run uses {tp_size}")
    path = os.path.join(load_dir, iter_dir_name(iteration), entry["file"])
    try:
        payload = read_file_bytes(path)
    except OSError as exc:
        raise UsageError(f"{path}: unreadable checkpoint file ({exc.strerror})") from None
    if len(payload) != nbytes or checksum(payload) != expected:
        raise UsageError(f"{path}: checksum mismatch, the checkpoint file is corrupt or truncated")
    try:
        return tensors_from_bytes(payload), file_metadata(path)
    except Exception as exc:  # noqa: BLE001 - the library's own error types vary by version
        raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None


def load_checkpoint(load_dir: str | None, state, tp_rank: int, tp_size: int) -> int | None:
    """Restore `state` (anything with .load(tensors)) from the newest persistent checkpoint;
    the iteration, or None if there is none."""
    iteration = latest_iteration(load_dir)
    if iteration is None:
        return None
    tensors, _ = read_shard(load_dir, iteration, tp_rank, tp_size)
    try:
        state.load(tensors)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration} does not fit this model: {exc}") from None
    return iteration

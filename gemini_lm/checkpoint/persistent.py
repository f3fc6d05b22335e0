"""The persistent checkpoint directory: one safetensors file per tensor-parallel shard.

    <save>/latest_checkpointed_iteration.txt     tracker (Megatron's name), written last
    <save>/iter_0000100/tp_rank_00.safetensors   exactly the bytes of a GEMINI snapshot slot
    <save>/iter_0000100/manifest.json            iteration, TP size, per-file checksums

A checkpoint directory is assembled under `iter_XXXXXXX.partial/` and renamed into place
only when every shard is in and the manifest is written; the tracker moves after it. A
crash at any point leaves the previous checkpoint as the newest complete one. Writers:
the GEMINI persister (from a committed slot, in the background) and the non-GEMINI path
(training/checkpointing.py: a blocking collective save, or --async-save in the background).

Background writers cannot gather the shards' manifest entries with a collective (it
would race the training thread's collectives), so each leaves its entry in a sidecar
file beside its shard (`write_shard_with_sidecar`), and one finalizer waits for every
tensor-parallel shard's sidecar before it writes the manifest (`finalize_from_sidecars`).

Every shard file is written and read through an optional `files.Throttle`
(--persistent-bandwidth-mbs: modelled remote storage); manifest and tracker are not.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from gemini_lm.checkpoint.checksum import checksum
from gemini_lm.checkpoint.files import (Throttle, file_metadata, read_file_bytes, tensors_from_bytes,
                                       write_file_atomic)
from gemini_lm.checkpoint.naming import (FORMAT, MANIFEST, PARTIAL_SUFFIX, TRACKER, iter_dir_name,
                                         parse_iter_dir_name, shard_file_name, shard_id, shard_sidecar_name)
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


def discard_partial(save_dir: str, iteration: int) -> None:
    """A failed write leaves nothing behind: its (shared) `.partial` directory goes. A TP peer
    still writing into it fails in turn, and the finalizer stops waiting for it."""
    shutil.rmtree(partial_dir(save_dir, iteration), ignore_errors=True)


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


def write_shard_file(partial: str, tp_rank: int, payload, throttle: Throttle | None = None,
                     known_checksum: str | None = None) -> dict:
    """Write one shard's snapshot bytes (a safetensors file) and describe it for the manifest.
    `known_checksum`: the payload's checksum when the caller has it (a committed slot)."""
    # mkdir, not makedirs: a --save deleted under a running job is an error, not re-created
    # (it may have been a mount point).
    with contextlib.suppress(FileExistsError):
        os.mkdir(partial)
    write_file_atomic(os.path.join(partial, shard_file_name(tp_rank)), payload, throttle)
    return {"file": shard_file_name(tp_rank), "nbytes": len(payload),
            "checksum": known_checksum or checksum(payload)}


def write_sidecar(partial: str, tp_rank: int, entry: dict) -> None:
    """Say that shard `tp_rank` is complete: its manifest entry, for finalize_from_sidecars."""
    write_file_atomic(os.path.join(partial, shard_sidecar_name(tp_rank)), json.dumps(entry).encode())


def write_shard_with_sidecar(partial: str, tp_rank: int, payload, throttle: Throttle | None = None,
                             known_checksum: str | None = None) -> dict:
    """write_shard_file, then its sidecar."""
    entry = write_shard_file(partial, tp_rank, payload, throttle, known_checksum)
    write_sidecar(partial, tp_rank, entry)
    return entry


def finalize_from_sidecars(save_dir: str, iteration: int, tp_size: int, extra: dict, keep: int | None,
                           timeout_s: float) -> str:
    """Wait until every tensor-parallel shard's sidecar is in `iteration`'s partial directory
    (TimeoutError after `timeout_s`), then finalize_checkpoint with their entries."""
    partial = partial_dir(save_dir, iteration)
    deadline = time.monotonic() + timeout_s
    sides = [os.path.join(partial, shard_sidecar_name(r)) for r in range(tp_size)]
    while not all(os.path.exists(p) for p in sides):
        if not os.path.isdir(partial):   # another shard's writer failed and discarded it
            raise FileNotFoundError(f"{partial}: removed by a failed shard write")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{partial}: shards missing after {timeout_s:.0f}s")
        time.sleep(0.05)
    shards = {}
    for r, p in enumerate(sides):
        with open(p) as f:
            shards[shard_id(r)] = json.load(f)
        os.remove(p)
    return finalize_checkpoint(save_dir, iteration, tp_size, shards, extra, keep)


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


def read_shard(load_dir: str, iteration: int, tp_rank: int, tp_size: int,
               throttle: Throttle | None = None) -> tuple[dict, dict]:
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
        payload = read_file_bytes(path, throttle)
    except OSError as exc:
        raise UsageError(f"{path}: unreadable checkpoint file ({exc.strerror})") from None
    if len(payload) != nbytes or checksum(payload) != expected:
        raise UsageError(f"{path}: checksum mismatch, the checkpoint file is corrupt or truncated")
    try:
        tensors, metadata = tensors_from_bytes(payload), file_metadata(path)
    except Exception as exc:  # noqa: BLE001 - the library's own error types vary by version
        raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    # A shard's own header says which shard it is: a file copied or renamed from another
    # shard matches its checksum in the manifest but must not be loaded here.
    said = {k: metadata.get(k) for k in ("tp_rank", "tp_size")}
    if any(v is not None and v != str(want) for v, want in zip(said.values(), (tp_rank, tp_size))):
        raise UsageError(f"{path}: its header says tp_rank {said['tp_rank']} of {said['tp_size']}, "
                         f"the manifest puts it at tp_rank {tp_rank} of {tp_size}")
    return tensors, metadata


def load_checkpoint(load_dir: str | None, state, tp_rank: int, tp_size: int,
                    throttle: Throttle | None = None) -> int | None:
    """Restore `state` (anything with .load(tensors)) from the newest persistent checkpoint;
    the iteration, or None if there is none."""
    iteration = latest_iteration(load_dir)
    if iteration is None:
        return None
    tensors, _ = read_shard(load_dir, iteration, tp_rank, tp_size, throttle)
    try:
        state.load(tensors)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"checkpoint {load_dir} iteration {iteration} does not fit this model: {exc}") from None
    return iteration

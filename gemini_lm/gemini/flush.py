"""The SIGTERM flush: the newest complete state in this machine's memory store to --save,
without a collective (it runs on the signal thread while training may sit in one).

Only DP rank 0 of each TP shard writes its TP shard's file; global rank 0 also finalizes
once every TP shard's sidecar is in (the persister's protocol: persist.py). TP shards pick
the same iteration when their machine's store holds them all (the newest iteration there
for every shard); otherwise each picks its own newest and, if they disagree, the checkpoint
is not finalized (the finalizer's wait times out) and the previous one stays the newest.
A failed write leaves no `.partial` directory behind; the store keeps the state.

    flush_snapshot   a TP shard's snapshot is its file: the persister writes the slot as is
    flush_slices     --use-distributed-optimizer: each DP rank's snapshot holds only its
                     optimizer slice (training/state.py), the file the gathered layout that
                     does not depend on the DP size, which the training thread writes with a
                     gather over DP. Here DP rank 0 of the TP shard reads every DP slice of
                     it from its own machine's store, at one iteration all of them have
                     there, and computes the gathered layout from them
                     (TrainState.gathered_from_slices: a pure function of the slices and the
                     DDP layout it knows). A slice this machine does not hold (it lives only
                     on a peer) means nothing is written: one line says which.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch

from gemini_lm.checkpoint.naming import shard_id, shard_ids
from gemini_lm.checkpoint.persistent import (discard_partial, finalize_from_sidecars, latest_iteration, partial_dir,
                                             write_shard_file, write_sidecar)
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.store_view import StaleRecordError
from gemini_lm.log import get_logger

log = get_logger(__name__)


def flush_snapshot(store, persister, shard: str, tp_size: int, timeout_s: float) -> int | None:
    """Persist this TP shard's newest complete snapshot (the TP shards' common one if this
    store has one); the iteration, or None if there was nothing newer than --save's."""
    own = sorted(store.records(shard), key=lambda r: -r.iteration)
    if not own:
        return None
    have = {s: {r.iteration for r in store.records(s)} for s in shard_ids(tp_size)}
    common = [r for r in own if all(r.iteration in its for its in have.values())]
    rec = (common or own)[0]
    done = latest_iteration(persister.save_dir)
    if done is not None and done >= rec.iteration:
        return None
    deadline = time.monotonic() + timeout_s
    waiter = threading.Thread(target=persister.wait, daemon=True)   # a persist already running
    waiter.start()
    waiter.join(timeout_s / 2)
    try:
        persister.persist(rec, finalize_timeout_s=max(1.0, deadline - time.monotonic()))
    except BaseException:
        discard_partial(persister.save_dir, rec.iteration)   # the store keeps it; no .partial left
        raise
    return rec.iteration


def pick_iteration(store, tp_rank: int, tp_size: int, dp_size: int) -> tuple[int | None, list[str]]:
    """The distributed optimizer's: (the iteration to flush or None, the slices of this TP
    shard this store lacks)."""
    have = {(t, d): {r.iteration for r in store.records(shard_id(t, d))}
            for t in range(tp_size) for d in range(dp_size)}
    mine = [have[(tp_rank, d)] for d in range(dp_size)]
    lacking = [shard_id(tp_rank, d) for d in range(dp_size) if not have[(tp_rank, d)]]
    ours = set.intersection(*mine)
    everyone = set.intersection(*have.values())
    if not ours:
        return None, lacking
    return max(ours & everyone or ours), []


def flush_slices(store, state, ps, save_dir: str, keep: int | None, timeout_s: float, throttle=None) -> int | None:
    """Write this TP shard's gathered file from the DP slices in `store` (DP rank 0 only;
    global rank 0 also finalizes, waiting at most `timeout_s` in all); the iteration, or None
    if nothing was written."""
    if ps.dp_rank != 0:
        return None
    deadline = time.monotonic() + timeout_s
    for _ in range(3):   # a slot reused while we read it: pick again
        it, lacking = pick_iteration(store, ps.tp_rank, ps.tp_size, ps.dp_size)
        if it is None:
            where = f"{', '.join(lacking)} not in" if lacking else "no iteration common to all slices in"
            log.warning(f"GEMINI flush: nothing written: {where} this machine's memory store ({store.path})")
            return None
        done = latest_iteration(save_dir)
        if done is not None and done >= it:
            return None
        try:
            payload = _gathered_file(store, state, ps, it)
        except StaleRecordError:
            continue
        break
    else:
        return None
    try:
        partial = partial_dir(save_dir, it)
        write_sidecar(partial, ps.tp_rank, write_shard_file(partial, ps.tp_rank, memoryview(payload.numpy()),
                                                            throttle))
        if ps.rank == 0:
            finalize_from_sidecars(save_dir, it, ps.tp_size, state.manifest, keep,
                                   max(1.0, deadline - time.monotonic()))
    except BaseException:
        discard_partial(save_dir, it)   # the store keeps the slices; no .partial left
        raise
    return it


def _gathered_file(store, state, ps, iteration: int) -> torch.Tensor:
    """The gathered layout's safetensors bytes, from every DP slice of this TP shard."""
    with contextlib.ExitStack() as views:
        slices = []
        for d in range(ps.dp_size):
            shard = shard_id(ps.tp_rank, d)
            rec = next((r for r in store.records(shard) if r.iteration == iteration), None)
            if rec is None:
                raise StaleRecordError(f"{shard}: no longer holds iteration {iteration}")
            slices.append(views.enter_context(store.open(rec, verify=True)).tensors())
        tensors = state.gathered_from_slices(slices)
        layout = SnapshotLayout.build(tensors, state.metadata)
        payload = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.write(tensors, payload)   # a copy: the slots may go once the views close
        del tensors, slices
    return payload

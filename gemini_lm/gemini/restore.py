"""Executing a recovery: inventory → agreement → retrieval → load, each phase timed.

recovery_plan.py decides (a pure function); this module carries the decision out:

1. Inventory: each machine's leader verifies every committed slot of its store
   (checksum) and publishes the good ones; a corrupt copy is simply not offered.
2. Agreement: every rank computes the same RecoveryPlan (recovery_plan.plan_recovery).
3. Retrieval: a rank whose shard is in its own machine's store maps it; otherwise the
   holder rank sends it over the default group and the receiver verifies the checksum.
4. Load: the bytes are copied into the live model/optimizer/RNG/data state.

If memory cannot give every shard, every rank loads the newest persistent checkpoint;
if there is none either, training starts fresh (source "none"): the caller says whether
that is a first start or a restart that lost everything (the record counts the corrupt
copies skipped: memory that held only those was not a first start). Snapshots of this job with
another layout (the model flags changed, the job id did not) stop the start-up with one
line that says what they hold; they are kept, never overwritten or removed unasked.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.checksum import CorruptSnapshotError, checksum
from gemini_lm.checkpoint.files import Throttle
from gemini_lm.checkpoint.persistent import latest_iteration, load_checkpoint
from gemini_lm.checkpoint.snapshot import SnapshotFormatError, SnapshotLayout, as_byte_tensor, read_tensors
from gemini_lm.errors import UsageError
from gemini_lm.gemini.recovery_plan import plan_recovery, stale_records
from gemini_lm.gemini.store_view import StaleRecordError
from gemini_lm.gemini.topology import GeminiTopology
from gemini_lm.log import get_logger
from gemini_lm.parallel.comm import peer_failures

log = get_logger(__name__)


def _verified_inventory(store) -> tuple[list[dict], int]:
    """(the records whose bytes match their checksums, how many did not)."""
    good, corrupt = [], 0
    for rec in store.records():
        try:
            with store.open(rec, verify=True):
                pass
            good.append(rec.to_dict())
        except CorruptSnapshotError as exc:
            log.warning(f"GEMINI: skipping corrupt copy: {exc}")
            corrupt += 1
        except StaleRecordError:
            pass
    return good, corrupt


def _layout_mismatch(store, topo: GeminiTopology, layout: SnapshotLayout | None) -> str | None:
    """Snapshots of this job that no rank can use, because the model layout changed under the
    same job id (other model flags, TP size or precision with the same --log-dir): what they
    are and what happens to them, or None. They are kept: they may be the user's newest state."""
    expected = {r.shard: r.layout_hash for r in topo.infos}
    odd = [r for r in store.records() if expected.get(r.shard) != r.layout_hash]
    if not odd:
        return None
    rec = max(odd, key=lambda r: r.iteration)
    if rec.shard not in expected:
        diff = f"shard {rec.shard}, which this tensor-parallel size does not have"
    elif rec.shard == topo.shard and layout is not None:
        try:
            with store.open(rec, verify=False) as view:
                diff = SnapshotLayout.parse(view.buffer).difference(layout)
        except (StaleRecordError, SnapshotFormatError):
            diff = "layout " + rec.layout_hash
    else:
        diff = f"layout {rec.layout_hash} there, {expected[rec.shard]} here"
    job_dir = os.path.dirname(store.path)
    return (f"the GEMINI memory store {store.path} holds iteration {rec.iteration} of this job for another "
            f"model layout ({diff}), so it cannot be restored here; it is kept ({store.nbytes() / 1e6:.1f} MB): "
            f"rerun with the flags that wrote it to resume from it, or free it (rm -rf {job_dir}) and rerun "
            f"to start this layout from --load or iteration 0 (another --log-dir is another job)")


def restore_state(topo: GeminiTopology, store, state, ps, job_id: str, load_dir: str | None,
                  throttle: Throttle | None = None, layout: SnapshotLayout | None = None) -> dict:
    """Load the newest consistent state into `state`; the recovery record (see the module doc).
    `throttle`: paces the persistent fallback's read (modelled remote storage). `layout`: this
    rank's, to say how a snapshot of another layout differs (UsageError on every rank alike:
    nothing is loaded, nothing removed)."""
    t0 = time.time()
    inventory, corrupt = _verified_inventory(store) if topo.is_leader else (None, 0)
    mismatch = _layout_mismatch(store, topo, layout) if topo.is_leader else None
    gathered: list = [None] * ps.world_size
    with peer_failures("recovery inventory"):
        dist.all_gather_object(gathered, (topo.machine, inventory, corrupt, mismatch))
    mismatches = [m for *_, m in gathered if m is not None]
    if mismatches:
        raise UsageError(mismatches[0])
    inventories = {m: inv for m, inv, *_ in gathered if inv is not None}
    plan = plan_recovery(list(topo.infos), inventories, job_id)
    t_agreed = time.time()
    persistent_it = latest_iteration(load_dir)
    use_memory = plan.iteration is not None and (persistent_it is None or plan.iteration >= persistent_it)

    bytes_moved = 0
    if use_memory:
        it = plan.iteration
        tensors, view, bytes_moved = _retrieve(topo, store, plan)
        t_retrieved = time.time()
        state.load(tensors)
        if view is not None:
            view.close()
        if topo.is_leader:
            for rec in stale_records(inventory, it):
                store.discard(rec["shard"], rec["slot"])
        source = "peer" if "peer" in set(plan.source.values()) else "local"
    elif persistent_it is not None:
        t_retrieved = time.time()
        it = load_checkpoint(load_dir, state, ps.tp_rank, ps.tp_size, throttle)
        source = "persistent"
    else:
        t_retrieved = time.time()
        it, source = 0, "none"
    totals = torch.tensor([bytes_moved], dtype=torch.int64)
    with peer_failures("recovery totals"):
        dist.all_reduce(totals)
    t_loaded = time.time()
    return {"time": t_loaded, "source": source, "iteration": it,
            "memory_iteration": plan.iteration, "persistent_iteration": persistent_it,
            "bytes_moved": int(totals), "peer_ranks": sorted(r for r, s in plan.source.items() if s == "peer"),
            "agree_s": t_agreed - t0, "retrieve_s": t_retrieved - t_agreed,
            "load_s": t_loaded - t_retrieved, "restore_s": t_loaded - t0,
            "started_at": t0, "machine_count": len(inventories),
            "corrupt_copies": sum(c for _, _, c, _ in gathered)}


def _retrieve(topo: GeminiTopology, store, plan):
    """This rank's tensors at plan.iteration, plus bytes it received; serves its peers too."""
    view, tensors, moved = None, None, 0
    sends, recvs = [], []
    with peer_failures("recovery transfer"):
        for i, f in enumerate(plan.fetches):
            if f.src_rank == topo.rank:
                rec = next(r for r in store.records(f.shard) if r.iteration == f.iteration)
                src_view = store.open(rec, verify=False)   # verified during the inventory
                # Sent straight from the slot: the view stays open until the send is done.
                sends.append((dist.isend(as_byte_tensor(src_view.buffer), f.dst_rank, tag=i), src_view))
            if f.dst_rank == topo.rank:
                buf = torch.empty(f.nbytes, dtype=torch.uint8)
                recvs.append((dist.irecv(buf, f.src_rank, tag=i), buf, f))
        for work, buf, f in recvs:
            work.wait()
            if checksum(memoryview(buf.numpy())) != f.checksum:
                raise CorruptSnapshotError(f"{f.shard} iteration {f.iteration} from {f.src_machine}: "
                                           "checksum mismatch after transfer")
            tensors, moved = read_tensors(memoryview(buf.numpy())), moved + f.nbytes
        for work, src_view in sends:
            work.wait()
            src_view.close()
    if plan.source.get(topo.rank) == "local":
        rec = plan.records[(topo.machine, topo.shard)]
        rec = next(r for r in store.records(topo.shard) if r.iteration == rec["iteration"])
        view = store.open(rec, verify=False)
        tensors = view.tensors()
    return tensors, view, moved

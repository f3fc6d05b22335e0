"""Executing a recovery: inventory → agreement → retrieval → load, each phase timed.

1. Inventory: each machine's lowest rank verifies every committed slot of its store
   (checksum) and publishes the good ones; a corrupt copy is simply not offered.
2. Agreement: every rank computes the same RecoveryPlan (recovery.plan_recovery).
3. Retrieval: a rank whose shard is in its own machine's store maps it; otherwise the
   holder rank sends it over the default group and the receiver verifies the checksum.
4. Load: the bytes are copied into the live model/optimizer/RNG/data state.

If memory cannot give every shard, every rank loads the newest persistent checkpoint;
if there is none either, training starts fresh and says so loudly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gemini_lm.gemini.checksum import CorruptSnapshotError, checksum
from gemini_lm.gemini.recovery import plan_recovery, stale_records
from gemini_lm.gemini.snapshot import as_byte_tensor, read_tensors
from gemini_lm.gemini.store import StaleRecordError
from gemini_lm.training.checkpointing import latest_iteration, load_checkpoint


@dataclass
class RestoreResult:
    record: dict | None    # the recovery.jsonl record (None: a first start, nothing to report)
    summary: str


def _verified_inventory(store, log) -> list[dict]:
    good = []
    for rec in store.records():
        try:
            with store.open(rec, verify=True):
                pass
            good.append(rec.to_dict())
        except CorruptSnapshotError as exc:
            log(f"GEMINI: skipping corrupt copy: {exc}")
        except StaleRecordError:
            pass
    return good


def _is_restart(ckpt) -> bool:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return True
    return os.path.exists(ckpt.logger.metrics_path)


def restore_state(ckpt, load_dir: str | None) -> RestoreResult:
    ps, store, state = ckpt.ps, ckpt.store, ckpt.state
    t0 = time.time()
    inventory = _verified_inventory(store, print) if ckpt.is_leader else None
    gathered: list = [None] * ps.world_size
    dist.all_gather_object(gathered, (ckpt.machine, inventory))
    inventories = {m: inv for m, inv in gathered if inv is not None}
    plan = plan_recovery(ckpt.infos, inventories, ckpt.job_id)
    t_agreed = time.time()
    persistent_it = latest_iteration(load_dir)
    use_memory = plan.iteration is not None and (persistent_it is None or plan.iteration >= persistent_it)

    bytes_moved = 0
    if use_memory:
        it = plan.iteration
        tensors, view, moved = _retrieve(ckpt, plan)
        bytes_moved = moved
        t_retrieved = time.time()
        state.load(tensors)
        if view is not None:
            view.close()
        if ckpt.is_leader:
            for rec in stale_records(inventory, it):
                store.discard(rec["shard"], rec["slot"])
        sources = set(plan.source.values())
        source = "peer" if "peer" in sources else "local"
    elif persistent_it is not None:
        t_retrieved = time.time()
        it = load_checkpoint(load_dir, state, ps)
        source = "persistent"
    else:
        t_retrieved = time.time()
        it, source = 0, "none"
    totals = torch.tensor([bytes_moved], dtype=torch.int64)
    dist.all_reduce(totals)
    t_loaded = time.time()

    if source == "none":
        if not _is_restart(ckpt):
            return RestoreResult(None, "GEMINI: no checkpoint in memory or on disk: starting fresh")
        summary = ("WARNING: GEMINI found no checkpoint in memory and none on disk: "
                   "STARTING FRESH FROM ITERATION 0")
    else:
        summary = (f"GEMINI recovery: iteration {it} from {source} "
                   f"({int(totals)/2**20:.1f} MiB moved) in {t_loaded - t0:.2f}s")
    record = {"time": t_loaded, "source": source, "iteration": it,
              "memory_iteration": plan.iteration, "persistent_iteration": persistent_it,
              "bytes_moved": int(totals), "peer_ranks": sorted(r for r, s in plan.source.items() if s == "peer"),
              "agree_s": t_agreed - t0, "retrieve_s": t_retrieved - t_agreed,
              "load_s": t_loaded - t_retrieved, "total_s": t_loaded - t0,
              "started_at": t0, "machine_count": len(inventories)}
    return RestoreResult(record, summary)


def _retrieve(ckpt, plan):
    """This rank's tensors at plan.iteration, plus bytes it received; serves its peers too."""
    ps, store = ckpt.ps, ckpt.store
    view, tensors, moved = None, None, 0
    sends, recvs = [], []
    for i, f in enumerate(plan.fetches):
        if f.src_rank == ps.rank:
            rec = store.records(f.shard)
            rec = next(r for r in rec if r.iteration == f.iteration)
            src_view = store.open(rec, verify=False)   # verified during the inventory
            # Sent straight from the pinned slot: the view stays open until the send is done.
            sends.append((dist.isend(as_byte_tensor(src_view.buffer), f.dst_rank, tag=i), src_view))
        if f.dst_rank == ps.rank:
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
    if plan.source.get(ps.rank) == "local":
        rec = plan.records[(ckpt.machine, ps.shard_id)]
        rec = next(r for r in store.records(ps.shard_id) if r.iteration == rec["iteration"])
        view = store.open(rec, verify=False)
        tensors = view.tensors()
    return tensors, view, moved

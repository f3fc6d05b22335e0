"""Checkpointer: the one face of GEMINI the training loop sees (checkpoint.protocol.Checkpointer).

    restore()                 at start-up: memory (local, then peers), else persistent, else fresh
    before_update()           train_step, before the optimizer update: the last snapshot has read it
    after_step(iteration)     train_step, after the update: snapshot + replicate + persist
    stats()                   timings for metrics.jsonl
    flush(timeout_s)          SIGTERM: the newest complete snapshot to --save
    abandon()                 a peer failed: stop the traffic whose process group is going away
    reform()                  in a new generation: new topology and groups, roll back in place
    close(iteration, clean)   drain background work; a clean finish frees the memory store

Per iteration, only the *writer* of a shard on a machine (its lowest rank holding that
shard) snapshots: data-parallel replicas on the same machine hold identical bytes. The
snapshot is one copy of the live tensors into a shared-memory slot that outlives this
process; the exchange then ships the slot to peer machines, its chunks issued by the
training thread at the timeline's points (exchange.py), and the persister writes it to
`--save` every `--save-interval` iterations.
Who writes, who leads a machine and where copies go is the GeminiTopology, built once.

With --use-distributed-optimizer every DP rank's optimizer slice is unique: each rank is
its own shard (tp00dp01, ...), snapshots and replicates it, and recovery fetches it like
any other shard. Persistent checkpoints then need the slices gathered into the DP-size-
independent layout, a collective over DP: they are written by the non-GEMINI path
(training/checkpointing.py, --async-save or blocking; handed in as `persistent`) on the
training thread instead of from a slot. The SIGTERM flush cannot run that collective: it
computes the gathered layout from the slices in its machine's store (flush.py).
A snapshot then holds no params (training/state.py): nothing in it is on another rank.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.files import Throttle, describe
from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.persistent import check_writable, remove_partial_dirs
from gemini_lm.checkpoint.protocol import WindowHook
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.errors import UsageError
from gemini_lm.gemini.agreement import agree_profile
from gemini_lm.gemini.exchange import Exchange
from gemini_lm.gemini.interleave import TrafficScheduler
from gemini_lm.gemini.persist import Persister
from gemini_lm.gemini.flush import flush_slices, flush_snapshot
from gemini_lm.gemini.restore import restore_state
from gemini_lm.gemini.staging import Staging, connect_routes
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.store_admin import describe_size, usage
from gemini_lm.gemini.topology import GeminiTopology, machine_id
from gemini_lm.log import get_logger
from gemini_lm.parallel.comm import peer_failures

log = get_logger(__name__)


class Checkpointer:
    def __init__(self, cfg, state, ps, job_id: str, persistent=None):
        """`persistent`: writes the persistent checkpoints instead of a Persister (another
        checkpoint.protocol.Checkpointer; the distributed optimizer's, see the module doc)."""
        self.cfg, self.state, self.ps, self.job_id = cfg, state, ps, job_id
        g = cfg.gemini
        self.interval = g.gemini_interval
        # auto is gloo: no GPU has run the staged NCCL exchange yet (see the README). nccl
        # without CUDA was refused with the other input checks; gloo-staged is its code on CPU.
        self.transport = "gloo" if g.gemini_transport == "auto" else g.gemini_transport
        self.staged = self.transport in ("nccl", "gloo-staged")
        self.machine = machine_id()
        distributed_optimizer = cfg.parallel.use_distributed_optimizer
        self.shard = shard_id(ps.tp_rank, ps.dp_rank if distributed_optimizer else None)
        # On CUDA the slots are page-locked, so the snapshot is an async DMA from the GPU.
        self.store = MemoryStore(g.gemini_store_dir, job_id, self.machine, pin_memory=ps.device.type == "cuda")
        self.layout = SnapshotLayout.build(state.tensors(), state.metadata)
        self.traffic = TrafficScheduler(g, ps.timeline)
        self._form_topology()
        topo = self.topology
        self.exchange: Exchange | None = None       # the training thread's checkpoint traffic
        self._sending = None                        # the view pinning the slot being sent
        self.persister: Persister | None = None
        self._window_hook: WindowHook | None = None
        save = cfg.checkpoint.save
        # Modelled remote storage for persistent writes and the fallback's reads (benchmarks).
        self.throttle = Throttle.from_mbs(cfg.checkpoint.persistent_bandwidth_mbs)
        if save:
            check_writable(save)
        self.persistent = persistent
        if save and topo.is_writer and ps.dp_rank == 0 and persistent is None:
            self.persister = Persister(self.store, save, ps.tp_rank, ps.tp_size, finalizer=ps.rank == 0,
                                       keep=cfg.checkpoint.save_keep, manifest=state.manifest,
                                       window_hook=self._in_window, throttle=self.throttle)
        self._stats: dict = {}
        self.last_record = None
        self._pending = None
        self._writing = None   # the write handle of this rank's newest snapshot
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemini-commit")
        # On CUDA the snapshot's device-to-host copies run on a side stream while the next
        # iteration's forward and backward run; only its update waits for them (before_update).
        self._d2h_stream = torch.cuda.Stream(ps.device) if ps.device.type == "cuda" else None
        self._d2h_done = None
        self._d2h_wait_s: float | None = None

    def _form_topology(self) -> None:
        """Collective: who holds what, and the groups checkpoint traffic goes over."""
        g, ps = self.cfg.gemini, self.ps
        with peer_failures("GEMINI topology"):
            self.topology = GeminiTopology.gather(ps.rank, ps.world_size, self.machine, self.shard,
                                                  self.layout.layout_hash, g.gemini_replicas, g.gemini_placement,
                                                  nbytes=self.layout.nbytes)
        topo = self.topology
        # Checkpoint traffic gets process groups of its own (collective: every rank creates
        # them): gloo for the protocol's small messages (and the payload, unstaged); staged,
        # one more for the payload (NCCL on GPU), every route connected now (staging.py).
        self.repl_group = dist.new_group(backend="gloo", timeout=ps.timeout) if topo.routes else None
        self.payload_group = None
        if topo.routes and self.staged:
            nccl = self.transport == "nccl"
            self.payload_group = dist.new_group(backend="nccl" if nccl else "gloo", timeout=ps.timeout)
            with peer_failures("GEMINI route connections"):
                connect_routes(topo.routes, self.payload_group, self._staging_device(), self.traffic.chunk_bytes)

    # ---- start-up ---------------------------------------------------------------------
    def restore(self) -> dict:
        """Load the newest state there is; the recovery record (source "none": nothing found)."""
        topo = self.topology
        if self.ps.rank == 0 and topo.placement.notes:   # what the flags became here, e.g. a clamped m
            log.info("GEMINI placement: " + "; ".join(topo.placement.notes))
        if self.cfg.checkpoint.save and self.ps.rank == 0:   # the finalizer, persister's or flush's
            # Before the restore's collectives: no rank of this run persists before they end,
            # and every process of the crashed run is gone (torchrun stopped them all).
            stale = remove_partial_dirs(self.cfg.checkpoint.save)
            if stale:
                log.warning(f"GEMINI: removed half-written checkpoint directories of a crashed run: {stale}")
        try:
            record = restore_state(topo, self.store, self.state, self.ps, self.job_id,
                                   self.cfg.checkpoint.load, self.throttle, layout=self.layout)
            self._start_replication()   # a store too small for two slots is found here
        except UsageError:
            if topo.is_leader and not self.store.records():
                self.store.wipe()   # it holds nothing: bad input leaves no empty store behind
            raise
        return record

    def _staging_device(self) -> torch.device:
        return self.ps.device if self.transport == "nccl" else torch.device("cpu")

    def _start_replication(self) -> None:
        topo = self.topology
        if topo.routes:
            senders = {i.rank: (i.nbytes, i.layout_hash) for i in topo.infos}
            staging = Staging(self.ps.rank, topo.routes, self._staging_device(), self.traffic.buffer_bytes,
                              self.traffic.num_buffers) if self.staged else None
            self.exchange = Exchange(list(topo.routes), self.ps.rank, self.repl_group, self.store, topo.machine,
                                     senders, window_hook=self._in_window, staging=staging,
                                     payload_group=self.payload_group)
            self.ps.timeline.on_point = self.exchange.at_point
        if topo.is_writer:
            self.store.prepare(self.shard, self.layout.nbytes)

    # ---- in-place recovery --------------------------------------------------------------
    def abandon(self) -> None:
        """A peer failed: let the snapshot in flight commit, stop checkpoint traffic and drop
        its groups. Nothing of ours can still be blocked in them: the training thread issued
        all the traffic (the staging copier only copies)."""
        try:
            if self._pending is not None:
                self._pending.result()
        except Exception:  # noqa: BLE001 - its replication may have failed with the peer
            pass
        self._pending, self._d2h_done = None, None
        self.ps.timeline.on_point = None
        if self.exchange is not None:
            self.exchange.abandon()   # pending sends and receives die with their group
            self.exchange.close()
            self.exchange = None
        self._unpin_sending()
        self.repl_group = self.payload_group = None

    def reform(self) -> dict:
        """In a new generation (its default group initialized, ParallelState rebuilt): new
        topology and traffic groups, then roll back to the newest iteration every shard holds
        in memory, exactly as at a restart. The recovery record."""
        self._form_topology()
        # Plan again, whether the peers changed or not: a replacement process starts with
        # no plan, and every rank must derive the same one (agreement.py).
        self.traffic.replan()
        record = restore_state(self.topology, self.store, self.state, self.ps, self.job_id,
                               self.cfg.checkpoint.load)
        self._start_replication()
        return record

    # ---- every iteration --------------------------------------------------------------
    def after_step(self, iteration: int) -> None:
        self._gemini_step(iteration)
        if self.persistent is not None:
            self.persistent.after_step(iteration)

    def _gemini_step(self, iteration: int) -> None:
        if iteration % self.interval != 0:
            return
        if self.exchange is None:
            if self.topology.is_writer:
                self._snapshot(iteration)
            return
        # Every rank takes each decision alike (the traffic's moments must agree); only
        # writers snapshot.
        t0 = time.perf_counter()
        traffic, ex = self.traffic, self.exchange
        replicate = traffic.replicate(iteration)
        wait_s = 0.0
        if replicate:
            wait_s += ex.finish()   # the previous replicated snapshot's deadline
            self._unpin_sending()
            if traffic.wants_plan(iteration):
                self._agree_plan()
        if self.topology.is_writer:
            self._snapshot(iteration, replicate=replicate)   # sets self._stats
        else:
            self._stats = {}
        if replicate:
            w = self._writing
            copied = self._d2h_done   # CUDA: the slot is complete once the side stream copied it
            ex.begin(iteration, None if w is None else w.buffer, self._sent_record,
                     partial(self._chunks_of, iteration), blocking=traffic.blocking(iteration),
                     ready=None if copied is None else copied.synchronize)
            if traffic.blocking(iteration):
                wait_s += ex.finish(observe=traffic.observe)
                self._unpin_sending()
        self._stats.update(gemini_wait_s=self._stats.get("gemini_wait_s", 0.0) + wait_s,
                           gemini_blocking_s=time.perf_counter() - t0)

    def _agree_plan(self) -> None:
        """Collective: the plan's inputs, agreed by all ranks; then every sender's plan."""
        topo = self.topology
        with peer_failures("GEMINI plan agreement"):
            profile = agree_profile(self.traffic.local_profile(), self.repl_group, self.ps.world_size)
        senders: dict = {}
        for r in topo.routes:
            senders.setdefault(r.src_rank, {})[r.dst_machine] = topo.infos[r.src_rank].nbytes
        self.traffic.adopt(profile, senders, self.ps.rank if self.ps.rank in senders else None)

    def _chunks_of(self, iteration: int, route) -> list:
        return self.traffic.chunks(route.dst_machine, self.topology.infos[route.src_rank].nbytes, iteration,
                                   sender=route.src_rank)

    def _sent_record(self):
        """The commit record of the snapshot being sent (its checksum goes in the trailer)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return self._sending.record

    def _unpin_sending(self) -> None:
        if self._sending is not None:
            self._sending.close()
            self._sending = None

    def before_update(self) -> None:
        """Called just before the optimizer update: the state may change only once the
        previous snapshot's copies have read it. A stream wait: the host does not block."""
        if self._d2h_done is not None:
            torch.cuda.current_stream(self.ps.device).wait_event(self._d2h_done)
            self._d2h_done = None

    def _snapshot(self, iteration: int, replicate: bool = False) -> None:
        """`replicate`: the exchange sends it (the caller's job); its slot stays pinned until then."""
        t0 = time.perf_counter()
        # Before the slot can be reused, the previous snapshot must be committed.
        wait_s = self._drain()
        t1 = time.perf_counter()
        w = self.store.begin_write(self.shard, self.layout.nbytes, self.layout.layout_hash)
        hook = self._window_hook   # set only while a failure injection is armed
        midway = None if hook is None else partial(hook, "copy", iteration)
        try:
            copied = self.layout.write(self.state.tensors(), w.buffer, stream=self._d2h_stream, midway=midway)
        except BaseException:
            self.store.abort(w)
            raise
        self._d2h_done = copied
        self._writing = w
        t2 = time.perf_counter()
        # Checksum + commit record + hand-off to replication/persistence happen off the
        # training thread: the loop is blocked only for the copy into shared memory (on
        # CUDA, only for queueing it).
        self._pending = self._worker.submit(self._commit_and_ship, w, iteration, replicate, copied)
        self._stats = {"gemini_snapshot_s": t2 - t1, "gemini_wait_s": wait_s,
                       "gemini_blocking_s": time.perf_counter() - t0,
                       "gemini_snapshot_bytes": self.layout.nbytes}

    def set_window_hook(self, hook: WindowHook | None) -> None:
        """`hook(window, iteration)` runs inside each checkpoint window — "copy" (half the
        state copied into the slot), "snapshot" (payload written, not committed), "send"
        (header sent to a peer, payload not), "receive" (a replica's payload in, not
        committed), "persist" (a shard's file in iter_N.partial/, not finalized) — for
        failure injection (resilience/breakpoints.py). None (the default) costs a None check."""
        self._window_hook = hook
        if self.persistent is not None:
            self.persistent.set_window_hook(hook)

    def _in_window(self, window: str, iteration: int | None) -> None:
        hook = self._window_hook
        if hook is not None:
            hook(window, iteration)

    def _commit_and_ship(self, w, iteration: int, replicate: bool, copied=None):
        if copied is not None:
            t0 = time.perf_counter()
            copied.synchronize()
            self._d2h_wait_s = time.perf_counter() - t0   # ≈ the copy's duration past the step
        self._in_window("snapshot", iteration)
        rec = self.store.commit(w, iteration)
        self.last_record = rec
        if replicate:
            # Pinned until its exchange finishes: a snapshot not replicated meanwhile
            # (every j-th travels) must not overwrite the slot being sent.
            self._sending = self.store.open(rec, verify=False)
        c = self.cfg.checkpoint
        if self.persister and c.save_interval and iteration % c.save_interval == 0:
            self.persister.submit(rec)
        return rec

    def _drain(self) -> float:
        """Wait for the previous snapshot's commit; seconds waited."""
        t0 = time.perf_counter()
        if self._pending is not None:
            self._pending.result()   # re-raises a failed commit on the training thread
            self._pending = None
        return time.perf_counter() - t0

    def stats(self) -> dict:
        out = dict(self._stats)
        if self._d2h_wait_s is not None:
            out["gemini_d2h_wait_s"] = self._d2h_wait_s
        if self.exchange is not None and self.exchange.last_send_s is not None:
            out["gemini_repl_send_s"] = self.exchange.last_send_s
        if self.persister is not None and self.persister.last_persist_s is not None:
            out["gemini_persist_s"] = self.persister.last_persist_s
        if self.persistent is not None:
            out.update(self.persistent.stats())
        if self.persister is not None and self.persister.failures:
            out["gemini_persist_failures"] = self.persister.failures   # cumulative; wandb plots it
            out["gemini_persist_failing"] = int(self.persister.error is not None)
        plan = self.traffic.plan
        if plan is not None:
            out["gemini_interleave_every"] = self.traffic.every
            out["gemini_interleave_leftover_bytes"] = plan.leftover_bytes
            out["gemini_interleave_predicted_extra_s"] = plan.predicted_extra_s
        return out

    def memory_store(self) -> tuple[str, int]:
        return self.store.path, self.store.nbytes()

    # ---- preemption -------------------------------------------------------------------
    def flush(self, timeout_s: float) -> int | None:
        """Write the newest complete state in this machine's store to --save; the iteration,
        or None if nothing to do. Runs on the signal thread while training may be blocked,
        so no collective (flush.py): DP rank 0 of each TP shard writes its file, global rank 0
        also finalizes, waiting at most `timeout_s` for the other TP shards."""
        if self.persistent is not None:   # the distributed optimizer: from every DP rank's slice
            deadline = time.monotonic() + timeout_s
            self.persistent.wait_background(timeout_s / 2)   # a save in flight must not race ours
            return flush_slices(self.store, self.state, self.ps, self.cfg.checkpoint.save,
                                self.cfg.checkpoint.save_keep, max(1.0, deadline - time.monotonic()),
                                self.throttle)
        if self.persister is None:
            return None
        return flush_snapshot(self.store, self.persister, self.shard, self.ps.tp_size, timeout_s)

    # ---- shutdown ---------------------------------------------------------------------
    def close(self, iteration: int, clean: bool) -> str | None:
        """Drain; a clean finish writes the final state to --save and frees the memory store,
        unless that write failed on some rank: then the store is kept (the only copy) and
        the one-line message saying so is returned."""
        self.ps.timeline.on_point = None
        if clean:
            self._drain()
            if self.exchange is not None:
                self.exchange.finish()   # every rank: the last replicated snapshot reaches its peers
        if self.exchange is not None:
            self.exchange.abandon()
            self.exchange.close()
            self.exchange = None
        self._unpin_sending()
        unsaved = None
        if self.persister is not None:
            if clean and (self.last_record is None or self.last_record.iteration != iteration):
                self._snapshot(iteration)
                self._drain()
            self.persister.wait()
            if clean and self.persister.last_iteration != iteration:
                self.persister.submit(self.last_record)   # always leave the final state on disk
                self.persister.wait()
            if clean and self.persister.last_iteration != iteration:
                unsaved = self._unsaved_message(iteration)
            self.persister.close()
        if self.persistent is not None:
            self.persistent.close(iteration, clean)   # collective: the final state, gathered
        self._worker.shutdown(wait=clean)
        if clean:
            flag = torch.tensor([unsaved is not None], dtype=torch.int32, device=self.ps.device)
            with peer_failures("GEMINI close"):
                # Also the barrier: every rank is done with the store before it goes.
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                self.store.close()   # the newest state exists nowhere else: never free it
                return unsaved or self._unsaved_message(iteration)
            if self.topology.is_leader and not self.cfg.gemini.gemini_keep_store:
                self.store.wipe()
                return None
        self.store.close()
        if self.topology.is_leader:   # say what stays in memory, and how to free it
            nbytes, _ = usage(self.store.path)
            why = "as --gemini-keep-store asks" if clean else "so that a restart resumes from it"
            log.warning(f"GEMINI: the memory store stays at {self.store.path} ({describe_size(nbytes)}) {why}; "
                        f"free it with `python tools/gemini_store.py remove {self.job_id}`")
        return None

    def _unsaved_message(self, iteration: int) -> str:
        err = self.persister.error if self.persister is not None else None
        why = f" ({describe(err)})" if err is not None else " (another shard's write failed)"
        return (f"training finished, but its final state (iteration {iteration}) could not be written to "
                f"--save {self.cfg.checkpoint.save}{why}; it is kept in memory at "
                f"{os.path.dirname(self.store.path)}: make room and run the same command again with "
                f"--gemini-job-id {self.job_id}, which resumes from memory and writes it")

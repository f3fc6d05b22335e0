"""The training process's side of in-place recovery: which generation and rank it trains in.

A supervised training process (resilience/supervisor.py) of a multi-rank job never uses
torchrun's WORLD_SIZE/RANK directly: it trains as rank r of a generation, an
`init_process_group` over a store prefix of that generation's own (membership.py).

    generation 0       the launch: slot s < world trains as rank s; the other slots are spares
    a survivor         sees a peer fail (PeerFailure), drops its groups, bumps the generation,
                       joins it and keeps its rank; the loop then rebuilds its groups and the
                       checkpointer rolls everything back to the newest iteration every shard
                       holds in memory — no re-import, no model rebuild, no data re-read
    a replacement      the warm child a supervisor re-forked after its predecessor died: it
                       bumps (if the predecessor trained) and joins, takes the dead rank, builds
                       its model and restores from its machine's store (or from peers)
    a spare            waits for a generation that adopts it (its machine replaces a lost one)

A plan that cannot be made (a lost machine and no spare) is a ColdFallback: the process
exits EXIT_RESTART and torchrun restarts everyone (the cold path).
"""
from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

from gemini_lm.log import get_logger
from gemini_lm.resilience import job_store
from gemini_lm.resilience.membership import Membership
from gemini_lm.resilience.reform_plan import Fallback
from gemini_lm.resilience.status import DONE, RECOVERING, SPARE, STARTING, TRAINING
from gemini_lm.resilience.supervisor import ChildContext

log = get_logger(__name__)


def publish_worker(log_dir: str, ctx: ChildContext, rank: int, generation: int) -> None:
    """<log-dir>/workers/slot<k>.json: which process trains which rank now (the failure
    injection tools find their targets by it: resilience/procs.workers)."""
    d = os.path.join(log_dir, "workers")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"slot{ctx.slot}.json")
    with open(path + f".tmp{os.getpid()}", "w") as f:
        json.dump({"slot": ctx.slot, "rank": rank, "generation": generation, "pid": os.getpid(),
                   "supervisor_pid": os.getppid(), "machine": ctx.machine}, f)
    os.replace(path + f".tmp{os.getpid()}", path)


class ColdFallback(RuntimeError):
    """In-place recovery cannot go on: take torchrun's full restart."""


class InPlace:
    def __init__(self, ctx: ChildContext, world_size: int, log_dir: str, timeout):
        self.ctx, self.status, self.world_size, self.log_dir = ctx, ctx.status, world_size, log_dir
        self.membership = Membership(job_store.connect(timeout), ctx.slot, ctx.machine, ctx.local_rank,
                                     world_size, fresh=ctx.incarnation > 0 or ctx.slot >= world_size)
        self.generation, self.rank, self.plan = -1, -1, None
        self.inputs_checked = False

    # ---- joining ------------------------------------------------------------------------
    def start(self) -> bool:
        """Find this process's first generation and rank; False if training finished while it
        waited as a spare."""
        m, ctx = self.membership, self.ctx
        if ctx.predecessor_was_member:
            g = m.bump(ctx.previous_generation)   # our predecessor's generation died with it
        else:
            g = m.current()
        if g == 0 and ctx.slot < self.world_size:
            self._enter(0, ctx.slot, None)        # the launch's own world: no plan needed
            return True
        if g == 0:                                # a spare of the launch
            self.status.set(phase=SPARE, generation=0)
            g = m.wait_as_spare(0)
            if g is None:
                return False
        return self._join_until_member(g)

    def _join_until_member(self, g: int) -> bool:
        m = self.membership
        while True:
            self.status.set(phase=RECOVERING if self.rank >= 0 else SPARE, generation=g)
            g, plan = m.join(g)
            if isinstance(plan, Fallback):
                raise ColdFallback(plan.why)
            if self.ctx.slot in plan.assign:
                self._enter(g, plan.assign.index(self.ctx.slot), plan)
                return True
            self.status.set(phase=SPARE, generation=g)
            nxt = m.wait_as_spare(g)
            if nxt is None:
                return False
            g = nxt

    def _enter(self, generation: int, rank: int, plan) -> None:
        self.generation, self.rank, self.plan = generation, rank, plan
        self.membership.fresh = False
        self.status.set(generation=generation, rank=rank, alarm=-1, member=1,
                        phase=STARTING if self.status.get("phase") != RECOVERING else RECOVERING)
        if self.inputs_checked:
            self.publish()

    def publish(self) -> None:
        """Once the inputs are known good (nothing is written before that): say which rank
        this process trains, for the tools."""
        self.inputs_checked = True
        publish_worker(self.log_dir, self.ctx, self.rank, self.generation)

    def init_process_group(self, backend: str, timeout, **kwargs) -> None:
        self.backend, self.timeout, self.pg_kwargs = backend, timeout, kwargs
        dist.init_process_group(backend, store=self.membership.pg_store(self.generation), rank=self.rank,
                                world_size=self.world_size, timeout=timeout, **kwargs)

    def reinit_process_group(self) -> None:
        """The default group of the generation just joined, as the first one was made."""
        self.init_process_group(self.backend, self.timeout, **self.pg_kwargs)

    def training(self) -> None:
        self.status.set(phase=TRAINING)

    def finish(self) -> None:
        """Training is complete: spares may leave, and the supervisor stops tending the store."""
        self.status.set(phase=DONE)
        self.membership.finish()

    # ---- recovering ---------------------------------------------------------------------
    def rejoin(self) -> dict:
        """After this survivor dropped its groups: the next generation, the same rank. The
        timestamps of the re-formation, for the recovery record."""
        t0 = time.time()
        rank = self.rank
        g = self.membership.bump(self.generation)
        self.status.set(phase=RECOVERING, generation=g, alarm=-1)
        if not self._join_until_member(g):
            raise ColdFallback("training finished during the recovery")
        if self.rank != rank:
            raise ColdFallback(f"rank {rank} was moved to rank {self.rank}")
        return {"generation": self.generation, "bumped_at": t0, "planned_at": self.membership.timing.planned_at,
                "replacement_ready_at": getattr(self.plan, "ready_at", None)}

"""Generations: how the live processes agree on the next training world, through the job store.

Keys (under the round's prefix, job_store.py):

    gen                  the current generation; bump(g) = compare_set(gen, g, g+1): everyone
                         who saw generation g fail lands on the same next number, and a second
                         failure meanwhile simply bumps again
    assign               slot of each training rank in the newest planned generation (absent:
                         generation 0, where rank r runs in slot r)
    g<G>/regs            slots registered for generation G (appended)
    g<G>/reg/<slot>      a registration: machine and local rank
    g<G>/leader          add() == 1: this participant plans generation G
    g<G>/plan            the plan (reform_plan.Plan) or a fallback to the full restart
    g<G>/pg/             the store prefix of generation G's process groups (never reused:
                         gloo would connect to a dead incarnation's address)
    hb/<slot>, machine/<slot>   written by the supervisors (supervisor.py)
    hang/g<G>            a hang alarm raised in generation G (relayed by a supervisor)
    done                 training finished: spares leave

The decision itself is reform_plan.plan_generation, a pure function; this module only
reads and writes the keys around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch.distributed as dist

from gemini_lm.resilience.reform_plan import Fallback, Participant, Plan, Wait, plan_generation


class StoreLost(RuntimeError):
    """The job store stopped answering: nothing can be agreed any more (→ the cold path)."""


@dataclass
class Timing:
    """When this participant's part of a re-formation happened (time.time())."""
    joined_at: float = 0.0
    planned_at: float = 0.0     # the plan was known here


class Membership:
    def __init__(self, store: dist.Store, slot: int, machine: str, local_rank: int, world_size: int, *,
                 fresh: bool = False, dead_after: float = 1.0, spare_wait: float = 1.0,
                 plan_timeout: float = 10.0, poll_s: float = 0.01):
        """`fresh`: this process has not trained in the last generation (a re-forked child or
        a spare); it stops being fresh once it enters a generation."""
        self.store, self.slot, self.machine, self.local_rank = store, slot, machine, local_rank
        self.world_size, self.fresh = world_size, fresh
        self.dead_after, self.spare_wait, self.plan_timeout, self.poll_s = dead_after, spare_wait, plan_timeout, poll_s
        self.timing = Timing()

    # ---- generation numbers -----------------------------------------------------------
    def current(self) -> int:
        try:
            value = self.store.compare_set("gen", "", "0")   # creates it as 0 if absent
        except RuntimeError as exc:
            raise StoreLost(f"job store: {exc}") from exc
        return int(value)

    def bump(self, generation: int) -> int:
        """Move on from `generation` (it failed): the next generation everyone agrees on."""
        try:
            self.store.compare_set("gen", "", "0")
            return int(self.store.compare_set("gen", str(generation), str(generation + 1)))
        except RuntimeError as exc:
            raise StoreLost(f"job store: {exc}") from exc

    def pg_store(self, generation: int) -> dist.Store:
        return dist.PrefixStore(f"g{generation}/pg/", self.store)

    # ---- joining ------------------------------------------------------------------------
    def join(self, generation: int) -> tuple[int, Plan | Fallback]:
        """Register for `generation` (or a newer one, if it is superseded meanwhile) and wait
        for its plan; the generation that was planned and its plan."""
        self.timing.joined_at = time.time()
        while True:
            try:
                plan = self._join_once(generation)
            except RuntimeError as exc:
                raise StoreLost(f"job store: {exc}") from exc
            if isinstance(plan, int):          # superseded, or its leader vanished: move on
                generation = plan
                continue
            self.timing.planned_at = time.time()
            return generation, plan

    def _join_once(self, g: int) -> Plan | Fallback | int:
        s = self.store
        s.set(f"g{g}/reg/{self.slot}", json.dumps({"machine": self.machine, "local_rank": self.local_rank,
                                                    "fresh": self.fresh, "time": time.time()}))
        s.append(f"g{g}/regs", f"{self.slot},")
        if s.add(f"g{g}/leader", 1) == 1:
            return self._lead(g)
        deadline = time.monotonic() + self.plan_timeout
        while not s.check([f"g{g}/plan"]):
            newer = self.current()
            if newer > g:
                return newer
            if time.monotonic() > deadline:   # the leader died while planning
                return self.bump(g)
            time.sleep(self.poll_s)
        return _decode_plan(s.get(f"g{g}/plan"))

    def _lead(self, g: int) -> Plan | Fallback | int:
        s = self.store
        previous = tuple(json.loads(s.get("assign"))) if s.check(["assign"]) else tuple(range(self.world_size))
        machines = {slot: s.get(f"machine/{slot}").decode() for slot in previous if s.check([f"machine/{slot}"])}
        started, beats = time.monotonic(), {}
        while True:
            newest = self.current()
            if newest > g:
                return newest
            now = time.monotonic()
            registered = self._registered(g)
            silent = {}
            for slot in previous:
                if slot in registered:
                    continue
                count = s.add(f"hb/{slot}", 0)
                last_count, since = beats.get(slot, (None, now))
                if count != last_count:
                    beats[slot] = (count, now)
                    since = now
                silent[slot] = now - since
            decision = plan_generation(previous, registered, machines, silent, dead_after=self.dead_after,
                                       waited_s=now - started, spare_wait=self.spare_wait)
            if not isinstance(decision, Wait):
                if isinstance(decision, Plan):
                    s.set("assign", json.dumps(list(decision.assign)))
                s.set(f"g{g}/plan", _encode_plan(decision))
                return decision
            time.sleep(self.poll_s)

    def _registered(self, g: int) -> dict[int, Participant]:
        s, out = self.store, {}
        if not s.check([f"g{g}/regs"]):
            return out
        for item in s.get(f"g{g}/regs").decode().split(","):
            if item:
                slot = int(item)
                reg = json.loads(s.get(f"g{g}/reg/{slot}"))
                out[slot] = Participant(slot, reg["machine"], reg["local_rank"], reg["fresh"], reg["time"])
        return out

    # ---- spares -------------------------------------------------------------------------
    def wait_as_spare(self, seen: int) -> int | None:
        """Block until a generation newer than `seen` starts (join it) or training is done (None).

        A spare also watches the members' supervisor heartbeats: when every member's machine is
        lost nobody is left to start the next generation (survivors do that when they see a
        collective fail), so a spare that sees a member silent for `dead_after` starts it."""
        s = self.store
        beats: dict[int, tuple[int, float]] = {}
        next_check = 0.0
        try:
            while True:
                if s.check(["done"]):
                    return None
                g = self.current()
                if g > seen:
                    return g
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + 0.2
                    members = json.loads(s.get("assign")) if s.check(["assign"]) else range(self.world_size)
                    for slot in members:
                        count = s.add(f"hb/{slot}", 0)
                        last, since = beats.get(slot, (None, now))
                        if count != last:
                            beats[slot] = (count, now)
                        elif count > 0 and now - since >= self.dead_after:
                            return self.bump(g)    # a member's machine is gone and nobody noticed
                time.sleep(self.poll_s * 2)
        except RuntimeError as exc:
            raise StoreLost(f"job store: {exc}") from exc

    def finish(self) -> None:
        """Training completed: spares may leave."""
        self.store.set("done", "1")


def _encode_plan(p: Plan | Fallback) -> str:
    if isinstance(p, Fallback):
        return json.dumps({"fallback": p.why})
    return json.dumps({"assign": list(p.assign), "spares": list(p.spares), "adopted": list(p.adopted),
                       "dead": list(p.dead), "ready_at": p.ready_at})


def _decode_plan(raw: bytes) -> Plan | Fallback:
    d = json.loads(raw)
    if "fallback" in d:
        return Fallback(d["fallback"])
    return Plan(tuple(d["assign"]), tuple(d["spares"]), tuple(d["adopted"]), tuple(d["dead"]), d["ready_at"])

"""Who trains in the next generation: a pure decision over what the job store says.

A generation is one process-group world of `world_size` training ranks. Each rank runs in
a *slot* (a torchrun worker: a supervisor and its forked training child); slots beyond
the training world wait as spares. After a failure every live participant registers for
the next generation and one of them (the leader) decides, with this function:

- a rank whose slot registered keeps it (a survivor, or the warm child its supervisor
  re-forked after the old one died: same machine, same memory store);
- a rank whose slot's supervisor stopped heartbeating for `dead_after` seconds lost its
  machine: it goes to a registered spare, machine by machine (a dead machine's ranks
  move together, in local-rank order, so tensor-parallel groups stay inside a machine);
- a rank whose slot neither registered nor died yet: wait;
- no spare machine for a dead one: wait `spare_wait` seconds (a spare may still be
  registering), then fall back to the full restart (torchrun), the cold path.

Which iteration everyone rolls back to is not decided here: once the new world has
formed, the restore (gemini/recovery_plan.py) finds the newest iteration every shard
has committed in memory, exactly as at a cold start.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Participant:
    slot: int          # torchrun RANK of the supervisor
    machine: str
    local_rank: int
    fresh: bool = False       # a re-forked or spare process (not a survivor of the last generation)
    joined_at: float = 0.0    # when it registered (time.time())


@dataclass(frozen=True)
class Plan:
    assign: tuple[int, ...]                # slot of each training rank
    spares: tuple[int, ...]                # registered slots left waiting
    adopted: tuple[int, ...] = ()          # training ranks that moved to a spare
    dead: tuple[int, ...] = ()             # slots declared dead
    ready_at: float | None = None          # when the last fresh member registered (replacement ready)


@dataclass(frozen=True)
class Fallback:
    why: str


@dataclass(frozen=True)
class Wait:
    pending: tuple[int, ...] = field(default_factory=tuple)   # slots not registered and not yet dead


def plan_generation(previous: tuple[int, ...], registered: dict[int, Participant],
                    machines: dict[int, str], silent_s: dict[int, float], *, dead_after: float,
                    waited_s: float, spare_wait: float) -> Plan | Wait | Fallback:
    """`previous`: slot of each rank in the last generation; `registered`: the participants of
    this one; `machines`: slot -> machine of every slot ever seen (the previous members');
    `silent_s`: slot -> seconds since its supervisor's heartbeat last moved; `waited_s`:
    since the leader started planning."""
    dead = sorted(s for s in previous if s not in registered and silent_s.get(s, 0.0) >= dead_after)
    pending = tuple(sorted(s for s in previous if s not in registered and s not in dead))
    if pending:
        return Wait(pending)
    members = set(previous)
    spares_by_machine: dict[str, list[Participant]] = {}
    for p in sorted(registered.values(), key=lambda p: (p.machine, p.local_rank, p.slot)):
        if p.slot not in members:
            spares_by_machine.setdefault(p.machine, []).append(p)
    assign = list(previous)
    adopted: list[int] = []
    lost_machines: dict[str, list[int]] = {}          # machine -> its dead ranks, in rank order
    for rank, slot in enumerate(previous):
        if slot in dead:
            lost_machines.setdefault(machines.get(slot, f"slot{slot}"), []).append(rank)
    free = sorted(spares_by_machine, key=lambda m: min(p.slot for p in spares_by_machine[m]))
    for machine, ranks in sorted(lost_machines.items(), key=lambda kv: kv[1][0]):
        fit = next((m for m in free if len(spares_by_machine[m]) >= len(ranks)), None)
        if fit is None:
            if waited_s < spare_wait:
                return Wait()
            return Fallback(f"no spare machine for the {len(ranks)} rank(s) of lost machine {machine}")
        free.remove(fit)
        for rank, spare in zip(ranks, spares_by_machine[fit]):
            assign[rank] = spare.slot
            adopted.append(rank)
    in_use = set(assign)
    spares = tuple(sorted(p.slot for p in registered.values() if p.slot not in in_use))
    fresh = [registered[s].joined_at for s in assign if registered[s].fresh]
    return Plan(tuple(assign), spares, tuple(adopted), tuple(dead), max(fresh) if fresh else None)

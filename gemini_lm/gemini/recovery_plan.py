"""Recovery planning: which iteration everyone resumes from, and from where (restore.py executes it).

At start-up every rank publishes who it is (rank, machine, shard, the layout hash of its
state) and what its machine's store holds. From that one table every rank computes the
same plan, independently:

- the newest iteration complete, with the right layout, for every shard somewhere in
  memory (older slots count: a shard that crashed mid-write still has the iteration
  before);
- for each rank, its shard's copy in its own machine's store ("local") or the holder
  rank that sends it ("peer"); a machine's copies are served by its lowest rank;
- if some shard has no copy of any common iteration anywhere: None (→ persistent).

Ranks are matched by shard and machine, never by rank number, so a restart that
renumbers ranks recovers all the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gemini_lm.gemini.topology import RankInfo, machine_leaders


@dataclass
class Fetch:
    src_rank: int
    dst_rank: int
    shard: str
    iteration: int
    nbytes: int
    checksum: str
    src_machine: str


@dataclass
class RecoveryPlan:
    iteration: int | None
    source: dict = field(default_factory=dict)      # rank -> "local" | "peer"
    fetches: list = field(default_factory=list)     # Fetch, in a global order every rank agrees on
    records: dict = field(default_factory=dict)     # (machine, shard) -> record dict at `iteration`


def plan_recovery(ranks: list[RankInfo], inventories: dict[str, list[dict]], job_id: str) -> RecoveryPlan:
    """`inventories`: machine -> the verified commit records (as dicts) its store holds."""
    expected = {r.shard: r.layout_hash for r in ranks}
    machines = {r.machine for r in ranks}
    # (shard, iteration) -> {machine: record}, only usable copies on live machines.
    copies: dict[tuple[str, int], dict[str, dict]] = {}
    for machine, records in inventories.items():
        if machine not in machines:
            continue
        for rec in records:
            if rec["job_id"] != job_id or expected.get(rec["shard"]) != rec["layout_hash"]:
                continue
            copies.setdefault((rec["shard"], rec["iteration"]), {})[machine] = rec
    per_shard = [{it for (s, it) in copies if s == shard} for shard in expected]
    common = set.intersection(*per_shard) if per_shard else set()
    if not common:
        return RecoveryPlan(iteration=None)
    it = max(common)
    plan = RecoveryPlan(iteration=it)
    leaders = machine_leaders(ranks)
    for r in sorted(ranks, key=lambda r: r.rank):
        holders = copies[(r.shard, it)]
        plan.records.update({(m, r.shard): rec for m, rec in holders.items()})
        if r.machine in holders:
            plan.source[r.rank] = "local"
            continue
        # Spread the load: the k-th rank needing this shard goes to the k-th holder.
        need_before = sum(1 for f in plan.fetches if f.shard == r.shard)
        src_machine = sorted(holders)[need_before % len(holders)]
        rec = holders[src_machine]
        plan.source[r.rank] = "peer"
        plan.fetches.append(Fetch(src_rank=leaders[src_machine], dst_rank=r.rank, shard=r.shard,
                                  iteration=it, nbytes=rec["nbytes"], checksum=rec["checksum"],
                                  src_machine=src_machine))
    return plan


def stale_records(inventory: list[dict], iteration: int) -> list[dict]:
    """Records newer than the agreed iteration: left by the failed timeline, to be dropped
    so they cannot be mistaken for the re-run of the same iteration later."""
    return [rec for rec in inventory if rec["iteration"] > iteration]

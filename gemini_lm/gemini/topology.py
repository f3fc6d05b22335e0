"""GeminiTopology: who holds which shard on which machine, and where each copy is sent.

Built once at start-up from one all-gather of every rank's RankInfo, then frozen and
handed to whatever needs it (restore, exchange, persister), like torchtitan's
ParallelDims: nobody asks the Checkpointer for ranks, machines or routes.

- a machine's *leader* is its lowest rank: it reads its machine's store at recovery and
  receives the replicas sent to that machine;
- a shard's *writer* on a machine is the lowest rank there holding it: data-parallel
  replicas on one machine hold identical bytes, so one snapshot per machine is enough;
- *routes* are the replication sends (shard, sender rank, receiver rank) derived from
  the placement plan, counting data-parallel copies on other machines as replicas.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

from gemini_lm.errors import UsageError
from gemini_lm.gemini.placement import Placement, plan_placement, replication_plan


def machine_id() -> str:
    """This process's machine: GEMINI_MACHINE_ID (set by local_cluster or the user), else the host name."""
    return os.environ.get("GEMINI_MACHINE_ID") or socket.gethostname()


@dataclass(frozen=True)
class RankInfo:
    rank: int
    machine: str
    shard: str
    layout_hash: str
    nbytes: int = 0      # its snapshot's size: a receiver sizes the replica's slot with it


@dataclass(frozen=True)
class Route:
    shard: str
    src_rank: int
    dst_rank: int
    src_machine: str
    dst_machine: str


def machine_leaders(ranks) -> dict[str, int]:
    """The lowest rank of each machine: it reads and serves that machine's store."""
    leaders: dict[str, int] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        leaders.setdefault(r.machine, r.rank)
    return leaders


def build_routes(rank_infos, replication: dict[str, list[tuple[str, str]]]) -> list[Route]:
    """Turn (shard, src_machine, dst_machine) sends into rank-to-rank routes: the shard's
    writer on the source machine sends, the destination machine's leader receives."""
    writers: dict[tuple[str, str], int] = {}
    for r in sorted(rank_infos, key=lambda r: r.rank):
        writers.setdefault((r.machine, r.shard), r.rank)
    leaders = machine_leaders(rank_infos)
    return [Route(shard, writers[(src_m, shard)], leaders[dst_m], src_m, dst_m)
            for shard, sends in sorted(replication.items()) for src_m, dst_m in sends]


@dataclass(frozen=True)
class GeminiTopology:
    rank: int
    machine: str
    shard: str
    infos: tuple[RankInfo, ...]       # every rank's, by rank
    machines: tuple[str, ...]         # in order of their lowest rank (the placement order)
    leaders: dict                     # machine -> its lowest rank
    placement: Placement
    routes: tuple[Route, ...]

    @classmethod
    def from_infos(cls, rank: int, infos: list[RankInfo], replicas: int, strategy: str) -> "GeminiTopology":
        """Pure: the same infos give every rank the same topology."""
        infos = sorted(infos, key=lambda r: r.rank)
        me = infos[rank]
        machines = tuple(dict.fromkeys(r.machine for r in infos))
        # Where each shard already lives: data-parallel copies count toward the m replicas.
        shard_machines = {s: list(dict.fromkeys(r.machine for r in infos if r.shard == s))
                          for s in dict.fromkeys(r.shard for r in infos)}
        try:
            placement = plan_placement(list(machines), replicas, strategy)
        except ValueError as exc:   # e.g. group placement whose m does not divide this launch's N
            raise UsageError(f"--gemini-replicas {replicas} --gemini-placement {strategy}: {exc}") from None
        routes = build_routes(infos, replication_plan(shard_machines, placement))
        return cls(rank, me.machine, me.shard, tuple(infos), machines, machine_leaders(infos),
                   placement, tuple(routes))

    @classmethod
    def gather(cls, rank: int, world_size: int, machine: str, shard: str, layout_hash: str,
               replicas: int, strategy: str, nbytes: int = 0) -> "GeminiTopology":
        """Collective: every rank publishes its RankInfo on the default group."""
        infos: list = [None] * world_size
        dist.all_gather_object(infos, RankInfo(rank, machine, shard, layout_hash, nbytes))
        return cls.from_infos(rank, infos, replicas, strategy)

    @property
    def is_leader(self) -> bool:
        return self.leaders[self.machine] == self.rank

    @property
    def is_writer(self) -> bool:
        return min(r.rank for r in self.infos if r.machine == self.machine and r.shard == self.shard) == self.rank

    def out_routes(self) -> list[Route]:
        return [r for r in self.routes if r.src_rank == self.rank]

    def in_routes(self) -> list[Route]:
        return [r for r in self.routes if r.dst_rank == self.rank]

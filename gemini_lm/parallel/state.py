"""ParallelState: who this rank is and which process groups it talks on.

Passed explicitly to every layer and function that communicates (no module globals).
Tensor-parallel groups are runs of `tp_size` consecutive ranks (so TP stays inside a
machine when ranks are packed per machine); data-parallel groups stride across them.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.parallel.timeline import CollectiveTimeline


@dataclass
class ParallelState:
    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: object   # torch.distributed.ProcessGroup
    dp_group: object
    tp_ranks: list
    dp_ranks: list
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeline: CollectiveTimeline = field(default_factory=CollectiveTimeline)
    timeout: datetime.timedelta | None = None   # of the groups' collectives (None: torch's default)

    @classmethod
    def initialize(cls, tp_size: int, device: torch.device | str = "cpu",
                   timeout: datetime.timedelta | None = None) -> "ParallelState":
        """Build groups on an initialized default process group. Every rank must call this.
        `timeout`: for the new groups' collectives (torch's default is 30 minutes)."""
        assert dist.is_initialized(), "init_process_group() first"
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp_size < 1 or world % tp_size:
            raise ValueError(f"world size {world} is not divisible by tensor-model-parallel size {tp_size}")
        dp_size = world // tp_size
        tp_group = dp_group = None
        tp_ranks = dp_ranks = None
        # new_group is collective over the whole world: every rank creates every group.
        for i in range(dp_size):
            ranks = list(range(i * tp_size, (i + 1) * tp_size))
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group, tp_ranks = g, ranks
        for j in range(tp_size):
            ranks = list(range(j, world, tp_size))
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group, dp_ranks = g, ranks
        return cls(rank=rank, world_size=world, tp_size=tp_size, tp_rank=rank % tp_size,
                   dp_size=dp_size, dp_rank=rank // tp_size, tp_group=tp_group, dp_group=dp_group,
                   tp_ranks=tp_ranks, dp_ranks=dp_ranks, device=torch.device(device), timeout=timeout)

    def rebuild_groups(self) -> None:
        """After a new generation's init_process_group: this rank's new TP/DP groups, in place
        (layers and the DDP wrapper hold this object). The rank keeps its place."""
        new = ParallelState.initialize(self.tp_size, self.device, timeout=self.timeout)
        if (new.rank, new.world_size) != (self.rank, self.world_size):
            raise RuntimeError(f"rank {self.rank}/{self.world_size} became {new.rank}/{new.world_size}")
        self.tp_group, self.dp_group, self.tp_ranks, self.dp_ranks = new.tp_group, new.dp_group, new.tp_ranks, new.dp_ranks

    def drop_groups(self) -> None:
        """Forget this generation's groups (destroy_process_group follows): once nothing holds
        them, their connections close and peers blocked on them fail at once."""
        self.tp_group = self.dp_group = None

    @property
    def shard_id(self) -> str:
        """Name of the model/optimizer shard this rank holds; DP replicas share it."""
        return shard_id(self.tp_rank)

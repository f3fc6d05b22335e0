"""Names of things in a checkpoint, in one place: shards, iterations, files, the format tag."""
from __future__ import annotations

import re

FORMAT = "gemini_lm/1"                              # in snapshot metadata and manifest.json
TRACKER = "latest_checkpointed_iteration.txt"       # Megatron's name; written last
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"                         # an iteration directory being assembled
_SHARD = re.compile(r"tp(\d{2,})(?:dp\d{2,})?")


def shard_id(tp_rank: int, dp_rank: int | None = None) -> str:
    """The name of a tensor-parallel shard (data-parallel replicas share it): tp00, tp01, ...
    With `dp_rank` (the distributed optimizer: each DP rank's snapshot is unique): tp00dp01."""
    return f"tp{tp_rank:02d}" if dp_rank is None else f"tp{tp_rank:02d}dp{dp_rank:02d}"


def shard_ids(tp_size: int) -> list[str]:
    return [shard_id(r) for r in range(tp_size)]


def tp_rank_of(shard: str) -> int:
    m = _SHARD.fullmatch(shard)
    if m is None:
        raise ValueError(f"not a shard id: {shard!r}")
    return int(m.group(1))


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def parse_iter_dir_name(name: str) -> int | None:
    """The iteration of a complete iteration directory's name, else None."""
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return None


def shard_file_name(tp_rank: int) -> str:
    return f"tp_rank_{tp_rank:02d}.safetensors"


def shard_sidecar_name(tp_rank: int) -> str:
    """A persisted shard's manifest entry, left beside it until the finalizer collects it."""
    return f"tp_rank_{tp_rank:02d}.json"

"""Agreement on the interleaving plan's inputs: every rank must derive the same moments
for every chunk, the receiver's irecv at the same point as the sender's isend.

Each rank profiled its own iterations and (if it sends) measured its own link, so the
inputs differ a little from rank to rank. One all-gather of fixed-size tensors settles
them: the gaps (and their timeline points) of the lowest rank that has a profile, the
largest measured per-message cost and the smallest measured bandwidth (the slowest
link decides). None everywhere if no rank profiled or none measured.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gemini_lm.gemini.interleave import Profile

MAX_GAPS = 256   # more gaps than this per iteration: the later ones go unused
_HEAD = 6        # has_profile, alpha, bandwidth, update_s, iteration_s, gap count


def encode(p: Profile | None) -> torch.Tensor:
    t = torch.zeros(_HEAD + 3 * MAX_GAPS, dtype=torch.float64)
    if p is None:
        return t
    n = min(len(p.gaps), MAX_GAPS)
    t[:_HEAD] = torch.tensor([1.0, p.alpha, p.bandwidth, p.update_s, p.iteration_s, n], dtype=torch.float64)
    for i in range(n):
        t[_HEAD + 3 * i:_HEAD + 3 * i + 3] = torch.tensor([*p.gaps[i], p.points[i]], dtype=torch.float64)
    return t


def combine(rows: list[torch.Tensor]) -> Profile | None:
    """Pure: the agreed profile from every rank's encoded one, in rank order."""
    have = [r for r in rows if r[0] == 1.0]
    measured = [r for r in have if math.isfinite(float(r[1])) and float(r[2]) > 0]
    if not have or not measured:
        return None
    src, n = have[0], int(have[0][5])
    g = src[_HEAD:_HEAD + 3 * n].view(n, 3).tolist()
    return Profile(gaps=tuple((s, e) for s, e, _ in g), points=tuple(int(pt) for _, _, pt in g),
                   update_s=float(src[3]), iteration_s=float(src[4]),
                   alpha=max(float(r[1]) for r in measured), bandwidth=min(float(r[2]) for r in measured))


def agree_profile(local: Profile | None, group, world_size: int) -> Profile | None:
    """Collective over `group` (every rank): the same Profile (or None) on every rank."""
    rows = [torch.empty(_HEAD + 3 * MAX_GAPS, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(rows, encode(local), group=group)
    return combine(rows)

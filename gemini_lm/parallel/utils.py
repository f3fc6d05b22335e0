"""Pure helpers for tensor parallelism: divisibility, sharding, weight initializers.

No communication here, so layers, checkpoint conversion and tests can all use them.

A *strided* shard follows Megatron: a fused weight such as QKV is `stride` equal parts
along `dim`; each part is split into `tp_size` chunks and rank r holds chunk r of every
part, concatenated. With stride=3, rank r thus holds its own heads' q, k and v.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

InitMethod = Callable[[torch.Tensor], None]


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator, which must divide exactly."""
    if denominator <= 0 or numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def shard_tensor(full: torch.Tensor, dim: int, tp_rank: int, tp_size: int,
                 stride: int = 1) -> torch.Tensor:
    """The slice of `full` along `dim` that tensor-parallel rank `tp_rank` holds (a copy)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    chunk = divide(full.size(dim), stride * tp_size)
    parts = full.split(chunk * tp_size, dim=dim)
    return torch.cat([p.narrow(dim, tp_rank * chunk, chunk) for p in parts], dim=dim)


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of shard_tensor: the full tensor from every rank's shard, in rank order."""
    if not shards:
        raise ValueError("no shards to unshard")
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"shards differ in shape: {sorted(shapes)}")
    chunk = divide(shards[0].size(dim), stride)
    pieces = [s.split(chunk, dim=dim) for s in shards]          # pieces[rank][part]
    return torch.cat([pieces[r][p] for p in range(stride) for r in range(len(shards))], dim=dim)


def init_method_normal(std: float = 0.02) -> InitMethod:
    """N(0, std) in place, drawn from the default torch generator."""
    def init_(tensor: torch.Tensor) -> None:
        torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)): for projections that add into the residual stream."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True when `param` is a shard that differs across TP ranks (not a replica)."""
    return bool(getattr(param, "tensor_model_parallel", False))

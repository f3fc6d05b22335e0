"""Process-group start-up: torchrun's environment, or a one-process world without it."""
from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from gemini_lm.config import Config
from gemini_lm.errors import UsageError
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.state import ParallelState

T = TypeVar("T")


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.parallel.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_timeout(cfg: Config) -> datetime.timedelta:
    p = cfg.parallel
    if p.distributed_timeout_seconds is not None:
        return datetime.timedelta(seconds=p.distributed_timeout_seconds)
    return datetime.timedelta(minutes=p.distributed_timeout_minutes)


def restart_scoped_agent_store(timeout: datetime.timedelta) -> dist.Store:
    """The torchrun agent's store, under a key prefix of this restart's own.

    Under torchrun's static rendezvous (and a shared c10d store) workers use the agent's
    store, which outlives every restart: gloo's rank addresses from the previous restart
    are still there, and a new rank that looks before its peer rewrote them connects to
    a dead port ("connectFullMesh failed ... Connection refused", about half the restarts
    here). A fresh prefix per TORCHELASTIC_RESTART_COUNT leaves nothing stale to read.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"gemini_lm/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def initialize_distributed(cfg: Config, init_group: Callable | None = None) -> ParallelState:
    """Join the world and build the TP/DP groups. The world: `init_group(backend, timeout,
    **kwargs)` when given (a generation of in-place recovery, training/inplace.py), else
    torchrun's environment, else a world of one."""
    device = resolve_device(cfg)
    backend = cfg.parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UsageError("--distributed-backend nccl needs --device cuda")
    if cfg.gemini.gemini_transport == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise UsageError("--gemini-transport nccl needs --device cuda and a torch built with NCCL")
    timeout = collective_timeout(cfg)
    if backend == "nccl":
        # Host tensors (recovery's inventory and peer fetches, input checks) go over gloo on
        # the same groups; device tensors over NCCL.
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if "nccl" in backend else {}
        if init_group is not None:
            init_group(backend, timeout, **kwargs)
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                kwargs.update(store=restart_scoped_agent_store(timeout), rank=int(os.environ["RANK"]),
                              world_size=int(os.environ["WORLD_SIZE"]))
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            # `python pretrain_gpt.py`: a world of one, no rendezvous needed.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    try:
        return ParallelState.initialize(cfg.parallel.tensor_model_parallel_size, device, timeout=timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


_MESSAGE_BYTES = 1024


def all_ranks_or_none(ps: ParallelState, check: Callable[[], T]) -> T:
    """Run an input check on every rank; if it raised UsageError anywhere, raise it everywhere.

    A rank that fails alone (a file only its machine lacks) would otherwise leave the others
    waiting in the next collective. `check` must not itself run collectives. The message of
    the lowest failing rank travels as bytes in a tensor (no pickling).
    """
    message, result = b"", None
    try:
        result = check()
    except UsageError as exc:
        message = str(exc).encode()[:_MESSAGE_BYTES] or b"bad input"
    if ps.world_size == 1:
        if message:
            raise UsageError(message.decode(errors="replace"))
        return result
    first = torch.tensor([ps.rank if message else ps.world_size], dtype=torch.int64, device=ps.device)
    with peer_failures("input check"):
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    if src == ps.world_size:
        return result
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=ps.device)
    if ps.rank == src:
        buf[:len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    with peer_failures("input check"):
        dist.broadcast(buf, src)
    raise UsageError(bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace"))

"""Run a function on N gloo ranks in spawned processes; a failing rank fails the test.

Usage:
    def _body(rank, world_size, tmp_path, arg): ...      # module-level, picklable
    results = run_ranks(_body, world_size=2, tmp_path=tmp_path, args=(arg,))

Each rank's return value comes back in `results[rank]` (it must be picklable).
"""
from __future__ import annotations

import datetime
import os
from queue import Empty
import time
import traceback
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world_size, init_file, timeout_s, args, queue, backend="gloo"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Each rank is its own host to NCCL: ranks sharing one GPU then talk over NCCL's
    # network transport, as across machines, instead of failing "duplicate GPU".
    os.environ["NCCL_HOSTID"] = f"gemini-test-rank{rank}"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        kwargs = {}
        if "nccl" in backend:
            torch.cuda.set_device(rank % torch.cuda.device_count())
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Like the training entry points (errors.run_cli(hard_exit=True)): skip interpreter
    # teardown, where gloo's threads can abort a finished process. The result must be
    # out of the queue's feeder thread first.
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_ranks(fn, world_size: int, tmp_path, args=(), timeout_s: float = 60.0, backend: str = "gloo"):
    """Spawn `world_size` processes running fn(rank, world_size, *args); return list of results.
    `backend`: of the default group, e.g. "cpu:gloo,cuda:nccl" for GPU tests."""
    # A fresh rendezvous file per world: a FileStore left by an earlier world holds stale keys.
    init_file = os.path.join(str(tmp_path), f"dist_init_{uuid.uuid4().hex}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, fn, world_size, init_file, timeout_s, args, queue, backend))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout_s * 3
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except Empty:
                # A rank that died without reporting (segfault, SIGKILL) fails the test now.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                elif time.monotonic() > deadline:
                    errors.append(f"ranks did not report within {timeout_s * 3:.0f}s")
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            # A busy 2-core machine can take seconds to tear a rank down; only cut short on error.
            p.join(timeout=timeout_s if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if os.path.exists(init_file):
        os.remove(init_file)
    if errors:
        raise AssertionError("\n".join(errors))
    dead = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    assert not dead, f"ranks exited with {dead}"
    return [results[r] for r in range(world_size)]

"""A peer's death is detected where it happens, as a PeerLostError, on a real gloo group."""
import datetime
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemini_lm.errors import PeerLostError
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.resilience.handler import is_peer_failure



def _rank(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    t = torch.ones(4)
    with peer_failures("warm-up"):
        dist.all_reduce(t)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)   # a real death, mid-job
    try:
        with peer_failures("DP all-reduce"):
            dist.all_reduce(t)
        queue.put(("no error", False, ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((type(exc).__name__, is_peer_failure(exc), str(exc)[:200]))
    # put() hands the message to a feeder thread: os._exit right after it could drop it (on a
    # busy machine it did, and the test waited its full minute). Flush it first (tests/dist.py).
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.mark.slow
def test_a_killed_peer_surfaces_as_peer_lost_error(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        name, classified, message = queue.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert name == "PeerLostError" and classified, message
    assert message.startswith("DP all-reduce:")
    assert procs[1].exitcode == -signal.SIGKILL


def test_a_bug_inside_keeps_its_type():
    with pytest.raises(ValueError):
        with peer_failures("x"):
            raise ValueError("not a peer's fault")
    with pytest.raises(PeerLostError):
        with peer_failures("x"):
            raise RuntimeError("what a failed torch.distributed call raises on gloo")

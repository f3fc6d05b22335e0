"""Only the training thread issues communication: every collective and point-to-point
operation of a real interleaved run (2 machines of one rank each, TP=2, m=2, persisting
to --save) goes to its process group from the thread that trains, and checkpoint chunks
go at the timeline's points inside iterations. NCCL's contract (one issuing thread, one
agreed order) is then kept by construction; gloo runs the same code, so CI checks it.

The record is taken at the ProcessGroup level (its methods wrapped in the ranks' own
processes, calling the real ones): whatever layer issues an operation, it is seen.
Replication stays correct: each machine ends with a checksum-valid replica of the
other's final snapshot. The staged mode (`--gemini-transport nccl`; `gloo-staged` is its code
on CPU) is checked alike: its copier thread only copies."""
import os
import threading
import traceback

import pytest

from tests.dist import run_ranks
from tests.e2e import tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

MACHINES = ["m0", "m1"]
ITERS, PROFILE = 8, 2
ISSUING = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "_allgather_base",
           "allgather_into_tensor_coalesced", "all_gather_single", "broadcast", "reduce", "gather",
           "scatter", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
           "alltoall", "alltoall_base", "all_to_all_single", "send", "recv", "recv_anysource",
           "barrier", "monitored_barrier")


def _instrument(calls: list) -> None:
    """Wrap each issuing method of torch's ProcessGroup to record (method, thread, whether
    the exchange issued it at a timeline point), then call the real method."""
    import torch.distributed as dist

    pg = dist.ProcessGroup
    for name in ISSUING:
        real = getattr(pg, name, None)
        if real is None:
            continue

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            at_point = _name in ("send", "recv") and any(f.name == "at_point" for f in traceback.extract_stack())
            calls.append((_name, threading.get_ident(), threading.current_thread().name, at_point, id(self)))
            return _real(self, *args, **kwargs)

        setattr(pg, name, wrapped)


def _body(rank, world_size, argv, root):
    os.environ["GEMINI_MACHINE_ID"] = MACHINES[rank]
    calls: list = []
    _instrument(calls)
    import pretrain_gpt
    from gemini_lm.config import parse_config
    from gemini_lm.checkpoint.naming import shard_id
    from gemini_lm.gemini.store import MemoryStore

    cfg = parse_config(argv, world_size=world_size)
    pretrain_gpt.pretrain(cfg, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                          pretrain_gpt.gpt_forward_step)
    trainer = threading.main_thread().ident   # run_ranks trains on the process's main thread
    others = sorted({(name, thread) for name, ident, thread, _, _ in calls if ident != trainer})
    at_points = sum(1 for name, _, _, p, _ in calls if p)
    groups = len({group for _, _, _, p, group in calls if p})   # staged: the payload group too
    # The other machine's final snapshot of this rank's peer shard, received here intact.
    peer_shard = shard_id(0, 1 - rank) if cfg.parallel.use_distributed_optimizer else shard_id(1 - rank)
    store = MemoryStore(root, "j", MACHINES[rank])
    replicas = [r.iteration for r in store.records(peer_shard) if r.source == MACHINES[1 - rank]]
    for rec in store.records(peer_shard):
        with store.open(rec, verify=True):
            pass
    return others, at_points, max(replicas, default=None), len(calls), groups, sorted({name for name, *_ in calls})


TP2 = ("--tensor-model-parallel-size", "2")
DP2_OVERLAP = ("--tensor-model-parallel-size", "1", "--use-distributed-optimizer", "--overlap-param-gather")


@pytest.mark.parametrize("transport, parallel", [("gloo", TP2), ("gloo-staged", TP2), ("gloo", DP2_OVERLAP)],
                         ids=["tp2", "tp2_staged", "dp2_overlap_param_gather"])   # gloo-staged: the nccl path's code
def test_only_the_training_thread_issues_collectives_and_p2p(byte_corpus, tmp_path, transport, parallel):
    """DP=2 with --overlap-param-gather: the param all-gather is launched by the update and
    waited for by the next forward, both on the training thread, at the same points everywhere."""
    argv = tiny_gpt_args(byte_corpus, str(tmp_path / "log"), "--train-iters", str(ITERS),
                         "--gemini-transport", transport, "--lr-decay-iters", "20", *parallel,
                         "--gemini-store-dir", str(tmp_path / "shm"), "--gemini-job-id", "j",
                         "--gemini-keep-store", "--gemini-profile-iters", str(PROFILE),
                         "--gemini-buffer-mb", "0.25", "--gemini-replication-interval", "1",
                         "--save", str(tmp_path / "ckpt"), "--save-interval", "3")
    results = run_ranks(_body, 2, tmp_path, args=(argv, str(tmp_path / "shm")), timeout_s=180)
    if "--use-distributed-optimizer" in parallel:   # each DP rank is its own shard
        assert all(any(name in ("all_gather_single", "_allgather_base") for name in names)
                   for *_, names in results)
    for others, at_points, newest_replica, total, groups, _ in results:
        assert total > 100                     # the instrument saw the run's traffic
        assert others == [], others            # no thread but the trainer issued anything
        assert at_points > 0                   # chunks went at points inside iterations
        assert newest_replica == ITERS         # the last snapshot reached the peer, intact
        assert groups == (2 if transport == "gloo-staged" else 1)   # payload and trailers; or one group

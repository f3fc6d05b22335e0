"""The training thread's exchange on real gloo ranks, and the agreement on the plan's inputs.

Two machines replicate to each other at once; chunks are issued at the points the plan
names (one batch per point), points that never come are flushed at the deadline, and the
replica is committed with the sender's checksum only at the deadline. Pure tests of the
agreement: every rank gets the same inputs from different local ones."""
import math

import torch.distributed as dist

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.agreement import combine, encode
from gemini_lm.gemini.exchange import Exchange
from gemini_lm.gemini.interleave import Profile
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.topology import Route
from tests.dist import run_ranks
from tests.gemini.replica import assert_peer_replica, peer_replicas, toy_state


def _exchange_body(rank, world_size, root):
    routes = [Route(shard_id(0), 0, 1, "m0", "m1"), Route(shard_id(1), 1, 0, "m1", "m0")]
    store = MemoryStore(root, "job", f"m{rank}")
    layout = SnapshotLayout.build(toy_state(rank, 0), {"shard": shard_id(rank)})
    infos = [None, None]
    dist.all_gather_object(infos, (layout.nbytes, layout.layout_hash))
    senders = dict(enumerate(infos))
    nbytes = [n for n, _ in infos]
    ex = Exchange(routes, rank, dist.new_group(backend="gloo"), store, f"m{rank}", senders)
    batches = []
    real = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: batches.append(len(ops)) or real(ops)   # count batches (real ops)
    store.prepare(shard_id(rank), layout.nbytes)
    for k in (1, 2):
        w = store.begin_write(shard_id(rank), layout.nbytes, layout.layout_hash)
        layout.write(toy_state(rank, k), w.buffer)
        rec = store.commit(w, k)

        def chunks_of(route, k=k):
            n = nbytes[route.src_rank]
            cut = [0, n // 4, n // 2, 3 * n // 4, n]
            # gaps at points 0 and 2 of iteration k+1, the rest at its update, plus a
            # point (7) no iteration reaches: flushed at the deadline
            whens = [(k + 1, 0), (k + 1, 2), (k + 1, 7), (k + 1, None)]
            return [(a, b - a, wh) for a, b, wh in zip(cut, cut[1:], whens)]

        batches.clear()
        ex.begin(k, w.buffer, lambda rec=rec: rec, chunks_of, blocking=False)
        assert batches == []                        # nothing is due at the snapshot itself
        for point in (0, 1, 2, 3, None):             # iteration k+1 as the timeline reports it
            ex.at_point(k + 1, point)
        assert batches == [2, 2, 4]                  # one batch per planned point: a send and a receive each (+ trailers)
        assert ex.transfer.writes                    # received, not committed before the deadline
        assert not peer_replicas(store, rank, k)
        ex.finish()
        assert batches[-2:] == [2, 2]                # the point that never came, then the acks
        assert_peer_replica(store, rank, k)          # the sender's checksum over the bytes received
    dist.batch_isend_irecv = real
    dist.barrier()
    store.close()
    return True


def test_chunks_go_at_their_points_and_the_replica_commits_at_the_deadline(tmp_path):
    assert run_ranks(_exchange_body, 2, tmp_path, args=(str(tmp_path / "shm"),), timeout_s=60) == [True, True]


# ---- agreement (pure) ---------------------------------------------------------------------
def _profile(gaps, points, alpha=1e-4, bandwidth=1e9, update_s=0.1):
    return Profile(tuple(gaps), tuple(points), update_s, 0.12, alpha, bandwidth)


def test_the_lowest_profiled_rank_gives_the_gaps_and_the_slowest_link_the_costs():
    rows = [encode(None),                                                    # a fresh replacement
            encode(_profile([(0.0, 0.01), (0.02, 0.05)], [0, 1], 2e-4, 5e8)),
            encode(_profile([(0.0, 0.02)], [0], 1e-4, 2e9)),
            encode(_profile([(0.0, 0.03)], [0], math.inf, 0.0))]            # profiled, sends nothing
    p = combine(rows)
    assert p.gaps == ((0.0, 0.01), (0.02, 0.05)) and p.points == (0, 1)
    assert (p.alpha, p.bandwidth) == (2e-4, 5e8)
    assert p.update_s == 0.1 and p.iteration_s == 0.12
    assert combine(rows[::-1]).gaps == ((0.0, 0.03),)                       # rank order decides


def test_no_profile_or_no_measurement_anywhere_means_no_plan():
    assert combine([encode(None), encode(None)]) is None
    assert combine([encode(_profile([(0.0, 0.01)], [0], math.inf, 0.0))]) is None

"""The exchange's staged mode (`--gemini-transport nccl`) on real ranks: chunks go through p
reserved sub-buffers per route on the payload group, at most p of a route per batch,
both machines sending to each other at once; every byte lands in place and the replica
commits with the sender's checksum. On CPU the same code runs over gloo with host
sub-buffers; with CUDA the same tests run it through GPU sub-buffers over NCCL (two
ranks may share one GPU: each is its own NCCL host, see tests/dist.py)."""
import pytest
import torch
import torch.distributed as dist

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.exchange import Exchange, _waves
from gemini_lm.gemini.staging import Staging, connect_routes
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.topology import Route
from tests.dist import run_ranks
from tests.gemini.replica import assert_peer_replica, peer_replicas, toy_state

NCCL = torch.cuda.is_available() and dist.is_nccl_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not NCCL, reason="needs CUDA and NCCL"))]
SUB, NBUF = 1000, 3


def _device(kind):
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def _backend(kind):
    return "cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo"


def _chunks(nbytes, k):
    """3 full chunks at point 0 of iteration k+1, 2 at its point 2 (reusing sub-buffers
    seen complete at point 1), 1 at a point no iteration reaches (flushed at the
    deadline), then the rest at the update: more than p, in waves."""
    sizes = [SUB] * 3 + [SUB, 17] + [SUB]
    whens = [(k + 1, 0)] * 3 + [(k + 1, 2)] * 2 + [(k + 1, 7)]
    out, off = [], 0
    for n, when in zip(sizes, whens):
        out.append((off, n, when))
        off += n
    while off < nbytes:
        n = min(SUB, nbytes - off)
        out.append((off, n, (k + 1, None)))
        off += n
    return out


def _staged_body(rank, world_size, kind, root):
    dev = _device(kind)
    routes = [Route(shard_id(0), 0, 1, "m0", "m1"), Route(shard_id(1), 1, 0, "m1", "m0")]
    store = MemoryStore(root, "job", f"m{rank}", pin_memory=kind == "cuda")
    layout = SnapshotLayout.build(toy_state(rank, 0), {"shard": shard_id(rank)})
    infos = [None, None]
    dist.all_gather_object(infos, (layout.nbytes, layout.layout_hash))
    nbytes = [n for n, _ in infos]
    payload_group = dist.new_group(backend="nccl" if kind == "cuda" else "gloo")
    connect_routes(routes, payload_group, dev, SUB)
    staging = Staging(rank, routes, dev, SUB * NBUF, NBUF)
    ex = Exchange(routes, rank, dist.new_group(backend="gloo"), store, f"m{rank}", dict(enumerate(infos)),
                  staging=staging, payload_group=payload_group)
    batches = []
    real = dist.batch_isend_irecv

    def counting(ops):
        if ops[0].group is payload_group:
            per_route = {}
            for op in ops:
                key = (op.peer, op.op)   # a route: its peer and direction
                per_route[key] = per_route.get(key, 0) + 1
                assert op.tensor.device.type == dev.type and op.tensor.numel() <= SUB
            batches.append(max(per_route.values()))
        return real(ops)

    dist.batch_isend_irecv = counting
    store.prepare(shard_id(rank), layout.nbytes)
    for k in (1, 2, 3):   # the sub-buffers carry several snapshots in turn
        w = store.begin_write(shard_id(rank), layout.nbytes, layout.layout_hash)
        layout.write(toy_state(rank, k), w.buffer)
        rec = store.commit(w, k)
        batches.clear()
        ex.begin(k, w.buffer, lambda rec=rec: rec, lambda r, k=k: _chunks(nbytes[r.src_rank], k), blocking=False)
        for point in (0, 1, 2, 3, None):            # iteration k+1 as the timeline reports it
            ex.at_point(k + 1, point)
        assert batches[:2] == [3, 2]                 # point 0, point 2: one batch each
        assert all(n <= NBUF for n in batches)       # never more chunks of a route than sub-buffers
        assert len(batches) > 3                      # the update's chunks went in waves
        assert not peer_replicas(store, rank, k)
        ex.finish()
        assert_peer_replica(store, rank, k)          # the sender's checksum over the bytes received
    dist.batch_isend_irecv = real
    dist.barrier()
    ex.close()
    store.close()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("kind", DEVICES)
def test_staged_replicas_are_committed_intact_both_ways(tmp_path, kind):
    assert run_ranks(_staged_body, 2, tmp_path, args=(kind, str(tmp_path / "shm")), backend=_backend(kind),
                     timeout_s=60) == [True, True]


def _connect_body(rank, world_size, kind):
    # A ring (0->1->2->0) plus a pair sending both ways (0<->1): every rank is a sender and a
    # receiver on several routes at once, and the global order must still let all connect.
    routes = [Route("a", 0, 1, "m0", "m1"), Route("b", 1, 2, "m1", "m2"), Route("c", 2, 0, "m2", "m0"),
              Route("d", 1, 0, "m1", "m0")]
    group = dist.new_group(backend="nccl" if kind == "cuda" else "gloo")
    connect_routes(routes, group, _device(kind), SUB)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("kind", DEVICES)
def test_connect_routes_opens_every_route_without_deadlock(tmp_path, kind):
    assert run_ranks(_connect_body, 3, tmp_path, args=(kind,), backend=_backend(kind), timeout_s=30) == [True] * 3


def test_a_point_goes_in_waves_of_at_most_p_chunks_per_route():
    class Op:
        def __init__(self, route):
            self.route = route
    ops = [Op("a"), Op("a"), Op("b"), Op("a"), Op("a"), Op("b"), Op("a")]
    assert [[op.route for op in w] for w in _waves(ops, 2)] == [["a", "a", "b", "b"], ["a", "a"], ["a"]]
    assert _waves([], 2) == []


def test_a_chunk_larger_than_a_sub_buffer_is_refused():
    route = Route("s", 0, 1, "m0", "m1")
    staging = Staging(0, [route], torch.device("cpu"), buffer_bytes=4096, num_buffers=4)
    with pytest.raises(ValueError, match="exceeds the 1024-byte sub-buffer"):
        staging.stage(route, 0, torch.zeros(2048, dtype=torch.uint8), send=True)
    staging.close()

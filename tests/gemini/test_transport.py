"""Payload transports on real ranks: every byte arrives in place whatever the chunking,
with both machines sending to each other at once, and a replica travelling through the
staged (reserved-buffer) transport is committed checksum-valid on the peer.

On CPU the staged transport runs over gloo with host sub-buffers; with CUDA the same
tests run it through GPU sub-buffers over NCCL (two ranks may share one GPU: each is
its own NCCL host, see tests/dist.py)."""
import threading
from functools import partial

import pytest
import torch
import torch.distributed as dist

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.replicator import Replicator
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.topology import Route
from gemini_lm.gemini.transport import StagedTransport, connect_routes, route_groups
from tests.dist import run_ranks

NCCL = torch.cuda.is_available() and dist.is_nccl_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not NCCL, reason="needs CUDA and NCCL"))]
SUB, NBUF = 1000, 3


def _device(kind):
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def _backend(device):
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def _payload(rank, nbytes):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def _chunks(nbytes):
    """Full sub-buffers, a short one mid-stream, and a tail: more chunks than sub-buffers."""
    out, off, sizes = [], 0, [SUB, SUB, 17, SUB, SUB, SUB, SUB]
    for n in sizes:
        n = min(n, nbytes - off)
        if n <= 0:
            break
        out.append((off, n, ("gap", off)))
        off += n
    while off < nbytes:
        n = min(SUB, nbytes - off)
        out.append((off, n, None))
        off += n
    return out


def _exchange_body(rank, world_size, device, kind):
    """Rank r sends its payload to the other rank while receiving the other's, at once."""
    routes = [Route("s0", 0, 1, "m0", "m1"), Route("s1", 1, 0, "m1", "m0")]
    backend = "nccl" if device == "cuda" else "gloo"
    groups = route_groups(routes, backend, timeout=None)
    make = partial(StagedTransport, groups, _device(device), SUB * NBUF, NBUF)
    sender, receiver = make(), make()
    peer, nbytes = 1 - rank, 5_555 + 1_000 * rank
    data = _payload(rank, nbytes)
    if device == "cuda":
        data = data.pin_memory()
    gated = []
    out = torch.zeros(5_555 + 1_000 * peer, dtype=torch.uint8)
    if device == "cuda":
        out = out.pin_memory()
    t = threading.Thread(target=receiver.recv, args=(out, [n for _, n, _ in _chunks(out.numel())], peer, 1))
    t.start()
    timings = sender.send(data, _chunks(nbytes), peer, gated.append, 1)
    t.join(60)
    assert not t.is_alive()
    assert torch.equal(out, _payload(peer, out.numel()))
    assert [n for n, _ in timings] == [n for _, n, _ in _chunks(nbytes)]
    assert all(s >= 0 for _, s in timings)
    assert gated == [w for _, _, w in _chunks(nbytes) if w is not None]   # each gated chunk waited its turn
    for tr in (sender, receiver):
        tr.close()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_staged_transport_moves_every_byte_both_ways(tmp_path, device):
    run_ranks(_exchange_body, 2, tmp_path, args=(device, "staged"), backend=_backend(device),
              timeout_s=30)


def test_a_chunk_larger_than_a_sub_buffer_is_refused():
    t = StagedTransport({}, torch.device("cpu"), buffer_bytes=4096, num_buffers=4)
    with pytest.raises(ValueError, match="exceeds the 1024-byte sub-buffer"):
        t.send(torch.zeros(2048, dtype=torch.uint8), [(0, 2048, None)], 1, lambda w: None, 1)


def _replicate_body(rank, world_size, device, root):
    dev = _device(device)
    machine, shard = f"m{rank}", shard_id(rank)
    routes = [Route("tp00", 0, 1, "m0", "m1"), Route("tp01", 1, 0, "m1", "m0")]
    backend = "nccl" if device == "cuda" else "gloo"
    groups = route_groups(routes, backend, timeout=None)
    store = MemoryStore(root, "job", machine, pin_memory=device == "cuda")
    state = {"w": torch.randn(3000, generator=torch.Generator().manual_seed(rank)).to(dev),
             "step": torch.tensor([7 + rank])}
    layout = SnapshotLayout.build(state, {"shard": shard})
    store.prepare(shard, layout.nbytes)
    repl = Replicator(routes, rank, dist.new_group(backend="gloo"), store, machine, chunk_bytes=SUB,
                      transports=partial(StagedTransport, groups, dev, SUB * NBUF, NBUF))
    for iteration in (1, 2):
        state["w"].add_(1)
        w = store.begin_write(shard, layout.nbytes, layout.layout_hash)
        layout.write(state, w.buffer)
        rec = store.commit(w, iteration)
        repl.submit(store.open(rec, verify=False), shard)
        repl.wait()
    dist.barrier()
    repl.close()
    peer_shard = shard_id(1 - rank)
    [rec] = [r for r in store.records(peer_shard) if r.iteration == 2]
    with store.open(rec, verify=True) as view:   # the sender's checksum, over the received bytes
        got = view.tensors()
        expected = torch.randn(3000, generator=torch.Generator().manual_seed(1 - rank)).add_(1).add_(1)
        assert torch.equal(got["w"], expected) and int(got["step"]) == 8 - rank
    assert rec.source == f"m{1 - rank}"
    dist.barrier()
    store.close()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_replicas_through_the_staged_transport_are_committed_intact(tmp_path, device):
    run_ranks(_replicate_body, 2, tmp_path, args=(device, str(tmp_path / "shm")), backend=_backend(device),
              timeout_s=30)


def _connect_body(rank, world_size, device):
    # A ring (0->1->2->0) plus a pair sending both ways (0<->1): every rank is a sender and a
    # receiver on several routes at once, and the global order must still let all connect.
    routes = [Route("a", 0, 1, "m0", "m1"), Route("b", 1, 2, "m1", "m2"), Route("c", 2, 0, "m2", "m0"),
              Route("d", 1, 0, "m1", "m0")]
    backend = "nccl" if device == "cuda" else "gloo"
    groups = route_groups(routes, backend, timeout=None)
    connect_routes(routes, groups, _device(device), SUB)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_connect_routes_opens_every_route_without_deadlock(tmp_path, device):
    assert run_ranks(_connect_body, 3, tmp_path, args=(device,), backend=_backend(device), timeout_s=30) == [True] * 3

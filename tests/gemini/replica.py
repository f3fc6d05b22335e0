"""What the exchange tests share: a rank's small state, and the check that the peer's
snapshot of an iteration arrived here whole (two ranks, machines m0 and m1)."""
import torch

from gemini_lm.checkpoint.naming import shard_id


def toy_state(rank: int, iteration: int) -> dict[str, torch.Tensor]:
    w = torch.randn(5000, generator=torch.Generator().manual_seed(rank)) + iteration
    return {"w": w, "step": torch.tensor([iteration])}


def peer_replicas(store, rank: int, iteration: int) -> list:
    """The committed replicas of the other rank's shard at `iteration` in this rank's store."""
    return [r for r in store.records(shard_id(1 - rank)) if r.iteration == iteration]


def assert_peer_replica(store, rank: int, iteration: int) -> None:
    """Exactly one replica, its bytes match the sender's checksum and state, from the peer's machine."""
    [got] = peer_replicas(store, rank, iteration)
    with store.open(got, verify=True) as view:
        t = view.tensors()
        assert torch.equal(t["w"], toy_state(1 - rank, iteration)["w"]) and int(t["step"]) == iteration
    assert got.source == f"m{1 - rank}"

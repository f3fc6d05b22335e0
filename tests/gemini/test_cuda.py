"""GEMINI on GPU, end to end: two ranks play two machines (TP=2, each machine holds its
shard and the other's replica) with the state on CUDA, NCCL for training collectives,
checkpoint payloads over NCCL (through the reserved GPU buffer) or gloo, snapshots
copied off the GPU on a side stream. A machine whose memory is lost recovers from its peer and continues
bit for bit like the uninterrupted run, dropout on (the CUDA RNG must come back too): every loss and
the whole final state (weights, Adam moments, schedule, every RNG, data position). Two ranks may
share one GPU (tests/dist.py)."""
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from tests.e2e import read_losses, read_metrics, read_recoveries, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                                reason="needs CUDA and NCCL")
NCCL = "cpu:gloo,cuda:nccl"
MACHINES = ["m0", "m1"]


def _args(data, tmp_path, name, iters, *extra):
    log_dir = str(tmp_path / name)
    return log_dir, tiny_gpt_args(data, log_dir, "--device", "cuda", "--train-iters", str(iters),
                                  "--lr-decay-iters", "20", "--tensor-model-parallel-size", "2",
                                  "--gemini-store-dir", str(tmp_path / "shm"), "--gemini-job-id", "j",
                                  "--gemini-keep-store", "--gemini-profile-iters", "3",
                                  "--gemini-buffer-mb", "0.25", "--hidden-dropout", "0.1",
                                  "--attention-dropout", "0.1", *extra)


@pytest.mark.parametrize("transport,interleave", [("nccl", "on"), ("nccl", "off"), ("gloo", "off")])
def test_peer_recovery_on_gpu_continues_bit_for_bit(byte_corpus, tmp_path, transport, interleave):
    flags = ("--gemini-interleave", interleave, "--gemini-replication-interval", "1",
             "--gemini-transport", transport)
    ref_log, ref = _args(byte_corpus, tmp_path / "ref", "ref", 16, *flags, "--save", str(tmp_path / "ref_ck"))
    run_pretrain(tmp_path, ref, world_size=2, machines=MACHINES, backend=NCCL, timeout_s=180)
    reference = dict(read_losses(ref_log))
    metrics = read_metrics(ref_log)
    assert any("gemini_d2h_wait_s" in m for m in metrics)          # snapshots went the side-stream way
    assert any(m.get("gemini_repl_send_s") for m in metrics)       # and travelled

    log, first = _args(byte_corpus, tmp_path, "run", 8, *flags)
    run_pretrain(tmp_path, first, world_size=2, machines=MACHINES, backend=NCCL, timeout_s=180)
    shutil.rmtree(tmp_path / "shm" / "j" / "m0")                  # m0's memory is lost
    _, second = _args(byte_corpus, tmp_path, "run", 16, *flags, "--save", str(tmp_path / "ck"))
    run_pretrain(tmp_path, second, world_size=2, machines=MACHINES, backend=NCCL, timeout_s=180)
    [rec] = read_recoveries(log)
    # The first run finished cleanly, so its last replica (m0's shard of 8) reached m1.
    assert (rec["source"], rec["iteration"], rec["peer_ranks"]) == ("peer", 8, [0])
    losses = read_losses(log)
    assert [it for it, _ in losses] == list(range(1, 17))            # 1-8, then 9-16 after recovery
    for it, loss in losses:
        assert loss == reference[it], it                            # bit for bit, dropout on
    for tp in range(2):                                              # the whole state, tensor by tensor
        name = f"iter_0000016/tp_rank_{tp:02d}.safetensors"
        a, b = safe_open(str(tmp_path / "ref_ck" / name), "pt"), safe_open(str(tmp_path / "ck" / name), "pt")
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

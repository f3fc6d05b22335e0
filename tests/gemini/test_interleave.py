"""Replication on 4 gloo ranks (4 simulated machines, TP=4, m=2): while profiling, each
snapshot is on its peer before the next iteration starts (the blocking schedule); past
profiling, each peer holds a complete, checksum-valid replica of the previous one at the
start of every iteration (interleaved); recovery from a peer continues bit for bit. Over
gloo and through the staged mode of `--gemini-transport nccl` (`gloo-staged`: its code on CPU)."""
import pytest
import os
import shutil

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.gemini.store import MemoryStore
from tests.dist import run_ranks
from tests.e2e import read_losses, read_metrics, read_recoveries, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

MACHINES = ["m0", "m1", "m2", "m3"]
PROFILE = 3


def _argv(data, tmp_path, name, iters, *extra):
    log_dir = str(tmp_path / name)
    return log_dir, tiny_gpt_args(data, log_dir, "--train-iters", str(iters), "--lr-decay-iters", "20",
                                  "--tensor-model-parallel-size", "4", "--gemini-store-dir",
                                  str(tmp_path / "shm"), "--gemini-job-id", "j", "--gemini-keep-store",
                                  "--gemini-profile-iters", str(PROFILE), "--gemini-buffer-mb", "0.25",
                                  "--global-batch-size", "2",   # one micro-batch per iteration
                                  "--gemini-replication-interval", "1",   # every snapshot travels
                                  *extra)


def _checking_body(rank, world_size, argv, root):
    """pretrain_gpt on this rank, checking at the start of every iteration k+1 that the
    replica of snapshot k (while profiling) or k-1 (interleaved: snapshot k travels during
    iteration k+1) of this rank's shard is committed and intact on m machines."""
    os.environ["GEMINI_MACHINE_ID"] = MACHINES[rank]
    import pretrain_gpt
    from gemini_lm.config import parse_config

    shard, seen = shard_id(rank), []

    def forward_step(model, batch):
        seen.append(None)
        it = len(seen)            # this forward belongs to iteration `it` (one micro-batch)
        k = it - 1                # the iteration that just completed
        due = k if k <= PROFILE else k - 1
        if due >= 1:              # a peer copy from the very first snapshot on
            holders = []
            for m in MACHINES:
                store = MemoryStore(root, "j", m)
                for rec in store.records(shard):
                    if rec.iteration == due:
                        with store.open(rec, verify=True):
                            holders.append(m)
            assert len(holders) == 2, (shard, due, holders)
        return pretrain_gpt.gpt_forward_step(model, batch)

    cfg = parse_config(argv, world_size=world_size)
    pretrain_gpt.pretrain(cfg, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, forward_step)
    return len(seen)


@pytest.mark.parametrize("transport", ["gloo", "gloo-staged"])   # gloo-staged: the nccl path's code
def test_interleaved_replicas_are_complete_every_iteration(byte_corpus, tmp_path, transport):
    ref_log, ref = _argv(byte_corpus, tmp_path / "ref", "ref", 14, "--no-gemini")
    run_pretrain(tmp_path, ref, world_size=4)
    reference = dict(read_losses(ref_log))

    log, argv = _argv(byte_corpus, tmp_path, "run", 10, "--gemini-transport", transport)
    assert run_ranks(_checking_body, 4, tmp_path, args=(argv, str(tmp_path / "shm")),
                     timeout_s=180) == [10] * 4
    planned = [r for r in read_metrics(log) if "gemini_interleave_leftover_bytes" in r]
    assert planned and planned[-1]["iteration"] == 10 and planned[-1]["gemini_interleave_every"] == 1
    assert read_losses(log) == [(i, reference[i]) for i in range(1, 11)]   # GEMINI changes nothing

    shutil.rmtree(tmp_path / "shm" / "j" / "m0")     # machine 0 lost
    log2, argv2 = _argv(byte_corpus, tmp_path, "after", 14, "--gemini-transport", transport)
    run_pretrain(tmp_path, argv2, world_size=4, machines=MACHINES)
    [rec] = read_recoveries(log2)
    assert (rec["source"], rec["iteration"]) == ("peer", 10)
    assert read_losses(log2) == [(i, reference[i]) for i in range(11, 15)]

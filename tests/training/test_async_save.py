"""--async-save (no GEMINI) at TP=2: a checkpoint written in the background resumes bit for bit,
and training is blocked only for the copy, not for the (throttled) write."""
import os

import pytest
import torch
from safetensors import safe_open

from tests.e2e import read_losses, read_metrics, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

TP2 = ["--tensor-model-parallel-size", "2", "--lr-decay-iters", "10"]


def _run(tmp_path, data, name, *extra):
    log_dir = str(tmp_path / name)
    run_pretrain(tmp_path, tiny_gpt_args(data, log_dir, "--no-gemini", *TP2, *extra), 2)
    return log_dir


def test_async_save_at_tp2_resumes_bit_for_bit_and_stalls_only_for_the_copy(byte_corpus, tmp_path):
    full = read_losses(_run(tmp_path, byte_corpus, "full", "--train-iters", "10", "--save", str(tmp_path / "ck_full")))
    save = str(tmp_path / "ck")
    # ~1 MB per shard at 3 MB/s: each background write takes ~0.3 s, iterations a few ms.
    first_log = _run(tmp_path, byte_corpus, "first", "--train-iters", "6", "--save", save, "--save-interval", "3",
                     "--async-save", "--persistent-bandwidth-mbs", "3")
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "6"
    assert sorted(os.listdir(save)) == ["iter_0000003", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(os.path.join(save, "iter_0000006"))) == [
        "manifest.json", "tp_rank_00.safetensors", "tp_rank_01.safetensors"]   # no sidecars left

    recs = {r["iteration"]: r for r in read_metrics(first_log)}
    at3 = recs[3]   # the first save: nothing in flight to wait for, so its stall is the copy
    assert at3["persist_wait_s"] < 0.05 and at3["persist_blocking_s"] < 0.1
    writes = [r["persist_write_s"] for r in recs.values() if "persist_write_s" in r]
    shard_bytes = os.path.getsize(os.path.join(save, "iter_0000006", "tp_rank_00.safetensors"))
    assert writes and min(writes) >= shard_bytes / 3e6                # the throttle held the writer back
    assert at3["persist_blocking_s"] < min(writes) / 3                # ... but not training

    second = read_losses(_run(tmp_path, byte_corpus, "second", "--train-iters", "10", "--save", save))
    first = read_losses(first_log)
    assert [i for i, _ in second] == list(range(7, 11))
    assert first + second == full          # exact float equality, iteration by iteration
    for tp in ("00", "01"):
        a = safe_open(os.path.join(tmp_path, "ck_full", "iter_0000010", f"tp_rank_{tp}.safetensors"), "pt")
        b = safe_open(os.path.join(save, "iter_0000010", f"tp_rank_{tp}.safetensors"), "pt")
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (tp, k)

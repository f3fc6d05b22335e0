"""End-to-end equivalence of the training loop: TP=2 == TP=1, DP=2 == DP=1, resume == uninterrupted."""
import pytest
import os

import torch
from safetensors import safe_open

from tests.e2e import read_losses, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes


def _run(tmp_path, data, name, world, *extra):
    log_dir = str(tmp_path / name)
    run_pretrain(tmp_path, tiny_gpt_args(data, log_dir, "--no-gemini", *extra), world)
    return read_losses(log_dir)


def _close(a, b, tol):
    assert [i for i, _ in a] == [i for i, _ in b]
    for (i, x), (_, y) in zip(a, b):
        assert abs(x - y) <= tol, (i, x, y)


def test_tp2_equals_tp1_and_dp2_equals_dp1(byte_corpus, tmp_path):
    # Same padded vocabulary (512) in both: padding is a multiple of divisible-by x TP.
    ref = _run(tmp_path, byte_corpus, "tp1", 1, "--train-iters", "5", "--make-vocab-size-divisible-by", "256")
    tp2 = _run(tmp_path, byte_corpus, "tp2", 2, "--train-iters", "5", "--tensor-model-parallel-size", "2")
    dp2 = _run(tmp_path, byte_corpus, "dp2", 2, "--train-iters", "5", "--make-vocab-size-divisible-by", "256")
    assert len(ref) == 5
    _close(ref, tp2, 1e-5)
    _close(ref, dp2, 1e-5)


def test_tp2_dp2_on_four_ranks_trains(byte_corpus, tmp_path):
    losses = _run(tmp_path, byte_corpus, "tp2dp2", 4, "--train-iters", "25", "--tensor-model-parallel-size", "2",
                  "--global-batch-size", "8", "--lr", "3e-3")
    assert losses[-1][1] < losses[0][1] - 0.5, losses


def test_save_load_resume_is_bit_exact(byte_corpus, tmp_path):
    full = _run(tmp_path, byte_corpus, "full", 1, "--train-iters", "10", "--lr-decay-iters", "10",
                "--save", str(tmp_path / "ck_full"))
    save = str(tmp_path / "ck")
    first = _run(tmp_path, byte_corpus, "resume_a", 1, "--train-iters", "5", "--lr-decay-iters", "10",
                 "--save", save, "--save-interval", "5")
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "5"
    second = _run(tmp_path, byte_corpus, "resume_b", 1, "--train-iters", "10", "--lr-decay-iters", "10",
                  "--save", save)
    assert [i for i, _ in second] == list(range(6, 11))
    assert first + second == full          # exact float equality, iteration by iteration
    # The final weights agree bit for bit as well.
    a = safe_open(os.path.join(tmp_path, "ck_full", "iter_0000010", "tp_rank_00.safetensors"), "pt")
    b = safe_open(os.path.join(save, "iter_0000010", "tp_rank_00.safetensors"), "pt")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

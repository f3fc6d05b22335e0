"""End-to-end equivalence of the training loop: TP=2, DP=2 and TP=2 x DP=2 each equal one rank,
loss by loss and in the whole final state (weights and Adam's moments); resume == uninterrupted."""
import pytest
import os

import torch
from safetensors import safe_open

from tests.e2e import assert_same_state, read_losses, read_metrics, run_pretrain, tiny_gpt_args, unsharded_state

pytestmark = pytest.mark.slow   # spawns processes

# Enough iterations after the 2 of warm-up for Adam's moments to steer every update
# (exp_avg_sq needs ~1/(1-beta2) steps to forget its zero start; the comparison of the
# moments themselves covers the rest).
ITERS = 20
# One global batch of 8 sequences in every layout: 4 micro-batches on one rank, 2 on each of
# two DP ranks. The same padded vocabulary (512) in every layout: a multiple of divisible-by x TP.
SAME_BATCH = ("--train-iters", str(ITERS), "--global-batch-size", "8", "--micro-batch-size", "2",
              "--make-vocab-size-divisible-by", "256")


def _run(tmp_path, data, name, world, *extra):
    log_dir = str(tmp_path / name)
    run_pretrain(tmp_path, tiny_gpt_args(data, log_dir, "--no-gemini", "--save", str(tmp_path / name / "ck"),
                                         *extra), world)
    return read_metrics(log_dir), unsharded_state(str(tmp_path / name / "ck"), ITERS)


@pytest.fixture(scope="module")
def one_rank(byte_corpus, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one_rank"), byte_corpus, "tp1", 1, *SAME_BATCH)


def _assert_equivalent(reference, got):
    """Losses and gradient norms (before clipping, which would hide a gradient off by a
    constant factor) within float rounding of a different reduction order, iteration by
    iteration; then every parameter and its Adam moments, unsharded."""
    (ref_metrics, ref_state), (metrics, state) = reference, got
    assert [r["iteration"] for r in ref_metrics] == [r["iteration"] for r in metrics] == list(range(1, ITERS + 1))
    for a, b in zip(ref_metrics, metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["iteration"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a["iteration"], a["grad_norm"], b["grad_norm"])
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"] - 0.5   # it trained: the updates were not negligible
    assert_same_state(ref_state, state)


def test_tp2_equals_tp1_and_dp2_equals_dp1(byte_corpus, one_rank, tmp_path):
    _assert_equivalent(one_rank, _run(tmp_path, byte_corpus, "tp2", 2, *SAME_BATCH,
                                      "--tensor-model-parallel-size", "2"))
    _assert_equivalent(one_rank, _run(tmp_path, byte_corpus, "dp2", 2, *SAME_BATCH))


def test_tp2_dp2_on_four_ranks_equals_one_rank(byte_corpus, one_rank, tmp_path):
    _assert_equivalent(one_rank, _run(tmp_path, byte_corpus, "tp2dp2", 4, *SAME_BATCH,
                                      "--tensor-model-parallel-size", "2"))


def test_save_load_resume_is_bit_exact(byte_corpus, tmp_path):
    def run(name, *extra):
        log_dir = str(tmp_path / name)
        run_pretrain(tmp_path, tiny_gpt_args(byte_corpus, log_dir, "--no-gemini", "--lr-decay-iters", "10",
                                             *extra), 1)
        return read_losses(log_dir)

    full = run("full", "--train-iters", "10", "--save", str(tmp_path / "ck_full"))
    save = str(tmp_path / "ck")
    first = run("resume_a", "--train-iters", "5", "--save", save, "--save-interval", "5")
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "5"
    second = run("resume_b", "--train-iters", "10", "--save", save)
    assert [i for i, _ in second] == list(range(6, 11))
    assert first + second == full          # exact float equality, iteration by iteration
    # The final weights agree bit for bit as well.
    a = safe_open(os.path.join(tmp_path, "ck_full", "iter_0000010", "tp_rank_00.safetensors"), "pt")
    b = safe_open(os.path.join(save, "iter_0000010", "tp_rank_00.safetensors"), "pt")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

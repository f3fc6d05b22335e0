"""--use-distributed-optimizer end to end: the same losses as the plain optimizer at TP2 x DP2,
and persistent checkpoints that do not depend on the DP size (save DP=2, load DP=1, and back)."""
import os

import pytest
import torch
from safetensors import safe_open

from tests.e2e import read_losses, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

FLAG = "--use-distributed-optimizer"


def _run(tmp_path, data, name, world, *extra):
    log_dir = str(tmp_path / name)
    run_pretrain(tmp_path, tiny_gpt_args(data, log_dir, "--no-gemini", "--lr-decay-iters", "15", *extra), world)
    return read_losses(log_dir)


def _assert_same_checkpoint(dir_a: str, dir_b: str, iteration: int, tp_size: int = 1) -> None:
    for tp_rank in range(tp_size):
        name = os.path.join(f"iter_{iteration:07d}", f"tp_rank_{tp_rank:02d}.safetensors")
        a, b = safe_open(os.path.join(dir_a, name), "pt"), safe_open(os.path.join(dir_b, name), "pt")
        assert sorted(a.keys()) == sorted(b.keys())
        assert any(k.startswith("optimizer/exp_avg/") for k in a.keys())   # the gathered layout
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_tp2_dp2_equals_plain_bit_for_bit(byte_corpus, tmp_path):
    args = ("--train-iters", "6", "--tensor-model-parallel-size", "2", "--global-batch-size", "8")
    plain = _run(tmp_path, byte_corpus, "plain", 4, *args, "--save", str(tmp_path / "ck_plain"))
    dist = _run(tmp_path, byte_corpus, "dist", 4, *args, FLAG, "--save", str(tmp_path / "ck_dist"))
    assert len(plain) == 6
    assert dist == plain                 # exact float equality, iteration by iteration
    _assert_same_checkpoint(str(tmp_path / "ck_plain"), str(tmp_path / "ck_dist"), 6, tp_size=2)


def test_save_dp2_load_dp1_and_back_continues_as_plain(byte_corpus, tmp_path):
    """Each leg runs with and without the flag on the other's checkpoint lineage; the two
    lineages stay bit-identical across DP=2 -> DP=1 -> DP=2."""
    legs = [(2, 5), (1, 10), (2, 15)]   # (DP size, train until)
    losses = {}
    for variant, extra in (("plain", ()), ("dist", (FLAG,))):
        save = str(tmp_path / f"ck_{variant}")
        losses[variant] = []
        for world, until in legs:
            losses[variant] += _run(tmp_path, byte_corpus, f"{variant}_{world}_{until}", world,
                                    "--train-iters", str(until), "--save", save, "--save-interval", "5",
                                    "--global-batch-size", "4", *extra)
    assert [i for i, _ in losses["dist"]] == list(range(1, 16))
    assert losses["dist"] == losses["plain"]
    for it in (5, 10, 15):
        _assert_same_checkpoint(str(tmp_path / "ck_plain"), str(tmp_path / "ck_dist"), it)


def _valid_losses(log_dir: str) -> list[tuple[int, float]]:
    import json
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [(r["iteration"], r["valid_loss"]) for r in map(json.loads, f) if "valid_loss" in r]


@pytest.mark.parametrize("precision", [(), ("--bf16",)], ids=["fp32", "bf16"])
def test_overlap_param_gather_same_losses_through_evaluation_and_a_save_load(byte_corpus, tmp_path, precision):
    """DP=2: evaluations (their forward waits for the all-gather in flight) and a persistent
    save (it gathers the whole params) at iteration 4, then a second run that loads it: the
    losses and validation losses with --overlap-param-gather equal those without, bit for bit."""
    runs = {}
    for variant, extra in (("sync", ()), ("overlap", ("--overlap-param-gather",))):
        save, train, valid = str(tmp_path / f"ck_{variant}"), [], []
        for until in (4, 8):
            name = f"{variant}_{until}"
            train += _run(tmp_path, byte_corpus, name, 2, "--train-iters", str(until), "--save", save,
                          "--save-interval", "4", "--eval-interval", "3", "--eval-iters", "2",
                          *precision, FLAG, *extra)
            valid += _valid_losses(str(tmp_path / name))
        runs[variant] = (train, valid)
    train, valid = runs["sync"]
    assert [i for i, _ in train] == list(range(1, 9)) and [i for i, _ in valid] == [3, 4, 6, 8]
    assert runs["overlap"] == runs["sync"]
    _assert_same_checkpoint(str(tmp_path / "ck_sync"), str(tmp_path / "ck_overlap"), 8)

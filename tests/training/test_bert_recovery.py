"""BERT under GEMINI recovers from a killed worker bit for bit: SIGKILL `pretrain_bert.py`
mid-run, start it again with the same flags, and every iteration's loss equals the
uninterrupted run's. Dropout is on, so this also checks that every RNG comes back."""
import pytest
import os
import signal
import subprocess
import sys
import time

from tests.e2e import ROOT, read_losses, read_recoveries
from tests.models.test_bert_tp import build_bert_byte_corpus

pytestmark = pytest.mark.slow   # spawns processes

TRAIN_ITERS = 30


def _args(data: str, log_dir: str, store: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "pretrain_bert.py"),
            "--data-path", data, "--tokenizer-type", "ByteLevelTokenizer",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(TRAIN_ITERS),
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0",
            "--log-dir", log_dir, "--gemini-store-dir", store]


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _last_logged(log_dir: str) -> int:
    try:
        return max((i for i, _ in read_losses(log_dir)), default=0)
    except (OSError, ValueError):   # not created yet, or a line half written
        return 0


def test_bert_recovers_from_sigkill_bit_for_bit(byte_corpus, tmp_path):
    data = build_bert_byte_corpus(byte_corpus)
    store = str(tmp_path / "store")
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    _run(_args(data, ref_dir, store))
    reference = dict(read_losses(ref_dir))
    assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))

    victim = subprocess.Popen(_args(data, run_dir, store), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while _last_logged(run_dir) < 5 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    killed_at = _last_logged(run_dir)
    assert 5 <= killed_at < TRAIN_ITERS, killed_at   # killed mid-run, not after the end

    _run(_args(data, run_dir, store))   # the same command again: it finds its memory
    records = read_losses(run_dir)
    recovery = read_recoveries(run_dir)
    assert len(recovery) == 1 and recovery[0]["source"] == "local", recovery
    resumed = recovery[0]["iteration"]
    # Iteration k is logged after its snapshot was copied and k-1's committed; k+1's snapshot
    # commits on a background thread and can land before its log line (tests/resilience/cluster.py).
    assert killed_at - 1 <= resumed <= killed_at + 1, (killed_at, resumed)
    assert recovery[0]["last_logged_iteration"] == killed_at
    # Iterations up to the kill, then from the recovered one on: each loss exactly the reference's.
    assert {i for i, _ in records} == set(range(1, TRAIN_ITERS + 1))
    for i, loss in records:
        assert loss == reference[i], (i, loss, reference[i])

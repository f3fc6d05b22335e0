"""`python pretrain_gpt.py` killed with SIGKILL and started again with the same flags
resumes from its in-memory snapshot and continues bit for bit."""
import pytest
import os
import signal
import subprocess
import sys
import time

from tests.e2e import ROOT, read_losses, read_recoveries, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes


def _flags(data, tmp_path, log_dir, iters):
    return tiny_gpt_args(data, str(log_dir), "--train-iters", str(iters), "--lr-decay-iters", str(iters),
                         "--hidden-dropout", "0.1", "--gemini-store-dir", str(tmp_path / "shm"))


def _wait_for_iteration(log_dir, iteration, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        try:
            if any(i >= iteration for i, _ in read_losses(str(log_dir))):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"iteration {iteration} not reached")


def test_sigkilled_run_resumes_from_memory(byte_corpus, tmp_path):
    ref_log = tmp_path / "ref"
    run_pretrain(tmp_path, _flags(byte_corpus, tmp_path / "refshm", ref_log, 150))
    reference = dict(read_losses(str(ref_log)))

    log = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *_flags(byte_corpus, tmp_path, log, 150)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_iteration(log, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(i for i, _ in read_losses(str(log)))
    assert killed_at < 150
    # The store survived the process: the restarted run finds it (same --log-dir → same job).
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    [rec] = read_recoveries(str(log))
    assert rec["source"] == "local"
    assert killed_at - 1 <= rec["iteration"] <= killed_at + 1   # at most one iteration lost
    for it, loss in read_losses(str(log)):   # the re-run iterations included
        assert loss == reference[it], it
    assert not (tmp_path / "shm").exists()   # a clean finish frees the memory store and its empty root

"""One job, one directory: the default --log-dir per job, what a first start and a rerun say
(no recovery), the console at both ends, SIGTERM without a launcher, and a memory snapshot
of another layout under the same job (refused, kept, explained)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gemini_lm.config import default_log_dir, parse_config
from tests.e2e import ROOT, read_losses, read_recoveries

ENTRY = os.path.join(ROOT, "pretrain_gpt.py")


def _dir(*flags: str, script: str = "pretrain_gpt.py") -> str:
    return default_log_dir(script, list(flags))


def test_the_default_log_dir_is_one_per_job():
    base = ("--hidden-size", "64", "--data-path", "corpus_text_document", "--tokenizer-type", "ByteLevelTokenizer")
    d = _dir(*base)
    assert d.startswith(os.path.join("runs", "pretrain_gpt-")) and len(os.path.basename(d)) == len("pretrain_gpt-") + 8
    assert _dir(*base) == d                                                    # the same command: found again
    for other in (("--hidden-size", "128"), ("--data-path", "other_text_document"), ("--seed", "7"),
                  ("--tensor-model-parallel-size", "2"), ("--train-iters", "50")):
        assert _dir(*base, *other) != d, other                                 # another model, data, run
    assert _dir(*base, script="/x/pretrain_bert.py") == d.replace("pretrain_gpt", "pretrain_bert")   # another entry
    for same in (("--log-interval", "1"), ("--eval-interval", "5"), ("--save", "ckpt"), ("--gemini-replicas", "3"),
                 ("--exit-interval", "10"), ("--distributed-timeout-seconds", "30"), ("--wandb-project", "p")):
        assert _dir(*base, *same) == d, same                                   # how it runs, not what
    assert _dir(*base, "--log-dir", "mine") == "mine"


def test_parse_config_takes_the_same_default_as_a_launcher(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/pretrain_gpt.py"])
    argv = ["--hidden-size", "64", "--micro-batch-size", "2"]
    assert parse_config(argv, world_size=2).logging.log_dir == _dir(*argv)   # before validation fills in


def test_local_cluster_takes_and_passes_on_the_same_default():
    import local_cluster

    flags = ["--hidden-size", "64", "--train-iters", "10"]
    args, train = local_cluster.parse_args(["--machines", "2", "--", "pretrain_gpt.py", *flags])
    cluster = local_cluster.Cluster(args, train)   # starts nothing
    assert cluster.log_dir == os.path.abspath(_dir(*flags))
    assert cluster.train[cluster.train.index("--log-dir") + 1] == cluster.log_dir


TINY = ["--tokenizer-type", "ByteLevelTokenizer", "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2", "--eval-interval", "2",
        "--eval-iters", "1", "--log-interval", "1"]


def _train(cwd, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    out = subprocess.run([sys.executable, ENTRY, *flags], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_NUM_THREADS": "1"})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_first_start_and_a_rerun_are_no_recoveries_and_the_console_says_where_things_are(byte_corpus, tmp_path):
    shm = str(tmp_path / "shm")
    flags = ["--data-path", byte_corpus, *TINY, "--train-iters", "2", "--gemini-store-dir", shm]
    first = _train(tmp_path, *flags)
    log_dir = _dir(*flags)
    assert os.listdir(tmp_path / "runs") == [os.path.basename(log_dir)]
    assert "starting from iteration 0" in first.stdout
    assert "WARNING" not in first.stderr and "STARTING FRESH" not in first.stderr + first.stdout
    assert f"outputs: metrics {log_dir}/metrics.jsonl; no checkpoints on disk (--save); memory store {shm}/" \
        in first.stdout
    assert "done: iterations 0 -> 2 in " in first.stdout and "; final loss " in first.stdout
    assert f"outputs: metrics {log_dir}/metrics.jsonl; no recoveries; no checkpoint on disk (--save); " \
           "memory store freed" in first.stdout
    summary = json.load(open(tmp_path / log_dir / "summary.json"))
    assert (summary["first_iteration"], summary["iteration"]) == (0, 2) and summary["loss"] > 0

    rerun = _train(tmp_path, *flags)   # the same command after a clean finish: a new run, not a recovery
    assert f"{log_dir} holds a run that finished at iteration 2" in rerun.stdout
    assert "starting from iteration 0" in rerun.stdout and "WARNING" not in rerun.stderr
    assert read_recoveries(str(tmp_path / log_dir)) == []

    _train(tmp_path, *flags, "--hidden-size", "64", "--num-attention-heads", "4")   # another model: another job
    assert len(os.listdir(tmp_path / "runs")) == 2


@pytest.mark.slow
def test_sigterm_without_launcher_then_another_layout_is_refused_and_the_store_kept(byte_corpus, tmp_path):
    shm, log_dir = tmp_path / "shm", tmp_path / "log"
    flags = ["--data-path", byte_corpus, *TINY, "--train-iters", "100000", "--eval-interval", "0",
             "--gemini-store-dir", str(shm), "--log-dir", str(log_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    proc = subprocess.Popen([sys.executable, ENTRY, *flags], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while not (log_dir / "metrics.jsonl").exists() or not read_losses(str(log_dir)):
        assert proc.poll() is None and time.monotonic() < deadline, "no iteration logged"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    (job,) = os.listdir(shm)
    assert "no launcher restarts it; to resume, rerun the same command" in err and "for a restart" not in err
    assert f"to free that memory instead: rm -rf {shm / job}" in err
    stored = sorted(os.listdir(shm / job))

    other = _train(tmp_path, *flags, "--hidden-size", "64", "--num-attention-heads", "4", check=False)
    lines = other.stderr.splitlines()
    assert other.returncode == 2 and len(lines) == 1, other.stderr
    assert lines[0].startswith(f"error: the GEMINI memory store {shm / job}/") and " holds iteration " in lines[0]
    assert "hidden_size 32 there, 64 here" in lines[0] and "it is kept" in lines[0]
    assert sorted(os.listdir(shm / job)) == stored   # nothing overwritten or removed

    killed_at = max(it for it, _ in read_losses(str(log_dir)))
    _train(tmp_path, *flags, "--exit-interval", str(killed_at + 2))   # the hint: the same flags resume from it
    [rec] = read_recoveries(str(log_dir))
    assert rec["source"] == "local" and rec["iteration"] >= killed_at - 1

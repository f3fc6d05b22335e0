"""A persist that cannot be written (issue 13, item 1) is counted, reported and retried at the
next save point; it leaves no `.partial` directory behind and never re-creates a --save
directory deleted under it. Real filesystem errors: a full tmpfs (ENOSPC), a read-only one
(EROFS), a deleted directory (ENOENT)."""
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from gemini_lm.checkpoint.persistent import latest_iteration
from gemini_lm.errors import EXIT_UNSAVED
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.persist import Persister
from gemini_lm.gemini.store import MemoryStore
from tests.e2e import read_metrics
from tests.tmpfs import tmpfs  # noqa: F401 - a fixture

STATE = {"w": torch.arange(256 * 1024, dtype=torch.float32).reshape(256, 1024)}   # 1 MiB
LAYOUT = SnapshotLayout.build(STATE, {"format": "test"})


def _commit(store: MemoryStore, iteration: int, shard: str = "tp00"):
    w = store.begin_write(shard, LAYOUT.nbytes, LAYOUT.layout_hash)
    LAYOUT.write(STATE, w.buffer)
    return store.commit(w, iteration)


@pytest.fixture
def store(tmp_path):
    s = MemoryStore(str(tmp_path / "shm"), "job", "m0")
    yield s
    s.close()


def _persister(store, save_dir, tp_size=1, finalizer=True, **kw):
    return Persister(store, str(save_dir), 0, tp_size, finalizer=finalizer, keep=None,
                     manifest={"metadata": {}}, **kw)


def _leftovers(save_dir) -> list[str]:
    return sorted(n for n in os.listdir(save_dir) if not n.startswith("iter_") or n.endswith(".partial")) \
        if os.path.isdir(save_dir) else []


def test_a_full_filesystem_is_counted_cleaned_up_and_retried(store, tmpfs):
    save = tmpfs("512k")
    p = _persister(store, save)
    p.submit(_commit(store, 1))
    p.wait()
    assert p.failures == 1 and isinstance(p.error, OSError) and p.last_iteration is None
    assert os.listdir(save) == []                  # no iter_0000001.partial, no temporary file
    tmpfs.remount(save, "size=8m")                 # space freed: the next save point succeeds
    p.submit(_commit(store, 2))
    p.wait()
    p.close()
    assert (p.failures, p.error, p.last_iteration) == (1, None, 2)
    assert latest_iteration(str(save)) == 2 and _leftovers(save) == ["latest_checkpointed_iteration.txt"]


def test_a_read_only_filesystem_is_a_counted_failure(store, tmpfs):
    save = tmpfs("8m")
    tmpfs.remount(save, "ro")
    p = _persister(store, save)
    p.submit(_commit(store, 1))
    p.wait()
    p.close()
    assert p.failures == 1 and p.error is not None and os.listdir(save) == []


def test_a_save_directory_deleted_under_it_is_not_recreated(store, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    p = _persister(store, save)
    shutil.rmtree(save)
    p.submit(_commit(store, 1))
    p.wait()
    p.close()
    assert p.failures == 1 and isinstance(p.error, FileNotFoundError)
    assert not save.exists()   # deleted by someone: not silently re-created beneath a mount point


def test_the_finalizer_stops_waiting_when_a_peer_shard_gave_up(store, tmp_path):
    # TP=2: the other shard's writer failed and removed the partial directory; the finalizer
    # must not wait out its timeout for a sidecar that will never come.
    save = tmp_path / "ckpt"
    save.mkdir()
    p = _persister(store, save, tp_size=2, finalize_timeout_s=60.0)
    p.submit(_commit(store, 1))
    partial = save / "iter_0000001.partial"
    while not (partial / "tp_rank_00.json").exists():   # tp00 is written: the finalizer now waits for tp01
        threading.Event().wait(0.01)
    shutil.rmtree(partial)   # what the failed tp01 writer does
    p.wait()
    p.close()
    assert p.failures == 1 and not isinstance(p.error, TimeoutError), repr(p.error)
    assert _leftovers(save) == []


@pytest.mark.slow
def test_a_run_whose_final_persist_fails_keeps_its_state_and_says_where(byte_corpus, tmp_path, tmpfs):
    """The whole run on a --save too small for one checkpoint: every persist fails, metrics say
    so, the run exits EXIT_UNSAVED with one line naming the store, which it keeps; the same
    command, once there is room, resumes from memory and writes the final state."""
    from tests.test_cli_errors import ENTRY, TINY

    save, log, shm = tmpfs("64k"), tmp_path / "log", tmp_path / "shm"
    argv = [sys.executable, ENTRY, "--data-path", byte_corpus, *TINY, "--train-iters", "6",
            "--save-interval", "2", "--save", str(save), "--log-dir", str(log), "--gemini-store-dir", str(shm)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == EXIT_UNSAVED, first.stderr[-2000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "iteration 6" in errors[0] and str(shm) in errors[0], first.stderr[-2000:]
    argv += ["--gemini-job-id", errors[0].split("--gemini-job-id ")[1].split(",")[0]]   # as the line says
    assert "Traceback" not in first.stderr
    assert os.listdir(save) == [] and os.listdir(shm)          # nothing half-written; the state kept
    assert max(r.get("gemini_persist_failures", 0) for r in read_metrics(str(log))) >= 1

    tmpfs.remount(save, "size=8m")
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert latest_iteration(str(save)) == 6 and _leftovers(save) == ["latest_checkpointed_iteration.txt"]
    assert not shm.exists() or os.listdir(shm) == []              # written out: the store is freed


@pytest.mark.slow
def test_a_preemption_flush_that_cannot_write_leaves_nothing_half_written(byte_corpus, tmp_path, tmpfs):
    """SIGTERM's flush to a full --save fails: the exit for the restart still happens, the
    failure is recorded, no .partial directory stays, and the store keeps the state."""
    import signal
    import time

    from gemini_lm.errors import EXIT_RESTART
    from gemini_lm.resilience.events import read_jsonl
    from tests.test_cli_errors import ENTRY, TINY

    save, log, shm = tmpfs("64k"), tmp_path / "log", tmp_path / "shm"
    argv = [sys.executable, ENTRY, "--data-path", byte_corpus, *TINY, "--train-iters", "100000",
            "--log-interval", "1", "--save", str(save), "--log-dir", str(log), "--gemini-store-dir", str(shm),
            "--no-gemini-inplace"]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while not (log / "metrics.jsonl").exists() or len(read_metrics(str(log))) < 3:
            assert time.monotonic() < deadline and run.poll() is None, "training did not start"
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == EXIT_RESTART
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    failure = next(f for f in read_jsonl(str(log / "failures.jsonl")) if f["cause"] == "sigterm")
    assert "flush failed" in failure["detail"], failure
    assert os.listdir(save) == [] and os.listdir(shm)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["blocking", "async"])
def test_without_gemini_a_failed_save_is_retried_and_a_failed_final_save_is_not_exit_0(byte_corpus, tmp_path,
                                                                                      tmpfs, mode):
    """--no-gemini has no copy in memory: write errors are counted and retried at the next save
    point (every rank alike, no traceback), and a run whose final save failed says so and exits 3."""
    from tests.test_cli_errors import ENTRY, TINY

    save, log = tmpfs("64k"), tmp_path / "log"
    argv = [sys.executable, ENTRY, "--data-path", byte_corpus, *TINY, "--train-iters", "6", "--log-interval", "1",
            "--save-interval", "2", "--save", str(save), "--log-dir", str(log), "--no-gemini", *mode]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == EXIT_UNSAVED, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "iteration 6" in errors[0] and "the newest checkpoint there is none" in errors[0]
    assert "Traceback" not in run.stderr and os.listdir(save) == []
    assert max(r.get("persist_failures", 0) for r in read_metrics(str(log))) >= 1


@pytest.mark.slow
def test_tp2_ranks_agree_that_the_final_state_is_unsaved(byte_corpus, tmp_path, tmpfs):
    """Under torchrun with TP=2 each shard's writer fails on its own; every rank learns it (one
    all-reduce at close), keeps the store, and exits 3; rank 0 alone prints the line."""
    from tests.test_cli_errors import ENTRY, TINY

    save, shm = tmpfs("64k"), tmp_path / "shm"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", ENTRY,
            "--data-path", byte_corpus, *TINY, "--train-iters", "4", "--save-interval", "2",
            "--tensor-model-parallel-size", "2", "--save", str(save), "--log-dir", str(tmp_path / "log"),
            "--gemini-store-dir", str(shm)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "exitcode: 3" in run.stderr and run.stderr.count("\nerror: training finished") == 1, run.stderr[-3000:]
    assert os.listdir(save) == [] and os.listdir(shm)

"""wandb without an account: an offline run under <log-dir>/wandb, plotted against `iteration`."""
from __future__ import annotations

import struct
import time

import pytest
import wandb  # noqa: F401 - a hard requirement (requirements.txt): missing, this fails, not skips

from tests.e2e import run_pretrain, tiny_gpt_args


def read_offline_run(run_dir, timeout_s: float = 60.0) -> list:
    """The records of an offline run's `.wandb` file, once complete. wandb's service process
    writes the file on its own, and `finish()` can return before the last records are in
    (seen on a busy machine: no history yet): wait for the run's `exit` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse_offline_run(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _parse_offline_run(run_dir) -> list:
    """The records of an offline run's `.wandb` file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, block, chunk, out = path.read_bytes(), 7, 32768, b"", []   # 7-byte file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                   # FULL or LAST fragment: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def logged(records, key: str) -> list:
    rows = [{i.nested_key[0] if i.nested_key else i.key: i.value_json for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return [(int(row["iteration"]), float(row[key])) for row in rows if key in row]


def step_metrics(records) -> dict:
    return {r.metric.glob_name: r.metric.step_metric for r in records
            if r.WhichOneof("record_type") == "metric" and r.metric.glob_name}


@pytest.mark.slow
def test_offline_run_under_log_dir_indexed_by_iteration(byte_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_elsewhere"))   # --log-dir wins
    log_dir = tmp_path / "log"
    argv = tiny_gpt_args(byte_corpus, str(log_dir), "--train-iters", "4", "--log-interval", "2",
                         "--eval-interval", "4", "--eval-iters", "1", "--wandb-project", "demo",
                         "--wandb-exp-name", "smoke")
    run_pretrain(tmp_path, argv)
    (run_dir,) = (log_dir / "wandb").glob("offline-run-*")   # <log-dir>/wandb, not .../wandb/wandb
    records = read_offline_run(run_dir)
    assert [it for it, _ in logged(records, "train/loss")] == [2, 4]
    assert [it for it, _ in logged(records, "valid/loss")] == [4]
    assert {"train/*": "iteration", "valid/*": "iteration", "recovery/*": "iteration"}.items() \
        <= step_metrics(records).items()


@pytest.mark.slow
def test_iterations_logged_again_after_a_recovery_are_kept(tmp_path, monkeypatch):
    # After a rollback the resumed run logs iterations it has logged before; a wandb `step`
    # would have to grow monotonically and drop them.
    from gemini_lm.training.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(str(tmp_path), enabled=True, wandb_project="demo", run_id="resumed")
    for iteration, loss in [(5, 3.0), (6, 2.9), (5, 3.1)]:
        logger.log_iteration({"iteration": iteration, "loss": loss})
    logger.log_recovery({"iteration": 5, "retrieval_s": 0.25})
    logger.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-resumed")
    records = read_offline_run(run_dir)
    assert logged(records, "train/loss") == [(5, 3.0), (6, 2.9), (5, 3.1)]
    assert logged(records, "recovery/retrieval_s") == [(5, 0.25)]


@pytest.mark.slow
def test_one_job_is_one_run_resumed_across_a_restart(byte_corpus, tmp_path, monkeypatch):
    # The same command twice (the first stops at iteration 2 and keeps its memory store, the
    # second resumes from it): both processes log into one wandb run, the job's.
    from gemini_lm.config import parse_config
    from gemini_lm.training.inputs import default_job_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    log_dir = tmp_path / "log"
    argv = tiny_gpt_args(byte_corpus, str(log_dir), "--train-iters", "4", "--wandb-project", "demo",
                         "--gemini-store-dir", str(tmp_path / "shm"), "--gemini-keep-store")
    run_pretrain(tmp_path, argv + ["--exit-interval", "2"])
    run_pretrain(tmp_path, argv)
    run_id = default_job_id(parse_config(argv, world_size=1))
    run_dirs = sorted((log_dir / "wandb").glob("offline-run-*"))
    assert [d.name for d in run_dirs if d.name.endswith("-" + run_id)] == [d.name for d in run_dirs]
    assert len(run_dirs) == 2 and not (log_dir / "wandb" / "wandb").exists()
    assert [[it for it, _ in logged(read_offline_run(d), "train/loss")] for d in run_dirs] == [[1, 2], [3, 4]]

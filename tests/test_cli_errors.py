"""Bad input to the real entry points: one line on stderr, exit 2, no traceback, nothing written.

Every case runs `python pretrain_gpt.py ...` (or pretrain_bert.py, tools/inject_failure.py, or
torchrun with 2 workers) as a user would.
Under torchrun each worker prints its line and exits 2; torchrun itself exits 1 and prints
its own ChildFailedError report (with the workers' exit codes), which we do not control.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.dist import run_ranks
from tests.e2e import ROOT
from tests.tmpfs import tmpfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow   # spawns processes

ENTRY = os.path.join(ROOT, "pretrain_gpt.py")
BERT_ENTRY = os.path.join(ROOT, "pretrain_bert.py")
TINY = ["--tokenizer-type", "ByteLevelTokenizer", "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "2", "--seq-length", "16", "--train-iters", "2"]


@pytest.fixture
def run(byte_corpus, tmp_path):
    """Run pretrain_gpt.py with tiny flags; return (completed process, outputs to stay absent)."""
    outputs = {"log": tmp_path / "log", "shm": tmp_path / "shm"}

    def _run(*flags: str, data_path: str | None = None, launcher: list[str] = (), timeout: float = 60,
             entry: str = ENTRY):
        argv = [*launcher, entry, "--data-path", data_path or byte_corpus, *TINY,
                "--log-dir", str(outputs["log"]), "--gemini-store-dir", str(outputs["shm"]), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)   # torchrun's workers share its store
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                                timeout=timeout, cwd=tmp_path, env=env)
        return result, outputs

    return _run


def assert_usage_error(result, outputs, message: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for path in outputs.values():   # nothing half-written: no log dir, no in-memory store
        assert not path.exists(), f"{path} was created"


def _corrupt_copy(src_prefix: str, dst_prefix: str, truncate: str | None = None,
                  drop: str | None = None) -> str:
    for ext in (".bin", ".idx"):
        if ext != drop:
            shutil.copyfile(src_prefix + ext, dst_prefix + ext)
    if truncate:
        size = os.path.getsize(dst_prefix + truncate)
        os.truncate(dst_prefix + truncate, size // 2)
    return dst_prefix


def _encoded_elsewhere(prefix: str) -> None:
    """A well-formed pair whose ids come from a bigger vocabulary than the byte tokenizer's."""
    import numpy as np

    from gemini_lm.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for i in range(64):
            builder.add_item(np.arange(i * 40, i * 40 + 40) % 1000)
            builder.end_document()
        builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "4"], "--global-batch-size 4 is not divisible"),
    (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible by --tensor-model-parallel-size 2"),
    (["--tokenizer-type", "NoSuchTokenizer"], "unknown tokenizer type 'NoSuchTokenizer'"),
    (["--split", "0,1,0"], "leaves nothing to train on"),
    (["--log-dir", os.devnull + "/log"], "--log-dir"),
    (["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: no such directory"),
    (["--device", "cpu", "--gemini-transport", "nccl"], "--gemini-transport nccl needs --device cuda"),
    (["--persistent-bandwidth-mbs", "-5"], "--persistent-bandwidth-mbs -5.0: must be a number >= 0"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_bad_flags(run, flags, message):
    assert_usage_error(*run(*flags), message)


@pytest.mark.parametrize("case, message", [
    ("no_idx", "indexed dataset file not found"),
    ("short_idx", "truncated or corrupt index"),
    ("short_bin", "the pair is truncated or mismatched"),
    ("foreign_tokens", "token id 999 is outside the vocabulary of --tokenizer-type ByteLevelTokenizer"),
])
def test_missing_or_truncated_data(run, byte_corpus, tmp_path, case, message, monkeypatch):
    bad = str(tmp_path / "bad_text_document")
    monkeypatch.setenv("GEMINI_LM_CACHE", str(tmp_path / "cache"))
    {"no_idx": lambda: _corrupt_copy(byte_corpus, bad, drop=".idx"),
     "short_idx": lambda: _corrupt_copy(byte_corpus, bad, truncate=".idx"),
     "short_bin": lambda: _corrupt_copy(byte_corpus, bad, truncate=".bin"),
     "foreign_tokens": lambda: _encoded_elsewhere(bad)}[case]()
    save = tmp_path / "ckpt"
    result, outputs = run("--save", str(save), data_path=bad)
    assert_usage_error(result, {**outputs, "save": save}, message)


def test_unwritable_save(run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result, outputs = run("--save", str(blocker / "ckpt"))
    assert_usage_error(result, outputs, f"--save {blocker / 'ckpt'}: not writable")
    assert blocker.read_text() == "not a directory"


def test_damaged_checkpoint_under_load_leaves_no_store(run, tmp_path):
    save = tmp_path / "ckpt"
    result, outputs = run("--save", str(save), "--no-gemini")
    assert result.returncode == 0, result.stderr
    (save / "iter_0000002" / "manifest.json").write_text("{}")
    shutil.rmtree(outputs["log"])
    result, outputs = run("--load", str(save))
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "manifest" in lines[0]
    assert not outputs["shm"].exists() or not any(outputs["shm"].rglob("*")), "an empty GEMINI store was left"


def test_a_checkpoint_whose_tensors_disagree_with_the_model(run, tmp_path):
    """Issue 13, item 5: a shard whose checksum matches its manifest but whose safetensors header
    holds another dtype or shape (rewritten by hand, another tool) is one line, not a run that
    quietly restarts from a garbled counter."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from gemini_lm.checkpoint.checksum import checksum

    save = tmp_path / "ckpt"
    result, outputs = run("--save", str(save), "--no-gemini")
    assert result.returncode == 0, result.stderr
    shard, manifest = save / "iter_0000002" / "tp_rank_00.safetensors", save / "iter_0000002" / "manifest.json"
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(shard))
    tensors["train/iteration"] = torch.zeros(3, dtype=torch.float64)
    save_file(tensors, str(shard), metadata=metadata)
    entry = json.loads(manifest.read_text())
    payload = shard.read_bytes()
    entry["shards"]["tp00"].update(nbytes=len(payload), checksum=checksum(payload))
    manifest.write_text(json.dumps(entry))
    shutil.rmtree(outputs["log"])
    result, outputs = run("--load", str(save))
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "does not fit this model: train/iteration: checkpoint has torch.float64 (3,)" in lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "4"], "--global-batch-size 4 is not divisible"),
    (["--num-attention-heads", "3"], "not divisible by"),
    ([], "split-sentences"),   # a document-level corpus has no sentence pairs
])
def test_bert_entry_point(run, flags, message):
    assert_usage_error(*run(*flags, entry=BERT_ENTRY), message)


@pytest.mark.parametrize("args, message", [
    (["--kind", "worker", "--target", "0"], "cluster.json not found"),
    (["--kind", "meteor", "--target", "0"], "invalid choice: 'meteor'"),
    (["--kind", "worker", "--target", "-1"], "--target must be >= 0"),
    (["--kind", "worker", "--target", "0", "--during", "lunch"], "invalid choice: 'lunch'"),
    (["--target", "0"], "the following arguments are required: --kind"),
])
def test_inject_failure_tool(tmp_path, args, message):
    log_dir = tmp_path / "no_cluster_here"
    log_dir.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inject_failure.py"),
                             "--log-dir", str(log_dir), *args], capture_output=True, text=True, timeout=60)
    assert_usage_error(result, {}, message)
    assert result.stdout == "" and os.listdir(log_dir) == []   # no event recorded, nothing armed


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "48", "--num-attention-heads", "3", "--tensor-model-parallel-size", "2"],
     "number of attention heads 3 is not divisible by the tensor-model-parallel size 2"),
    (["--micro-batch-size", "2", "--global-batch-size", "2"],
     "--global-batch-size 2 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
])
def test_two_workers_under_torchrun(run, tmp_path, flags, message):
    logs = tmp_path / "torchrun_logs"
    # --standalone: torchrun binds its rendezvous store to a free port itself and hands that
    # store to the workers, so no port is picked here and released for someone else to take.
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--log-dir", str(logs), "--redirects", "3"]
    result, outputs = run(*flags, launcher=launcher, timeout=120)
    assert result.returncode != 0
    # torchrun names the first worker to exit as the root cause, then SIGTERMs the others:
    # a slower worker may be killed (-15) before it exits 2, even before it prints its line.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert re.search(r"exitcode\s*:\s*2\b", root_cause) and set(codes) <= {"2", "-15"}, result.stderr
    worker_lines = [path.read_text().splitlines() for path in logs.glob("*/attempt_0/*/stderr.log")]
    assert len(worker_lines) == 2 and any(worker_lines)   # at least the root cause printed
    for lines in worker_lines:
        assert lines == [] or (len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]), lines
    for path in outputs.values():
        assert not path.exists(), f"{path} was created"


def _check_data_on(rank: int) -> str:
    from gemini_lm.errors import UsageError

    if rank == 1:
        raise UsageError("only rank 1 lacks its data")
    return "fine"


def _agree_body(rank, world_size):
    import torch

    from gemini_lm.errors import UsageError
    from gemini_lm.parallel.state import ParallelState
    from gemini_lm.training.initialize import all_ranks_or_none

    ps = ParallelState.initialize(1, torch.device("cpu"))
    assert all_ranks_or_none(ps, lambda: rank) == rank   # no failure: each rank's own result
    try:
        all_ranks_or_none(ps, lambda: _check_data_on(rank))
    except UsageError as exc:
        return str(exc)
    return "no error"


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    # Otherwise the ranks that passed would wait for the failed one in the next collective.
    assert run_ranks(_agree_body, 2, tmp_path) == ["only rank 1 lacks its data"] * 2


def test_a_store_too_small_for_two_slots(run, tmpfs):
    """Issue 13, item 5: ENOSPC while the store makes its slots at start-up is the user's choice
    of --gemini-store-dir: one line, exit 2, and no empty store left in it. (Found at restore,
    as a damaged --load is: the log directory exists by then.)"""
    small = tmpfs("64k")
    result, outputs = run("--gemini-store-dir", str(small))
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --gemini-store-dir {small}: no room for two slots of"), lines[0]
    assert os.listdir(small) == []


def test_values_adapted_rather_than_refused_are_echoed(run):
    """Issue 13, item 5: a clamped value is said once, by rank 0: m > machines, warmup > decay."""
    result, _ = run("--gemini-replicas", "3")
    assert result.returncode == 0, result.stderr
    assert "GEMINI placement: replicas 3 > machines 1: clamped to 1" in result.stdout
    assert "note: --lr-warmup-iters 30 > --lr-decay-iters 2: warmup shortened to 2" in result.stdout

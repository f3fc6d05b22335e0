"""tools/gemini_store.py (issue 13, item 6): the stores a crashed run left, listed with what is
in them and who holds them; removed one job at a time, or pruned by age; never while held."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.store import MemoryStore
from tests.e2e import ROOT

pytestmark = pytest.mark.slow   # runs the tool as a user would: a process each

TOOL = os.path.join(ROOT, "tools", "gemini_store.py")
STATE = {"w": torch.zeros(64 * 1024)}   # 256 KiB
LAYOUT = SnapshotLayout.build(STATE, {"format": "test"})


def _leave_store(root, job: str, machine: str, iteration: int) -> str:
    """A store as a crashed run leaves it: a committed snapshot, nobody holding it."""
    s = MemoryStore(str(root), job, machine)
    w = s.begin_write("tp00", LAYOUT.nbytes, LAYOUT.layout_hash)
    LAYOUT.write(STATE, w.buffer)
    s.commit(w, iteration)
    s.close()
    return s.path


def _tool(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args, "--store-dir", str(root)], capture_output=True,
                          text=True, timeout=60)


def test_list_remove_and_prune(tmp_path):
    root = tmp_path / "shm"
    old = _leave_store(root, "job-old", "m0", 7)
    new = _leave_store(root, "job-new", "m0", 12)
    _leave_store(root, "job-new", "m1", 12)
    an_hour_ago = time.time() - 3600
    for name in os.listdir(old):
        os.utime(os.path.join(old, name), (an_hour_ago, an_hour_ago))

    listing = _tool(root, "list")
    assert listing.returncode == 0, listing.stderr
    rows = {tuple(line.split()[:3]): line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {("job-old", "m0", "7"), ("job-new", "m0", "12"), ("job-new", "m1", "12")}
    size, unit = rows[("job-new", "m0", "12")].split()[3:5]
    assert unit == "KiB" and float(size) >= 256 and new in rows[("job-new", "m0", "12")]   # the slot, at least

    held = MemoryStore(str(root), "job-new", "m0")   # a live run still using it
    held.records()
    refused = _tool(root, "remove", "job-new")
    lines = refused.stderr.splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and f"held by live process(es) [{os.getpid()}]" in lines[0]
    assert os.path.isdir(new)
    held.close()

    pruned = _tool(root, "prune", "--older-than", "30m")
    assert pruned.returncode == 0 and f"removed {old}" in pruned.stdout and not os.path.exists(old)
    assert os.path.isdir(new)                                 # younger: kept
    removed = _tool(root, "remove", "job-new")
    assert removed.returncode == 0 and removed.stdout.count("removed ") == 2
    assert not root.exists()                                   # the empty root goes too


@pytest.mark.parametrize("args", [["remove"], ["remove", "no-such-job"], ["prune"], ["prune", "--older-than", "soon"]])
def test_bad_input_is_one_line(tmp_path, args):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gemini_store
    finally:
        sys.path.pop(0)
    from gemini_lm.errors import UsageError

    with pytest.raises(UsageError):
        gemini_store.main([*args, "--store-dir", str(tmp_path)])


def test_a_run_that_keeps_its_store_says_where_and_the_tool_frees_it(byte_corpus, tmp_path):
    from tests.test_cli_errors import ENTRY, TINY

    root = tmp_path / "shm"
    run = subprocess.run([sys.executable, ENTRY, "--data-path", byte_corpus, *TINY, "--log-dir", str(tmp_path / "log"),
                          "--gemini-store-dir", str(root), "--gemini-keep-store"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    said = [line for line in (run.stdout + run.stderr).splitlines() if "the memory store stays at" in line]
    assert len(said) == 1 and str(root) in said[0] and "as --gemini-keep-store asks" in said[0], run.stderr
    job = said[0].split("gemini_store.py remove ")[1].rstrip("`")
    listing = _tool(root, "list")
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert len(rows) == 1 and (rows[0][0], rows[0][2]) == (job, "2")   # the job, at its final iteration
    assert _tool(root, "remove", job).returncode == 0 and not root.exists()

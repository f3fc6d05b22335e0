"""Issue 13, item 4: inject_failure.py acts only on what the cluster owns. A cluster.json left by
a finished cluster, or forged to name someone else's process or directory, is one line and
exit 2; nothing is signalled, nothing is deleted. (The real thing is test_local_cluster's.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemini_lm.errors import UsageError
from gemini_lm.resilience import procs
from gemini_lm.resilience.injection import STORE_MARK, mark_store_root, wipe_machine_store
from tests.e2e import ROOT

INJECT = os.path.join(ROOT, "tools", "inject_failure.py")


@pytest.fixture
def bystander():
    """An unrelated live process (what a stale pid may have become)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _cluster_json(log_dir, pid: int, pid_start, store_root: str, agent_pid: int) -> None:
    os.makedirs(log_dir, exist_ok=True)
    state = {"cluster_id": "c0ffee00", "job_id": "cluster-c0ffee00", "pid": pid, "pid_start": pid_start,
             "store_root": store_root, "log_dir": str(log_dir), "state": "running",
             "machines": [{"slot": 0, "id": "m0", "agent_pid": agent_pid, "state": "running"}]}
    (log_dir / "cluster.json").write_text(json.dumps(state))


def _inject(log_dir, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, INJECT, "--log-dir", str(log_dir), *flags],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _victim_dir(tmp_path):
    victim = tmp_path / "precious" / "job" / "m0"
    victim.mkdir(parents=True)
    (victim / "data").write_text("keep me")
    return victim


def _assert_refused(out, message: str) -> None:
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_a_stale_cluster_file_is_refused(tmp_path, bystander):
    dead = subprocess.Popen(["true"])
    dead.wait()
    victim = _victim_dir(tmp_path)
    _cluster_json(tmp_path / "logs", dead.pid, 12345, str(tmp_path / "precious"), bystander.pid)
    _assert_refused(_inject(tmp_path / "logs", "--kind", "machine", "--target", "0"), "stale or foreign")
    assert bystander.poll() is None and (victim / "data").exists()


def test_a_cluster_file_naming_another_process_is_refused(tmp_path, bystander):
    victim = _victim_dir(tmp_path)
    # the bystander's pid, with a start time that is not its own (or none at all)
    for start in (procs.start_time(bystander.pid) + 1, None):
        _cluster_json(tmp_path / "logs", bystander.pid, start, str(tmp_path / "precious"), bystander.pid)
        _assert_refused(_inject(tmp_path / "logs", "--kind", "machine", "--target", "0"), "stale or foreign")
    assert bystander.poll() is None and (victim / "data").exists()


def test_a_forged_file_with_a_real_pid_and_start_time_reaches_nothing(tmp_path, bystander):
    """Even a file that gets pid and start time right (the bystander's) reaches nothing: the agent
    pid lacks the cluster's mark, the store root lacks the cluster's claim."""
    victim = _victim_dir(tmp_path)
    _cluster_json(tmp_path / "logs", bystander.pid, procs.start_time(bystander.pid), str(tmp_path / "precious"),
                  bystander.pid)
    _assert_refused(_inject(tmp_path / "logs", "--kind", "machine", "--target", "0"),
                    "not the store root of cluster c0ffee00: nothing deleted")
    assert bystander.poll() is None and (victim / "data").exists()


def test_wiping_stays_inside_the_cluster_root(tmp_path):
    root = tmp_path / "root"
    mark_store_root(str(root), "c0ffee00")
    assert os.stat(root).st_mode & 0o777 == 0o700 and (root / STORE_MARK).read_text() == "c0ffee00"
    (root / "job" / "m0").mkdir(parents=True)
    outside = _victim_dir(tmp_path)
    os.symlink(outside.parent, root / "linked")            # a job directory that is a link: not followed
    with pytest.raises(UsageError, match="not a plain name"):
        wipe_machine_store(str(root), "../../precious/job/m0", "c0ffee00")
    with pytest.raises(UsageError, match="not the store root of cluster other"):
        wipe_machine_store(str(root), "m0", "other")
    wipe_machine_store(str(root), "m0", "c0ffee00")
    assert not (root / "job" / "m0").exists() and (outside / "data").exists()
    with pytest.raises(UsageError, match="exists and is not an empty directory"):
        mark_store_root(str(tmp_path / "precious"), "c0ffee00")   # --store-root naming a full directory


def test_local_cluster_never_takes_a_users_directory_as_its_store_root(tmp_path):
    """The cluster removes its store root when it ends: a --store-root that already holds
    something is one line and exit 2 before anything starts, and is left as it was."""
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", "1",
                          "--store-root", str(precious), "--", "pretrain_gpt.py", "--log-dir", str(tmp_path / "log")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    _assert_refused(out, f"--store-root {precious}: exists and is not an empty directory")
    assert (precious / "thesis.tex").read_text() == "keep me"

"""plot_recovery.py on a recorded run: a real one-machine cluster whose worker is SIGKILLed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e import ROOT, read_recoveries, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

TOOL = os.path.join(ROOT, "tools", "plot_recovery.py")


@pytest.fixture(scope="module")
def recorded_run(byte_corpus, tmp_path_factory) -> str:
    """In-memory checkpoints every 4 iterations, a worker killed after iteration 6: 2 iterations redone."""
    log_dir = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", "1",
           "--inject", "worker:0@iteration=6", "--max-restarts", "2", "--timeout", "100",
           "--", "pretrain_gpt.py", *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "10",
                                                   "--gemini-interval", "4", "--gemini-profile-iters", "2")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir


def test_renders_a_recorded_run(recorded_run, tmp_path):
    from plot_recovery import load_run, phase_spans, split_repeated

    run = load_run(recorded_run)
    (rec,) = read_recoveries(recorded_run)
    assert rec["iteration"] == 4 and rec["iterations_lost"] >= 2
    first, again = split_repeated(run["metrics"])
    assert [r["iteration"] for r in first] == list(range(1, 11))
    # the redone iterations are exactly those after the recovered checkpoint, up to where it had got
    assert [r["iteration"] for r in again] == list(range(5, rec["iteration_before_failure"] + 1))
    spans = phase_spans(rec)
    assert [s[0] for s in spans][-2:] == ["retrieval", "first iteration"]
    assert all(a < b for _, a, b, _ in spans) and all(x[2] <= y[1] for x, y in zip(spans, spans[1:]))
    assert spans[0][1] == rec["injected_at"] and spans[-1][2] == rec["first_iteration_at"]

    png = str(tmp_path / "run.png")
    out = subprocess.run([sys.executable, TOOL, "--log-dir", recorded_run, "--out", png],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{len(again)} trained again" in out.stdout and "1 recoveries" in out.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < os.path.getsize(png) < 200_000


@pytest.mark.parametrize("case", ["missing", "no_metrics"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    log_dir = str(tmp_path / "nothing") if case == "missing" else str(tmp_path)
    if case == "no_metrics":
        (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "valid_loss": 3.0, "time": 1.0}\n')
    out = subprocess.run([sys.executable, TOOL, "--log-dir", log_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")
    assert not os.path.exists(os.path.join(log_dir, "recovery.png"))

"""tools/evaluate.py --smoke: every section runs for real (shrunk) and lands in the report."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.e2e import ROOT

pytestmark = pytest.mark.slow   # spawns processes

TOOL = os.path.join(ROOT, "tools", "evaluate.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval"))
    run = subprocess.run([sys.executable, TOOL, "--out", out, "--smoke"], capture_output=True, text=True,
                         timeout=400, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_report_has_every_section_with_its_figure(smoke):
    report = open(os.path.join(smoke, "report.md")).read()
    headings = ["## 1. Iteration time", "## 2. Checkpoint time", "## 3. Wasted time per failure",
                "## 4. Recovery time by phase", "## 5. Recovery probability", "## 6. Large clusters (simulated)"]
    assert [h for h in headings if h not in report] == []
    assert "Section failed" not in report
    for png in ("iteration_time.png", "checkpoint_time.png", "wasted_time.png", "recovery_phases.png",
                "recovery_run.png", "recovery_probability.png", "simulated_clusters.png"):
        assert f"]({png})" in report
        with open(os.path.join(smoke, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert "Poisson" in report and "| N=16 m=2 k=2 group | 0.9333 |" in report
    res = json.load(open(os.path.join(smoke, "results.json")))
    for m, r in res["iteration_time"]["methods"].items():   # the table shows the measured numbers
        assert f"| {m} | {r['s_per_iter']:.4f} | {r['x_none']:.3f} |" in report, m
    assert "Smoke mode: the figures of sections 1-4 are not meaningful." in report


def test_results_are_measured_from_the_runs(smoke):
    res = json.load(open(os.path.join(smoke, "results.json")))
    it = res["iteration_time"]["methods"]
    assert set(it) == {"none", "interleaved", "blocking"} and all(m["s_per_iter"] > 0 for m in it.values())
    for m in ("interleaved", "blocking"):   # each ratio is the median of its rounds' ratios to "none"
        rounds = it[m]["per_round_s"]
        assert len(rounds) == len(it["none"]["per_round_s"]) >= 1
        assert it[m]["x_none"] == pytest.approx(statistics.median(
            x / n for x, n in zip(rounds, it["none"]["per_round_s"])))
        assert it[m]["s_per_iter"] == pytest.approx(statistics.median(rounds))
    # Only the GEMINI runs checkpointed: time blocked in the checkpointer comes from their steps.
    assert it["none"]["blocked_s"] == 0 and it["interleaved"]["blocked_s"] > 0 and it["blocking"]["blocked_s"] > 0
    runs = res["wasted_time"]["runs"]["worker"]
    assert runs["GEMINI"]["source"] == "local" and runs["GEMINI"]["lost"] <= 1
    assert runs["Strawman"]["source"] == "persistent" and runs["Strawman"]["lost"] >= 1
    phases = res["recovery_phases"]["phases_s"]["worker"]
    assert sum(v for v in phases.values() if v) == pytest.approx(res["recovery_phases"]["recovery_s"]["worker"],
                                                                abs=0.05)
    assert res["checkpoint_time"]["blocked_s"]["torch.save (disk, fsync)"] > 0


def test_bad_sections_exit_2(tmp_path):
    out = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path), "--sections", "1,9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: --sections") and not os.listdir(tmp_path)

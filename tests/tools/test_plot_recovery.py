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
    """In-memory checkpoints every 4 iterations; the worker is killed half-way through copying
    the first snapshot from iteration 6 on (8, or 12 if it was armed late): the iterations
    since the previous snapshot are trained again."""
    log_dir = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", "1",
           "--inject", "worker:0@iteration=6@during=copy", "--max-restarts", "2", "--timeout", "100",
           "--", "pretrain_gpt.py", *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "14",
                                                   "--gemini-interval", "4", "--gemini-profile-iters", "2")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir


def test_renders_a_recorded_run(recorded_run, tmp_path):
    from plot_recovery import load_run, phase_spans, split_repeated

    run = load_run(recorded_run)
    (rec,) = read_recoveries(recorded_run)
    (injection,) = run["injections"]
    k = injection["window"]["iteration"]   # the snapshot being copied: 8 (12 if armed late)
    assert k in (8, 12)
    # k's snapshot never committed and k itself was not logged: back to the one before it
    assert rec["iteration"] == k - 4
    assert rec["iteration_before_failure"] == k - 1 and rec["iterations_lost"] == k - 1 - rec["iteration"]
    first, again = split_repeated(run["metrics"])
    assert [r["iteration"] for r in first] == list(range(1, 15))
    # the redone iterations are exactly those after the recovered checkpoint, up to where it had got
    assert [r["iteration"] for r in again] == list(range(rec["iteration"] + 1, k))
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
    assert_drawn(png, run, rec, again)


def _pixels(image, rgb, tol: float) -> int:
    """How many pixels are within `tol` of the colour `rgb` (0..1 floats) in every channel."""
    import numpy as np

    return int((np.abs(image[..., :3] - np.asarray(rgb)).max(axis=-1) <= tol).sum())


def assert_drawn(png: str, run: dict, rec: dict, again: list) -> None:
    """What the picture must show, by the colours plot_recovery.py documents: the failure
    (a red line), each recovery phase long enough to span pixels (a shade of its colour
    over white) and the iterations trained again (purple circles). Counted above the
    legend (the bottom tenth of the figure), whose samples show every colour regardless."""
    import numpy as np
    from matplotlib import colors
    import matplotlib.image

    from plot_recovery import phase_spans

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    plot = image[:int(image.shape[0] * 0.88)]
    # Thin lines are anti-aliased: their pixels are near their colour, rarely on it.
    assert _pixels(plot, colors.to_rgb("#d62728"), 0.2) >= 100, "no failure line"
    times = [r["time"] for r in run["metrics"]] + [e["time"] for e in run["injections"] + run["failures"]]
    wide = [(name, colour) for name, a, b, colour in phase_spans(rec) if b - a > 0.03 * (max(times) - min(times))]
    assert wide, phase_spans(rec)
    for name, colour in wide:   # alpha 0.25 over the white axes; 3% of the axes is thousands of pixels
        assert _pixels(plot, 0.75 + 0.25 * np.asarray(colors.to_rgb(colour)), 0.02) >= 1000, name
    markers = _pixels(plot, colors.to_rgb("#9467bd"), 0.2)
    assert markers >= 50 if again else markers == 0, ("trained-again markers", markers)


@pytest.mark.parametrize("case", ["missing", "no_metrics"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    log_dir = str(tmp_path / "nothing") if case == "missing" else str(tmp_path)
    if case == "no_metrics":
        (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "valid_loss": 3.0, "time": 1.0}\n')
    out = subprocess.run([sys.executable, TOOL, "--log-dir", log_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")
    assert not os.path.exists(os.path.join(log_dir, "recovery.png"))

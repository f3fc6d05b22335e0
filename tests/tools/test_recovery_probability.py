import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow   # spawns processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "recovery_probability.py")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tool finds the repo itself
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd="/", timeout=60)


def test_paper_numbers_and_json_last_line():
    out = _run("--machines", 16, "--replicas", 2, "--failures", 3, "--trials", 4000, "--seed", 3)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["machines"] == 16 and result["replicas"] == 2 and result["failures"] == 3
    assert result["auto"] == "group"
    assert result["probability"]["group"] == pytest.approx(0.8, abs=1e-12)
    assert result["probability"]["mixed"] == result["probability"]["group"]
    assert result["probability"]["ring"] < result["probability"]["group"]
    for name, p in result["probability"].items():
        assert abs(result["monte_carlo"][name] - p) <= 3 * (p * (1 - p) / 4000) ** 0.5
    assert any(line.startswith("auto picks group") for line in lines)
    assert any("mixed not listed" in line for line in lines)


def test_mixed_when_m_does_not_divide_n():
    out = _run("--machines", 5, "--replicas", 2, "--failures", 2, "--trials", 0)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["auto"] == "mixed"
    assert set(result["probability"]) == {"ring", "mixed"} and result["monte_carlo"] == {}
    # 10 failure pairs; mixed (group {0,1} + ring {2,3,4}) loses 1 + 3 of them, the ring of 5 loses 5
    assert result["probability"] == {"mixed": pytest.approx(0.6), "ring": pytest.approx(0.5)}


def test_single_placement():
    out = _run("--machines", 8, "--replicas", 2, "--failures", 2, "--placement", "ring", "--trials", 100)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(result["probability"]) == ["ring"] and result["probability"]["ring"] == pytest.approx(20 / 28)


@pytest.mark.parametrize("args", [
    ["--machines", 4, "--replicas", 2, "--failures", 5],
    ["--machines", 4, "--replicas", 0, "--failures", 1],
    ["--machines", "four", "--replicas", 2, "--failures", 1],
    ["--machines", 4, "--replicas", 2.5, "--failures", 1],
    ["--machines", 5, "--replicas", 2, "--failures", 1, "--placement", "group"],
    ["--machines", 5, "--replicas", 2],
])
def test_bad_input_exits_2_with_one_line(args):
    out = _run(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr

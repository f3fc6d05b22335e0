"""The large-cluster simulator: closed form by hand on a tiny case, exact probabilities, Monte Carlo."""
from __future__ import annotations

import math

import pytest

from gemini_lm.eval.simulator import (DAY_S, ClusterModel, Method, assumptions, checkpoint_interval,
                                      effective_ratio, expected_waste, memory_probability, monte_carlo,
                                      recoverable_counts, simultaneous_failures, sweep)
from gemini_lm.gemini.probability import recovery_probability


def tiny_model(**kw) -> ClusterModel:
    """4 machines; numbers chosen so every term is a round number (see test_tiny_case_by_hand)."""
    window = 3600.0
    base = dict(machines=4, hardware_fraction=0.5, window_s=window,
                # lambda_hw * window = ln 2 per machine: each other machine joins the event with q = 1/2
                failures_per_machine_day=math.log(2) * DAY_S / (0.5 * window),
                iteration_s=10.0, checkpoint_bytes=4e9,             # 1 GB per machine
                network_bandwidth=1e9, local_bandwidth=2e9, remote_bandwidth=1e8,
                restart_s=3.0, strawman_interval_s=100.0)
    return ClusterModel(**{**base, **kw})


def test_tiny_case_by_hand():
    model = tiny_model()
    # K - 1 ~ Binomial(3, 1/2); group placement m=2 on 4 machines: {0,1}, {2,3}.
    assert simultaneous_failures(model) == pytest.approx({1: 1 / 8, 2: 3 / 8, 3: 3 / 8, 4: 1 / 8})
    # k=1 always recoverable; k=2: 4 of the 6 pairs are not a whole group; k>=3 always hits a group.
    p_mem = 1 / 8 + 3 / 8 * 4 / 6
    assert memory_probability(model, 2) == pytest.approx(p_mem)
    # GEMINI: t_ckpt = max(1 GB / 2 GB/s, 1 GB / 1 GB/s) = 1 s, 1/f = 10 s (one iteration)
    w_local = 1 + 10 / 2 + 0.5 + 3          # + local retrieve 0.5 s + restart
    w_peer = 1 + 10 / 2 + (1 + 0.5) + 3     # fetch from a peer, then copy to the GPU
    w_remote = 40 + 40 / 2 + 40 + 3         # 4 GB at 0.1 GB/s to write, interval 40 s, 40 s to read
    expected = 0.5 * w_local + 0.5 * (p_mem * w_peer + (1 - p_mem) * w_remote)
    w = expected_waste(model, Method("gemini", 2))
    assert (w.checkpoint_s, w.interval_s, w.restart_s) == (1.0, 10.0, 3.0)
    assert w.total_s == pytest.approx(expected)
    assert w.p_memory == pytest.approx(0.5 + 0.5 * p_mem)
    assert expected_waste(model, Method("highfreq")).total_s == pytest.approx(w_remote)
    # Strawman: every 100 s -> 1/f = 100 s
    assert expected_waste(model, Method("strawman")).total_s == pytest.approx(40 + 50 + 40 + 3)
    rate = 4 * model.failures_per_machine_day / DAY_S
    assert effective_ratio(model, Method("gemini", 2)) == pytest.approx(1 - rate * expected)
    # m = 1: nothing on peers, every hardware failure goes to remote storage
    assert expected_waste(model, Method("gemini", 1)).total_s == pytest.approx(
        0.5 * (0.5 + 10 / 2 + 0.5 + 3) + 0.5 * w_remote)   # t_ckpt is just the 0.5 s local copy


@pytest.mark.parametrize("n", [5, 8, 9, 12, 16])
def test_counts_agree_with_exact_recovery_probability(n):
    for m in (1, 2, 3, 4):
        for placement in ["auto", "ring", "mixed"] + (["group"] if n % m == 0 else []):
            counts = recoverable_counts(n, m, placement, n)
            for k in range(n + 1):
                assert counts[k] / math.comb(n, k) == recovery_probability(n, m, k, placement), (n, m, placement, k)


def test_memory_probability_is_the_mixture_of_exact_probabilities():
    model = ClusterModel(machines=12, failures_per_machine_day=5.0, window_s=7200.0)
    pmf = simultaneous_failures(model)
    assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
    for m, placement in ((2, "group"), (3, "ring"), (5, "mixed")):
        expected = sum(p * recovery_probability(12, m, k, placement) for k, p in pmf.items())
        assert memory_probability(model, m, placement) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", [Method("gemini", 2), Method("gemini", 3, "ring"), Method("highfreq"),
                                    Method("strawman")])
@pytest.mark.slow
def test_monte_carlo_agrees_with_closed_form(method):
    model = tiny_model(machines=8, iteration_s=7.0)   # 1/f not a multiple of t_ckpt: phases matter
    closed = expected_waste(model, method)
    mc = monte_carlo(model, method, samples=20_000, seed=1)
    sigma = mc["std_waste_s"] / 20_000 ** 0.5
    assert abs(mc["mean_waste_s"] - closed.total_s) < 4 * sigma + 1e-9, (mc, closed)
    assert mc["p_memory"] == pytest.approx(closed.p_memory, abs=0.015)
    assert mc["ratio"] == pytest.approx(effective_ratio(model, method), abs=0.01)


def test_checkpoint_interval_is_whole_iterations():
    assert checkpoint_interval(0.1, 10.0) == 10.0
    assert checkpoint_interval(10.0, 10.0) == 10.0
    assert checkpoint_interval(10.5, 10.0) == 20.0


def test_large_clusters_favour_memory_checkpoints():
    methods = [Method("gemini", 2), Method("highfreq"), Method("strawman")]
    rows = {(r["machines"], r["name"]): r for r in sweep(ClusterModel(), [16, 1000, 10_000], methods)}
    for n in (16, 1000, 10_000):
        assert rows[n, "gemini"]["ratio"] > rows[n, "highfreq"]["ratio"] >= rows[n, "strawman"]["ratio"]
    assert rows[10_000, "gemini"]["ratio"] > 0.9 and rows[10_000, "highfreq"]["ratio"] == 0.0
    assert rows[16, "gemini"]["ratio"] < 1.0      # restarts and the half iteration are never free


def test_assumptions_name_their_numbers_and_bad_models_are_refused():
    text = " ".join(assumptions(ClusterModel(window_s=123.0)))
    assert "123 s" in text and "Poisson" in text and "t_ckpt + 1/(2f)" in text
    with pytest.raises(ValueError):
        ClusterModel(machines=0)
    with pytest.raises(ValueError):
        ClusterModel(hardware_fraction=1.5)
    with pytest.raises(ValueError):
        Method("disk")

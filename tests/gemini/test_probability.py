import math
from fractions import Fraction

import pytest

from gemini_lm.gemini.probability import (enumerate_probability, exact_recovery_probability,
                                          monte_carlo_probability, recovery_probability, ring_good_count)


def _cases(max_n=10):
    for n in range(1, max_n + 1):
        for m in range(1, 5):
            for strategy in ("group", "ring", "mixed", "auto"):
                if strategy == "group" and n % min(m, n):
                    continue
                yield n, m, strategy


@pytest.mark.parametrize("n,m,strategy", list(_cases()))
def test_exact_equals_enumeration(n, m, strategy):
    for k in range(n + 1):
        exact = exact_recovery_probability(n, m, k, strategy)
        assert isinstance(exact, Fraction)
        assert exact == enumerate_probability(n, m, k, strategy), (n, m, k, strategy)
        if k < min(m, n):
            assert exact == 1  # fewer failures than copies: always recoverable


def test_paper_values_n16_m2():
    assert recovery_probability(16, 2, 2, "group") == pytest.approx(0.9333, abs=5e-5)
    assert recovery_probability(16, 2, 3, "group") == pytest.approx(0.8000, abs=5e-5)
    assert exact_recovery_probability(16, 2, 2, "group") == Fraction(14, 15)
    assert exact_recovery_probability(16, 2, 3, "group") == Fraction(4, 5)


@pytest.mark.parametrize("n,m", [(16, 2), (12, 3), (20, 4)])
def test_paper_closed_form_in_its_range_and_bound_beyond(n, m):
    for k in range(m, n + 1):
        exact = exact_recovery_probability(n, m, k, "group")
        paper = 1 - Fraction(n // m * math.comb(n - m, k - m), math.comb(n, k))
        if k < 2 * m:
            assert exact == paper
        else:
            assert exact >= paper  # only a lower bound once two groups can die


def test_group_beats_ring_when_m_divides_n():
    for k in range(2, 16):
        assert recovery_probability(16, 2, k, "group") >= recovery_probability(16, 2, k, "ring")


def test_ring_count_large_n_matches_transfer_matrix():
    # independent check for a ring too big to enumerate: DP over (first run, current run)
    n, m = 40, 3
    for k in (0, 5, 17, 26, 27, 40):
        count = 0
        for first in range(m):  # length of the run of failures at the start
            # dp[run][ones] after fixing positions 0..first (first ones then a survivor)
            if first >= n:
                continue
            dp = {(0, first): 1}
            for _ in range(first + 1, n):
                nxt = {}
                for (run, ones), c in dp.items():
                    nxt[(0, ones)] = nxt.get((0, ones), 0) + c
                    if run + 1 < m:
                        nxt[(run + 1, ones + 1)] = nxt.get((run + 1, ones + 1), 0) + c
                dp = nxt
            count += sum(c for (run, ones), c in dp.items() if ones == k and run + first < m)
        assert ring_good_count(n, m, k) == count, k


@pytest.mark.parametrize("n,m,k,strategy", [(16, 2, 3, "ring"), (16, 2, 4, "group"), (13, 3, 5, "mixed"),
                                            (64, 4, 12, "auto")])
def test_monte_carlo_within_three_sigma(n, m, k, strategy):
    trials = 4000
    p = recovery_probability(n, m, k, strategy)
    est = monte_carlo_probability(n, m, k, strategy, trials=trials, seed=1)
    assert abs(est - p) <= 3 * math.sqrt(p * (1 - p) / trials) + 1e-12
    assert est == monte_carlo_probability(n, m, k, strategy, trials=trials, seed=1)  # seeded


def test_bad_input():
    with pytest.raises(ValueError):
        recovery_probability(4, 2, 5)
    with pytest.raises(ValueError):
        recovery_probability(4, 0, 1)
    with pytest.raises(ValueError):
        recovery_probability(5, 2, 1, "group")
    with pytest.raises(ValueError):
        recovery_probability(4, 2, 1.5)
    with pytest.raises(ValueError):
        monte_carlo_probability(4, 2, 1, trials=0)

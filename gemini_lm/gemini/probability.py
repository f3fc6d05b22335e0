"""Probability that every checkpoint survives k simultaneous machine failures.

k of N machines fail, every k-subset equally likely. Recovery from CPU memory succeeds
when each machine's checkpoint still has a live holder (placement.py). We count the
"good" failure sets exactly with Python integers:

  group  inclusion-exclusion over the N/m groups (a bad set contains a whole group):
         good = sum_i (-1)^i C(N/m, i) C(N - i*m, k - i*m).
         For m <= k < 2m only i <= 1 contributes: the paper's 1 - (N/m) C(N-m,k-m)/C(N,k).
  ring   holders of machine i are the m consecutive machines i..i+m-1, so a bad set
         contains m cyclically consecutive machines. Good sets with z = r - j survivors:
         cut the circle at each survivor; the runs of failed machines between survivors
         are z parts in [0, m-1] summing to j. Each (start survivor, parts) pair is one
         labelled set counted once per survivor: count = r * W(z, j) / z.
  mixed  failures split independently between the groups and the ring: the product of
         the per-unit generating polynomials, coefficient of x^k.

`enumerate_probability` and `monte_carlo_probability` use the placement's holder sets
directly, so the tests check the closed forms against the definitions.
"""
from __future__ import annotations

import itertools
import random
from fractions import Fraction
from math import comb

from gemini_lm.gemini.placement import plan_placement, resolve_strategy


def _check(num_machines: int, replicas: int, failures: int, strategy: str) -> tuple[str, int]:
    for name, value in (("machines", num_machines), ("replicas", replicas), ("failures", failures)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer (got {value!r})")
    if not 0 <= failures <= num_machines:
        raise ValueError(f"failures must be in [0, machines={num_machines}] (got {failures})")
    strategy, m, _ = resolve_strategy(num_machines, replicas, strategy)
    return strategy, m


def _bounded_compositions(parts: int, total: int, cap: int) -> int:
    """Number of ways to write `total` as `parts` ordered integers in [0, cap-1]."""
    if parts == 0:
        return int(total == 0)
    return sum((-1) ** i * comb(parts, i) * comb(total - i * cap + parts - 1, parts - 1)
               for i in range(min(parts, total // cap) + 1))


def ring_good_count(ring_size: int, window: int, failed: int) -> int:
    """Failure sets of size `failed` on a ring of `ring_size` with no `window` consecutive."""
    if failed == ring_size:
        return int(ring_size < window)
    survivors = ring_size - failed
    num = ring_size * _bounded_compositions(survivors, failed, window)
    assert num % survivors == 0
    return num // survivors


def _group_polynomial(m: int) -> list[int]:
    """x^j coefficient: ways j failures hit a group of m without killing all of it."""
    return [comb(m, j) for j in range(m)] + [0]


def _multiply(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] += x * y
    return out


def good_failure_sets(num_machines: int, replicas: int, failures: int, strategy: str = "auto") -> int:
    """Number of `failures`-subsets of the machines that leave every checkpoint recoverable."""
    strategy, m = _check(num_machines, replicas, failures, strategy)
    n, k = num_machines, failures
    if strategy == "group":
        return sum((-1) ** i * comb(n // m, i) * comb(n - i * m, k - i * m)
                   for i in range(min(n // m, k // m) + 1))
    if strategy == "ring":
        return ring_good_count(n, m, k)
    num_groups = n // m - 1
    ring_size = n - m * num_groups
    poly = [ring_good_count(ring_size, m, j) for j in range(ring_size + 1)]
    for _ in range(num_groups):
        poly = _multiply(poly, _group_polynomial(m))
    return poly[k]


def exact_recovery_probability(num_machines: int, replicas: int, failures: int,
                               strategy: str = "auto") -> Fraction:
    good = good_failure_sets(num_machines, replicas, failures, strategy)
    return Fraction(good, comb(num_machines, failures))


def recovery_probability(num_machines: int, replicas: int, failures: int, strategy: str = "auto") -> float:
    """Exact Pr[all checkpoints recoverable from memory | k uniform random failures]."""
    return float(exact_recovery_probability(num_machines, replicas, failures, strategy))


def _holder_masks(num_machines: int, replicas: int, strategy: str) -> list[int]:
    placement = plan_placement([str(i) for i in range(num_machines)], replicas, strategy)
    return [sum(1 << int(h) for h in placement.holders(str(i))) for i in range(num_machines)]


def _survives(masks: list[int], failed_mask: int) -> bool:
    return all(h & failed_mask != h for h in masks)


def enumerate_probability(num_machines: int, replicas: int, failures: int, strategy: str = "auto") -> Fraction:
    """Brute force over all C(N, k) failure sets, from the placement's holder sets."""
    _check(num_machines, replicas, failures, strategy)
    masks = _holder_masks(num_machines, replicas, strategy)
    good = sum(_survives(masks, sum(1 << i for i in failed))
               for failed in itertools.combinations(range(num_machines), failures))
    return Fraction(good, comb(num_machines, failures))


def monte_carlo_probability(num_machines: int, replicas: int, failures: int, strategy: str = "auto",
                            trials: int = 10_000, seed: int = 0) -> float:
    """Fraction of `trials` uniformly drawn failure sets that leave everything recoverable."""
    _check(num_machines, replicas, failures, strategy)
    if trials < 1:
        raise ValueError(f"trials must be >= 1 (got {trials})")
    masks = _holder_masks(num_machines, replicas, strategy)
    rng = random.Random(seed)
    machines = range(num_machines)
    good = sum(_survives(masks, sum(1 << i for i in rng.sample(machines, failures)))
               for _ in range(trials))
    return good / trials

"""Effective training time of a large cluster under failures: GEMINI vs remote-storage checkpoints.

The paper's large-scale figure, as a model small enough to read. Per failure the time
wasted is (design doc §1)

    W = t_ckpt + 1/(2f) + t_retrieve (+ t_restart, the same for every method)

where 1/f = ceil(t_ckpt / T_iter) * T_iter is the checkpoint interval: checkpoints start
at iteration boundaries, one at a time. A failure at a uniformly random moment loses the
work since the start of the newest *completed* checkpoint, t_ckpt + 1/(2f) on average.
Failures arrive at rate N * lambda; the fraction of wall-clock time spent on useful
training is 1 - N * lambda * E[W] (wastes add up, first order; clamped at 0).

Methods:
  gemini    checkpoint to CPU memory (own + m-1 peers) as often as replication allows;
            software failure: retrieve from local memory; hardware failure: from a
            peer's memory if every lost machine's checkpoint has a live holder
            (probability.py, exact), else from remote storage, which GEMINI writes in the
            background at the storage's pace (the HighFreq schedule without its stall).
  highfreq  checkpoint to remote storage as often as its bandwidth allows.
  strawman  checkpoint to remote storage every `strawman_interval_s`.

Every assumption is a field of ClusterModel, and `assumptions()` says them in words.
`monte_carlo()` samples the same model the long way (explicit checkpoint schedules,
explicit failed machines checked against the placement's holder sets) to test the
closed form.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from gemini_lm.gemini.placement import plan_placement, resolve_strategy
from gemini_lm.gemini.probability import good_failure_sets, ring_good_count

DAY_S = 86400.0
METHODS = ("gemini", "highfreq", "strawman")


@dataclass(frozen=True)
class ClusterModel:
    machines: int = 16
    # OPT-175B's logbook: ~110 failures in ~2 months on 124 machines (992 A100s)
    failures_per_machine_day: float = 110 / (124 * 61)
    hardware_fraction: float = 0.5       # failures that lose the machine (and its CPU memory)
    window_s: float = 600.0              # hardware failures this close together are simultaneous
    iteration_s: float = 10.0            # constant in N: per-machine batch fixed (weak scaling of data)
    checkpoint_bytes: float = 1.4e12     # whole job: 100B params x 14 B (fp16 + fp32 master + Adam)
    remote_bandwidth: float = 2.5e9      # B/s, aggregate, shared by all machines (20 Gbps)
    network_bandwidth: float = 50e9      # B/s per machine to its peers (400 Gbps, p4d)
    local_bandwidth: float = 25e9        # B/s per machine between GPU and CPU memory (PCIe 4 x16)
    restart_s: float = 15.0              # detection + process restart, same for every method
    strawman_interval_s: float = 3 * 3600.0

    def __post_init__(self):
        if not isinstance(self.machines, int) or self.machines < 1:
            raise ValueError(f"machines must be a positive integer (got {self.machines!r})")
        if not 0 <= self.hardware_fraction <= 1:
            raise ValueError(f"hardware_fraction must be in [0, 1] (got {self.hardware_fraction})")
        for name in ("failures_per_machine_day", "window_s", "restart_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("iteration_s", "checkpoint_bytes", "remote_bandwidth", "network_bandwidth",
                     "local_bandwidth", "strawman_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")

    @property
    def shard_bytes(self) -> float:
        """Each machine's checkpoint: the job's state sharded evenly (ZeRO-3 style)."""
        return self.checkpoint_bytes / self.machines

    @property
    def failures_per_s(self) -> float:
        """Cluster-wide failure rate N * lambda."""
        return self.machines * self.failures_per_machine_day / DAY_S


@dataclass(frozen=True)
class Method:
    name: str                  # gemini | highfreq | strawman
    replicas: int = 2          # gemini only: m
    placement: str = "auto"    # gemini only

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")

    def label(self, machines: int | None = None) -> str:
        if self.name != "gemini":
            return {"highfreq": "HighFreq (remote)", "strawman": "Strawman (remote, rare)"}[self.name]
        strategy = self.placement
        if machines is not None:
            strategy = resolve_strategy(machines, self.replicas, self.placement)[0]
        return f"GEMINI m={self.replicas} ({strategy})"


@dataclass(frozen=True)
class Waste:
    """Expected seconds wasted per failure, and where they come from."""
    checkpoint_s: float    # t_ckpt of the method's own tier
    interval_s: float      # 1/f of that tier
    lost_s: float          # expected work lost (t_ckpt + 1/(2f), mixed over sources)
    retrieve_s: float      # expected retrieval
    restart_s: float
    p_memory: float        # probability the failure is recovered from CPU memory
    total_s: float


def checkpoint_interval(checkpoint_s: float, iteration_s: float) -> float:
    """1/f: the next checkpoint starts at the first iteration boundary after the last one ends."""
    return max(1, math.ceil(checkpoint_s / iteration_s - 1e-12)) * iteration_s


def simultaneous_failures(model: ClusterModel, tail: float = 1e-15) -> dict[int, float]:
    """Pr[K = k] machines lost in one hardware failure event.

    The first machine fails; each of the other N-1 loses its memory within the window
    with probability q = 1 - exp(-lambda_hw * window), independently: K - 1 ~ Binomial(N-1, q).
    Terms past the mode are dropped once below `tail`.
    """
    n = model.machines
    q = -math.expm1(-model.failures_per_machine_day * model.hardware_fraction * model.window_s / DAY_S)
    if q == 0 or n == 1:
        return {1: 1.0}
    pmf, p = {}, (1 - q) ** (n - 1)
    for j in range(n):
        pmf[j + 1] = p
        if j > (n - 1) * q and p < tail:   # past the mode, terms only shrink (geometrically)
            break
        p *= (n - 1 - j) / (j + 1) * q / (1 - q)
    return pmf


def recoverable_counts(machines: int, replicas: int, placement: str, max_failures: int) -> list[int]:
    """Good failure sets of each size 0..max_failures (probability.py's counts).

    Mixed placement is the product of per-unit generating polynomials; probability.py
    multiplies them out in full, O(N^2) per k, so here they are truncated at x^max_failures.
    """
    strategy, m, _ = resolve_strategy(machines, replicas, placement)
    kmax = min(max_failures, machines)
    if strategy != "mixed":
        return [good_failure_sets(machines, m, k, strategy) for k in range(kmax + 1)]
    num_groups = machines // m - 1
    ring = machines - m * num_groups
    poly = [ring_good_count(ring, m, j) if j <= ring else 0 for j in range(kmax + 1)]
    group = [math.comb(m, j) if j < m else 0 for j in range(kmax + 1)]
    for _ in range(num_groups):
        poly = [sum(poly[i] * group[k - i] for i in range(k + 1)) for k in range(kmax + 1)]
    return poly


def memory_probability(model: ClusterModel, replicas: int, placement: str = "auto") -> float:
    """Pr[a hardware failure event is recoverable from CPU memory] (exact per k, probability.py)."""
    pmf = simultaneous_failures(model)
    good = recoverable_counts(model.machines, replicas, placement, max(pmf))
    return sum(p * good[k] / math.comb(model.machines, k) for k, p in pmf.items())


def _tiers(model: ClusterModel, method: Method) -> dict[str, tuple[float, float, float]]:
    """(t_ckpt, 1/f, t_retrieve) of every source the method may recover from."""
    t = model.iteration_s
    remote_ckpt = model.checkpoint_bytes / model.remote_bandwidth
    remote_retrieve = model.checkpoint_bytes / model.remote_bandwidth    # all machines read at once
    remote = (remote_ckpt, checkpoint_interval(remote_ckpt, t), remote_retrieve)
    if method.name == "highfreq":
        return {"remote": remote}
    if method.name == "strawman":
        return {"remote": (remote_ckpt, max(remote[1], checkpoint_interval(model.strawman_interval_s, t)),
                           remote_retrieve)}
    s = model.shard_bytes
    m = min(method.replicas, model.machines)
    mem_ckpt = max(s / model.local_bandwidth, (m - 1) * s / model.network_bandwidth)
    mem_interval = checkpoint_interval(mem_ckpt, t)
    return {"local": (mem_ckpt, mem_interval, s / model.local_bandwidth),
            "peer": (mem_ckpt, mem_interval, s / model.network_bandwidth + s / model.local_bandwidth),
            "remote": remote}


def source_probabilities(model: ClusterModel, method: Method) -> dict[str, float]:
    """Pr[a failure is recovered from each source]."""
    if method.name != "gemini":
        return {"remote": 1.0}
    h = model.hardware_fraction
    p_peer = memory_probability(model, method.replicas, method.placement)
    return {"local": 1 - h, "peer": h * p_peer, "remote": h * (1 - p_peer)}


def expected_waste(model: ClusterModel, method: Method) -> Waste:
    """The closed form: E[W] mixed over recovery sources."""
    tiers, probs = _tiers(model, method), source_probabilities(model, method)
    lost = sum(p * (tiers[src][0] + tiers[src][1] / 2) for src, p in probs.items())
    retrieve = sum(p * tiers[src][2] for src, p in probs.items())
    own = tiers["local" if method.name == "gemini" else "remote"]
    return Waste(checkpoint_s=own[0], interval_s=own[1], lost_s=lost, retrieve_s=retrieve,
                 restart_s=model.restart_s, p_memory=probs.get("local", 0.0) + probs.get("peer", 0.0),
                 total_s=lost + retrieve + model.restart_s)


def effective_ratio(model: ClusterModel, method: Method) -> float:
    """Fraction of wall-clock time spent on useful training: 1 - N lambda E[W], clamped to [0, 1]."""
    return min(1.0, max(0.0, 1 - model.failures_per_s * expected_waste(model, method).total_s))


# ---- Monte Carlo: the same model sampled the long way ----------------------------------

def _lost_since_checkpoint(t: float, checkpoint_s: float, interval_s: float) -> float:
    """Checkpoints start at j*interval and are usable checkpoint_s later; work since the newest usable."""
    j = math.floor((t - checkpoint_s) / interval_s)
    return t - j * interval_s


def _holder_masks(machines: int, replicas: int, placement: str) -> list[int]:
    plan = plan_placement([str(i) for i in range(machines)], replicas, placement)
    return [sum(1 << int(h) for h in plan.holders(str(i))) for i in range(machines)]


def monte_carlo(model: ClusterModel, method: Method, samples: int = 20_000, seed: int = 0,
                horizon_days: float = 30.0) -> dict:
    """Sampled per-failure waste and effective ratio.

    Each sample: a failure at a uniform time over a long stretch of explicit checkpoint
    schedules; software or hardware; for hardware, the extra machines lost in the window
    drawn one by one, the failed set checked against the placement's holder sets.
    The ratio comes from Poisson failure counts over `horizon_days` of wall-clock time,
    with per-failure wastes drawn from the samples.
    """
    rng = random.Random(seed)
    tiers = _tiers(model, method)
    n = model.machines
    masks = _holder_masks(n, method.replicas, method.placement) if method.name == "gemini" else []
    q = -math.expm1(-model.failures_per_machine_day * model.hardware_fraction * model.window_s / DAY_S)
    span = 1000 * max(tier[1] for tier in tiers.values())
    wastes, from_memory = [], 0
    for _ in range(samples):
        t = span + rng.random() * span
        if method.name != "gemini":
            src = "remote"
        elif rng.random() >= model.hardware_fraction:
            src = "local"
        else:
            first = rng.randrange(n)   # O(N) per sample: meant for small clusters
            failed = sum(1 << i for i in range(n) if i == first or rng.random() < q)
            src = "peer" if all(mask & failed != mask for mask in masks) else "remote"
        from_memory += src != "remote"
        ckpt, interval, retrieve = tiers[src]
        wastes.append(_lost_since_checkpoint(t, ckpt, interval) + retrieve + model.restart_s)
    horizon = horizon_days * DAY_S
    lam = model.failures_per_s * horizon
    ratios = []
    for _ in range(50):
        count = _poisson(rng, lam)
        ratios.append(1 - sum(rng.choice(wastes) for _ in range(count)) / horizon)
    return {"mean_waste_s": sum(wastes) / samples,
            "std_waste_s": (sum((w - sum(wastes) / samples) ** 2 for w in wastes) / (samples - 1)) ** 0.5,
            "p_memory": from_memory / samples,
            "ratio": min(1.0, max(0.0, sum(ratios) / len(ratios)))}


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 50:   # normal approximation: exact sampling is slow and not the point here
        return max(0, round(rng.gauss(lam, lam ** 0.5)))
    k, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        k += 1
        p *= rng.random()
    return k


# ---- the figure's data and its caption ---------------------------------------------------

def sweep(base: ClusterModel, machines: list[int], methods: list[Method]) -> list[dict]:
    """One row per (N, method): per-failure waste, its parts and the effective ratio."""
    rows = []
    for n in machines:
        model = ClusterModel(**{**asdict(base), "machines": n})
        for method in methods:
            w = expected_waste(model, method)
            rows.append({"machines": n, "method": method.label(n), "name": method.name,
                         "replicas": method.replicas if method.name == "gemini" else None,
                         "failures_per_day": model.failures_per_s * DAY_S,
                         **asdict(w), "ratio": effective_ratio(model, method)})
    return rows


def assumptions(model: ClusterModel) -> list[str]:
    """The model in sentences, with its numbers."""
    gb = 1e9
    return [
        f"Failures: each machine fails as a Poisson process at {model.failures_per_machine_day:.4f}/day "
        f"(OPT-175B's logbook: ~110 failures in ~2 months on 124 machines); the cluster sees N times that.",
        f"{model.hardware_fraction:.0%} of failures are hardware (the machine and its CPU memory are lost, a "
        f"replacement starts empty); the rest are software (processes restart, CPU memory survives).",
        f"Hardware failures within {model.window_s:.0f} s of each other are simultaneous: after the first, each "
        "other machine is lost in that window independently. Recovery from memory needs a live holder of every "
        "lost machine's checkpoint; its probability for k lost machines is exact (gemini/probability.py).",
        f"The job's checkpoint is {model.checkpoint_bytes / gb:.0f} GB, sharded evenly over the N machines "
        f"(ZeRO-3); the iteration time is {model.iteration_s:g} s at every N (fixed per-machine batch).",
        f"Remote storage: {model.remote_bandwidth / gb:g} GB/s aggregate for the whole cluster, for writing and "
        f"for reading back (every machine restores at once).",
        f"GEMINI: per machine {model.network_bandwidth / gb:g} GB/s to peers and {model.local_bandwidth / gb:g} "
        "GB/s between GPU and CPU memory; a checkpoint takes max(local copy, (m-1) sends); checkpoint traffic "
        "interleaves with training and never stalls it; it also persists to remote storage in the background "
        "as often as the storage allows, the fallback when memory cannot serve.",
        "Checkpoint interval 1/f = ceil(t_ckpt / T_iter) * T_iter (one checkpoint at a time, starting at "
        "iteration boundaries). HighFreq checkpoints to remote storage that often; Strawman every "
        f"{model.strawman_interval_s / 3600:g} h.",
        "Wasted time per failure = t_ckpt + 1/(2f) + t_retrieve + t_restart (design doc §1, plus a restart "
        f"of {model.restart_s:g} s for detection and process restart, the same for every method).",
        "Effective training time ratio = 1 - (failures per second) x E[wasted per failure], clamped at 0: "
        "wastes add up (first order; a failure during a recovery costs its own full waste).",
    ]

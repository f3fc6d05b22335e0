"""TrafficScheduler: when each checkpoint chunk may travel (GEMINI's traffic interleaving).

Phases of a run, with `--gemini-interleave on`:

1. Profiling (`--gemini-profile-iters`): the collective timeline records every TP/DP
   collective and when each optimizer update starts. Meanwhile every snapshot is
   replicated with the blocking schedule — sent eagerly after the step, the next
   iteration waiting for it — so a machine lost in the first iterations still has a peer
   copy, and the profiled iterations see no checkpoint traffic inside them.
2. Measuring: those sends report how long their trailer (≈ α, the per-message cost) and
   each chunk took, giving the bandwidth B.
3. Interleaving: gaps = robust (median) idle gaps of the profiled iterations; the pure
   planner (schedule.py) fills them with chunks of R/p bytes, at most p of a peer per
   gap (one per sub-buffer), the rest goes when the update begins. The snapshot of iteration k is sent during iteration k+1. If sending it
   takes longer than mu of an iteration, it is spread over the gaps of k+1..k+j and only
   every j-th snapshot is replicated (the log says so; `--gemini-replication-interval`
   fixes j instead). Each chunk's moment is a *point* of the timeline (the iteration, and
   how many collectives of it had returned when its gap began; None: the update), where
   the training thread issues it (exchange.py).

Every rank must derive the same moments for every route, senders and receivers alike, so
the plan's inputs are agreed (agreement.py: one rank's gaps, the slowest measurements),
and every rank plans every sender's traffic (`adopt`).

Unlike GPU GEMINI, our snapshot is already a complete copy in CPU shared memory before
any byte travels, so an update cannot corrupt a snapshot in flight; the hard deadline
is the next replicated snapshot, which waits for the previous one (Checkpointer._drain).

`--gemini-interleave off` is the paper's blocking baseline: every snapshot is sent
eagerly and the training thread waits for it right after the step.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from gemini_lm.gemini.schedule import (ScheduleInputs, fixed_chunks, gaps_from_timelines, plan_schedule,
                                       replication_interval)
from gemini_lm.log import get_logger

_MIN_SAMPLES = 2   # bandwidth samples (chunks) needed before planning


@dataclass(frozen=True)
class Profile:
    """The plan's inputs that come from the run: the profiled gaps of an iteration (with
    the timeline point each begins at), when the update begins, the iteration time, and
    the measured per-message cost and bandwidth."""
    gaps: tuple
    points: tuple
    update_s: float
    iteration_s: float
    alpha: float
    bandwidth: float


class TrafficScheduler:
    def __init__(self, gcfg, timeline, log=None):
        self.interleave = gcfg.gemini_interleave == "on"
        self.profile_iters = gcfg.gemini_profile_iters if self.interleave else 0
        self.buffer_bytes = max(1, int(gcfg.gemini_buffer_mb * 2**20))
        self.num_buffers = gcfg.gemini_sub_buffers
        self.mu = gcfg.gemini_gap_safety
        self.timeline, self.log = timeline, log or get_logger(__name__).info
        self.fixed_every = gcfg.gemini_replication_interval   # 0: choose j from the measurements
        self.every = self.fixed_every or 1   # replicate every j-th snapshot
        self._replicable = 0           # snapshots taken since profiling ended
        self.plans: dict = {}          # sender -> SchedulePlan (every rank plans every sender)
        self._own = None               # this rank's key in plans
        self._attempted = False        # the agreement ran in this generation
        self._profile: Profile | None = None   # the agreed inputs, kept for a re-plan
        self._spread = None                    # how the profiled gaps varied (for the log)
        self._points: list[int] = []
        self.alpha_samples: list[float] = []
        self.bandwidth_samples: list[float] = []

    @property
    def chunk_bytes(self) -> int:
        return max(1, self.buffer_bytes // self.num_buffers)

    # ---- which snapshots travel -------------------------------------------------------
    def replicate(self, iteration: int) -> bool:
        """Called once per snapshot: does this one go to the peers?"""
        if iteration <= self.profile_iters:
            return True   # blocking (see blocking()) until the plan can exist
        self._replicable += 1
        return (self._replicable - 1) % self.every == 0

    @property
    def plan(self):
        """This rank's own sending plan (None: not planned, or this rank sends nothing)."""
        return self.plans.get(self._own)

    @property
    def planned(self) -> bool:
        return bool(self.plans)

    def replan(self) -> None:
        """The peers changed (a machine was replaced): plan again at the next replicated
        snapshot, from the profile and measurements already taken."""
        self.plans, self._attempted = {}, False
        self.every = self.fixed_every or 1
        self._replicable = 0

    def blocking(self, iteration: int) -> bool:
        """Does the step wait for this replicated snapshot's traffic? Always with
        interleaving off (the paper's blocking baseline); while profiling, so the
        profiled iterations carry no checkpoint traffic."""
        return not self.interleave or iteration <= self.profile_iters

    # ---- measurements from the exchange ------------------------------------------------
    def observe(self, header_s: float, chunks: list[tuple[int, float]]) -> None:
        """One snapshot's send timings: the small header ≈ α; big chunks give B. Only
        the plan uses them: once it exists, nothing more is kept (a run can be long)."""
        if self.planned or not self.interleave:
            return
        self.alpha_samples.append(header_s)
        for nbytes, secs in chunks:
            if secs > header_s and nbytes >= 4096:
                self.bandwidth_samples.append(nbytes / (secs - header_s))

    @property
    def alpha(self) -> float:
        return statistics.median(self.alpha_samples) if self.alpha_samples else 0.0

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.bandwidth_samples) if self.bandwidth_samples else math.inf

    # ---- the plan ---------------------------------------------------------------------
    def wants_plan(self, iteration: int) -> bool:
        """Is it time for the (collective) agreement on the plan's inputs? Once per
        generation, at the first replicated snapshot past profiling; a function of the
        iteration and of state every rank changes alike, so all ranks answer the same."""
        return self.interleave and not self._attempted and iteration > self.profile_iters

    def local_profile(self) -> Profile | None:
        """This rank's profile and measurements (alpha/bandwidth inf/0 if it measured
        nothing: it sends nothing), or None without profiled iterations. Kept once agreed:
        the timeline forgets old iterations, and a re-plan after a failure needs them."""
        if self._profile is not None:
            return self._profile
        profiled = [it for it in self.timeline.iterations() if it.iteration <= self.profile_iters
                    and it.update_start is not None]
        if not profiled:
            return None
        update_s = statistics.median(it.update_start for it in profiled)
        gaps, spread = gaps_from_timelines(profiled, update_start_s=update_s)
        measured = len(self.alpha_samples) >= 1 and len(self.bandwidth_samples) >= _MIN_SAMPLES
        self._spread = spread
        return Profile(tuple(gaps), tuple(spread.points), update_s, spread.duration_median_s or update_s,
                       self.alpha if measured else math.inf, self.bandwidth if measured else 0.0)

    def adopt(self, profile: Profile | None, senders: dict, own) -> None:
        """Plan every sender's traffic (`senders[key] = {peer: nbytes}`) from the agreed
        `profile` (None: nothing to plan from; the traffic stays eager this generation).
        One j for all: the slowest sender's."""
        self._attempted = True
        if profile is None:
            return
        self._profile, self._own = profile, own
        def inputs(peer_bytes):
            return ScheduleInputs(gaps=list(profile.gaps), update_s=profile.update_s, peer_bytes=peer_bytes,
                                  buffer_bytes=self.buffer_bytes, num_buffers=self.num_buffers,
                                  bandwidth=profile.bandwidth, alpha=profile.alpha, mu=self.mu)
        iteration_s = profile.iteration_s
        # The user's choice of j wins; the plan still spreads over it.
        j = self.fixed_every or max([replication_interval(inputs(pb), iteration_s) for pb in senders.values()] or [1])
        self._points = list(profile.points)
        self.plans = {key: plan_schedule(inputs(pb), iterations=j, iteration_time_s=iteration_s if j > 1 else None)
                      for key, pb in senders.items()}
        self.every = j
        self._replicable = 1   # the snapshot being planned now starts the new cadence
        if j > 1 and not self.fixed_every:
            self.log(f"GEMINI: the checkpoint does not fit in one iteration's gaps; "
                     f"replicating every {j} iterations")
        if self.plan is not None:
            spread = "" if self._spread is None else f" Profiled gaps: {self._spread.describe()}"
            self.log(f"GEMINI interleaving plan: {self.plan.describe()}{spread}")

    def chunks(self, peer: str, nbytes: int, iteration: int, sender=None) -> list[tuple[int, int, tuple | None]]:
        """[(offset, size, when)] for `sender` sending `nbytes` of snapshot `iteration` to
        `peer`; when = (iteration, timeline point, or None for "its update began"), or None
        for "at once" (no plan)."""
        plan = self.plans.get(sender if sender is not None else self._own)
        if plan is None or self.blocking(iteration):
            return fixed_chunks(nbytes, self.chunk_bytes)
        out = []
        per_iter = max(1, len(plan.gaps) // plan.iterations)
        for c in plan.chunks:
            if c.peer != peer:
                continue
            if c.gap_index is None:
                out.append((c.offset, c.nbytes, (iteration + plan.iterations, None)))
            else:
                k = c.gap_index // per_iter
                out.append((c.offset, c.nbytes, (iteration + 1 + k, self._points[c.gap_index % per_iter])))
        return out

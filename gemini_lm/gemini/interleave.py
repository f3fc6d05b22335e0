"""TrafficScheduler: when each checkpoint chunk may travel (GEMINI's traffic interleaving).

Phases of a run, with `--gemini-interleave on`:

1. Profiling (`--gemini-profile-iters`): the collective timeline records every TP/DP
   collective and when each optimizer update starts. Meanwhile every snapshot is
   replicated with the blocking schedule — sent eagerly after the step, the next
   iteration waiting for it — so a machine lost in the first iterations still has a peer
   copy, and the profiled iterations see no checkpoint traffic inside them.
2. Measuring: those sends report how long their header (≈ α, the per-message cost) and
   each chunk took, giving the bandwidth B.
3. Interleaving: gaps = robust (median) idle gaps of the profiled iterations; the pure
   planner (schedule.py) fills them with chunks of R/p bytes, the rest goes when the
   update begins. The snapshot of iteration k is sent during iteration k+1. If sending it
   takes longer than mu of an iteration, it is spread over the gaps of k+1..k+j and only
   every j-th snapshot is replicated (the log says so; `--gemini-replication-interval`
   fixes j instead). The sender thread waits for each chunk's moment on the timeline
   (`CollectiveTimeline.wait_until`).

Unlike GPU GEMINI, our snapshot is already a complete copy in CPU shared memory before
any byte travels, so an update cannot corrupt a snapshot in flight; the hard deadline
is the next replicated snapshot, which waits for the previous one (Checkpointer._drain).

`--gemini-interleave off` is the paper's blocking baseline: every snapshot is sent
eagerly and the training thread waits for it right after the step.
"""
from __future__ import annotations

import math
import statistics

from gemini_lm.gemini.schedule import (ScheduleInputs, fixed_chunks, gaps_from_timelines, plan_schedule,
                                       replication_interval)
from gemini_lm.log import get_logger

_MIN_SAMPLES = 2   # bandwidth samples (chunks) needed before planning


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
        self.plan = None
        self._period = 0.0
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

    def replan(self) -> None:
        """The peers changed (a machine was replaced): plan again at the next replicated
        snapshot, from the profile and measurements already taken."""
        self.plan = None
        self.every = self.fixed_every or 1
        self._replicable = 0

    def blocking(self, iteration: int) -> bool:
        """Does the step wait for this replicated snapshot's traffic? Always with
        interleaving off (the paper's blocking baseline); while profiling, so the
        profiled iterations carry no checkpoint traffic."""
        return not self.interleave or iteration <= self.profile_iters

    # ---- measurements from the replicator ---------------------------------------------
    def observe(self, header_s: float, chunks: list[tuple[int, float]]) -> None:
        """One snapshot's send timings: the small header ≈ α; big chunks give B. Only
        the plan uses them: once it exists, nothing more is kept (a run can be long)."""
        if self.plan is not None or not self.interleave:
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
    def maybe_plan(self, peer_bytes: dict[str, int], iteration: int) -> None:
        """Plan, if it is time, the traffic from snapshot `iteration` on. Never while
        profiling: a profiled snapshot is waited for (blocking), so gating its chunks on a
        later iteration would deadlock the step."""
        if not self.interleave or self.plan is not None or iteration <= self.profile_iters \
                or len(self.alpha_samples) < 1 or len(self.bandwidth_samples) < _MIN_SAMPLES:
            return
        profiled = [it for it in self.timeline.iterations() if it.iteration <= self.profile_iters
                    and it.update_start is not None]
        if not profiled:
            return
        update_s = statistics.median(it.update_start for it in profiled)
        gaps, spread = gaps_from_timelines(profiled, update_start_s=update_s)
        iteration_s = spread.duration_median_s or update_s
        inputs = ScheduleInputs(gaps=gaps, update_s=update_s, peer_bytes=peer_bytes,
                                buffer_bytes=self.buffer_bytes, num_buffers=self.num_buffers,
                                bandwidth=self.bandwidth, alpha=self.alpha, mu=self.mu)
        # The user's choice of j wins; the plan still spreads over it.
        j = self.fixed_every or replication_interval(inputs, iteration_s)
        self._period = iteration_s if j > 1 else 0.0   # gaps of iteration k are shifted by k periods
        self.plan = plan_schedule(inputs, iterations=j, iteration_time_s=iteration_s if j > 1 else None)
        self.every = j
        self._replicable = 1   # the snapshot being planned now starts the new cadence
        if j > 1 and not self.fixed_every:
            self.log(f"GEMINI: the checkpoint does not fit in one iteration's gaps; "
                     f"replicating every {j} iterations")
        self.log(f"GEMINI interleaving plan: {self.plan.describe()} Profiled gaps: {spread.describe()}")

    def chunks(self, peer: str, nbytes: int, iteration: int) -> list[tuple[int, int, tuple | None]]:
        """[(offset, size, when)] for sending `nbytes` of snapshot `iteration` to `peer`;
        when = (iteration to wait for, seconds into it, or None for "its update began")."""
        if self.plan is None or self.blocking(iteration):
            return fixed_chunks(nbytes, self.chunk_bytes)
        plan, out = self.plan, []
        per_iter = max(1, len(plan.gaps) // plan.iterations)
        period = self._period
        for c in plan.chunks:
            if c.peer != peer:
                continue
            if c.gap_index is None:
                out.append((c.offset, c.nbytes, (iteration + plan.iterations, None)))
            else:
                k = c.gap_index // per_iter
                out.append((c.offset, c.nbytes, (iteration + 1 + k, c.planned_start_s - k * period)))
        return out

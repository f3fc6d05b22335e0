"""Traffic interleaving: place checkpoint chunks in the idle gaps between training collectives.

GEMINI §3.3: checkpoint traffic to peers must not slow training. From the profiled
timeline of training collectives we know the idle gaps of an iteration. The checkpoint
of iteration k is sent during iteration k+1, split into chunks that go through a reserved
buffer of R bytes in p sub-buffers (chunk size R/p, so receiving one chunk overlaps
copying the previous one into CPU memory). A chunk costs `alpha + size/B`; a gap of
length g offers `mu * g` seconds (mu < 1 leaves slack for timing noise). What does not
fit is sent just before the optimizer update, which it delays.

Assumptions:
  * One link: chunks to different peers go one after another over the machine's NIC,
    peers in the order given, each peer's bytes in offset order.
  * Gaps are usable only up to the update; time after it belongs to the next checkpoint.
  * A gap holds at most p chunks of each peer (p sub-buffers per route, each reused only
    once its chunk completed, which is checked at the next gap).
  * No chunk is smaller than `min_chunk_bytes` (default: the size whose transfer time
    equals alpha, capped at R/p), so per-message cost never dominates, except the last
    piece of a peer's data, which is whatever is left.

Everything here is pure: the exchange feeds it numbers and executes the plan.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from gemini_lm.parallel.timeline import IterationTimeline


@dataclass(frozen=True)
class ScheduleInputs:
    gaps: Sequence[tuple[float, float]]  # idle (start_s, end_s), relative to the iteration start
    update_s: float                      # when the optimizer step begins
    peer_bytes: dict[str, int]           # bytes to send to each peer
    buffer_bytes: int                    # R
    num_buffers: int                     # p, chunk size R // p
    bandwidth: float                     # B, bytes/s (math.inf allowed)
    alpha: float                         # per-message cost, s
    mu: float = 0.9                      # safety factor on gap length, in (0, 1]
    min_chunk_bytes: int | None = None   # None: see module docstring

    def validate(self) -> None:
        if not 0 < self.mu <= 1:
            raise ValueError(f"mu must be in (0, 1] (got {self.mu})")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s (got {self.bandwidth})")
        if not 0 <= self.alpha < math.inf:
            raise ValueError(f"alpha must be finite and >= 0 s (got {self.alpha})")
        if self.num_buffers < 1 or self.buffer_bytes < self.num_buffers:
            raise ValueError(f"need num_buffers >= 1 and buffer_bytes >= num_buffers "
                             f"(got R={self.buffer_bytes}, p={self.num_buffers})")
        if not 0 <= self.update_s < math.inf:
            raise ValueError(f"update_s must be finite and >= 0 (got {self.update_s})")
        if any(n < 0 for n in self.peer_bytes.values()):
            raise ValueError("peer byte counts must be >= 0")
        prev_end = 0.0
        for start, end in self.gaps:
            if not (0 <= start <= end < math.inf) or start < prev_end:
                raise ValueError(f"gaps must be finite, sorted, non-overlapping and start >= 0 "
                                 f"(bad gap {(start, end)})")
            prev_end = end

    @property
    def chunk_bytes(self) -> int:
        return self.buffer_bytes // self.num_buffers

    def resolved_min_chunk(self) -> int:
        if self.min_chunk_bytes is not None:
            return max(1, min(self.min_chunk_bytes, self.chunk_bytes))
        if self.alpha == 0:
            return 1
        if self.bandwidth == math.inf:
            return self.chunk_bytes
        return max(1, min(self.chunk_bytes, math.ceil(self.alpha * self.bandwidth)))

    def cost(self, nbytes: int) -> float:
        return self.alpha + nbytes / self.bandwidth


@dataclass(frozen=True)
class Chunk:
    peer: str
    offset: int                 # byte offset in this peer's data
    nbytes: int
    gap_index: int | None       # index into SchedulePlan.gaps; None: sent before the update
    planned_start_s: float      # relative to the start of the first iteration of the interval
    duration_s: float           # alpha + nbytes / B


@dataclass
class SchedulePlan:
    inputs: ScheduleInputs
    iterations: int                       # the checkpoint is spread over this many iterations
    gaps: list[tuple[float, float]]       # usable gaps, unrolled over `iterations`
    chunks: list[Chunk]
    gap_chunks: list[int]                 # chunks per gap, aligned with `gaps`
    gap_bytes: list[int]
    leftover_bytes: int                   # sent just before the (last) update
    predicted_extra_s: float              # time the leftover adds to the iteration
    min_chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.inputs.peer_bytes.values())

    def describe(self) -> str:
        inp, total = self.inputs, self.total_bytes
        in_gaps = total - self.leftover_bytes
        used = sum(1 for n in self.gap_chunks if n)
        pct = 100.0 * in_gaps / total if total else 100.0
        return (f"Checkpoint of {total / 2**20:.2f} MiB to {len(inp.peer_bytes)} peer(s) in chunks of "
                f"{inp.chunk_bytes / 2**20:.2f} MiB (R={inp.buffer_bytes / 2**20:.2f} MiB / p={inp.num_buffers}), "
                f"B={inp.bandwidth / 1e9:.3g} GB/s, alpha={inp.alpha * 1e6:.1f} us, mu={inp.mu}: "
                f"{in_gaps / 2**20:.2f} MiB ({pct:.1f}%) in {sum(self.gap_chunks)} chunk(s) over {used} of "
                f"{len(self.gaps)} gap(s) across {self.iterations} iteration(s); "
                f"{self.leftover_bytes / 2**20:.2f} MiB left for before the update, "
                f"predicted to add {self.predicted_extra_s * 1e3:.3f} ms.")


class _Stream:
    """Cursor over every peer's bytes, peer after peer, in offset order."""

    def __init__(self, peer_bytes: dict[str, int]):
        self.items = [(peer, n) for peer, n in peer_bytes.items() if n > 0]
        self.index, self.offset = 0, 0

    def done(self) -> bool:
        return self.index >= len(self.items)

    def remaining_of_peer(self) -> int:
        return self.items[self.index][1] - self.offset

    def take(self, nbytes: int) -> tuple[str, int]:
        peer, offset = self.items[self.index][0], self.offset
        self.offset += nbytes
        if self.offset == self.items[self.index][1]:
            self.index, self.offset = self.index + 1, 0
        return peer, offset


def _usable(gaps: Sequence[tuple[float, float]], update_s: float) -> list[tuple[float, float]]:
    """Clip gaps to end at the update (later time belongs to the next checkpoint)."""
    return [(s, min(e, update_s)) for s, e in gaps if s < update_s]


def _fill_gap(inp: ScheduleInputs, stream: _Stream, start: float, end: float, gap_index: int,
              min_chunk: int, out: list[Chunk]) -> int:
    """Greedily place chunks into one gap, at most p per peer (a gap's chunks are issued
    together, one per sub-buffer, which is reused only at a later gap); return the
    number placed."""
    budget = inp.mu * (end - start)
    if budget <= 0:
        return 0
    used, placed, per_peer = 0.0, 0, Counter()
    while not stream.done():
        if per_peer[stream.items[stream.index][0]] >= inp.num_buffers:
            break   # this peer's sub-buffers are full until a later gap; the stream is in peer order
        room = budget - used - inp.alpha
        if room < 0:
            break
        remaining = stream.remaining_of_peer()
        size = min(inp.chunk_bytes, remaining)
        if inp.bandwidth != math.inf and room * inp.bandwidth < size:
            size = int(room * inp.bandwidth)
        while size > 0 and used + inp.cost(size) > budget:  # float rounding
            size -= 1
        if size <= 0 or (size < min_chunk and size < remaining):
            break
        peer, offset = stream.take(size)
        per_peer[peer] += 1
        out.append(Chunk(peer, offset, size, gap_index, start + used, inp.cost(size)))
        used += inp.cost(size)
        placed += 1
    return placed


def plan_schedule(inputs: ScheduleInputs, iterations: int = 1, iteration_time_s: float | None = None
                  ) -> SchedulePlan:
    """Chunks in gaps, leftovers before the update.

    With `iterations` > 1 (checkpoint every j iterations) the gaps repeat every
    `iteration_time_s`, each clipped at that iteration's update, and the leftover goes
    before the update of the last iteration.
    """
    inputs.validate()
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1 (got {iterations})")
    if iterations > 1 and (iteration_time_s is None or iteration_time_s < inputs.update_s):
        raise ValueError("spreading over several iterations needs iteration_time_s >= update_s")
    period = iteration_time_s or 0.0
    one = _usable(inputs.gaps, inputs.update_s)
    gaps = [(s + it * period, e + it * period) for it in range(iterations) for s, e in one]
    stream, min_chunk = _Stream(inputs.peer_bytes), inputs.resolved_min_chunk()
    chunks: list[Chunk] = []
    gap_chunks = [_fill_gap(inputs, stream, s, e, i, min_chunk, chunks) for i, (s, e) in enumerate(gaps)]
    gap_bytes = [0] * len(gaps)
    for c in chunks:
        gap_bytes[c.gap_index] += c.nbytes
    # What did not fit: full chunks back to back, delaying the update by their transfer time.
    t0 = (iterations - 1) * period + inputs.update_s
    extra, leftover = 0.0, 0
    while not stream.done():
        size = min(inputs.chunk_bytes, stream.remaining_of_peer())
        peer, offset = stream.take(size)
        chunks.append(Chunk(peer, offset, size, None, t0 + extra, inputs.cost(size)))
        extra += inputs.cost(size)
        leftover += size
    return SchedulePlan(inputs, iterations, gaps, chunks, gap_chunks, gap_bytes, leftover, extra, min_chunk)


def fixed_chunks(nbytes: int, chunk_bytes: int) -> list[tuple[int, int, None]]:
    """[(offset, size, None)]: `nbytes` in chunks of `chunk_bytes`, all to be sent at once."""
    return [(off, min(chunk_bytes, nbytes - off), None) for off in range(0, nbytes, chunk_bytes)]


def send_time(inp: ScheduleInputs) -> float:
    """Seconds to send the whole checkpoint to every peer: α per chunk plus size / B."""
    chunk = inp.chunk_bytes
    return sum(math.ceil(n / chunk) * inp.alpha + n / inp.bandwidth for n in inp.peer_bytes.values())


def replication_interval(inp: ScheduleInputs, iteration_time_s: float) -> int:
    """j: replicate every j-th snapshot, the smallest j >= 1 with send_time <= mu * j iterations.

    Within one iteration the gaps take what they can and the rest goes when the update
    begins, so a checkpoint that takes at most mu of an iteration to send is replicated
    every iteration; only a slower one is spread over the gaps of j iterations.
    """
    inp.validate()
    if iteration_time_s <= 0:
        return 1
    return max(1, math.ceil(send_time(inp) / (inp.mu * iteration_time_s)))


@dataclass
class GapSpread:
    """How much the profiled gaps vary across iterations."""
    iterations_total: int
    iterations_used: int                    # those with the winning gap count
    gap_count_histogram: dict[int, int]
    length_iqr_s: list[float] = field(default_factory=list)  # per gap index
    duration_median_s: float | None = None
    duration_iqr_s: float | None = None
    points: list[int] = field(default_factory=list)   # per gap: the timeline point it begins at

    def describe(self) -> str:
        worst = max(self.length_iqr_s, default=0.0)
        dur = "n/a" if self.duration_median_s is None else \
            f"{self.duration_median_s * 1e3:.3f} ms (IQR {self.duration_iqr_s * 1e3:.3f} ms)"
        return (f"{self.iterations_used}/{self.iterations_total} iterations with "
                f"{len(self.length_iqr_s)} gap(s) (gap counts {self.gap_count_histogram}); "
                f"largest gap-length IQR {worst * 1e3:.3f} ms; iteration time {dur}")


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def iteration_gaps(timeline: IterationTimeline, update_start_s: float | None = None,
                   min_gap_s: float = 1e-4) -> list[tuple[float, float]]:
    """Idle gaps of one iteration: before the first collective (from 0), between merged
    collectives, and after the last one only up to `update_start_s` when given (without
    it the tail is the optimizer step and not counted)."""
    busy: list[list[float]] = []
    for span in sorted(timeline.spans, key=lambda s: (s.start, s.end)):
        if busy and span.start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], span.end)
        else:
            busy.append([span.start, span.end])
    gaps, cursor = [], 0.0
    for start, end in busy:
        gaps.append((cursor, start))
        cursor = max(cursor, end)
    if update_start_s is not None:
        gaps.append((cursor, update_start_s))
    return [(s, e) for s, e in gaps if e - s >= min_gap_s]


def gap_points(timeline: IterationTimeline, gaps: Sequence[tuple[float, float]]) -> list[int]:
    """The timeline point (parallel/timeline.py) at which each gap begins: the number of
    collectives that had returned by then. Spans are recorded when they return, in program
    order, so this counts the same collectives on every rank."""
    ends = sorted(span.end for span in timeline.spans)
    return [bisect.bisect_right(ends, start + 1e-9) for start, _ in gaps]


def gaps_from_timelines(iterations: Sequence[IterationTimeline], min_gap_s: float = 1e-4,
                        update_start_s: float | None = None) -> tuple[list[tuple[float, float]], GapSpread]:
    """Robust gaps across profiled iterations.

    Iterations are aligned by gap index. Only iterations with the most common gap count
    are used (ties: the smaller count, the conservative choice); each gap boundary is the
    median over them. Medians keep the order (start <= end <= next start) because it
    holds in every iteration.
    """
    per_iter = [iteration_gaps(it, update_start_s, min_gap_s) for it in iterations]
    histogram = Counter(len(g) for g in per_iter)
    durations = [it.duration for it in iterations if it.duration is not None]
    spread = GapSpread(len(per_iter), 0, dict(sorted(histogram.items())),
                       duration_median_s=statistics.median(durations) if durations else None,
                       duration_iqr_s=_iqr(durations) if durations else None)
    if not per_iter:
        return [], spread
    count = min(histogram, key=lambda c: (-histogram[c], c))
    used = [g for g in per_iter if len(g) == count]
    spread.iterations_used = len(used)
    gaps = [(statistics.median(g[i][0] for g in used), statistics.median(g[i][1] for g in used))
            for i in range(count)]
    spread.length_iqr_s = [_iqr([g[i][1] - g[i][0] for g in used]) for i in range(count)]
    points = [gap_points(it, g) for it, g in zip(iterations, per_iter) if len(g) == count]
    spread.points = [statistics.median_low(p[i] for p in points) for i in range(count)]
    return gaps, spread

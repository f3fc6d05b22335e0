"""Exchange: replication traffic issued by the training thread itself, at agreed points.

NCCL's contract (and a sane one for any backend): one thread issues every operation of a
rank, and every rank issues its operations in an order all ranks agree on. So no thread
of ours sends or receives checkpoint bytes. For each replicated snapshot, every rank
derives from the same plan (interleave.py, agreement.py) which chunks of which route go
at which *point* of the iteration (parallel/timeline.py: the iteration's start, after
its i-th collective, when the update begins), and at each point the training thread
issues that point's sends and receives as one batch (`batch_isend_irecv`). It never
waits for them there: their completion is looked at when the next point comes (a
failure then surfaces at once), and waited for only at the deadline, `finish()`, which
the checkpointer calls before the next replicated snapshot (or at once, for the
blocking schedule).

Wire format per route and snapshot: the payload chunks (tag = 1 + chunk index), then a
trailer (JSON in a uint8 tensor: iteration, nbytes, checksum, layout hash, sender
machine) with the route's last chunk, and at the deadline the receiver's ack. The
receiver writes the chunks straight into a store slot and commits only at the deadline,
after the trailer arrived and checks out: a replica is never visible half-written, and a
peer lost mid-transfer leaves the slot uncommitted (abandon()). The sender learns its
snapshot's checksum only once the commit thread has computed it: the trailer is the one
message that needs it, and goes last.

Over gloo (`--gemini-transport gloo`, the default) the chunks travel straight between
host memory: the sender's slot is the send buffer, the receiver's store slot the receive
buffer, and every message goes on the checkpoint group. Staged (`--gemini-transport
nccl`; `gloo-staged` runs the same code on CPU), the payload chunks go on a payload group
of their own (NCCL), through the reserved sub-buffers of staging.py, at most p chunks of
a route per batch (more at one point go in waves); the trailer and the acks stay on the
gloo group.

A batch's works are waited for once (Batch): gloo's point-to-point works report completion
only once waited for, and a second wait blocks forever; NCCL returns one work per batch,
gloo one per operation.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from gemini_lm.errors import ReplicationError
from gemini_lm.gemini.topology import Route
from gemini_lm.parallel.comm import peer_failures

HEADER_BYTES = 512
TRAILER_TAG, ACK_TAG = 1 << 24, (1 << 24) + 1   # above any chunk's tag
NOW, LAST = (-1, -1), (1 << 62, 0)               # step keys: at begin(); at the deadline, after the payload


def encode_header(obj: dict) -> torch.Tensor:
    raw = json.dumps(obj).encode()
    if len(raw) > HEADER_BYTES:
        raise ValueError("replication header too large")
    out = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    out[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def decode_header(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.numpy().tobytes()).rstrip(b"\x00"))


def step_key(when) -> tuple:
    """Sortable key of a chunk's moment: NOW, (iteration, point), update = after every point."""
    if when is None:
        return NOW
    iteration, point = when
    return (iteration, 1 << 30 if point is None else point)


@dataclass
class _Op:
    send: bool
    route: Route
    tensor: torch.Tensor | Callable[[], torch.Tensor]   # a callable: built when issued (the trailer)
    tag: int


class Batch:
    """The works of one batch_isend_irecv (its operations `ops`), waited for at most once."""

    def __init__(self, ops: list, works: list, payload: bool):
        self.ops, self.works, self.payload, self.waited = ops, works, payload, False

    def done(self) -> bool:
        return self.waited or all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        """gloo: until complete; NCCL: the current stream waits (staging.py waits on the host)."""
        if not self.waited:
            for w in self.works:
                w.wait()
            self.waited = True


@dataclass
class _Transfer:
    """One replicated snapshot: this rank's part in every route it sends or receives on."""
    iteration: int
    steps: dict                                  # step key -> [_Op], not issued yet
    writes: dict = field(default_factory=dict)   # receiving route -> WriteHandle
    trailers: dict = field(default_factory=dict) # receiving route -> its trailer buffer
    issued: list = field(default_factory=list)   # [Batch], in issue order
    in_flight: list = field(default_factory=list)  # batches not yet seen complete
    started: float = field(default_factory=time.perf_counter)
    send_window_done: bool = False
    ready: Callable | None = None                # before the first send: the source is complete


class Exchange:
    def __init__(self, routes, rank: int, group, store, machine: str, senders: dict[int, tuple[int, str]],
                 window_hook: Callable | None = None, staging=None, payload_group=None):
        """`routes` in the global order; `senders[rank]`: (snapshot bytes, layout hash) of each.
        `window_hook(window, iteration)` runs inside "send" (some payload issued, the
        trailer not) and "receive" (payload in, not committed): failure injection.
        `staging` (staging.Staging) with its `payload_group`: the staged mode."""
        self.rank, self.group, self.store, self.machine = rank, group, store, machine
        self.staging, self.payload_group = staging, payload_group
        self.routes = [r for r in routes if rank in (r.src_rank, r.dst_rank)]
        self.out_routes = [r for r in self.routes if r.src_rank == rank]
        self.senders, self.window_hook = senders, window_hook
        self.transfer: _Transfer | None = None
        self.received: dict[str, int] = {}          # shard -> newest committed replica iteration
        self.last_send_s: float | None = None
        self.bytes_sent = 0

    # ---- a snapshot's traffic -------------------------------------------------------------
    def begin(self, iteration: int, source: torch.Tensor | None, record: Callable | None,
              chunks_of: Callable[[Route], list], blocking: bool, ready: Callable | None = None) -> None:
        """Called by every rank at the same point (after the snapshot of `iteration`): plan
        this rank's sends and receives and issue those due now. `source`: this rank's slot
        (if it sends); `record()`: its commit record, waited for when the trailer goes;
        `chunks_of(route)`: [(offset, size, when)]. The trailer goes with the update of the
        last iteration the chunks use (the commit thread has long computed the checksum by
        then), or, `blocking`, at the deadline after the payload (its time measures alpha).
        `ready()`: called before the first send (on CUDA: the slot's copy off the GPU is done)."""
        assert self.transfer is None, "the previous transfer was not finished"
        t = self.transfer = _Transfer(iteration, {}, ready=ready)
        for r in self.routes:
            sending, (nbytes, layout_hash) = r.src_rank == self.rank, self.senders[r.src_rank]
            if not sending:
                t.writes[r] = self.store.begin_write(r.shard, nbytes, layout_hash, pin=False)
            buf = source if sending else t.writes[r].buffer
            chunks = chunks_of(r)
            for k, (off, n, when) in enumerate(chunks):
                t.steps.setdefault(step_key(when), []).append(_Op(sending, r, buf[off:off + n], 1 + k))
            last = LAST if blocking else max([step_key(w) for _, _, w in chunks] + [step_key((iteration + 1, None))])
            if sending:
                trailer = _trailer(record, iteration, self.machine)
            else:
                trailer = t.trailers[r] = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
            t.steps.setdefault(last, []).append(_Op(sending, r, trailer, TRAILER_TAG))
        self._issue(NOW)

    def at_point(self, iteration: int, point: int | None) -> None:
        """The training thread reached a point: see whether earlier batches failed, then
        issue this point's batch, if it has one."""
        t = self.transfer
        if t is None:
            return
        if t.in_flight:
            with peer_failures("GEMINI replication"):
                done = [b for b in t.in_flight if b.done()]
                for b in done:
                    b.wait()   # returns at once; raises if it failed: a peer is gone
                if self.staging is not None:
                    self.staging.drain_completed()
            t.in_flight = [b for b in t.in_flight if b not in done]
        self._issue(step_key((iteration, point)))

    def _issue(self, key) -> None:
        t = self.transfer
        ops = t.steps.pop(key, None)
        if not ops:
            return
        if t.ready is not None and any(op.send for op in ops):
            t.ready()
            t.ready = None
        for op in ops:
            if callable(op.tensor):
                op.tensor = op.tensor()   # kept on the op: alive until the send completes
        if self.staging is None:
            self._batch(ops, [op.tensor for op in ops], self.group)
        else:
            payload = [op for op in ops if op.tag != TRAILER_TAG]
            for wave in _waves(payload, self.staging.p):
                with peer_failures("GEMINI replication"):
                    uses = [self.staging.stage(op.route, op.tag - 1, op.tensor, op.send) for op in wave]
                    with self.staging.issuing():
                        batch = self._batch(wave, [u.sub for u in uses], self.payload_group)
                self.staging.issued(uses, batch)
            trailers = [op for op in ops if op.tag == TRAILER_TAG]
            if trailers:
                self._batch(trailers, [op.tensor for op in trailers], self.group)
        if not t.send_window_done and any(op.send for op in ops) and self.window_hook is not None:
            t.send_window_done = True
            self.window_hook("send", t.iteration)

    def _batch(self, ops: list, tensors: list, group) -> Batch:
        p2p = [dist.P2POp(dist.isend if op.send else dist.irecv, x,
                          op.route.dst_rank if op.send else op.route.src_rank, group, op.tag)
               for op, x in zip(ops, tensors)]
        with peer_failures("GEMINI replication"):
            batch = Batch(ops, dist.batch_isend_irecv(p2p), payload=group is not self.group)
        self.transfer.issued.append(batch)
        self.transfer.in_flight.append(batch)
        return batch

    def _wait(self, batch: Batch) -> None:
        """Until `batch` completed, on the host (a NCCL work's wait() only orders a stream)."""
        if batch.payload:
            self.staging.wait(batch)
        else:
            batch.wait()

    def finish(self, observe: Callable | None = None) -> float:
        """The deadline: issue what is left, wait for everything, commit the replicas this
        rank received, exchange acks. Seconds spent. `observe(alpha_s, [(bytes, s)])` gets
        the send timings (the blocking schedule measures with them)."""
        t = self.transfer
        if t is None:
            return 0.0
        t0 = time.perf_counter()
        for key in sorted(k for k in t.steps if k != LAST):   # points that never came
            self._issue(key)
        timings, prev = [], t0
        with peer_failures("GEMINI replication"):
            for b in t.issued:
                # gloo: one work per operation, each timed (unless waited for already); NCCL: one per batch
                each = not b.waited and len(b.works) == len(b.ops)
                parts = [([op], Batch([op], [w], b.payload)) for op, w in zip(b.ops, b.works)] if each else [(b.ops, b)]
                for part, sub in parts:
                    self._wait(sub)
                    now = time.perf_counter()
                    n = sum(op.tensor.numel() for op in part if op.send and op.tag != TRAILER_TAG)
                    if n:
                        timings.append((n, now - prev))
                        self.bytes_sent += n
                    prev = now
                b.waited = True
            t1 = time.perf_counter()
            tail = len(t.issued)
            self._issue(LAST)
            for b in t.issued[tail:]:
                self._wait(b)
            alpha = time.perf_counter() - t1
            if self.staging is not None:
                self.staging.settle()   # every received chunk is in its store slot
        self._commit_received(t)
        self._ack(t)
        if observe is not None and self.out_routes:
            if timings and not any(secs > alpha for _, secs in timings):
                # Every chunk completed within the trailer's round (the ranks' skew at the
                # deadline dominates it): one sample of the whole payload, or the plan would
                # never get a bandwidth on a run like this one.
                timings = [(sum(n for n, _ in timings), sum(secs for _, secs in timings) + alpha)]
            observe(alpha, timings)
        self.last_send_s = time.perf_counter() - t.started
        self.transfer = None
        return time.perf_counter() - t0

    def _commit_received(self, t: _Transfer) -> None:
        for r, w in t.writes.items():
            h = decode_header(t.trailers[r])
            if (h["iteration"], h["nbytes"]) != (t.iteration, w.nbytes) or h["layout_hash"] != w.layout_hash:
                raise ReplicationError(f"{r.src_machine} sent {h} for iteration {t.iteration}, "
                                       f"{w.nbytes} bytes, layout {w.layout_hash}")
            if self.window_hook is not None:
                self.window_hook("receive", t.iteration)
            self.store.commit(w, t.iteration, checksum=h["checksum"], source=h["machine"])
            self.received[r.shard] = t.iteration
        t.writes = {}

    def _ack(self, t: _Transfer) -> None:
        """Receivers tell senders the replica is committed: "sent" then means "complete on the peer"."""
        ops, bufs = [], []
        for r in self.routes:
            sending = r.src_rank == self.rank
            buf = torch.tensor([-1 if sending else t.iteration], dtype=torch.int64)
            bufs.append((r, sending, buf))
            ops.append(dist.P2POp(dist.irecv if sending else dist.isend, buf,
                                  r.dst_rank if sending else r.src_rank, self.group, ACK_TAG))
        if not ops:
            return
        with peer_failures("GEMINI replication ack"):
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        for r, sending, buf in bufs:
            if sending and int(buf) != t.iteration:
                raise ReplicationError(f"{r.dst_machine} acknowledged iteration {int(buf)}, not {t.iteration}")

    # ---- failures and shutdown --------------------------------------------------------------
    def abandon(self) -> None:
        """A peer failed: drop the transfer in flight (its group is going away); a replica
        being received stays uncommitted."""
        t, self.transfer = self.transfer, None
        if self.staging is not None:
            self.staging.reset()
        if t is not None:
            for w in t.writes.values():
                self.store.abort(w)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()


def _waves(ops: list, p: int) -> list[list]:
    """One point's payload in batches holding at most p chunks of any route (its
    sub-buffers), in order: the i-th chunk of a route at this point goes in wave i // p."""
    waves, seen = [], {}
    for op in ops:
        i = seen[op.route] = seen.get(op.route, -1) + 1
        if i // p == len(waves):
            waves.append([])
        waves[i // p].append(op)
    return waves


def _trailer(record: Callable | None, iteration: int, machine: str) -> Callable[[], torch.Tensor]:
    def build() -> torch.Tensor:
        rec = record()   # the commit thread's checksum: usually long done by now
        if rec.iteration != iteration:
            raise ReplicationError(f"the trailer of iteration {iteration} got the record of {rec.iteration}")
        return encode_header({"iteration": rec.iteration, "nbytes": rec.nbytes, "checksum": rec.checksum,
                              "layout_hash": rec.layout_hash, "machine": machine})
    return build

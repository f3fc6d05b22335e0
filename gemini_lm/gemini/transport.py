"""Transports of the threaded replicator (`--gemini-transport nccl` only; the default
path is the training thread's exchange, exchange.py): how a replica's payload bytes
travel from a sender rank to a receiver rank.

The replicator owns the protocol (header, chunk sizes, ack, all small messages on its
gloo group); a transport moves only the payload chunks, in order, gated by the
interleaving plan.

- StagedTransport (GPU, NCCL): GEMINI's reserved transfer buffer. Each side reserves R
  bytes on its device, split into p sub-buffers; chunk k goes through sub-buffer k mod p.
  The sender copies host -> sub-buffer on its copy stream and sends from there; the
  receiver receives into one sub-buffer while the previous one drains device -> host on
  a second stream, into pinned host sub-buffers the CPU copies into the store (the
  pipelining). Each route has its own NCCL communicator, connected before training
  (connect_routes), so two machines replicating to each other never queue a send
  behind a receive on one NCCL stream. On CPU the same code runs over gloo with host
  sub-buffers (no streams); the tests use that to check the chunk bookkeeping.

It returns per-chunk timings (bytes, seconds the link was busy with it) for the
interleaving scheduler's estimate of the bandwidth.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

Chunks = list  # [(offset, nbytes, when)]; when: None = now, else the timeline moment to wait for
Gate = Callable[[tuple], None]


class StagedTransport:
    def __init__(self, groups: dict, device: torch.device, buffer_bytes: int, num_buffers: int):
        """`groups[(src_rank, dst_rank)]`: a two-rank process group per route."""
        self.groups, self.device = groups, torch.device(device)
        self.num_buffers = num_buffers
        sub = max(1, buffer_bytes // num_buffers)
        self.sub_bytes = sub
        self.cuda = self.device.type == "cuda"
        # Reserved once: the per-chunk path never allocates device memory.
        self.buffer = torch.empty(sub * num_buffers, dtype=torch.uint8, device=self.device)
        self.subs = [self.buffer[i * sub:(i + 1) * sub] for i in range(num_buffers)]
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)     # sender: H2D; receiver: issues receives
            self.drain = torch.cuda.Stream(self.device)      # sender: completions; receiver: D2H
            # The receiver drains into page-locked host sub-buffers of its own, then copies
            # into the store: the store's slots are never registered with the driver mid-run
            # (that can wait for the device, which may be waiting for this very peer).
            self.host = torch.empty(sub * num_buffers, dtype=torch.uint8, pin_memory=True)
            self.host_subs = [self.host[i * sub:(i + 1) * sub] for i in range(num_buffers)]

    def _check(self, sizes) -> None:
        if any(n > self.sub_bytes for n in sizes):
            raise ValueError(f"a chunk of {max(sizes)} bytes exceeds the {self.sub_bytes}-byte sub-buffer")

    # ---- sender -------------------------------------------------------------------------
    def send(self, data: torch.Tensor, chunks: Chunks, dst: int, gate: Gate, tag: int) -> list:
        self._check([n for _, n, _ in chunks])
        if not self.cuda:
            return self._send_host(data, chunks, dst, gate, tag)
        group = self.groups[(dist.get_rank(), dst)]
        p, works, marks = self.num_buffers, [None] * self.num_buffers, []
        t0 = torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device):
            t0.record(self.stream)
            for k, (off, n, when) in enumerate(chunks):
                if when is not None:
                    gate(when)
                i = k % p
                issued = torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(self.stream):
                    if works[i] is not None:
                        works[i].wait()   # the stream waits (not the host) for sub-buffer i's last send
                    issued.record()
                    self.subs[i][:n].copy_(data[off:off + n], non_blocking=True)
                    works[i] = dist.isend(self.subs[i][:n], dst, group=group)
                done = torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(self.drain):
                    works[i].wait()
                    done.record()
                marks.append((n, issued, done))
            self.drain.synchronize()   # every chunk has left: the caller may release the slot
        # Busy time of chunk k: from when it could start (issued, and the link free of
        # chunk k-1) to when it was done — the pipelined per-chunk cost.
        timings, prev_done = [], 0.0
        for n, issued, done in marks:
            start, end = t0.elapsed_time(issued) / 1e3, t0.elapsed_time(done) / 1e3
            timings.append((n, end - max(start, prev_done)))
            prev_done = end
        return timings

    def _send_host(self, data, chunks, dst, gate, tag) -> list:
        group, timings = self.groups[(dist.get_rank(), dst)], []
        for k, (off, n, when) in enumerate(chunks):
            if when is not None:
                gate(when)
            t = time.perf_counter()
            sub = self.subs[k % self.num_buffers][:n]
            sub.copy_(data[off:off + n])
            dist.send(sub, dst, group=group, tag=tag)
            timings.append((n, time.perf_counter() - t))
        return timings

    # ---- receiver -----------------------------------------------------------------------
    def recv(self, out: torch.Tensor, sizes: list[int], src: int, tag: int) -> None:
        """Receive the chunks into `out` (host memory; pinned for an async drain)."""
        self._check(sizes)
        group = self.groups[(src, dist.get_rank())]
        if not self.cuda:
            off = 0
            for k, n in enumerate(sizes):
                sub = self.subs[k % self.num_buffers][:n]
                dist.recv(sub, src, group=group, tag=tag)
                out[off:off + n].copy_(sub)
                off += n
            return
        # Three stages overlap: the network fills sub-buffer k, the copy engine drains k-1
        # to pinned host memory, the CPU copies k-2's bytes into the store.
        p, drained, off, pending = self.num_buffers, [None] * self.num_buffers, 0, []
        with torch.cuda.device(self.device):
            for k, n in enumerate(sizes):
                i = k % p
                if pending and pending[0][1] == i:   # host sub-buffer i still holds unstored bytes
                    self._store(out, *pending.pop(0))
                with torch.cuda.stream(self.stream):
                    if drained[i] is not None:
                        self.stream.wait_event(drained[i])   # device sub-buffer i is free again
                    work = dist.irecv(self.subs[i][:n], src, group=group)
                with torch.cuda.stream(self.drain):
                    work.wait()
                    self.host_subs[i][:n].copy_(self.subs[i][:n], non_blocking=True)
                    drained[i] = torch.cuda.Event()
                    drained[i].record()
                pending.append((drained[i], i, off, n))
                if len(pending) > 1:
                    self._store(out, *pending.pop(0))
                off += n
            while pending:   # then `out` is complete: the caller may commit it
                self._store(out, *pending.pop(0))

    def _store(self, out, drained, i: int, off: int, n: int) -> None:
        drained.synchronize()
        out[off:off + n].copy_(self.host_subs[i][:n])

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.buffer = self.host = None
        self.subs, self.host_subs = [], []


def connect_routes(routes, groups: dict, device: torch.device, nbytes: int) -> None:
    """Open every route's connections now, before training starts.

    NCCL connects a pair of ranks on their first send/receive, and that set-up can wait
    for the whole device (NCCL's docs: any CUDA call may synchronize it). Mid-run the
    device may be busy with a training collective that is itself waiting for this peer,
    which is waiting for the connection: a deadlock (seen on an H100 with
    --gemini-interleave off). One message of a full sub-buffer per route connects every
    channel a chunk will use. Routes go in one global order and every rank finishes each
    before the next, so the lowest unfinished route always has both ends at it."""
    device = torch.device(device)
    rank, buf = dist.get_rank(), torch.zeros(max(1, nbytes), dtype=torch.uint8, device=device)
    for src, dst in sorted({(r.src_rank, r.dst_rank) for r in routes}):
        if rank == src:
            dist.send(buf, dst, group=groups[(src, dst)])
        elif rank == dst:
            dist.recv(buf, src, group=groups[(src, dst)])
        else:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # NCCL's send/recv return once queued


def route_groups(routes, backend: str, timeout) -> dict:
    """One two-rank group per route, created in the same order on every rank (new_group
    is collective over the world)."""
    groups = {}
    for key in sorted({(r.src_rank, r.dst_rank) for r in routes}):
        groups[key] = dist.new_group(sorted(key), backend=backend, timeout=timeout)
    return groups

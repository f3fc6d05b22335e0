"""Staging: the reserved transfer buffer of the exchange's staged mode (`--gemini-transport nccl`).

NCCL moves device memory only, so checkpoint chunks travel through buffers reserved once,
before training (no allocation, no page-locking mid-run: either can wait for the whole
device, which may be blocked by a collective waiting for this very peer). Per route this
rank takes part in: `--gemini-sub-buffers` (p) device sub-buffers of R/p bytes
(R = `--gemini-buffer-mb`); chunk k of a route goes through sub-buffer k mod p.

- Sending: the chunk is copied host slot -> sub-buffer on the copy stream, and the batch
  is issued inside that stream's context, so NCCL's stream waits for the copy (no host wait).
- Receiving: the chunk arrives in the sub-buffer; once a later point saw it complete (or
  its sub-buffer is needed again), the training thread queues the copy device -> a
  page-locked host twin on the drain stream, and the copier thread waits for that copy
  and moves the bytes into the store slot. The copier only copies: every send and
  receive is issued by the training thread (exchange.py).
- A sub-buffer is reused only once its previous chunk is done with it: on CUDA the copy
  stream waits for the previous send, or for the previous receive's drain (stream
  order, the host goes on); on CPU the host waits. The plan puts at most p chunks of a
  route in one gap (schedule.py), so reuse normally waits for a chunk issued at an
  earlier point; more than p at one point (the update, or no plan) go in waves of p.

On CPU (`--gemini-transport gloo-staged`, the tests) the same code runs over gloo with
host sub-buffers and no streams.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _Use:
    """A chunk occupying a sub-buffer."""
    send: bool
    sub: torch.Tensor
    dst: torch.Tensor | None = None        # receiving: where its bytes go in the store slot
    host: torch.Tensor | None = None       # receiving on CUDA: the page-locked twin
    batch: object | None = None            # the exchange's Batch that carries it
    drained: object | None = None          # receiving on CUDA: the event of its copy off the device
    copied: Future | None = None           # receiving: the copier's move into the store slot
    before: Future | None = None           # receiving: the previous chunk's move out of the same twin


class Staging:
    def __init__(self, rank: int, routes, device: torch.device, buffer_bytes: int, num_buffers: int):
        self.device, self.p = torch.device(device), num_buffers
        self.cuda = self.device.type == "cuda"
        self.sub_bytes = max(1, buffer_bytes // num_buffers)
        mine = [r for r in routes if rank in (r.src_rank, r.dst_rank)]
        self.subs, self.hosts = {}, {}
        for r in mine:
            buf = torch.empty(self.sub_bytes * self.p, dtype=torch.uint8, device=self.device)
            self.subs[r] = buf.view(self.p, self.sub_bytes)
            if self.cuda and r.dst_rank == rank:
                host = torch.empty(self.sub_bytes * self.p, dtype=torch.uint8, pin_memory=True)
                self.hosts[r] = host.view(self.p, self.sub_bytes)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)    # H2D, and the batches are issued here
            self.drain_stream = torch.cuda.Stream(self.device)   # D2H of received chunks
        self._uses: dict = {}                                   # (route, sub index) -> _Use
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemini-copy")

    def stage(self, route, k: int, chunk: torch.Tensor, send: bool) -> _Use:
        """Sub-buffer (k mod p) of `route`, free for chunk k: a send's bytes are copied in;
        a receive's destination (`chunk`, in the store slot) is remembered for its drain."""
        n = chunk.numel()
        if n > self.sub_bytes:
            raise ValueError(f"a chunk of {n} bytes exceeds the {self.sub_bytes}-byte sub-buffer")
        i = k % self.p
        prev = self._uses.get((route, i))
        if prev is not None:
            self._release(prev)
        use = _Use(send, self.subs[route][i, :n])
        if send:
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    use.sub.copy_(chunk, non_blocking=True)   # the slot is page-locked on CUDA
            else:
                use.sub.copy_(chunk)
        else:
            use.dst = chunk
            use.host = self.hosts[route][i, :n] if self.cuda else None
            use.before = None if prev is None else prev.copied
        self._uses[(route, i)] = use
        return use

    @contextlib.contextmanager
    def issuing(self):
        """Where a batch is issued: on CUDA the copy stream, so NCCL waits for the staged copies."""
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                yield
        else:
            yield

    def issued(self, uses: list[_Use], batch) -> None:
        for u in uses:
            u.batch = batch

    def wait(self, batch) -> None:
        """Block the host until `batch` completed (NCCL's wait() only orders a stream)."""
        if self.cuda:
            done = torch.cuda.Event()
            with torch.cuda.stream(self.drain_stream):
                for w in batch.works:
                    w.wait()
                done.record()
            done.synchronize()
            batch.waited = True
        else:
            batch.wait()

    def _after(self, batch, stream) -> None:
        """`stream` waits for `batch` (the host goes on): NCCL's wait() orders the current stream."""
        with torch.cuda.stream(stream):
            for w in batch.works:
                w.wait()

    def _release(self, prev: _Use) -> None:
        """The sub-buffer's previous chunk must be done with it before it is reused."""
        if prev.batch is None:
            return   # never issued (its batch failed): nothing uses the sub-buffer
        if prev.send:
            if self.cuda:
                self._after(prev.batch, self.copy_stream)
            else:
                prev.batch.wait()
        else:
            self._drain(prev)
            if self.cuda:
                self.copy_stream.wait_event(prev.drained)
            else:
                prev.copied.result()   # the copier has read the sub-buffer

    def _drain(self, use: _Use) -> None:
        """Queue a received chunk's way into the store slot (once)."""
        if use.copied is not None:
            return
        if use.before is not None:
            use.before.result()   # the twin's previous bytes are in the store
        if self.cuda:
            self._after(use.batch, self.drain_stream)
            with torch.cuda.stream(self.drain_stream):
                use.host.copy_(use.sub, non_blocking=True)
                use.drained = torch.cuda.Event()
                use.drained.record()
            use.copied = self._copier.submit(_to_store, use.drained, use.host, use.dst)
        else:
            use.batch.wait()
            use.copied = self._copier.submit(use.dst.copy_, use.sub)

    def drain_completed(self) -> None:
        """At a point: received chunks whose batch completed start their way into the store."""
        for u in self._uses.values():
            if not u.send and u.copied is None and u.batch is not None and u.batch.done():
                self._drain(u)

    def settle(self) -> None:
        """The deadline: every received chunk is in its store slot."""
        for u in self._uses.values():
            if not u.send and u.batch is not None:
                self._drain(u)
                u.copied.result()

    def reset(self) -> None:
        """Forget the chunks of an abandoned transfer (their group is going away)."""
        self._uses = {}

    def close(self) -> None:
        self._uses = {}
        self._copier.shutdown(wait=False, cancel_futures=True)


def _to_store(drained, host: torch.Tensor, dst: torch.Tensor) -> None:
    drained.synchronize()   # the copier thread waits, not the training thread
    dst.copy_(host)


def connect_routes(routes, group, device: torch.device, nbytes: int) -> None:
    """Open every route's connection on the payload group now, before training starts.

    NCCL connects a pair of ranks on their first send/receive, and that set-up can wait
    for the whole device (NCCL's docs: any CUDA call may synchronize it). Mid-run the
    device may be busy with a training collective that is itself waiting for this peer,
    which is waiting for the connection: a deadlock (seen on an H100 with the threaded
    transport). The group's communicator is created first by a collective of all ranks
    (a batch of point-to-point operations must not be a group's first operation unless
    every rank takes part), then one batch of a full sub-buffer per route, through
    batch_isend_irecv like the exchange's, so the same communicator connects. Routes go
    in one global order and every rank finishes each before the next, so the lowest
    unfinished route always has both ends at it."""
    device = torch.device(device)
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    rank, buf = dist.get_rank(), torch.zeros(max(1, nbytes), dtype=torch.uint8, device=device)
    for src, dst in sorted({(r.src_rank, r.dst_rank) for r in routes}):
        if rank not in (src, dst):
            continue
        op = dist.P2POp(dist.isend if rank == src else dist.irecv, buf, dst if rank == src else src, group)
        for w in dist.batch_isend_irecv([op]):
            w.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # NCCL's wait() only orders the stream

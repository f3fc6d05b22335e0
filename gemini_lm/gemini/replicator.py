"""Replicator: copies committed snapshots into peer machines' stores, from threads.

Only `--gemini-transport nccl` still uses it. Its threads issue operations beside the
training thread's collectives, which NCCL documents as unsafe; the default path is the
training thread's exchange (exchange.py), and this goes once the exchange has a staged
NCCL variant verified on a GPU.

Every rank computes the same routes from the placement plan: (shard, sender rank,
receiver rank). The sender is the rank that writes the shard on its machine; the
receiver is the lowest rank of the destination machine, which writes the replica into
that machine's store. Traffic runs on a process group of its own, from threads, so
training collectives never queue behind checkpoint bytes.

Wire format per snapshot: a fixed-size header (JSON in a uint8 tensor: iteration,
nbytes, checksum, layout hash, sender machine, chunk count), the chunk sizes (int64),
then the payload in those chunks; the receiver answers with the iteration once committed. The
receiver writes chunks straight into the store's slot and commits only after the last
one with the sender's checksum, so a replica is never visible half-written. An
iteration of -1 in the header ends the stream.

The payload chunks travel on a transport (transport.py): on GPU through a reserved
device buffer over NCCL.

Sending is asynchronous: `submit()` hands a committed slot to the sender thread and
returns; `wait()` blocks until the previous snapshot is fully sent. The checkpointer
calls `wait()` before reusing a slot, so the slot being sent is never overwritten.
A chunker (the interleaving scheduler) decides the chunks and when each may go.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.snapshot import as_byte_tensor
from gemini_lm.errors import ReplicationError
from gemini_lm.gemini.exchange import HEADER_BYTES, decode_header, encode_header   # one wire format
from gemini_lm.gemini.schedule import fixed_chunks
from gemini_lm.gemini.topology import Route
from gemini_lm.log import get_logger

log = get_logger(__name__)

STOP = -1
# Two machines may replicate to each other: each rank then has a sending and a receiving
# thread talking to the same peer. Separate tags keep data and acks from crossing.
DATA_TAG, ACK_TAG = 1, 2


class Replicator:
    def __init__(self, routes: list[Route], rank: int, group, store, machine_id: str,
                 chunk_bytes: int, timeline=None, on_sent: Callable | None = None,
                 transports: Callable | None = None, window_hook: Callable | None = None):
        """`transports()` makes a payload transport (one per thread: a staged one owns
        its buffer). `window_hook(window, iteration)`
        runs inside the replication windows, "send" and "receive" (failure injection)."""
        self.rank, self.group, self.store = rank, group, store
        make = transports   # required: the staged (NCCL) transport
        self.machine_id, self.chunk_bytes = machine_id, chunk_bytes
        self.timeline, self.on_sent = timeline, on_sent
        self.window_hook = window_hook
        self.out_routes = [r for r in routes if r.src_rank == rank]
        self.in_routes = [r for r in routes if r.dst_rank == rank]
        self.error: BaseException | None = None
        self.bytes_sent = 0
        self.last_send_s: float | None = None
        self.received: dict[str, int] = {}          # shard -> newest committed replica iteration
        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._threads = []
        self._transports = []
        if self.out_routes:
            self._send_transport = make()
            self._transports.append(self._send_transport)
            self._threads.append(threading.Thread(target=self._send_loop, name="gemini-send", daemon=True))
        for r in self.in_routes:
            self._transports.append(make())
            self._threads.append(threading.Thread(target=self._recv_loop, args=(r, self._transports[-1]),
                                                  name=f"gemini-recv-{r.shard}", daemon=True))
        for t in self._threads:
            t.start()

    # ---- sending ----------------------------------------------------------------------
    def submit(self, view, shard: str, chunker: Callable | None = None) -> None:
        """Send a pinned committed snapshot (store.SnapshotView) to this shard's peers; the
        view is closed once sent. `chunker(peer, nbytes, iteration)` gives the chunks as
        [(offset, size, when)], when = None (now) or (iteration, timeline point | None)
        for the timeline to wait on; default: fixed-size chunks, sent at once."""
        routes = [r for r in self.out_routes if r.shard == shard]
        if not routes:
            view.close()
            return
        self._raise_if_failed()
        self._idle.clear()
        self._jobs.put((view, routes, chunker))

    def wait(self) -> float:
        """Block until everything submitted is sent; returns the seconds spent waiting."""
        t0 = time.perf_counter()
        self._idle.wait()
        self._raise_if_failed()
        return time.perf_counter() - t0

    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            view, routes, chunker = job
            try:
                t0 = time.perf_counter()
                rec = view.record
                for r in routes:
                    chunks = (fixed_chunks(rec.nbytes, self.chunk_bytes) if chunker is None
                              else chunker(r.dst_machine, rec.nbytes, rec.iteration))
                    # The writer's own mapping of the slot is page-locked on CUDA: DMA-able.
                    data = self.store.writer_mapping(rec)
                    self._send_one(as_byte_tensor(view.buffer) if data is None else data, rec, r, chunks)
                self.last_send_s = time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - surfaced to the training thread
                self.error = exc
            finally:
                view.close()
                if self._jobs.empty():
                    self._idle.set()

    def _send_one(self, data: torch.Tensor, rec, route: Route, chunks: list) -> None:
        header = {"iteration": rec.iteration, "nbytes": rec.nbytes, "checksum": rec.checksum,
                  "layout_hash": rec.layout_hash, "machine": self.machine_id, "chunks": len(chunks)}
        t0 = time.perf_counter()
        dist.send(encode_header(header), route.dst_rank, group=self.group, tag=DATA_TAG)
        dist.send(torch.tensor([n for _, n, _ in chunks], dtype=torch.int64), route.dst_rank,
                  group=self.group, tag=DATA_TAG)
        header_s = time.perf_counter() - t0
        if self.window_hook is not None:
            self.window_hook("send", rec.iteration)
        timings = self._send_transport.send(data, chunks, route.dst_rank, self._gate, DATA_TAG)
        self.bytes_sent += sum(n for _, n, _ in chunks)
        # The receiver acknowledges its commit: "sent" then means "complete on the peer".
        ack = torch.zeros(1, dtype=torch.int64)
        dist.recv(ack, route.dst_rank, group=self.group, tag=ACK_TAG)
        if int(ack) != rec.iteration:
            raise ReplicationError(f"{route.dst_machine} acknowledged iteration {int(ack)}, not {rec.iteration}")
        if self.on_sent is not None:
            self.on_sent(header_s / 2, timings)   # two small messages in the header phase

    def _gate(self, when: tuple) -> None:
        if self.timeline is not None:
            self.timeline.wait_until(*when)

    # ---- receiving --------------------------------------------------------------------
    def _recv_loop(self, route: Route, transport) -> None:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        while True:
            try:
                dist.recv(header, route.src_rank, group=self.group, tag=DATA_TAG)
                h = decode_header(header)
                if h["iteration"] == STOP:
                    return
                sizes = torch.empty(h["chunks"], dtype=torch.int64)
                dist.recv(sizes, route.src_rank, group=self.group, tag=DATA_TAG)
                w = self.store.begin_write(route.shard, h["nbytes"], h["layout_hash"], pin=False)
                try:
                    transport.recv(w.buffer, sizes.tolist(), route.src_rank, DATA_TAG)
                except BaseException:
                    self.store.abort(w)
                    raise
                if self.window_hook is not None:
                    self.window_hook("receive", h["iteration"])
                self.store.commit(w, h["iteration"], checksum=h["checksum"], source=h["machine"])
                self.received[route.shard] = h["iteration"]
                dist.send(torch.tensor([h["iteration"]], dtype=torch.int64), route.src_rank, group=self.group,
                          tag=ACK_TAG)
            except BaseException as exc:  # noqa: BLE001 - a dead peer ends the stream
                self.error = exc
                return

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise ReplicationError(f"GEMINI replication failed: {self.error!r}") from self.error

    def close(self, timeout: float = 30.0) -> bool:
        """Finish pending sends, tell receivers to stop, join the threads; False if a thread
        is still running (a peer never sent its stop): its group must then not be destroyed."""
        if self.out_routes:
            self._idle.wait(timeout)
            stop = encode_header({"iteration": STOP})
            for r in self.out_routes:
                try:
                    dist.send(stop, r.dst_rank, group=self.group, tag=DATA_TAG)
                except Exception:  # noqa: BLE001 - peer already gone
                    pass
            self._jobs.put(None)
        stuck = False
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():   # a peer never sent its stop: say so rather than hang
                log.warning(f"GEMINI replication thread {t.name} did not stop")
                stuck = True
        if not stuck:   # a stuck thread may still be using its transport's buffer
            for tr in self._transports:
                tr.close()
        return not stuck

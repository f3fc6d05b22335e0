#!/usr/bin/env python
"""Iteration time under each checkpointing method, measured side by side in one run.

Real training (pretrain_gpt's pretrain(), bundled corpus) on 2 gloo ranks that play 2
machines (GEMINI_MACHINE_ID m0, m1) with TP=2, so each machine's shard is replicated to
the other one, every iteration. Same model, same data, same ranks for:

  none         no checkpointing (--no-gemini, no --save)
  local        GEMINI without peers (--gemini-replicas 1): the snapshot copy alone, a
               diagnostic that splits GEMINI's cost into copying and peer traffic
  interleaved  GEMINI, peer traffic in the profiled gaps (--gemini-interleave on)
  blocking     GEMINI, the step waits for its peer traffic (--gemini-interleave off)
  torch_save   torch.save of every rank's state every iteration (to --dir, fsynced)
  async_save   torch.distributed.checkpoint.async_save every iteration (to --dir); the
               next save first waits for the previous one, as DCP requires

The two baselines run the same training loop with a small checkpointer defined here (the
Checkpointer face: restore, after_step, stats, close), swapped in for
`gemini_lm.training.loop.build_checkpointer` inside the spawned ranks.

Runs go in rounds (none, local, interleaved, blocking, torch_save, async_save, again) so a
change in machine load hits every method alike. Per run, iteration times come from
metrics.jsonl (`last_iter_time_s`, every iteration); the first --gemini-profile-iters + 3
iterations are skipped in every method (profiling, the first eager snapshot, the plan's
first use). Per run: the median of the kept iterations; per round: each method's
ratio to `none` of the same round; reported: the medians over rounds.

Prints a table, then one JSON line.

    python tools/bench_overhead.py            # ~7 minutes on 2 idle cores
    python tools/bench_overhead.py --quick    # ~2 minutes
"""
from __future__ import annotations

import os
import sys


import argparse
import datetime
import json
import shutil
import statistics
import tempfile
import time
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

METHODS = ("none", "local", "interleaved", "blocking", "torch_save", "async_save")
WORLD = 2


class BaselineCheckpointer:
    """Every iteration, this rank's state with torch.save (fsynced) or DCP async_save."""

    def __init__(self, method: str, state, ps, directory: str):
        self.method, self.state, self.ps = method, state, ps
        self.dir = os.path.join(directory, method)
        os.makedirs(self.dir, exist_ok=True)
        # DCP's background thread runs collectives: on a group of its own, never training's.
        self.group = dist.new_group(backend="gloo") if method == "async_save" else None
        self.pending = None          # (future, checkpoint dir) of the save in flight
        self.previous: str | None = None
        self.blocking_s: float | None = None

    def restore(self) -> None:
        return None   # measured from iteration 0: nothing to load, no recovery record

    def before_update(self) -> None:
        pass   # torch.save copies synchronously; DCP's async_save stages to CPU before returning

    def after_step(self, iteration: int) -> None:
        t0 = time.perf_counter()
        if self.method == "torch_save":
            self._torch_save()
        else:
            self._async_save(iteration)
        self.blocking_s = time.perf_counter() - t0

    def _torch_save(self) -> None:
        if self.ps.dp_rank != 0:     # data-parallel replicas hold the same bytes
            return
        path = os.path.join(self.dir, f"{self.ps.shard_id}.pt")
        with open(path + ".tmp", "wb") as f:
            torch.save(self.state.tensors(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def _async_save(self, iteration: int) -> None:
        self._wait()
        path = os.path.join(self.dir, f"iter_{iteration:07d}")
        # TP shards share parameter names: the key says whose shard it is.
        tensors = {f"{self.ps.shard_id}/{k}": v for k, v in self.state.tensors().items()}
        self.pending = (dcp.async_save(tensors, checkpoint_id=path, process_group=self.group), path)

    def _wait(self) -> None:
        if self.pending is None:
            return
        future, path = self.pending
        future.result()
        self.pending = None
        if self.previous is not None and self.ps.rank == 0:
            shutil.rmtree(self.previous, ignore_errors=True)   # keep the newest complete one
        self.previous = path

    def stats(self) -> dict:
        return {} if self.blocking_s is None else {"baseline_blocking_s": self.blocking_s}

    def flush(self, timeout_s: float) -> int | None:
        return None   # a benchmark is never preempted

    def set_window_hook(self, hook) -> None:
        pass

    def memory_store(self) -> None:
        return None   # no in-memory store: the final report line says so

    def close(self, iteration: int, clean: bool) -> None:
        self._wait()


def _rank(rank: int, init_file: str, argv: list[str], method: str, work: str, log_file: str) -> None:
    # The ranks' console goes to a file: the table stays readable, a failure still shows it.
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["GEMINI_MACHINE_ID"] = f"m{rank}"
    torch.set_num_threads(1)
    kwargs = {}
    if "--device" in argv and argv[argv.index("--device") + 1] == "cuda":
        # The two "machines" may share one GPU: each is its own NCCL host, so NCCL talks
        # between them over its network transport, as between machines.
        os.environ["NCCL_HOSTID"] = f"m{rank}"
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        torch.cuda.set_device(rank % torch.cuda.device_count())
        kwargs = {"backend": "cpu:gloo,cuda:nccl", "device_id": torch.device("cuda", torch.cuda.current_device())}
    dist.init_process_group(kwargs.pop("backend", "gloo"), init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300), **kwargs)
    import pretrain_gpt
    from gemini_lm.config import parse_config
    from gemini_lm.training import loop

    # CPU seconds of this process (every thread: training, GEMINI's, DCP's) from one step's
    # start to the next: the work an iteration costs, whatever else runs on the machine.
    cpu_log = open(log_file + ".cpu", "w", buffering=1)
    train_step = loop.train_step

    def timed_step(*a, iteration: int, **kw):
        cpu_log.write(f"{iteration} {time.process_time()}\n")
        return train_step(*a, iteration=iteration, **kw)

    loop.train_step = timed_step
    if method in ("torch_save", "async_save"):
        loop.build_checkpointer = lambda cfg, state, ps: BaselineCheckpointer(method, state, ps, work)
    cfg = parse_config(argv, world_size=WORLD)
    pretrain_gpt.pretrain(cfg, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                          pretrain_gpt.gpt_forward_step)


def run_once(method: str, args, work: str, name: str) -> list[dict]:
    """One training run of `method` on WORLD spawned ranks: rank 0's metrics records, with
    `cpu_s` (CPU seconds per rank) added for every iteration but the last."""
    log_dir = os.path.join(work, name)
    argv = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--tensor-model-parallel-size", str(WORLD), "--train-iters", str(args.iters),
            "--lr", "1e-4", "--lr-warmup-iters", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--log-interval", "1", "--eval-interval", "0", "--log-dir", log_dir,
            "--gemini-store-dir", os.path.join(args.shm, os.path.basename(work)), "--gemini-job-id", name,
            "--gemini-profile-iters", str(args.profile_iters), "--gemini-buffer-mb", str(args.buffer_mb),
            "--device", args.device, "--gemini-transport", args.transport]
    if method == "local":
        argv += ["--gemini-replicas", "1"]
    elif method == "interleaved":
        argv += ["--gemini-interleave", "on"]
    elif method == "blocking":
        argv += ["--gemini-interleave", "off"]
    else:
        argv += ["--no-gemini"]
    init_file = os.path.join(work, f"init_{name}_{uuid.uuid4().hex}")   # a FileStore is single-use
    ctx = mp.get_context("spawn")
    logs = [os.path.join(work, f"{name}.rank{r}.log") for r in range(WORLD)]
    procs = [ctx.Process(target=_rank, args=(r, init_file, argv, method, work, logs[r])) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    try:
        while any(p.exitcode is None for p in procs) and time.monotonic() < deadline \
                and all(p.exitcode in (None, 0) for p in procs):
            time.sleep(0.2)
    finally:   # a failed rank, a timeout or Ctrl-C: no rank outlives the run
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        tail = "".join(open(log).read()[-3000:] for log in logs if os.path.exists(log))
        raise SystemExit(f"{tail}\n{name}: ranks exited with {[p.exitcode for p in procs]}")
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "last_iter_time_s" in r]
    cpu: dict[int, list[float]] = {}
    for log in logs:       # iteration i's CPU time: from its start to the next one's
        starts = dict(tuple(map(float, line.split())) for line in open(log + ".cpu"))
        for it, t in starts.items():
            if it + 1 in starts:
                cpu.setdefault(int(it), []).append(starts[it + 1] - t)
    for r in records:
        if r["iteration"] in cpu:
            r["cpu_s"] = statistics.mean(cpu[r["iteration"]])   # mean over the ranks
    return records


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of shorter runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default 30, quick 16)")
    p.add_argument("--profile-iters", type=int, default=5, help="--gemini-profile-iters")
    p.add_argument("--buffer-mb", type=float, default=128.0, help="--gemini-buffer-mb")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8, help="2 micro-batches by default")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: state on the GPU, NCCL for training and checkpoint payloads")
    p.add_argument("--transport", default="auto", choices=["auto", "gloo", "nccl", "gloo-staged"],
                   help="--gemini-transport")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="disk directory for the baselines' files")
    p.add_argument("--shm", default="/dev/shm", help="where the GEMINI stores go")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 16 if args.quick else 30
    if args.quick:
        args.rounds = 1
    if args.transport == "nccl" and args.device != "cuda":
        p.error("--transport nccl needs --device cuda")
    args.skip = args.profile_iters + 3
    if args.iters <= args.skip + 2:
        p.error(f"--iters must exceed --profile-iters + 5 (got {args.iters})")
    return args


def _blocked_s(record: dict) -> float:
    """Seconds the training thread spent inside the checkpointer this iteration."""
    return record.get("gemini_blocking_s", record.get("baseline_blocking_s", 0.0))


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"       # one thread a rank: 2 ranks on 2 cores
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = tempfile.mkdtemp(prefix="bench_overhead_", dir=args.dir)
    per_round: dict[str, list[float]] = {m: [] for m in METHODS}    # median s/it of each run
    cpu_round: dict[str, list[float]] = {m: [] for m in METHODS}    # median CPU s/it of each run
    blocked: dict[str, list[float]] = {m: [] for m in METHODS}
    last: dict[str, dict] = {}
    loads = [os.getloadavg()[0]]
    failed: dict[str, str] = {}   # method -> why; the other methods are still measured
    try:
        for rnd in range(args.rounds):
            for method in METHODS:
                if method in failed:
                    continue
                try:
                    records = [r for r in run_once(method, args, work, f"{method}-{rnd}")
                               if r["iteration"] > args.skip]
                except SystemExit as exc:
                    if method == "none":
                        raise   # nothing to compare with
                    print(exc, file=sys.stderr, flush=True)
                    failed[method] = str(exc).strip().splitlines()[-1]
                    continue
                per_round[method].append(statistics.median(r["last_iter_time_s"] for r in records))
                cpu_round[method].append(statistics.median(r["cpu_s"] for r in records if "cpu_s" in r))
                blocked[method] += [_blocked_s(r) for r in records]
                last[method] = records[-1]
                loads.append(os.getloadavg()[0])
                print(f"round {rnd} {method:<12} median {per_round[method][-1]:.4f} s/it, "
                      f"{cpu_round[method][-1]:.4f} CPU s/it ({len(records)} iterations, load {loads[-1]:.2f})",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.path.join(args.shm, os.path.basename(work)), ignore_errors=True)

    # A ratio compares runs of the same round (minutes apart); the median over rounds
    # discards a round that another process on the machine disturbed.
    med = statistics.median
    methods = [m for m in METHODS if m not in failed]
    ratio = {m: med(x / n for x, n in zip(per_round[m], per_round["none"])) for m in methods}
    cpu_ratio = {m: med(x / n for x, n in zip(cpu_round[m], cpu_round["none"])) for m in methods}
    secs = {m: med(per_round[m]) for m in methods}
    cpu = {m: med(cpu_round[m]) for m in methods}
    snap = next((last[m] for m in ("interleaved", "blocking", "local") if m in last), {})
    print(f"\n{WORLD} ranks as {WORLD} machines on {args.device} (transport {args.transport}), TP={WORLD}, {args.num_layers} layers, hidden {args.hidden_size}, "
          f"seq {args.seq_length}, batch {args.global_batch_size} (micro {args.micro_batch_size}); snapshot "
          f"{snap.get('gemini_snapshot_bytes', 0) / 2**20:.1f} MiB per rank, sent to the other machine; "
          f"{args.rounds} round(s) x {args.iters - args.skip} iterations; cpus {os.cpu_count()}, "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'method':<12} {'s/it':>7} {'x none':>7} {'CPU s/it':>9} {'x none':>7} {'blocked s':>10}   "
          f"per-round s/it")
    for m, why in failed.items():
        print(f"{m:<12} FAILED: {why}")
    for m in methods:
        print(f"{m:<12} {secs[m]:>7.4f} {ratio[m]:>7.3f} {cpu[m]:>9.4f} {cpu_ratio[m]:>7.3f} "
              f"{med(blocked[m]):>10.4f}   " + " ".join(f"{x:.4f}" for x in per_round[m]))
    print("CPU s/it: CPU seconds of one rank's process per iteration, all threads (less sensitive to other "
          "load than wall time); blocked: time inside the checkpointer on the training thread (snapshot "
          "copy, waits, saves) - the rest of the overhead is background work competing for the same cores")
    if snap:
        print(f"interleaving plan: every {snap.get('gemini_interleave_every')} iteration(s), "
              f"{snap.get('gemini_interleave_leftover_bytes', 0) / 2**20:.2f} MiB left for before the update, "
              f"predicted extra {snap.get('gemini_interleave_predicted_extra_s', 0) * 1e3:.1f} ms")
    out = {f"ratio_{m}": ratio[m] for m in methods if m != "none"}
    out.update({f"cpu_ratio_{m}": cpu_ratio[m] for m in methods if m != "none"})
    out.update({f"{m}_s": secs[m] for m in methods})
    out.update({f"{m}_cpu_s": cpu[m] for m in methods})
    out.update({f"{m}_blocked_s": med(blocked[m]) for m in methods if m != "none"})
    out.update({"failed": failed, "per_round_s": per_round, "per_round_cpu_s": cpu_round,
                "snapshot_bytes": snap.get("gemini_snapshot_bytes"),
                "interleave_every": snap.get("gemini_interleave_every"),
                "interleave_leftover_bytes": snap.get("gemini_interleave_leftover_bytes"),
                "interleave_predicted_extra_s": snap.get("gemini_interleave_predicted_extra_s"),
                "load_average": [min(loads), max(loads)], "cpus": os.cpu_count(),
                "config": {k: getattr(args, k) for k in ("rounds", "iters", "skip", "profile_iters", "buffer_mb",
                                                          "num_layers", "hidden_size", "num_attention_heads",
                                                          "seq_length", "micro_batch_size", "global_batch_size",
                                                          "dir", "device", "transport")}})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

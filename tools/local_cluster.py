"""Simulate a cluster of machines on one host: one torchrun agent per machine, plus an operator.

    python tools/local_cluster.py --machines 4 --procs-per-machine 2 --spares 1 \\
        --inject machine:1@iteration=30 --inject worker:5@iteration=60 \\
        -- pretrain_gpt.py --tensor-model-parallel-size 2 --train-iters 100 --log-dir runs/demo

Each machine is a `torchrun` agent (c10d rendezvous, `is_host=false`) in its own session,
with its own GEMINI_MACHINE_ID (m0, m1, ...) and its own directory in a shared-memory
store root private to this cluster. This process hosts the rendezvous TCPStore — also
the job store in-place recovery coordinates through (GEMINI_JOB_STORE) — so no machine's
death takes it down, and plays the cloud operator.

With in-place recovery (the default), --spares machines start with the job and wait
warm (the training gets --gemini-spares): a lost machine's ranks move to one of them in
place and nothing is restarted. When a machine dies and no spare is left, the job takes
the full restart: the operator starts replacements (fresh ids, empty memory) for every
lost machine after --replacement-delay seconds and torchrun restarts the workers
(--max-restarts). Without in-place recovery (--no-gemini, --no-gemini-inplace), --spares
counts replacements available at once instead.

<log-dir>/cluster.json: machines, agent and worker PIDs, states, replacements,
injections. Agents' stderr goes to <log-dir>/cluster/<machine>.log. At the end, on
Ctrl-C or SIGTERM every process of the cluster is killed (found by the GEMINI_CLUSTER_ID
in its environment, whoever its parent is), what the workers left in the store root is
listed in cluster.json (`store_left`; empty after a clean finish) and the root is removed.
Exit code: 0 when training completed on every machine, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time


from gemini_lm.config import default_log_dir
from gemini_lm.errors import HelpFormatter, UsageArgumentParser, UsageError, run_cli
from gemini_lm.resilience import procs
from gemini_lm.resilience.events import INJECTIONS, read_jsonl
from gemini_lm.resilience.injection import Injection, inject, metrics_size, wipe_machine_store
from gemini_lm.resilience.recovery_report import summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


USAGE = "local_cluster.py [options] -- SCRIPT.py [training flags]"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # Parse the options before asking for `--`, so that --help alone prints the help.
    split = argv.index("--") if "--" in argv else len(argv)
    p = UsageArgumentParser(usage=USAGE, description="\n\n".join(__doc__.split("\n\n")[:2]),
                            formatter_class=HelpFormatter)
    p.add_argument("--machines", type=int, default=2, help="machines (torchrun agents)")
    p.add_argument("--procs-per-machine", type=int, default=1, help="workers per machine")
    p.add_argument("--spares", type=int, default=0,
                   help="warm spare machines started with the job (in-place recovery), else replacements "
                        "available at once")
    p.add_argument("--replacement-delay", type=float, default=5.0, help="seconds to get a new machine")
    p.add_argument("--max-restarts", type=int, default=5, help="torchrun --max-restarts per agent")
    p.add_argument("--inject", action="append", default=[], metavar="KIND:N[@iteration=N][@during=W]",
                   help="failure to inject (repeatable; see tools/inject_failure.py)")
    p.add_argument("--job-id", default=None, help="rendezvous id = GEMINI job id (default: cluster-<random>)")
    p.add_argument("--store-root", default=None,
                   help="shared-memory store root (default: /dev/shm/gemini_lm_cluster_<id>)")
    p.add_argument("--port", type=int, default=0, help="rendezvous port (default: a free one)")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0 = never)")
    args = p.parse_args(argv[:split])
    if "--" not in argv:
        raise UsageError(f"usage: {USAGE}")
    train = argv[split + 1:]
    if not train or not train[0].endswith(".py"):
        raise UsageError("after --: the training script (e.g. pretrain_gpt.py) and its flags")
    if args.machines < 1 or args.procs_per_machine < 1 or args.spares < 0 or args.max_restarts < 0:
        raise UsageError("--machines and --procs-per-machine must be >= 1, --spares and --max-restarts >= 0")
    args.injections = [Injection.parse(s) for s in args.inject]
    return args, train


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class Cluster:
    def __init__(self, args: argparse.Namespace, train: list[str]):
        self.args = args
        self.cluster_id = secrets.token_hex(4)
        self.job_id = args.job_id or f"cluster-{self.cluster_id}"
        script = train[0] if os.path.exists(train[0]) else os.path.join(ROOT, train[0])
        if not os.path.exists(script):
            raise UsageError(f"{train[0]}: no such script")
        # The training's own default (one directory per job), passed on explicitly: the
        # workers and this process must agree on it.
        self.log_dir = os.path.abspath(default_log_dir(script, train[1:]))
        if flag_value(train, "--log-dir") is None:
            train = train + ["--log-dir", self.log_dir]
        self.store_root = args.store_root or (f"/dev/shm/gemini_lm_cluster_{self.cluster_id}"
                                              if os.path.isdir("/dev/shm") else
                                              os.path.join(self.log_dir, "store"))
        if flag_value(train, "--gemini-store-dir") is None:
            train = train + ["--gemini-store-dir", self.store_root]
        self.train = [os.path.abspath(script)] + train[1:]
        self.machines: list[dict] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.replacements: list[dict] = []
        self.pending: list[dict] = []            # replacements not started yet
        self.injections: list[dict] = []
        self.inplace = "--no-gemini" not in train and "--no-gemini-inplace" not in train
        self.warm_spares = args.spares if self.inplace else 0   # machines that start with the job
        if self.warm_spares and flag_value(train, "--gemini-spares") is None:
            self.train += ["--gemini-spares", str(self.warm_spares)]
        self.spares_left = args.spares
        self.unreplaced: list[dict] = []         # dead machines whose ranks a warm spare took over
        self.idle_since: float | None = None
        self.next_id = 0
        self.state = "starting"
        self.started_at = time.time()
        self.lock = threading.Lock()
        self.store = None
        self.store_left: list[str] | None = None   # set at shutdown, before the store root goes

    # ---- machines ---------------------------------------------------------------------
    def start_machine(self, slot: int, replaces: str | None = None) -> dict:
        mid = f"m{self.next_id}"
        self.next_id += 1
        a = self.args
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(a.machines + self.warm_spares),
               "--nproc-per-node", str(a.procs_per_machine), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.job_id,
               # keep-alive: a killed agent drops out of the rendezvous in ~3 s, not 15 s
               "--rdzv-conf", "is_host=false,keep_alive_interval=1,keep_alive_max_attempt=3",
               "--max-restarts", str(a.max_restarts), "--monitor-interval", "0.2",
               "--local-addr", "127.0.0.1", *self.train]
        env = {**os.environ, "GEMINI_MACHINE_ID": mid, procs.CLUSTER_ENV: self.cluster_id,
               # machines sharing a host's GPUs are separate hosts to NCCL too (one GPU may
               # then serve several machines: NCCL would refuse a "duplicate GPU" otherwise)
               "NCCL_HOSTID": mid,
               # pytorch#135712: sharing the rendezvous store with workers breaks gloo after restarts
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               "GEMINI_JOB_STORE": f"127.0.0.1:{self.port}",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        os.makedirs(os.path.join(self.log_dir, "cluster"), exist_ok=True)
        err = open(os.path.join(self.log_dir, "cluster", f"{mid}.log"), "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=None, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        err.close()
        m = {"slot": slot, "id": mid, "agent_pid": proc.pid, "state": "running", "started_at": time.time(),
             "ended_at": None, "exit_code": None, "replaces": replaces, "workers": []}
        self.procs[mid] = proc
        self.machines.append(m)
        return m

    def live(self) -> list[dict]:
        return [m for m in self.machines if m["state"] == "running"]

    def poll(self) -> str | None:
        """Update machine states; 'done' or 'failed' when the job is over."""
        now = time.time()
        for m in self.live():
            rc = self.procs[m["id"]].poll()
            if rc is None:
                continue
            m["exit_code"], m["ended_at"] = rc, now
            if rc == 0:
                m["state"] = "done"
            elif rc < 0:   # killed by a signal: the machine is lost
                m["state"] = "dead"
                wipe_machine_store(self.store_root, m["id"])
                self._replace(m, now)
            else:
                m["state"] = "failed"
                print(f"local_cluster: machine {m['id']} failed (torchrun exit {rc}); see "
                      f"{os.path.join(self.log_dir, 'cluster', m['id'] + '.log')}", file=sys.stderr, flush=True)
                return "failed"
        for r in [r for r in self.pending if r["due"] <= now]:
            self.pending.remove(r)
            new = self.start_machine(r["slot"], replaces=r["dead"])
            self.replacements.append({**{k: v for k, v in r.items() if k != "due"},
                                      "new": new["id"], "started_at": new["started_at"]})
        slots = {}
        for m in self.machines:
            slots[m["slot"]] = m   # the newest machine of each slot
        lost = {m["slot"] for m in self.unreplaced}
        if not self.pending and all(m["state"] == "done" for s, m in slots.items() if s not in lost):
            return "done"
        self._release_exit_barrier(now)
        return None

    def _replace(self, m: dict, now: float) -> None:
        if self.warm_spares and self.spares_left > 0:
            # A warm spare takes the lost ranks over in place: no new machine joins (a node
            # joining the rendezvous would make torchrun restart every worker).
            self.spares_left -= 1
            self.unreplaced.append(m)
            print(f"local_cluster: machine {m['id']} (slot {m['slot']}) died; a warm spare takes over "
                  f"({self.spares_left} left)", flush=True)
            return
        # The full restart: the rendezvous needs every slot again.
        lost, self.unreplaced = self.unreplaced + [m], []
        from_spare = not self.warm_spares and self.spares_left > 0
        self.spares_left = self.warm_spares if self.warm_spares else self.spares_left - from_spare
        delay = 0.0 if from_spare else self.args.replacement_delay
        for dead in lost:
            self.pending.append({"slot": dead["slot"], "dead": dead["id"], "died_at": now, "due": now + delay,
                                 "from_spare": from_spare, "delay_s": delay})
        print(f"local_cluster: machine {m['id']} (slot {m['slot']}) died; "
              f"{len(lost)} replacement(s) {'from spares now' if from_spare else f'in {delay:g}s'}", flush=True)

    def _release_exit_barrier(self, now: float) -> None:
        """torchrun's agents wait (300 s, no flag) in an exit barrier for every node of their
        rendezvous — including a lost machine whose ranks a spare took over. Once no training
        process is left on the live machines, training is over: stop those agents."""
        if not self.unreplaced:
            return
        live = [m for m in self.live()]
        busy = any(w["machine"] in {m["id"] for m in live} for w in procs.workers(self.cluster_id))
        if busy or not live:
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        if now - self.idle_since > 2.0:
            for m in live:
                procs.signal_group(m["agent_pid"], signal.SIGTERM)
                m["state"], m["exit_code"], m["ended_at"] = "done", 0, now
                m["note"] = "stopped in torchrun's exit barrier after training finished"


    def write_state(self) -> None:
        found = procs.workers(self.cluster_id, self.log_dir)
        for m in self.machines:
            if m["state"] == "running":
                m["workers"] = [{"pid": w["pid"], "rank": w["rank"], "local_rank": w["local_rank"],
                                 "restart_count": w["restart_count"]} for w in found if w["machine"] == m["id"]]
            else:
                m["workers"] = []
        state = {"cluster_id": self.cluster_id, "job_id": self.job_id, "pid": os.getpid(),
                 "state": self.state, "log_dir": self.log_dir, "store_root": self.store_root,
                 "rdzv_endpoint": f"127.0.0.1:{self.port}", "procs_per_machine": self.args.procs_per_machine,
                 "machines": self.machines, "replacements": self.replacements, "injections": self.injections,
                 "store_left": self.store_left, "updated_at": time.time()}
        path = os.path.join(self.log_dir, "cluster.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)

    # ---- injections -------------------------------------------------------------------
    def _inject(self, inj: Injection, offset: int) -> None:
        try:
            event = inject(self.log_dir, inj, offset=offset, source="local_cluster")
            print(f"local_cluster: injected {inj.kind}:{inj.target}"
                  f"{'' if event.get('victim_rank') is None else ' (rank %d)' % event['victim_rank']}"
                  f"{' during ' + inj.during if inj.during else ''}", flush=True)
        except Exception as exc:  # noqa: BLE001 - an injection that cannot happen is reported, not fatal
            event = {"time": time.time(), "kind": inj.kind, "target": inj.target, "error": repr(exc)}
            print(f"local_cluster: injection {inj} failed: {exc}", file=sys.stderr, flush=True)
        with self.lock:
            self.injections.append(event)

    # ---- run --------------------------------------------------------------------------
    def run(self) -> int:
        import torch.distributed as dist

        os.makedirs(self.log_dir, exist_ok=True)
        os.makedirs(self.store_root, exist_ok=True)
        # Agents join this store as clients (is_host=false): it outlives every machine.
        self.store = dist.TCPStore("127.0.0.1", self.args.port, is_master=True, wait_for_workers=False,
                                   timeout=__import__("datetime").timedelta(seconds=600))
        self.port = self.store.port
        for slot in range(self.args.machines + self.warm_spares):
            self.start_machine(slot)
        self.state = "running"
        self.write_state()   # injections resolve targets from it
        offset = metrics_size(self.log_dir)
        for inj in self.args.injections:
            threading.Thread(target=self._inject, args=(inj, offset), daemon=True).start()
        deadline = time.monotonic() + self.args.timeout if self.args.timeout else None
        last_write = 0.0
        outcome = None
        while outcome is None:
            time.sleep(0.1)
            with self.lock:
                outcome = self.poll()
                if time.monotonic() - last_write > 0.3 or outcome:
                    self.write_state()
                    last_write = time.monotonic()
            if deadline and time.monotonic() > deadline:
                print(f"local_cluster: timed out after {self.args.timeout:g}s", file=sys.stderr, flush=True)
                outcome = "timeout"
        self.state = outcome
        return 0 if outcome == "done" else 1

    def summary(self) -> list[str]:
        """What this cluster saw: the failures it injected, the recoveries the training
        recorded since it started (recovery.jsonl), and where everything is."""
        recs = [r for r in read_jsonl(os.path.join(self.log_dir, "recovery.jsonl"))
                if (r.get("first_iteration_at") or 0) >= self.started_at]
        # by --inject or by hand (tools/inject_failure.py); a failed one has no injections.jsonl line
        injected = [e for e in read_jsonl(os.path.join(self.log_dir, INJECTIONS)) if e["time"] >= self.started_at]
        injected += [e for e in self.injections if e.get("error")]
        lines = [f"local_cluster: {self.state} after {time.time() - self.started_at:.1f}s; "
                 f"{len(injected)} failure(s) injected, {len(recs)} recovery(ies) recorded, "
                 f"{len(self.replacements)} machine(s) replaced"]
        for e in sorted(injected, key=lambda e: e["time"]):
            what = f"{e['kind']}:{e['target']}" + (f" (rank {e['victim_rank']})" if e.get("victim_rank") is not None else "")
            lines.append(f"  +{e['time'] - self.started_at:.1f}s injected {what}"
                         + (f": failed: {e['error']}" if e.get("error") else ""))
        for r in recs:
            lines.append(f"  +{r['first_iteration_at'] - self.started_at:.1f}s {summary_line(r)}")
        lines.append(f"  logs: {self.log_dir} (metrics.jsonl, recovery.jsonl, failures.jsonl, cluster.json, cluster/)")
        return lines

    def shutdown(self) -> None:
        """Stop every process of the cluster and free its shared memory."""
        for m in self.live():
            procs.signal_group(m["agent_pid"], signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while procs.cluster_processes(self.cluster_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.kill_all(self.cluster_id)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5.0
        while procs.cluster_processes(self.cluster_id) and time.monotonic() < deadline:
            procs.kill_all(self.cluster_id)
            time.sleep(0.05)
        # What the machines' workers left in memory (a clean finish frees it all), for the record.
        self.store_left = sorted(os.path.relpath(os.path.join(d, n), self.store_root)
                                 for d, dirs, files in os.walk(self.store_root) for n in dirs + files)
        shutil.rmtree(self.store_root, ignore_errors=True)
        for m in self.machines:
            if m["state"] == "running":
                m["state"] = "stopped"
        try:
            self.write_state()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args, train = parse_args(sys.argv[1:] if argv is None else argv)
    cluster = Cluster(args, train)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return cluster.run()
    except KeyboardInterrupt:
        cluster.state = "interrupted"
        print("local_cluster: interrupted, shutting down", file=sys.stderr, flush=True)
        return 130
    finally:
        cluster.shutdown()
        print("\n".join(cluster.summary()), flush=True)


if __name__ == "__main__":
    run_cli(main)

"""Recovery time and wasted time per failure: GEMINI's paths vs. persistent checkpoints, in one run.

    python tools/bench_recovery.py                     # 2 machines x 1 worker, TP=2, tiny GPT
    python tools/bench_recovery.py --parts inplace     # only the recovery-time part
    python tools/bench_recovery.py --checkpoint-iterations 6 -- --hidden-size 256 --num-layers 4

Part "inplace": recovery time by path, --failures failures of each kind in one run each,
measured from each injection's timestamp to the first iteration completed after it
(recovery.jsonl, joined to its injection): in place (the default) for a worker kill, a
machine kill onto a warm spare machine (one spare per failure) and a hung worker (from
its detection, after --gemini-hang-timeout); the full restart (--no-gemini-inplace) and
no GEMINI (a blocking save every iteration) for a worker kill, side by side.

Part "paper":
for a worker kill and a machine kill it runs tools/local_cluster.py once with GEMINI and
once per persistent baseline (--no-gemini), injects the failure, and measures it from
metrics.jsonl, injections.jsonl and recovery.jsonl (--log-interval 1). The baselines:

  on modelled remote storage (the paper's baselines): --persistent-bandwidth-mbs paces
  every shard write and read so that one checkpoint takes K iterations to write, as in
  the paper's setting (PaperSetting: its figures and our assumptions, printed).
    HighFreq   --async-save every ceil(K) iterations: one checkpoint after the other,
               as often as the bandwidth allows
    Strawman   --async-save every 3 hours of the paper's iterations
  on this machine's local disk (what the disk allows; not the paper's setting):
    HighFreq   blocking saves, the smallest interval whose save fits in the training
               between two saves (measured first, with --save-interval 1)
    Strawman   --rare-factor times that interval

A persistent run is hit halfway between two *completed* checkpoints (a checkpoint
written in the background counts from when its write ends), so its lost work is the
paper's t_ckpt + 1/(2f) of a failure at a random moment. Per run:

    stall_s      the training time one checkpoint blocks (GEMINI: its snapshot copy;
                 async: the copy into a CPU buffer; blocking: the whole save)
    lost         iterations reached before the failure − iteration recovered to
    retrieval_s  restore start → state loaded (recovery.jsonl; reads are throttled too)
    wasted_s     (a) the paper's definition: stall_s + lost progress + retrieval_s, with
                 lost progress = (lost + 1/2) × iteration time: the failure is injected
                 right after an iteration, and one at a random moment also loses half of
                 the iteration in progress (the same for every method)
    e2e_s        (b) end to end: injection → back at the iteration reached at the
                 injection, minus one normal iteration, plus stall_s (includes detection,
                 process restart, rendezvous and set-up, which the paper leaves out)

Prints the arithmetic, a table, then one JSON line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from gemini_lm.errors import UsageArgumentParser, run_cli
from gemini_lm.resilience.events import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The phases of both recovery paths (recovery_report.PHASES): in place, then the full restart.
PHASES = ("detect_s", "abort_s", "reform_s", "restart_s", "rendezvous_s", "setup_s", "retrieval_s",
          "first_iteration_s")
LABELS = {"gemini": "GEMINI", "remote_highfreq": "HighFreq", "remote_strawman": "Strawman",
          "persistent_frequent": "HighFreq (local disk)", "persistent_rare": "Strawman (local disk)"}
REMOTE = ("remote_highfreq", "remote_strawman")
LOCAL_DISK = ("persistent_frequent", "persistent_rare")


@dataclass(frozen=True)
class PaperSetting:
    """The paper's setting, from which one remote checkpoint's length in iterations follows.
    Figures marked (paper) are the paper's; the iteration time is not in it, so it is derived
    from the marked assumptions."""
    params: float = 100e9                        # (paper) GPT-2 100B, its largest model
    gpus: int = 128                              # (paper) 16 p4d.24xlarge x 8 A100
    remote_bytes_per_s: float = 20e9 / 8         # (paper) remote persistent storage: 20 Gbps aggregate
    mtnlg_params: float = 530e9                  # (paper) "it takes 42 minutes to checkpoint the model
    mtnlg_checkpoint_s: float = 42 * 60.0        #  states of MT-NLG (530B) ... when the bandwidth is 20Gbps"
    strawman_interval_s: float = 3 * 3600.0      # (paper) Strawman checkpoints every 3 hours
    tokens_per_iteration: int = 1024 * 1024      # (assumed) 1024 sequences x 1024 tokens (GPT-2's context)
    gpu_peak_flops: float = 312e12               # (A100 datasheet) dense bf16
    mfu: float = 0.4                             # (assumed) model FLOPs utilisation

    @property
    def bytes_per_param(self) -> float:
        return self.mtnlg_checkpoint_s * self.remote_bytes_per_s / self.mtnlg_params

    @property
    def checkpoint_s(self) -> float:
        return self.params * self.bytes_per_param / self.remote_bytes_per_s

    @property
    def iteration_s(self) -> float:
        return 6 * self.params * self.tokens_per_iteration / (self.gpus * self.gpu_peak_flops * self.mfu)

    @property
    def checkpoint_iterations(self) -> float:
        return self.checkpoint_s / self.iteration_s

    def lines(self) -> list[str]:
        flops = 6 * self.params * self.tokens_per_iteration
        return [
            f"remote storage {self.remote_bytes_per_s * 8 / 1e9:.0f} Gbps = {self.remote_bytes_per_s / 1e9:.2f} GB/s "
            "aggregate (paper)",
            f"MT-NLG {self.mtnlg_params / 1e9:.0f}B checkpointed in {self.mtnlg_checkpoint_s / 60:.0f} min at that "
            f"bandwidth (paper): {self.mtnlg_checkpoint_s:.0f} s x {self.remote_bytes_per_s / 1e9:.2f} GB/s / "
            f"{self.mtnlg_params:.3g} params = {self.bytes_per_param:.1f} bytes of state per parameter",
            f"GPT-2 {self.params / 1e9:.0f}B (paper): {self.params * self.bytes_per_param / 1e12:.2f} TB per checkpoint "
            f"-> t_ckpt = {self.checkpoint_s:.0f} s to remote storage",
            f"iteration time (not in the paper; assumed): 6 x {self.params:.3g} params x {self.tokens_per_iteration:,} "
            f"tokens = {flops:.3g} FLOP on {self.gpus} A100 x {self.gpu_peak_flops / 1e12:.0f} TFLOP/s x MFU "
            f"{self.mfu:.2f} -> T_iter = {self.iteration_s:.1f} s",
            f"K = t_ckpt / T_iter = {self.checkpoint_s:.0f} / {self.iteration_s:.1f} = "
            f"{self.checkpoint_iterations:.1f} iterations per remote checkpoint (--checkpoint-iterations)",
            f"Strawman every {self.strawman_interval_s / 3600:g} h (paper) = "
            f"{self.strawman_interval_s / self.iteration_s:.0f} iterations of {self.iteration_s:.1f} s (--strawman-hours)",
        ]


def tiny_corpus(work: str) -> str:
    """A small byte-level corpus (no tokenizer to train), like the tests'."""
    src = os.path.join(work, "docs.jsonl")
    with open(src, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"Document {i}. " + "Checkpoints in memory make failures cheap. "
                                * (5 + i % 7)}) + "\n")
    prefix = os.path.join(work, "bytes")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", src,
                    "--output-prefix", prefix, "--tokenizer-type", "ByteLevelTokenizer", "--append-eod",
                    "--workers", "1"], check=True, capture_output=True)
    return prefix + "_text_document"


def train_flags(corpus: str, log_dir: str, iters: int, extra: list[str]) -> list[str]:
    return ["--data-path", corpus, "--tokenizer-type", "ByteLevelTokenizer", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "2",
            "--log-interval", "1", "--eval-interval", "0", "--tensor-model-parallel-size", "2",
            "--gemini-profile-iters", "2", "--train-iters", str(iters), "--log-dir", log_dir, *extra]


def run(args, log_dir: str, iters: int, flags: list[str], inject: str | None, spares: int = 0) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", str(args.machines),
           "--procs-per-machine", "1", "--spares", str(spares), "--timeout", "900"]
    if inject:
        cmd += ["--inject", inject]
    cmd += ["--", "pretrain_gpt.py", *train_flags(args.corpus, log_dir, iters, flags + args.extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {out.returncode}\n{out.stderr[-2000:]}")


def losses(log_dir: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(log_dir, "metrics.jsonl")) if "loss" in r]


def measure(log_dir: str) -> dict:
    """Wasted time of the one injected failure, both definitions (see the module doc)."""
    inj = read_jsonl(os.path.join(log_dir, "injections.jsonl"))[0]
    t_inj = inj["time"]
    recs = losses(log_dir)
    before = [r for r in recs if r["time"] <= t_inj]
    after = [r for r in recs if r["time"] > t_inj]
    reached = before[-1]["iteration"]
    iter_s = statistics.median(r["last_iter_time_s"] for r in before[2:] or before)
    first = after[0]
    back = next(r for r in after if r["iteration"] == reached + 1)
    # The stall one checkpoint adds to the step it is taken in.
    stalls = [r.get("persist_blocking_s", r.get("gemini_blocking_s")) for r in before]
    stalls = [x for x in stalls if x is not None]
    stall = statistics.median(stalls) if stalls else 0.0
    lost = reached - (first["iteration"] - 1)
    out = {"recovery_s": first["time"] - t_inj, "lost": lost, "stall_s": stall, "iter_s": iter_s,
           "e2e_s": back["time"] - t_inj - iter_s + stall, "injected_at_iteration": reached}
    writes = [r["persist_write_s"] for r in before if "persist_write_s" in r]
    if writes:   # async saves: how many iterations one background write took
        out["write_s"] = statistics.median(writes)
    # The recovery that followed this injection: a run can log another one after it (seen:
    # workers restarted once more after training completed), so join on the injection.
    records = read_jsonl(os.path.join(log_dir, "recovery.jsonl"))
    joined = [r for r in records if r.get("injected_at") == t_inj] or records[-1:]
    out["source"] = joined[0]["source"] if joined else "?"
    out.update({k: joined[0].get(k) if joined else None for k in PHASES})
    out["recovery_records"] = len(records)
    out["lost_progress_s"] = (lost + 0.5) * iter_s
    out["wasted_s"] = stall + out["lost_progress_s"] + (out["retrieval_s"] or 0.0)
    return out


def calibrate(args, work: str, iters: int = 12) -> dict:
    """A blocking save every iteration, unthrottled: the save's and the training's time per
    iteration, and the bytes of one shard (from the manifest)."""
    log_dir, ckpt = os.path.join(work, "calibrate"), os.path.join(work, "calibrate_ckpt")
    run(args, log_dir, iters, ["--no-gemini", "--save", ckpt, "--save-interval", "1"], None)
    recs = losses(log_dir)[2:]
    save_s = statistics.median(r["persist_blocking_s"] for r in recs if "persist_blocking_s" in r)
    train_s = statistics.median(r["last_iter_time_s"] - r.get("persist_blocking_s", 0.0) for r in recs)
    it = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    manifest = json.load(open(os.path.join(ckpt, f"iter_{it:07d}", "manifest.json")))
    shard_bytes = max(s["nbytes"] for s in manifest["shards"].values())
    return {"save_s": save_s, "train_s": train_s, "shard_bytes": shard_bytes}


def baselines(cal: dict, k: float, strawman_iters: int, rare_factor: int) -> dict:
    """name -> (interval, lag, flags): lag = iterations before a checkpoint is complete."""
    frequent = max(1, math.ceil(cal["save_s"] / cal["train_s"]))   # as often as the disk allows
    highfreq = max(1, math.ceil(k - 1e-9))                           # as often as the bandwidth allows
    bandwidth_mbs = cal["shard_bytes"] / (k * cal["train_s"]) / 1e6  # one write = K iterations of training
    remote = ["--async-save", "--persistent-bandwidth-mbs", f"{bandwidth_mbs:.6g}"]
    return {"remote_highfreq": (highfreq, highfreq, remote), "remote_strawman": (strawman_iters, highfreq, remote),
            "persistent_frequent": (frequent, 0, []), "persistent_rare": (frequent * rare_factor, 0, []),
            "_bandwidth_mbs": bandwidth_mbs}


def inject_iteration(interval: int, lag: int, not_before: int) -> int:
    """Halfway between two completed checkpoints, rounded down: the checkpoint started at
    iteration s (a multiple of `interval`, >= not_before) is complete `lag` iterations later."""
    s = interval * max(1, math.ceil(not_before / interval))
    return s + lag + (interval - 1) // 2


def run_failures(args, work: str, kind: str, plan: dict, names, inject_at: int, tail: int = 10) -> dict:
    """One run per method in `names`, each with one `kind` kill (of machine/worker 1)."""
    res = {}
    for name in names:
        log = os.path.join(work, f"{name}_{kind}")
        if name == "gemini":
            run(args, log, inject_at + tail, [], f"{kind}:1@iteration={inject_at}", spares=1)
        else:
            interval, lag, flags = plan[name]
            at = inject_iteration(interval, lag, inject_at)
            ckpt = os.path.join(work, f"{name}_{kind}_ckpt")
            run(args, log, at + tail, ["--no-gemini", "--save", ckpt, "--save-interval", str(interval), *flags],
                f"{kind}:1@iteration={at}", spares=1)
        res[name] = {**measure(log), "log_dir": log}
        if name != "gemini":
            res[name]["interval"] = plan[name][0]
    return res


INPLACE_KINDS = {   # name -> (injection kind, cluster flags, training flags, victims in turn)
    "inplace_worker_kill": ("worker", (), (), (1, 0)),
    "inplace_machine_kill": ("machine", None, (), None),          # spares and victims: see repeated()
    "inplace_hang": ("hang", (), ("--gemini-hang-timeout", "2"), (1, 0)),
    "restart_worker_kill": ("worker", (), ("--no-gemini-inplace",), (1, 0)),
    "nogemini_worker_kill": ("worker", (), ("--no-gemini", "--save", None, "--save-interval", "1"), (1, 0)),
}


def repeated(args, work: str, name: str, failures: int, every: int = 10) -> dict:
    """One run with `failures` injections of one kind, `every` iterations apart: per failure,
    seconds from the injection to the first iteration after it (for a hang: from its
    detection), the path and iterations lost."""
    kind, cluster_flags, train_extra, victims = INPLACE_KINDS[name]
    log = os.path.join(work, name)
    flags = [os.path.join(work, f"{name}_ckpt") if f is None else f for f in train_extra]
    if kind == "machine":   # the k-th kill takes the machine that adopted rank 1 last: slot 1, then 2, 3...
        injections = [f"machine:{1 + k}@iteration={every * (k + 1)}" for k in range(failures)]
        cluster_flags = ("--spares", str(failures))
    else:
        injections = [f"{kind}:{victims[k % len(victims)]}@iteration={every * (k + 1)}" for k in range(failures)]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"), "--machines", str(args.machines),
           "--procs-per-machine", "1", "--timeout", "1200", *cluster_flags,
           *[a for i in injections for a in ("--inject", i)],
           "--", "pretrain_gpt.py", *train_flags(args.corpus, log, every * (failures + 1), flags + args.extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {out.returncode}\n{out.stderr[-2000:]}")
    records = read_jsonl(os.path.join(log, "recovery.jsonl"))
    per = []
    for inj in read_jsonl(os.path.join(log, "injections.jsonl")):
        rec = next((r for r in records if r.get("injected_at") == inj["time"]), None)
        if rec is None:
            continue   # two injections before one recovery: the record joins the newer one
        start = rec["detected_at"] if kind == "hang" else inj["time"]
        per.append({"s": rec["first_iteration_at"] - start, "path": rec.get("path", "restart"),
                    "lost": rec.get("iterations_lost"), "source": rec["source"],
                    **{p: rec.get(p) for p in ("detect_s", "abort_s", "reform_s", "replacement_ready_s",
                                               "restart_s", "rendezvous_s", "setup_s", "retrieval_s",
                                               "first_iteration_s")}})
    secs = [p["s"] for p in per]
    return {"kind": kind, "failures": len(per), "injected": len(injections), "p50_s": statistics.median(secs),
            "max_s": max(secs), "paths": sorted({p["path"] for p in per}),
            "lost_max": max((p["lost"] or 0) for p in per), "per_failure": per}


def print_repeated(res: dict) -> None:
    print(f"{'recovery':24} {'path':8} {'n':>3} {'p50_s':>7} {'max_s':>7} {'lost':>4}   median phases (s)")
    for name, r in res.items():
        phases = {}
        for p in ("detect_s", "abort_s", "reform_s", "replacement_ready_s", "restart_s", "rendezvous_s",
                  "setup_s", "retrieval_s", "first_iteration_s"):
            vals = [f[p] for f in r["per_failure"] if f.get(p) is not None]
            if vals:
                phases[p[:-2]] = statistics.median(vals)
        shown = " ".join(f"{k} {v:.3f}" for k, v in phases.items())
        print(f"{name:24} {'/'.join(r['paths']):8} {r['failures']:3d} {r['p50_s']:7.3f} {r['max_s']:7.3f} "
              f"{r['lost_max']:4d}   {shown}")


def summarize(res: dict) -> dict:
    """Ratios of one failure kind: best baseline / GEMINI, each definition, each storage."""
    g = res["gemini"]
    out = {"gemini_wasted_s": g["wasted_s"], "gemini_wasted_end_to_end_s": g["e2e_s"],
           "gemini_recovery_s": g["recovery_s"], "gemini_source": g["source"]}
    for tag, names in (("persistent", REMOTE), ("local_disk", LOCAL_DISK)):
        present = [n for n in names if n in res]
        if not present:
            continue
        for key, field in (("wasted", "wasted_s"), ("wasted_end_to_end", "e2e_s")):
            best = min(present, key=lambda n: res[n][field])
            out[f"best_{tag}_{key}_s"] = res[best][field]
            out[f"best_{tag}_{key}"] = LABELS[best]
            out[f"ratio_{key}_best_{tag}_over_gemini"] = res[best][field] / g[field] if g[field] > 0 else None
    return out


def print_table(rows) -> None:
    print(f"{'failure':8} {'method':22} {'every':>5} {'source':10} {'lost':>4} {'stall_s':>7} {'retr_s':>6} "
          f"{'wasted_s':>8} {'e2e_s':>7} {'recov_s':>7}  " + " ".join(f"{p[:-2]:>10}" for p in PHASES))
    for kind, name, m in rows:
        phases = " ".join(f"{m[p]:10.2f}" if m.get(p) is not None else f"{'-':>10}" for p in PHASES)
        retr = m.get("retrieval_s")
        print(f"{kind:8} {LABELS[name]:22} {m.get('interval', 1):5d} {m['source']:10} {m['lost']:4d} "
              f"{m['stall_s']:7.3f} {'-' if retr is None else f'{retr:.2f}':>6} {m['wasted_s']:8.2f} "
              f"{m['e2e_s']:7.2f} {m['recovery_s']:7.2f}  {phases}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    paper = PaperSetting()
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, default=2)
    p.add_argument("--inject-at", type=int, default=12, help="GEMINI runs: inject at this iteration")
    p.add_argument("--checkpoint-iterations", type=float, default=paper.checkpoint_iterations,
                   help="K: iterations one remote checkpoint takes to write (default: the paper's setting, "
                        "printed); sets the modelled bandwidth")
    p.add_argument("--strawman-hours", type=float, default=paper.strawman_interval_s / 3600,
                   help="modelled Strawman: hours of the paper's iterations between checkpoints")
    p.add_argument("--rare-factor", type=int, default=10, help="local-disk Strawman: interval = factor x HighFreq")
    p.add_argument("--work-dir", default=None, help="keep runs here (default: a temporary directory)")
    p.add_argument("--parts", default="inplace,paper", help="inplace (recovery time by path), paper (wasted time)")
    p.add_argument("--failures", type=int, default=5, help="part inplace: failures of each kind")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.checkpoint_iterations >= 1 or not args.strawman_hours > 0:
        p.error("--checkpoint-iterations must be >= 1 and --strawman-hours > 0")
    parts = set(args.parts.split(","))
    if not parts or parts - {"inplace", "paper"} or args.failures < 1:
        p.error("--parts takes inplace and/or paper; --failures must be >= 1")
    args.extra = extra
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_recovery_")
    os.makedirs(work, exist_ok=True)
    args.corpus = tiny_corpus(work)
    load = os.getloadavg()
    k = args.checkpoint_iterations
    strawman = max(1, round(args.strawman_hours * 3600 / paper.iteration_s))
    result: dict = {"load_average_start": load[0]}
    try:
        if "inplace" in parts:
            inplace = {name: repeated(args, work, name, args.failures) for name in INPLACE_KINDS}
            result["inplace"] = inplace
            result.update({
                "inplace_worker_kill_s_p50": inplace["inplace_worker_kill"]["p50_s"],
                "inplace_machine_kill_s_p50": inplace["inplace_machine_kill"]["p50_s"],
                "inplace_hang_after_detect_s_p50": inplace["inplace_hang"]["p50_s"],
                "restart_worker_kill_s_p50": inplace["restart_worker_kill"]["p50_s"],
                "nogemini_worker_kill_s_p50": inplace["nogemini_worker_kill"]["p50_s"],
                "iterations_lost_max": max(r["lost_max"] for n, r in inplace.items() if n.startswith("inplace"))})
            print_repeated(inplace)
    except BaseException:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if "paper" not in parts:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        result["load_average_end"] = os.getloadavg()[0]
        print(f"load average {load[0]:.2f} at the start, {result['load_average_end']:.2f} at the end")
        print(json.dumps(result, sort_keys=True))
        return 0
    print("The paper's setting (tools/bench_recovery.py: PaperSetting):", *paper.lines(), sep="\n  ", flush=True)
    try:
        cal = calibrate(args, work)
        plan = baselines(cal, k, strawman, args.rare_factor)
        bw = plan.pop("_bandwidth_mbs")
        print(f"Here (measured): one shard {cal['shard_bytes'] / 1e6:.3f} MB per process, {cal['train_s'] * 1e3:.1f} ms "
              f"of training per iteration -> modelled remote storage --persistent-bandwidth-mbs {bw:.4g} "
              f"(= shard / (K x iteration) with K = {k:.2f}: each process writes and reads its shard at that pace)."
              f"\n  HighFreq: --async-save every {plan['remote_highfreq'][0]} iterations (ceil K); Strawman: every "
              f"{strawman}.\n  Local disk: blocking save {cal['save_s'] * 1e3:.1f} ms -> HighFreq every "
              f"{plan['persistent_frequent'][0]}, Strawman every {plan['persistent_rare'][0]}. "
              f"Load average {load[0]:.2f}.", flush=True)
        rows = []
        result.update({"save_interval_frequent": plan["persistent_frequent"][0],
                       "save_interval_rare": plan["persistent_rare"][0],
                       "modelled": {"checkpoint_iterations": k, "bandwidth_mbs": bw,
                                    "highfreq_interval": plan["remote_highfreq"][0],
                                    "strawman_interval": strawman, "calibration": cal,
                                    "paper": paper.lines()}})
        for kind in ("worker", "machine"):
            res = run_failures(args, work, kind, plan, ("gemini", *REMOTE, *LOCAL_DISK), args.inject_at)
            for name, m in res.items():
                m.pop("log_dir")
                rows.append((kind, name, m))
            result[kind] = {**summarize(res), "runs": res}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()[0]
    if "inplace" in result:
        print_repeated(result["inplace"])
    print_table(rows)
    for kind in ("worker", "machine"):
        r = result[kind]
        hf = r["runs"]["remote_highfreq"]
        if "write_s" in hf:
            print(f"{kind} kill: HighFreq's background write took {hf['write_s']:.2f}s = "
                  f"{hf['write_s'] / hf['iter_s']:.1f} iterations (modelled K = {k:.1f})")
        print(f"{kind} kill: GEMINI wastes {r['gemini_wasted_s']:.3f}s (paper's definition), the best modelled-remote "
              f"baseline ({r['best_persistent_wasted']}) {r['best_persistent_wasted_s']:.2f}s: "
              f"{r['ratio_wasted_best_persistent_over_gemini']:.1f}x; end to end {r['gemini_wasted_end_to_end_s']:.2f}s "
              f"vs {r['best_persistent_wasted_end_to_end_s']:.2f}s: "
              f"{r['ratio_wasted_end_to_end_best_persistent_over_gemini']:.2f}x; local disk (paper's definition): "
              f"{r['ratio_wasted_best_local_disk_over_gemini']:.1f}x")
    print(f"load average {load[0]:.2f} at the start, {result['load_average_end']:.2f} at the end")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_cli(main)

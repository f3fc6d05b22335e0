"""Wasted time per failure: GEMINI (memory) vs. persistent checkpoints, side by side in one run.

    python tools/bench_recovery.py                     # 2 machines x 1 worker, TP=2, tiny GPT
    python tools/bench_recovery.py --machines 2 -- --hidden-size 256 --num-layers 4

For a worker kill and a machine kill it runs tools/local_cluster.py once with GEMINI and
once per persistent baseline (--no-gemini, --save-interval "as often as the disk allows"
and "rarely", as in the paper), injects the failure, and measures from metrics.jsonl and
injections.jsonl (--log-interval 1):

    recovery_s   injection → first iteration completed after it
    lost         iterations reached before the failure − iteration recovered to
    stall_s      the blocking time of one checkpoint (the paper's t_ckpt)
    wasted_s     injection → back at the iteration reached at the injection, minus one
                 normal iteration, plus stall_s: t_ckpt + lost work + retrieval and restart

"As often as the disk allows": the smallest interval whose blocking save takes no longer
than the training between two saves (measured first, with --save-interval 1). Persistent
runs are hit halfway between two saves, so their lost work is the average, 1/(2f).
GEMINI runs also report the phases of their recovery.jsonl record. Prints a table, then
one JSON line.
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


from gemini_lm.errors import UsageArgumentParser, run_cli
from gemini_lm.resilience.events import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("detect_s", "restart_s", "rendezvous_s", "setup_s", "retrieval_s", "first_iteration_s")


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
           "--procs-per-machine", "1", "--spares", str(spares), "--timeout", "600"]
    if inject:
        cmd += ["--inject", inject]
    cmd += ["--", "pretrain_gpt.py", *train_flags(args.corpus, log_dir, iters, flags + args.extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {out.returncode}\n{out.stderr[-2000:]}")


def losses(log_dir: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(log_dir, "metrics.jsonl")) if "loss" in r]


def measure(log_dir: str) -> dict:
    """Wasted time of the one injected failure, from metrics.jsonl and injections.jsonl."""
    inj = read_jsonl(os.path.join(log_dir, "injections.jsonl"))[0]
    t_inj = inj["time"]
    recs = losses(log_dir)
    before = [r for r in recs if r["time"] <= t_inj]
    after = [r for r in recs if r["time"] > t_inj]
    reached = before[-1]["iteration"]
    iter_s = statistics.median(r["last_iter_time_s"] for r in before[2:] or before)
    first = after[0]
    back = next(r for r in after if r["iteration"] == reached + 1)
    # The paper's t_ckpt: the stall one checkpoint adds to the step it is taken in.
    stalls = [r.get("persist_blocking_s", r.get("gemini_blocking_s")) for r in before]
    stalls = [x for x in stalls if x is not None]
    stall = statistics.median(stalls) if stalls else 0.0
    out = {"recovery_s": first["time"] - t_inj, "lost": reached - (first["iteration"] - 1),
           "stall_s": stall, "wasted_s": back["time"] - t_inj - iter_s + stall, "iter_s": iter_s}
    # The recovery that followed this injection: a run can log another one after it (seen:
    # workers restarted once more after training completed), so join on the injection.
    records = read_jsonl(os.path.join(log_dir, "recovery.jsonl"))
    joined = [r for r in records if r.get("injected_at") == t_inj] or records[-1:]
    if joined:
        out["source"] = joined[0]["source"]
        out.update({k: joined[0].get(k) for k in PHASES})
    else:
        out["source"] = "persistent"   # --no-gemini runs log no recovery record
    out["recovery_records"] = len(records)
    return out


def save_interval_the_disk_allows(args, work: str) -> tuple[int, float, float]:
    """Smallest interval with blocking save time <= training time between saves."""
    log_dir = os.path.join(work, "calibrate")
    run(args, log_dir, 12, ["--no-gemini", "--save", os.path.join(work, "calibrate_ckpt"), "--save-interval", "1"],
        None)
    recs = losses(log_dir)[2:]
    save_s = statistics.median(r["persist_blocking_s"] for r in recs if "persist_blocking_s" in r)
    train_s = statistics.median(r["last_iter_time_s"] - r.get("persist_blocking_s", 0.0) for r in recs)
    return max(1, math.ceil(save_s / train_s)), save_s, train_s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, default=2)
    p.add_argument("--inject-at", type=int, default=12, help="GEMINI runs: inject at this iteration")
    p.add_argument("--rare-factor", type=int, default=10, help="rare baseline: interval = factor x frequent")
    p.add_argument("--work-dir", default=None, help="keep runs here (default: a temporary directory)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_recovery_")
    os.makedirs(work, exist_ok=True)
    args.corpus = tiny_corpus(work)
    try:
        frequent, save_s, train_s = save_interval_the_disk_allows(args, work)
        rare = frequent * args.rare_factor
        print(f"blocking save {save_s * 1000:.1f} ms vs {train_s * 1000:.1f} ms of training per iteration: "
              f"--save-interval {frequent} is as often as the disk allows; rare = {rare}", flush=True)
        rows, result = [], {"save_interval_frequent": frequent, "save_interval_rare": rare}
        for kind in ("worker", "machine"):
            target = f"{kind}:1"
            res = {}
            log = os.path.join(work, f"gemini_{kind}")
            run(args, log, args.inject_at + 10, [], f"{target}@iteration={args.inject_at}", spares=1)
            res["gemini"] = measure(log)
            for name, interval in (("persistent_frequent", frequent), ("persistent_rare", rare)):
                # Halfway between two saves: the average lost work, 1/(2f).
                at = max(args.inject_at, interval) + interval // 2
                log = os.path.join(work, f"{name}_{kind}")
                ckpt = os.path.join(work, f"{name}_{kind}_ckpt")
                run(args, log, at + 10, ["--no-gemini", "--save", ckpt, "--save-interval", str(interval)],
                    f"{target}@iteration={at}", spares=1)
                res[name] = measure(log)
            for name, m in res.items():
                rows.append((kind, name, m))
            best = min(res["persistent_frequent"]["wasted_s"], res["persistent_rare"]["wasted_s"])
            g = res["gemini"]["wasted_s"]
            result[kind] = {"gemini_wasted_s": g, "best_persistent_wasted_s": best,
                            "ratio_wasted_best_persistent_over_gemini": best / g if g > 0 else None,
                            "gemini_recovery_s": res["gemini"]["recovery_s"], "gemini_source": res["gemini"]["source"],
                            "runs": res}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'failure':8} {'recovery from':20} {'source':10} {'lost':>4} {'stall_s':>7} {'recovery_s':>10} "
          f"{'wasted_s':>9}  "
          + " ".join(f"{p[:-2]:>10}" for p in PHASES))
    for kind, name, m in rows:
        phases = " ".join(f"{m[p]:10.2f}" if m.get(p) is not None else f"{'-':>10}" for p in PHASES)
        print(f"{kind:8} {name:20} {m['source']:10} {m['lost']:4d} {m['stall_s']:7.3f} {m['recovery_s']:10.2f} "
              f"{m['wasted_s']:9.2f}  "
              f"{phases}")
    for kind in ("worker", "machine"):
        r = result[kind]
        print(f"{kind} kill: GEMINI wastes {r['gemini_wasted_s']:.2f}s, the best persistent baseline "
              f"{r['best_persistent_wasted_s']:.2f}s: {r['ratio_wasted_best_persistent_over_gemini']:.2f}x")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_cli(main)

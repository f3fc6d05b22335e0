"""Sections 1 and 2 of the evaluation: what checkpointing costs a run that never fails.

1 iteration time with no checkpoint, GEMINI interleaved and GEMINI blocking (tools/bench_overhead.py,
  rounds alternating the methods so load changes hit them alike);
2 training time blocked per checkpoint: GEMINI's copy to memory vs persistent saves
  (tools/bench_checkpoint.py, as a subprocess).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from evaluate_sections.figures import pyplot, save

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)


# ---- 1 iteration time ----------------------------------------------------------------------

def section_iteration_time(ctx) -> dict:
    import bench_overhead

    flags = ["--quick"] if ctx.mode != "full" else []
    if ctx.mode == "smoke":
        flags += ["--iters", "9", "--profile-iters", "2", "--num-layers", "2", "--hidden-size", "64",
                  "--seq-length", "64"]
    args = bench_overhead.parse_args(flags)
    work = tempfile.mkdtemp(prefix="eval_overhead_", dir=ctx.work)
    methods = ("none", "interleaved", "blocking")
    per_round = {m: [] for m in methods}
    blocked = {m: [] for m in methods}
    for rnd in range(args.rounds):
        for m in methods:   # rounds interleave the methods so load changes hit them alike
            recs = [r for r in bench_overhead.run_once(m, args, work, f"{m}-{rnd}") if r["iteration"] > args.skip]
            per_round[m].append(statistics.median(r["last_iter_time_s"] for r in recs))
            blocked[m] += [r.get("gemini_blocking_s", 0.0) for r in recs]
    ratio = {m: statistics.median(x / n for x, n in zip(per_round[m], per_round["none"])) for m in methods}
    res = {"methods": {m: {"s_per_iter": statistics.median(per_round[m]), "x_none": ratio[m],
                           "blocked_s": statistics.median(blocked[m]), "per_round_s": per_round[m]}
                       for m in methods},
           "setup": f"2 ranks as 2 machines, TP=2, {args.num_layers} layers, hidden {args.hidden_size}, seq "
                    f"{args.seq_length}, {args.rounds} round(s) x {args.iters - args.skip} measured iterations; "
                    "each machine's shard goes to the other every iteration"}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = {"none": "no checkpoint", "interleaved": "GEMINI\ninterleaved", "blocking": "GEMINI\nblocking"}
    secs = [res["methods"][m]["s_per_iter"] * 1e3 for m in methods]
    bars = ax.bar([labels[m] for m in methods], secs, color=["#7f7f7f", "#2ca02c", "#d62728"])
    for b, m in zip(bars, methods):
        ax.annotate(f"{ratio[m]:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("median iteration time (ms)")
    res["figure"] = save(fig, ctx, "iteration_time.png")
    shutil.rmtree(work, ignore_errors=True)
    # run_once keeps its GEMINI stores under <shm>/<basename(work)>: free that memory too.
    shutil.rmtree(os.path.join(args.shm, os.path.basename(work)), ignore_errors=True)
    return res


def report_iteration_time(res: dict) -> list[str]:
    lines = [res["setup"] + ".", "", "| method | s/iteration | x no checkpoint | blocked in checkpointer (s) |",
             "|---|---:|---:|---:|"]
    for m, r in res["methods"].items():
        lines.append(f"| {m} | {r['s_per_iter']:.4f} | {r['x_none']:.3f} | {r['blocked_s']:.4f} |")
    return lines + ["", f"![iteration time]({res['figure']})"]


# ---- 2 checkpoint time ---------------------------------------------------------------------

def section_checkpoint_time(ctx) -> dict:
    cmd = [sys.executable, os.path.join(TOOLS, "bench_checkpoint.py"), "--dir", ctx.work]
    if ctx.mode != "full":
        cmd += ["--quick", "--reps", "1" if ctx.mode == "smoke" else "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"bench_checkpoint failed:\n{out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    methods = {"GEMINI (copy to memory)": data["gemini_bg_commit_s"], "GEMINI (copy + checksum)": data["gemini_s"],
               "torch.save (disk, fsync)": data["torch_save_s"], "DCP async_save (staging)": data["async_save_s"],
               "memcpy (limit)": data["memcpy_s"]}
    res = {"state": data["state"], "state_bytes": data["state_bytes"], "blocked_s": methods,
           "torch_save_over_gemini": data["torch_save_s"] / data["gemini_bg_commit_s"], "raw": data}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(methods)[::-1], [v * 1e3 for v in methods.values()][::-1],
            color=["#7f7f7f", "#9467bd", "#d62728", "#2ca02c", "#2ca02c"])
    ax.set_xlabel(f"training blocked per checkpoint (ms), {data['state_bytes'] / 1e6:.0f} MB state")
    res["figure"] = save(fig, ctx, "checkpoint_time.png")
    return res


def report_checkpoint_time(res: dict) -> list[str]:
    lines = [f"State `{res['state']}`: {res['state_bytes'] / 1e6:.1f} MB (fp32 params + Adam moments); "
             "median seconds the training loop is blocked per checkpoint.", "",
             "| method | blocked (s) | GB/s |", "|---|---:|---:|"]
    for name, s in res["blocked_s"].items():
        lines.append(f"| {name} | {s:.4f} | {res['state_bytes'] / s / 1e9:.2f} |")
    return lines + ["", f"torch.save blocks {res['torch_save_over_gemini']:.1f}x longer than GEMINI's copy.", "",
                    f"![checkpoint time]({res['figure']})"]

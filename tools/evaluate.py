"""The paper's evaluation at small scale: real processes, real injected failures, one report.

    python tools/evaluate.py --out runs/eval --quick     # a few minutes on 2 cores
    python tools/evaluate.py --out runs/eval             # the full runs (longer, steadier)
    python tools/evaluate.py --out runs/eval --smoke --sections 5,6

Writes <out>/report.md, <out>/results.json and one PNG per figure:

  1 iteration time: no checkpoint vs GEMINI interleaved vs blocking   (tools/bench_overhead.py)
  2 checkpoint time: GEMINI to memory vs persistent storage           (tools/bench_checkpoint.py)
  3 wasted time per failure, worker and machine kill: GEMINI vs HighFreq vs Strawman on
    modelled remote storage (and on the local disk)                   (tools/bench_recovery.py)
  4 recovery time by phase, from the GEMINI runs of section 3, and a plot of one run
                                                                      (tools/plot_recovery.py)
  5 recovery probability vs machines and m, per placement (exact)    (gemini/probability.py)
  6 effective training time of 16 to 10,000 machines (model)          (gemini_lm/eval/simulator.py)

Sections 1-4 are measured on this host; 5 is exact; 6 is a model whose assumptions the
report prints. --smoke shrinks every run to seconds (for tests; its numbers mean little).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from gemini_lm.errors import UsageArgumentParser, UsageError, run_cli

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)

TITLES = {1: "Iteration time", 2: "Checkpoint time", 3: "Wasted time per failure",
          4: "Recovery time by phase", 5: "Recovery probability", 6: "Large clusters (simulated)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ctx, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, name))
    _plt().close(fig)
    return name


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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = {"none": "no checkpoint", "interleaved": "GEMINI\ninterleaved", "blocking": "GEMINI\nblocking"}
    secs = [res["methods"][m]["s_per_iter"] * 1e3 for m in methods]
    bars = ax.bar([labels[m] for m in methods], secs, color=["#7f7f7f", "#2ca02c", "#d62728"])
    for b, m in zip(bars, methods):
        ax.annotate(f"{ratio[m]:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("median iteration time (ms)")
    res["figure"] = _save(fig, ctx, "iteration_time.png")
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(methods)[::-1], [v * 1e3 for v in methods.values()][::-1],
            color=["#7f7f7f", "#9467bd", "#d62728", "#2ca02c", "#2ca02c"])
    ax.set_xlabel(f"training blocked per checkpoint (ms), {data['state_bytes'] / 1e6:.0f} MB state")
    res["figure"] = _save(fig, ctx, "checkpoint_time.png")
    return res


def report_checkpoint_time(res: dict) -> list[str]:
    lines = [f"State `{res['state']}`: {res['state_bytes'] / 1e6:.1f} MB (fp32 params + Adam moments); "
             "median seconds the training loop is blocked per checkpoint.", "",
             "| method | blocked (s) | GB/s |", "|---|---:|---:|"]
    for name, s in res["blocked_s"].items():
        lines.append(f"| {name} | {s:.4f} | {res['state_bytes'] / s / 1e9:.2f} |")
    return lines + ["", f"torch.save blocks {res['torch_save_over_gemini']:.1f}x longer than GEMINI's copy.", "",
                    f"![checkpoint time]({res['figure']})"]


# ---- 3 + 4 failures, measured ----------------------------------------------------------------

def measure(br, log_dir: str) -> dict:
    """bench_recovery.measure (wasted time and the phases of the recovery that followed
    the injection), plus where the run's logs are."""
    return {**br.measure(log_dir), "log_dir": log_dir}


def failure_runs(ctx) -> dict:
    """Worker and machine kills for GEMINI and the paper's baselines on modelled remote storage
    (and, but in smoke mode, on the local disk), as tools/bench_recovery.py runs them (cached:
    sections 3 and 4 share it)."""
    if ctx.cache.get("failures") is not None:
        return ctx.cache["failures"]
    import bench_recovery as br

    work = os.path.join(ctx.work, "recovery")
    os.makedirs(work, exist_ok=True)
    args = SimpleNamespace(machines=2, extra=[], corpus=br.tiny_corpus(work))
    paper = br.PaperSetting()
    smoke = ctx.mode == "smoke"
    inject_at = 6 if smoke else 12
    cal = br.calibrate(args, work, iters=6 if smoke else 12)
    # Smoke: a 2-iteration checkpoint and a Strawman every 6 iterations (seconds-long runs; its
    # numbers mean little). Otherwise the paper's setting, as bench_recovery's defaults.
    k = 2.0 if smoke else paper.checkpoint_iterations
    strawman = 6 if smoke else round(paper.strawman_interval_s / paper.iteration_s)
    plan = br.baselines(cal, k, strawman, rare_factor=10)
    bandwidth = plan.pop("_bandwidth_mbs")
    names = ("gemini", "remote_strawman") if smoke else ("gemini", *br.REMOTE, *br.LOCAL_DISK)
    kinds = ("worker",) if smoke else ("worker", "machine")
    runs = {kind: br.run_failures(args, work, kind, plan, names, inject_at, tail=3 if smoke else 10)
            for kind in kinds}
    ctx.cache["failures"] = {"runs": runs, "summary": {kind: br.summarize(r) for kind, r in runs.items()},
                             "save_interval_frequent": plan["persistent_frequent"][0],
                             "save_interval_rare": plan["persistent_rare"][0],
                             "modelled": {"checkpoint_iterations": k, "bandwidth_mbs": bandwidth,
                                          "highfreq_interval": plan["remote_highfreq"][0],
                                          "strawman_interval": strawman, "paper": paper.lines(),
                                          "shrunk": smoke},
                             "calibration": cal, "phases": list(br.PHASES), "labels": br.LABELS}
    return ctx.cache["failures"]


def section_wasted_time(ctx) -> dict:
    data = failure_runs(ctx)
    labels = data["labels"]
    res = {k: v for k, v in data.items() if k not in ("runs", "labels")}
    res["wasted_s"] = {kind: {labels[n]: r["wasted_s"] for n, r in runs.items()} for kind, runs in data["runs"].items()}
    res["wasted_end_to_end_s"] = {kind: {labels[n]: r["e2e_s"] for n, r in runs.items()}
                                  for kind, runs in data["runs"].items()}
    res["runs"] = {kind: {labels[n]: {k: v for k, v in r.items() if k != "log_dir"} for n, r in runs.items()}
                   for kind, runs in data["runs"].items()}
    # The paper's comparison: the better baseline on modelled remote storage, paper's definition.
    res["best_baseline_over_gemini"] = {kind: s.get("ratio_wasted_best_persistent_over_gemini")
                                        for kind, s in data["summary"].items()}
    res["best_baseline_over_gemini_end_to_end"] = {
        kind: s.get("ratio_wasted_end_to_end_best_persistent_over_gemini") for kind, s in data["summary"].items()}
    plt = _plt()
    kinds = list(res["wasted_s"])
    methods = list(next(iter(res["wasted_s"].values())))
    colours = {"GEMINI": "#2ca02c", "HighFreq": "#ff7f0e", "Strawman": "#d62728",
               "HighFreq (local disk)": "#ffbb78", "Strawman (local disk)": "#ff9896"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    handles = {}
    for ax, key, title in ((axes[0], "wasted_s", "paper's definition (log scale)"),
                           (axes[1], "wasted_end_to_end_s", "end to end, with restart")):
        handles.update(grouped_bars(ax, kinds, {n: [res[key][k].get(n) for k in kinds] for n in methods}, colours))
        ax.set_ylabel("wasted time per failure (s)")
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[1].legend([handles[n] for n in methods if n in handles], [n for n in methods if n in handles], fontsize=7)
    res["figure"] = _save(fig, ctx, "wasted_time.png")
    return res


def grouped_bars(ax, kinds: list[str], series: dict[str, list], colours: dict) -> dict:
    """One group of bars per failure kind, one bar per method; a method with no positive value
    draws nothing (a log axis cannot show 0). The handles of the methods drawn, by name: the
    legend lists only those, so no entry stands for a bar that is not there."""
    drawn = {n: v for n, v in series.items() if any(x is not None and x > 0 for x in v)}
    width = 0.8 / max(1, len(drawn))
    handles = {}
    for i, (name, values) in enumerate(drawn.items()):
        handles[name] = ax.bar([k + (i - (len(drawn) - 1) / 2) * width for k in range(len(kinds))],
                               [x if x is not None and x > 0 else 0 for x in values], width, label=name,
                               color=colours.get(name))
    ax.set_xticks(range(len(kinds)), [f"{k} kill" for k in kinds])
    return handles


def report_wasted_time(res: dict) -> list[str]:
    cal, mod = res["calibration"], res["modelled"]
    lines = ["Real `tools/local_cluster.py` runs (2 machines x 1 worker, TP=2, tiny GPT), one SIGKILL each, as "
             "`tools/bench_recovery.py` runs them. The paper's baselines checkpoint to remote storage, modelled "
             "here by pacing every persistent shard read and write (`--persistent-bandwidth-mbs`) so that one "
             "checkpoint takes as many iterations as in the paper's setting:", ""]
    lines += [f"- {line}" for line in mod["paper"]]
    lines += ["", f"Here: one shard {cal['shard_bytes'] / 1e6:.3f} MB, {cal['train_s'] * 1e3:.1f} ms of training per "
              f"iteration (measured), K = {mod['checkpoint_iterations']:.2f} -> {mod['bandwidth_mbs']:.4g} MB/s per "
              f"process. HighFreq: `--async-save` every {mod['highfreq_interval']} iterations (one checkpoint after "
              f"the other); Strawman: every {mod['strawman_interval']}. Local disk (blocking saves, what this disk "
              f"allows): every {res['save_interval_frequent']} and {res['save_interval_rare']}. Every persistent run is "
              "hit halfway between two completed checkpoints."
              + (" Smoke mode: K and the Strawman interval are shrunk so the runs take seconds; these numbers are "
                 "not the paper's comparison." if mod.get("shrunk") else ""), "",
              "Wasted, the paper's definition: stall + (iterations lost + 1/2) x iteration time + retrieval. "
              "End to end: injection -> back at the iteration reached, minus one iteration, plus the stall "
              "(includes detection, restart, rendezvous and set-up).", "",
              "| failure | method | every | source | lost | stall (s) | retrieval (s) | wasted, paper (s) | "
              "wasted, end to end (s) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for kind, runs in res["runs"].items():
        for name, r in runs.items():
            retr = "-" if r.get("retrieval_s") is None else f"{r['retrieval_s']:.3f}"
            lines.append(f"| {kind} kill | {name} | {r.get('interval', 1)} | {r['source']} | {r['lost']} | "
                         f"{r['stall_s']:.3f} | {retr} | {r['wasted_s']:.3f} | {r['e2e_s']:.2f} |")
    lines.append("")
    for kind, x in res["best_baseline_over_gemini"].items():
        e2e = res["best_baseline_over_gemini_end_to_end"][kind]
        if x:
            lines.append(f"- {kind} kill: the better modelled-remote baseline wastes {x:.1f}x GEMINI's time "
                         f"(paper's definition), {e2e:.2f}x end to end.")
    lines += ["", "End to end, restarting processes on one CPU host (Python + torch imports, rendezvous, set-up: "
              "section 4) costs every method the same several seconds, which the paper's definition leaves out."]
    return lines + ["", f"![wasted time]({res['figure']})"]


def section_phases(ctx) -> dict:
    import plot_recovery

    data = failure_runs(ctx)
    phases = data["phases"]
    res = {"phases_s": {kind: {p: runs["gemini"].get(p) for p in phases} for kind, runs in data["runs"].items()},
           "source": {kind: runs["gemini"]["source"] for kind, runs in data["runs"].items()},
           "recovery_s": {kind: runs["gemini"]["recovery_s"] for kind, runs in data["runs"].items()}}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    kinds = list(res["phases_s"])
    left = [0.0] * len(kinds)
    colours = dict(zip(phases, ("#d62728", "#9467bd", "#e377c2", "#ff7f0e", "#bcbd22", "#7f7f7f", "#2ca02c",
                                 "#1f77b4")))
    for p in phases:
        vals = [res["phases_s"][k][p] or 0.0 for k in kinds]
        if not any(vals):
            continue   # a phase of the other recovery path: no bar, no legend entry
        ax.barh([f"{k} kill\n({res['source'][k]})" for k in kinds], vals, left=left, label=p[:-2], color=colours[p])
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds from the failure to the first iteration after it")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    res["figure"] = _save(fig, ctx, "recovery_phases.png")
    kind = "machine" if "machine" in data["runs"] else kinds[0]
    res["run_figure"] = "recovery_run.png"
    plot_recovery.plot_run(data["runs"][kind]["gemini"]["log_dir"], os.path.join(ctx.out, res["run_figure"]),
                           title=f"GEMINI, {kind} kill: loss, failure and recovery phases")
    return res


def report_phases(res: dict) -> list[str]:
    phases = list(next(iter(res["phases_s"].values())))
    lines = ["GEMINI runs of section 3 (recovery.jsonl), seconds per phase.", "",
             "| failure | source | " + " | ".join(p[:-2] for p in phases) + " | total |",
             "|---|---|" + "---:|" * (len(phases) + 1)]
    for kind, ph in res["phases_s"].items():
        cells = " | ".join("-" if ph[p] is None else f"{ph[p]:.2f}" for p in phases)
        lines.append(f"| {kind} kill | {res['source'][kind]} | {cells} | {res['recovery_s'][kind]:.2f} |")
    return lines + ["", f"![recovery phases]({res['figure']})", "",
                    f"![one recovery]({res['run_figure']})"]


# ---- 5 recovery probability (exact) ----------------------------------------------------------

def section_probability(ctx) -> dict:
    from gemini_lm.gemini.probability import recovery_probability

    machines = [4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024]
    curves = {}
    for m in (2, 3):
        for k in (m, m + 1):
            for placement in ("group", "ring", "mixed"):
                pts = [(n, recovery_probability(n, m, k, placement)) for n in machines
                       if n > k and (placement != "group" or n % m == 0) and (placement != "mixed" or n % m)]
                curves[f"m={m} k={k} {placement}"] = pts
    res = {"curves": curves, "paper_check": {
        "N=16 m=2 k=2 group": recovery_probability(16, 2, 2, "group"),
        "N=16 m=2 k=3 group": recovery_probability(16, 2, 3, "group"),
        "N=16 m=2 k=2 ring": recovery_probability(16, 2, 2, "ring"),
        "N=16 m=3 k=3 mixed": recovery_probability(16, 3, 3, "mixed"),
        "N=16 m=3 k=3 ring": recovery_probability(16, 3, 3, "ring")}}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharey=True)
    styles = {"group": "-o", "ring": "--s", "mixed": ":^"}
    for ax, m in zip(axes, (2, 3)):
        for k, colour in ((m, "#1f77b4"), (m + 1, "#d62728")):
            for placement, style in styles.items():
                pts = curves[f"m={m} k={k} {placement}"]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, ms=3, lw=1, label=f"k={k} {placement}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"m = {m} copies", fontsize=10)
        ax.set_xlabel("machines N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Pr[recover from memory]")
    res["figure"] = _save(fig, ctx, "recovery_probability.png")
    return res


def report_probability(res: dict) -> list[str]:
    lines = ["Exact probability that every checkpoint keeps a live holder when k of N machines fail at once "
             "(every k-set equally likely; `gemini_lm/gemini/probability.py`). k < m is always recoverable. "
             "Mixed is shown where m does not divide N (where it does, it equals group).", "",
             "| case | Pr |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in res["paper_check"].items()]
    return lines + ["", "The paper reports 93.3 % and 80.0 % for N=16, m=2, k=2 and 3 (group).", "",
                    f"![recovery probability]({res['figure']})"]


# ---- 6 simulator -----------------------------------------------------------------------------

def section_simulator(ctx) -> dict:
    from dataclasses import asdict

    from gemini_lm.eval.simulator import ClusterModel, Method, assumptions, sweep

    model = ClusterModel()
    machines = [16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 10000]
    methods = [Method("gemini", 1), Method("gemini", 2), Method("gemini", 3), Method("highfreq"),
               Method("strawman")]
    rows = sweep(model, machines, methods)
    res = {"model": asdict(model), "assumptions": assumptions(model), "rows": rows}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    colours = {"GEMINI m=1": "#98df8a", "GEMINI m=2": "#2ca02c", "GEMINI m=3": "#17becf",
               "HighFreq": "#ff7f0e", "Strawman": "#d62728"}
    for key, colour in colours.items():
        pts = [(r["machines"], r["ratio"]) for r in rows if r["method"].startswith(key)]
        ax.plot(*zip(*pts), "-o", ms=3, color=colour, label=key)
    ax.set_xscale("log")
    ax.set_xlabel("machines")
    ax.set_ylabel("effective training time ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    res["figure"] = _save(fig, ctx, "simulated_clusters.png")
    return res


def report_simulator(res: dict) -> list[str]:
    lines = ["A model, not a measurement (`gemini_lm/eval/simulator.py`). Its assumptions:", ""]
    lines += [f"{i}. {a}" for i, a in enumerate(res["assumptions"], 1)]
    lines += ["", "| machines | method | failures/day | wasted per failure (s) | Pr[from memory] | effective ratio |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["machines"] in (16, 1000, 10000):
            lines.append(f"| {r['machines']} | {r['method']} | {r['failures_per_day']:.1f} | {r['total_s']:.1f} | "
                         f"{r['p_memory']:.6f} | {r['ratio']:.3f} |")
    return lines + ["", f"![simulated clusters]({res['figure']})"]


SECTIONS = {1: ("iteration_time", section_iteration_time, report_iteration_time),
            2: ("checkpoint_time", section_checkpoint_time, report_checkpoint_time),
            3: ("wasted_time", section_wasted_time, report_wasted_time),
            4: ("recovery_phases", section_phases, report_phases),
            5: ("recovery_probability", section_probability, report_probability),
            6: ("simulator", section_simulator, report_simulator)}


def write_report(out: str, results: dict, meta: dict) -> str:
    lines = ["# gemini_lm evaluation", "",
             f"Mode `{meta['mode']}`, {meta['cpus']} CPUs, load average {meta['load_average']:.2f} at the start, "
             f"{meta['elapsed_s']:.0f} s in all. Sections 1-4 measured on this host with real processes and real "
             "signals; 5 exact; 6 a model.", ""]
    if meta["mode"] == "smoke":
        lines += ["**Smoke mode: the figures of sections 1-4 are not meaningful.** Every run is shrunk to seconds "
                  "(a model of a few thousand parameters, a handful of iterations, one round, a shrunk K) to check "
                  "that each section runs end to end; at that size timer noise and start-up costs dominate, so "
                  "ratios, wasted times and phases say nothing about GEMINI. Use `--quick` or the full runs for "
                  "numbers. Sections 5 and 6 are exact and modelled, so they hold at any size.", ""]
    for num, (key, _, report) in SECTIONS.items():
        if key not in results:
            continue
        lines += [f"## {num}. {TITLES[num]}", ""]
        res = results[key]
        lines += [f"Section failed: `{res['error']}`"] if "error" in res else report(res)
        lines.append("")
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def parse_sections(text: str) -> list[int]:
    try:
        nums = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        nums = []
    if not nums or any(n not in SECTIONS for n in nums):
        raise UsageError(f"--sections {text!r}: a comma-separated subset of 1-6")
    return nums


def main(argv: list[str] | None = None) -> int:
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for report.md, results.json and the PNGs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    mode.add_argument("--smoke", action="store_true", help="every run shrunk to seconds (tests)")
    p.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated subset of 1-6")
    p.add_argument("--keep-runs", action="store_true", help="keep the runs' log dirs under <out>/runs")
    a = p.parse_args(argv)
    sections = parse_sections(a.sections)
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {a.out}: {exc.strerror}") from None
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = os.path.join(a.out, "runs") if a.keep_runs else tempfile.mkdtemp(prefix="evaluate_")
    os.makedirs(work, exist_ok=True)
    ctx = SimpleNamespace(out=a.out, work=work, mode="smoke" if a.smoke else "quick" if a.quick else "full",
                          cache={})
    t0, load = time.time(), os.getloadavg()[0]
    results: dict = {}
    try:
        for num in sections:
            key, run, _ = SECTIONS[num]
            ts = time.time()
            print(f"evaluate: section {num} ({TITLES[num].lower()}) ...", flush=True)
            try:
                results[key] = run(ctx)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                results[key] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
                print(f"evaluate: section {num} failed: {exc}", file=sys.stderr, flush=True)
            results[key]["elapsed_s"] = time.time() - ts
    finally:
        if not a.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    meta = {"mode": ctx.mode, "sections": sections, "cpus": os.cpu_count(), "load_average": load,
            "elapsed_s": time.time() - t0, "time": t0}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"meta": meta, **results}, f, indent=1, default=str)
    path = write_report(a.out, results, meta)
    failed = [k for k, v in results.items() if "error" in v]
    print(f"evaluate: {path} ({len(sections) - len(failed)}/{len(sections)} sections"
          f"{', failed: ' + ', '.join(failed) if failed else ''}) in {meta['elapsed_s']:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)

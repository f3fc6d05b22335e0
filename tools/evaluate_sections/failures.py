"""Sections 3 and 4 of the evaluation: real failures injected into real runs.

Worker and machine kills for GEMINI and the paper's baselines, run once by
tools/bench_recovery.py (`failure_runs`, cached in ctx.cache) and read twice:
3 wasted time per failure, GEMINI vs HighFreq vs Strawman;
4 GEMINI's recovery time by phase, and a plot of one recovery (tools/plot_recovery.py).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from evaluate_sections.figures import pyplot, save


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
    plt = pyplot()
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
    res["figure"] = save(fig, ctx, "wasted_time.png")
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
    plt = pyplot()
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
    res["figure"] = save(fig, ctx, "recovery_phases.png")
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

"""Sections 5 and 6 of the evaluation: computed, not measured, so they hold at any run size.

5 exact probability of recovering from memory vs machines and copies, per placement
  (gemini_lm/gemini/probability.py);
6 effective training time of 16 to 10,000 machines under failures, a model whose
  assumptions the report prints (gemini_lm/eval/simulator.py).
"""
from __future__ import annotations

from evaluate_sections.figures import pyplot, save


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
    plt = pyplot()
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
    res["figure"] = save(fig, ctx, "recovery_probability.png")
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
    plt = pyplot()
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
    res["figure"] = save(fig, ctx, "simulated_clusters.png")
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

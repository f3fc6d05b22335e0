"""One picture of a run: loss against wall-clock time, failures and each recovery phase.

    python tools/plot_recovery.py --log-dir runs/demo [--out runs/demo/recovery.png]

Reads <log-dir>/metrics.jsonl (`time`, `iteration`, `loss`), injections.jsonl and
failures.jsonl (dashed lines where a failure was injected / detected), and recovery.jsonl
(one shaded span per phase: detect, restart, rendezvous, setup, retrieval, first
iteration). Iterations trained again after a failure — the work it cost — are marked
with open circles, whatever the recovery source (runs without GEMINI have no
recovery.jsonl, but their repeated iterations still show). Prints one summary line.
"""
from __future__ import annotations

import os


from gemini_lm.errors import UsageArgumentParser, UsageError, run_cli
from gemini_lm.resilience.events import FAILURES, INJECTIONS, read_jsonl

# Per recovery path: (phase, record key where it ends, colour); each phase starts where the
# previous ended (resilience/recovery_report.py).
PHASES = {
    "restart": (("detect", "detected_at", "#d62728"), ("restart", "workers_started_at", "#ff7f0e"),
                ("rendezvous", "rendezvous_done_at", "#bcbd22"), ("setup", "restore_started_at", "#7f7f7f"),
                ("retrieval", "loaded_at", "#2ca02c"), ("first iteration", "first_iteration_at", "#1f77b4")),
    "inplace": (("detect", "detected_at", "#d62728"), ("abort", "aborted_at", "#9467bd"),
                ("re-form", "reformed_at", "#e377c2"), ("retrieval", "loaded_at", "#2ca02c"),
                ("first iteration", "first_iteration_at", "#1f77b4")),
}


def load_run(log_dir: str) -> dict:
    """The run's records; UsageError when there is nothing to plot."""
    if not os.path.isdir(log_dir):
        raise UsageError(f"--log-dir {log_dir}: no such directory")
    metrics = [r for r in read_jsonl(os.path.join(log_dir, "metrics.jsonl"))
               if "loss" in r and "time" in r and "iteration" in r]
    if not metrics:
        raise UsageError(f"{os.path.join(log_dir, 'metrics.jsonl')}: no iterations with loss and time logged")
    return {"metrics": metrics,
            "injections": read_jsonl(os.path.join(log_dir, INJECTIONS)),
            "failures": read_jsonl(os.path.join(log_dir, FAILURES)),
            "recoveries": read_jsonl(os.path.join(log_dir, "recovery.jsonl"))}


def split_repeated(metrics: list[dict]) -> tuple[list[dict], list[dict]]:
    """(first time each iteration was trained, iterations trained again after a failure)."""
    first, again, reached = [], [], 0
    for r in sorted(metrics, key=lambda r: r["time"]):
        (again if r["iteration"] <= reached else first).append(r)
        reached = max(reached, r["iteration"])
    return first, again


def phase_spans(rec: dict) -> list[tuple[str, float, float, str]]:
    """(phase, start, end, colour) from the failure (injection, else detection) to the first iteration."""
    start = rec.get("injected_at") or rec.get("detected_at") or rec.get("workers_started_at")
    spans = []
    for name, key, colour in PHASES[rec.get("path", "restart")]:
        end = rec.get(key)
        if end is None or start is None:
            continue
        if end > start:
            spans.append((name, start, end, colour))
        start = max(start, end)
    return spans


def plot_run(log_dir: str, out: str, title: str | None = None) -> dict:
    """Render the run in `log_dir` to the PNG `out`; returns what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(log_dir)
    events = [e["time"] for e in run["injections"] + run["failures"]]
    t0 = min([r["time"] for r in run["metrics"]] + events)
    first, again = split_repeated(run["metrics"])

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    shown: set[str] = set()
    for rec in run["recoveries"]:
        for name, a, b, colour in phase_spans(rec):
            ax.axvspan(a - t0, b - t0, color=colour, alpha=0.25, lw=0,
                       label=None if name in shown else name)
            shown.add(name)
    # No line across a failure: the loss was not being computed in between.
    cuts = sorted(e["time"] for e in run["injections"]) + [float("inf")]
    xs, ys, prev = [], [], None
    for r in first:
        if prev is not None and any(prev < c <= r["time"] for c in cuts):
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(r["time"] - t0)
        ys.append(r["loss"])
        prev = r["time"]
    ax.plot(xs, ys, "-", color="black", lw=1, marker=".", ms=3, label="loss")
    if again:
        ax.plot([r["time"] - t0 for r in again], [r["loss"] for r in again], "o", mfc="none",
                color="#9467bd", ms=5, label=f"trained again ({len(again)} it)")
    for i, e in enumerate(run["injections"]):
        ax.axvline(e["time"] - t0, color="#d62728", ls="--", lw=1.2,
                   label="failure injected" if i == 0 else None)
    detected = sorted({round(e["time"], 1) for e in run["failures"]})
    for i, t in enumerate(detected):
        ax.axvline(t - t0, color="#d62728", ls=":", lw=0.8, label="failure detected" if i == 0 else None)
    for rec in run["recoveries"]:
        lost = rec.get("iterations_lost")
        x = (rec.get("injected_at") or rec.get("detected_at") or rec.get("workers_started_at") or t0) - t0
        ax.annotate(f"{rec.get('failure_kind', '?')} -> {rec.get('source', '?')}\n"
                    f"{'?' if lost is None else lost} it lost\nrecovered in {rec.get('recovery_s', 0):.1f}s",
                    xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -4),
                    textcoords="offset points", fontsize=7, va="top")
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("training loss")
    ax.set_title(title or os.path.basename(os.path.abspath(log_dir)), fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="lower center", ncol=5, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {"out": out, "iterations": len(first), "trained_again": len(again),
            "injections": len(run["injections"]), "failures": len(run["failures"]),
            "recoveries": len(run["recoveries"])}


def main(argv: list[str] | None = None) -> int:
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-dir", required=True, help="a run's --log-dir (metrics.jsonl, recovery.jsonl, ...)")
    p.add_argument("--out", default=None, help="PNG to write (default <log-dir>/recovery.png)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    drawn = plot_run(a.log_dir, a.out or os.path.join(a.log_dir, "recovery.png"), a.title)
    print(f"plot_recovery: {drawn['out']}: {drawn['iterations']} iterations, {drawn['trained_again']} trained "
          f"again, {drawn['injections']} injected / {drawn['failures']} detected failure events, "
          f"{drawn['recoveries']} recoveries")
    return 0


if __name__ == "__main__":
    run_cli(main)

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
Each section's runs, figure and report text are in tools/evaluate_sections/; this file runs
the chosen ones and writes the report.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

from evaluate_sections import failures, modelled, overhead
from gemini_lm.errors import UsageArgumentParser, UsageError, run_cli

TITLES = {1: "Iteration time", 2: "Checkpoint time", 3: "Wasted time per failure",
          4: "Recovery time by phase", 5: "Recovery probability", 6: "Large clusters (simulated)"}

SECTIONS = {1: ("iteration_time", overhead.section_iteration_time, overhead.report_iteration_time),
            2: ("checkpoint_time", overhead.section_checkpoint_time, overhead.report_checkpoint_time),
            3: ("wasted_time", failures.section_wasted_time, failures.report_wasted_time),
            4: ("recovery_phases", failures.section_phases, failures.report_phases),
            5: ("recovery_probability", modelled.section_probability, modelled.report_probability),
            6: ("simulator", modelled.section_simulator, modelled.report_simulator)}


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

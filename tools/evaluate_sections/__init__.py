"""The sections of tools/evaluate.py, one module per kind of result.

Each section is a pair: `section_<name>(ctx) -> dict` runs it and returns what goes into
results.json (with the name of its figure, saved under ctx.out), and `report_<name>(res)`
turns that dict into the lines of its part of report.md. `ctx` carries out (the output
directory), work (scratch for the runs), mode ("smoke", "quick" or "full") and cache
(results sections share: 3 and 4 read the same failure runs).

  overhead.py   1 iteration time, 2 checkpoint time (failure-free runs, tools/bench_*.py)
  failures.py   3 wasted time per failure, 4 recovery time by phase (injected failures)
  modelled.py   5 recovery probability (exact), 6 large clusters (gemini_lm/eval/simulator.py)
  figures.py    matplotlib without a display, one PNG per figure

They live here rather than in gemini_lm/eval because sections 1-4 drive the benchmarks of
tools/, which the package never imports.
"""

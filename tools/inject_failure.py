"""Inject a failure into a running tools/local_cluster.py job.

    python tools/inject_failure.py --log-dir runs/demo --kind machine --target 1
    python tools/inject_failure.py --log-dir runs/demo --kind worker --target 3 --at-iteration 50
    python tools/inject_failure.py --log-dir runs/demo --kind worker --target 0 --during snapshot

--kind worker   SIGKILL the worker with global rank TARGET (a software failure)
--kind machine  SIGKILL machine slot TARGET's agent and all its workers, wipe its memory
--kind hang     SIGSTOP the worker with global rank TARGET (its peers' watchdogs notice)
--kind sigterm  SIGTERM the worker with global rank TARGET (a preemption notice)

--at-iteration N waits until metrics.jsonl logs an iteration >= N after this tool starts.
--during W pauses the target inside the copy, snapshot, send, receive or persist window
first (see gemini_lm/resilience/breakpoints.py), then delivers the failure there; with
--at-iteration N, inside the first such window of an iteration >= N. The event
is appended to <log-dir>/injections.jsonl; its JSON is printed as the last line.
"""
from __future__ import annotations

import json
import sys


from gemini_lm.errors import UsageArgumentParser, UsageError, run_cli
from gemini_lm.resilience.breakpoints import WINDOWS
from gemini_lm.resilience.injection import KINDS, Injection, inject


def main(argv: list[str] | None = None) -> int:
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-dir", required=True, help="the cluster's --log-dir (holds cluster.json)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--target", type=int, required=True, help="global rank (worker/hang/sigterm) or machine slot")
    p.add_argument("--at-iteration", type=int, default=None)
    p.add_argument("--during", choices=WINDOWS, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds")
    a = p.parse_args(argv)
    if a.target < 0:
        raise UsageError("--target must be >= 0")
    try:
        event = inject(a.log_dir, Injection(a.kind, a.target, a.at_iteration, a.during), timeout_s=a.timeout)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(event, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_cli(main)

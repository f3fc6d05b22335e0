"""Probability that GEMINI recovers every checkpoint from CPU memory after k machine failures.

    python tools/recovery_probability.py --machines 16 --replicas 2 --failures 3

Prints a table (exact, Monte Carlo, difference) per placement, which placement `auto`
picks and why, and as the last line one JSON object with the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys


from gemini_lm.errors import UsageArgumentParser, UsageError
from gemini_lm.gemini.placement import resolve_strategy
from gemini_lm.gemini.probability import monte_carlo_probability, recovery_probability


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = UsageArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, required=True, help="N, machines (failure domains)")
    p.add_argument("--replicas", type=int, required=True, help="m, copies of each checkpoint (own + peers)")
    p.add_argument("--failures", type=int, required=True, help="k, machines failing at once")
    p.add_argument("--placement", default="all", choices=["group", "ring", "mixed", "auto", "all"])
    p.add_argument("--trials", type=int, default=20_000, help="Monte Carlo trials (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.machines < 1:
        raise UsageError(f"--machines must be >= 1 (got {args.machines})")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1 (got {args.replicas})")
    if not 0 <= args.failures <= args.machines:
        raise UsageError(f"--failures must be in [0, --machines={args.machines}] (got {args.failures})")
    if args.trials < 0:
        raise UsageError(f"--trials must be >= 0 (got {args.trials})")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        n, k = args.machines, args.failures
        auto, m, notes = resolve_strategy(n, args.replicas, "auto")
        divides = n % m == 0
        if args.placement == "all":
            strategies = ["group", "ring"] if divides else ["ring", "mixed"]
        else:
            strategies = [resolve_strategy(n, m, args.placement)[0]]  # raises for group when m does not divide N
    except (UsageError, ValueError) as e:
        print(f"recovery_probability: error: {e}", file=sys.stderr)
        return 2

    exact = {s: recovery_probability(n, m, k, s) for s in strategies}
    mc = {s: monte_carlo_probability(n, m, k, s, args.trials, args.seed) for s in strategies} if args.trials else {}
    print(f"N={n} machines, m={m} copies of each checkpoint, k={k} simultaneous failures")
    for note in notes:
        print(f"  note: {note}")
    if k < m:
        print("  k < m: every checkpoint keeps a live holder, recovery is certain")
    print(f"{'placement':<10} {'exact':>10} {'monte carlo':>12} {'difference':>11} {'sigma':>9}")
    for s in strategies:
        if s in mc:
            sigma = (exact[s] * (1 - exact[s]) / args.trials) ** 0.5  # binomial std of the estimate
            mc_col = f"{mc[s]:>12.6f} {mc[s] - exact[s]:>+11.6f} {sigma:>9.6f}"
        else:
            mc_col = f"{'-':>12} {'-':>11} {'-':>9}"
        print(f"{s:<10} {exact[s]:>10.6f} {mc_col}")
    if mc:
        print(f"  Monte Carlo: {args.trials} trials, seed {args.seed}")
    if args.placement == "all":
        if divides:
            print(f"  mixed not listed: m={m} divides N={n}, so its ring is one more group and mixed equals group")
        else:
            print(f"  group is not defined here: m={m} does not divide N={n}")
    why = "m divides N, where group placement is optimal" if divides else \
        "m does not divide N: groups where possible, one ring of the remaining machines"
    print(f"auto picks {auto}: {why}")
    if args.placement == "all" and divides:  # mixed is defined and equals group
        exact["mixed"] = exact["group"]
        if mc:
            mc["mixed"] = mc["group"]
    print(json.dumps({"machines": n, "replicas": m, "failures": k, "auto": auto,
                      "probability": exact, "monte_carlo": mc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

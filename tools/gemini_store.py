"""List and remove GEMINI memory stores left on this host.

    python tools/gemini_store.py list
    python tools/gemini_store.py remove JOB [--machine M]
    python tools/gemini_store.py prune --older-than 2h

A run that crashes keeps its store in shared memory (/dev/shm) so that its restart resumes
from it; a job that is never restarted leaves it there. `list` shows every store of yours
(job, machine, newest iteration, size, age, the live processes holding it); `remove` deletes
one job's stores; `prune` deletes those older than an age that no live process holds. A
store some live process holds is never removed. Roots: --store-dir (repeatable; default
/dev/shm/gemini_lm and local_cluster's /dev/shm/gemini_lm_cluster_*).
"""
from __future__ import annotations

import glob
import re

from gemini_lm.errors import HelpFormatter, UsageArgumentParser, UsageError, run_cli
from gemini_lm.gemini.store_admin import DEFAULT_ROOT, StoreInfo, describe_size, list_stores, remove

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    m = _AGE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"--older-than {text!r}: expected a number with s, m, h or d (e.g. 90m, 2h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _table(stores: list[StoreInfo]) -> None:
    print(f"{'JOB':28} {'MACHINE':10} {'ITERATION':>9} {'SIZE':>10} {'AGE':>8}  HELD BY  PATH")
    for s in stores:
        held = ",".join(map(str, s.holders)) or "-"
        it = "-" if s.iteration is None else str(s.iteration)
        print(f"{s.job:28} {s.machine:10} {it:>9} {describe_size(s.nbytes):>10} {s.age_s / 60:>7.0f}m  "
              f"{held:7}  {s.path}")


def _remove(stores: list[StoreInfo]) -> int:
    for s in stores:
        remove(s)
        print(f"removed {s.path} ({describe_size(s.nbytes)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = UsageArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
                            formatter_class=HelpFormatter)
    p.add_argument("command", choices=["list", "remove", "prune"],
                   help="list the stores; remove one job's; prune old ones nobody holds")
    p.add_argument("job", nargs="?", help="remove: the job id (as `list` shows it)")
    p.add_argument("--machine", help="remove: only this machine's store of the job")
    p.add_argument("--older-than", help="prune: age, e.g. 90m, 2h, 1d")
    p.add_argument("--store-dir", action="append", help="a store root (repeatable)")
    a = p.parse_args(argv)
    roots = a.store_dir or [DEFAULT_ROOT, *sorted(glob.glob("/dev/shm/gemini_lm_cluster_*"))]
    stores = [s for root in roots for s in list_stores(root)]
    if a.command == "list":
        if a.job or a.machine or a.older_than:
            raise UsageError("list takes only --store-dir")
        _table(stores)
        return 0
    if a.command == "remove":
        if not a.job or a.older_than:
            raise UsageError("remove needs a JOB (and takes --machine, --store-dir)")
        chosen = [s for s in stores if s.job == a.job and a.machine in (None, s.machine)]
        if not chosen:
            raise UsageError(f"no store of job {a.job!r}{f' on machine {a.machine}' if a.machine else ''} "
                             f"in {', '.join(roots)}")
        held = [s for s in chosen if s.holders]
        if held:
            raise UsageError(f"{held[0].path} is held by live process(es) {held[0].holders}: not removed")
        return _remove(chosen)
    if a.job or a.machine or a.older_than is None:
        raise UsageError("prune needs --older-than AGE (and takes --store-dir)")
    age = parse_age(a.older_than)
    return _remove([s for s in stores if s.age_s > age and not s.holders])


if __name__ == "__main__":
    run_cli(main)

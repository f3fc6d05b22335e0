"""Helpers for end-to-end failure tests: run tools/local_cluster.py and check what it left."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from gemini_lm.resilience import procs
from tests.e2e import ROOT, read_losses, read_recoveries, tiny_gpt_args

TRAIN_ITERS = 16


def train_args(corpus: str, log_dir: str, *extra: str) -> list[str]:
    # TP=2 over 2 machines x 1 worker: each machine holds one shard, so a lost machine's
    # shard exists only as its peer's replica (with DP instead, every machine holds all).
    return tiny_gpt_args(corpus, log_dir, "--train-iters", str(TRAIN_ITERS),
                         "--tensor-model-parallel-size", "2",
                         "--gemini-profile-iters", "2",   # blocking replication, interleaved from iteration 3
                         *extra)


def run_cluster(log_dir: str, corpus: str, *, machines: int = 2, procs_per_machine: int = 1,
                injections: tuple[str, ...] = (), cluster_flags: tuple[str, ...] = (),
                train_flags: tuple[str, ...] = (), timeout_s: float = 150.0) -> subprocess.CompletedProcess:
    if "--save" not in train_flags:   # the final state is saved and compared with the reference's
        train_flags = ("--save", os.path.join(log_dir, "ckpt"), *train_flags)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "local_cluster.py"),
           "--machines", str(machines), "--procs-per-machine", str(procs_per_machine),
           "--replacement-delay", "0.5", "--max-restarts", "4", "--timeout", str(timeout_s - 10),
           *cluster_flags, *[a for i in injections for a in ("--inject", i)],
           "--", "pretrain_gpt.py", *train_args(corpus, log_dir, "--distributed-timeout-seconds", "20",
                                                  *train_flags)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if out.returncode != 0:
        logs = ""
        cdir = os.path.join(log_dir, "cluster")
        for name in sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []:
            logs += f"\n--- {name}\n" + open(os.path.join(cdir, name)).read()[-3000:]
        raise AssertionError(f"cluster exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}{logs}")
    return out


def cluster_state(log_dir: str) -> dict:
    with open(os.path.join(log_dir, "cluster.json")) as f:
        return json.load(f)


def assert_nothing_left(log_dir: str) -> None:
    """No process of the cluster alive, its shared-memory store root gone."""
    state = cluster_state(log_dir)
    assert procs.cluster_processes(state["cluster_id"]) == {}
    assert not os.path.exists(state["store_root"])


def assert_same_losses(reference: dict[int, float], log_dir: str) -> list[tuple[int, float]]:
    """Every logged loss — re-runs after a recovery included — equals the failure-free run's, bit for bit.

    An iteration may be missing only if it completed (and was checkpointed) but was not
    yet logged when the failure hit: between the last logged and the recovered iteration.
    """
    got = read_losses(log_dir)
    unlogged = set()
    for rec in read_recoveries(log_dir):
        unlogged |= set(range((rec["last_logged_iteration"] or 0) + 1, rec["iteration"] + 1))
    missing = set(range(1, TRAIN_ITERS + 1)) - {i for i, _ in got}
    assert missing <= unlogged, f"iterations never logged: {sorted(missing - unlogged)}"
    diff = [(i, loss, reference[i]) for i, loss in got if loss != reference[i]]
    assert not diff, f"losses differ from the failure-free run: {diff[:5]}"
    return got


def final_weights(save_dir: str) -> dict:
    """Every tensor of the final persistent checkpoint (weights, optimizer, RNG, data position)."""
    from safetensors.torch import load_file

    out = {}
    for tp in range(2):
        path = os.path.join(save_dir, f"iter_{TRAIN_ITERS:07d}", f"tp_rank_{tp:02d}.safetensors")
        out.update({f"tp{tp}/{k}": v for k, v in load_file(path).items()})
    return out


def assert_same_final_state(reference_save: str, save_dir: str) -> None:
    import torch

    ref, got = final_weights(reference_save), final_weights(save_dir)
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"final state differs from the failure-free run in {differ[:5]}"

#!/usr/bin/env python
"""How long each checkpoint method blocks the training loop, measured side by side.

For the same state (fp32 params + two Adam moments shaped like a GPT; a tiny one and
a ~100M-parameter one) it times, per checkpoint:

  gemini      what the Checkpointer does: SnapshotLayout.write into a mapped shared-memory
              slot, then checksum + commit on a background thread (blocked for the copy;
              the previous commit is waited for, untimed, before the next snapshot)
  gemini-sync the same with checksum + commit on the blocking path
  torch.save  to a file on disk, flushed and fsynced
  async_save  torch.distributed.checkpoint.async_save until the call returns (staging);
              the background write is waited for before the next checkpoint, untimed
  memcpy      one copy_ of the same number of bytes between preallocated buffers

Prints a table, then one JSON line (numbers for the larger state at the top level).
"""


import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gemini_lm.checkpoint.checksum import checksum
from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.gemini.store import MemoryStore


def gpt_state(vocab: int, hidden: int, layers: int, seq: int) -> dict[str, torch.Tensor]:
    """fp32 params and Adam exp_avg/exp_avg_sq of a GPT-2-shaped model, plus step counters."""
    shapes = {"embedding.word": (vocab, hidden), "embedding.position": (seq, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "ln1.weight": (hidden,), p + "ln1.bias": (hidden,),
                       p + "attn.qkv.weight": (3 * hidden, hidden), p + "attn.qkv.bias": (3 * hidden,),
                       p + "attn.proj.weight": (hidden, hidden), p + "attn.proj.bias": (hidden,),
                       p + "ln2.weight": (hidden,), p + "ln2.bias": (hidden,),
                       p + "mlp.fc1.weight": (4 * hidden, hidden), p + "mlp.fc1.bias": (4 * hidden,),
                       p + "mlp.fc2.weight": (hidden, 4 * hidden), p + "mlp.fc2.bias": (hidden,)})
    shapes.update({"final_ln.weight": (hidden,), "final_ln.bias": (hidden,)})
    state = {}
    for name, shape in shapes.items():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            state[f"{kind}.{name}"] = torch.randn(shape)
        state[f"step.{name}"] = torch.tensor(1000.0)
    state["iteration"] = torch.tensor(1000)
    return state


def filesystem_of(path: str) -> str:
    path, best = os.path.realpath(path), ("", "?")
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            if path.startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, fstype)
    return best[1]


def bench_state(name: str, state: dict, args, work: str) -> dict:
    """Time every method on `state`, round-robin so background load hits them alike."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    store = MemoryStore(args.shm, f"bench-{os.getpid()}", "machine0")
    layout = SnapshotLayout.build(state, {"format": "bench"})
    store.prepare("tp00", layout.nbytes)
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    pool = ThreadPoolExecutor(1)
    pending: list = []          # work a method left running in the background, waited for untimed
    parts: dict = {"gemini_copy_s": [], "gemini_commit_s": []}

    def gemini(i):              # (a) checksum + commit on the blocking path
        w = store.begin_write("tp00", layout.nbytes, layout.layout_hash)
        t0 = time.perf_counter()
        layout.write(state, w.buffer)
        t1 = time.perf_counter()
        store.commit(w, i)
        parts["gemini_copy_s"].append(t1 - t0)
        parts["gemini_commit_s"].append(time.perf_counter() - t1)

    def gemini_bg(i):           # (a') checksum + commit on a background thread, as the Checkpointer does
        w = store.begin_write("tp00", layout.nbytes, layout.layout_hash)
        layout.write(state, w.buffer)
        pending.append(pool.submit(store.commit, w, i))

    def torch_save(i):          # (b) to disk, flushed and fsynced
        with open(os.path.join(work, f"{name}.pt"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def async_save(i):          # (c) blocked until the call returns; the write finishes untimed
        path = os.path.join(work, f"dcp-{name}-{i}")
        pending.append(dcp.async_save(state, checkpoint_id=path))
        pending.append(lambda: shutil.rmtree(path))

    def memcpy(i):              # (d) the physical limit: one flat copy of the same bytes
        dst.copy_(src)

    def xxh3(i):
        checksum(dst)

    methods = {"gemini_s": gemini, "gemini_bg_commit_s": gemini_bg, "torch_save_s": torch_save,
               "async_save_s": async_save, "memcpy_s": memcpy, "checksum_s": xxh3}
    res: dict = {"state": name, "tensors": len(state), "state_bytes": nbytes, **{k: [] for k in methods}}
    warmup = 2                  # touches both slots, the page cache, DCP's first-call setup
    for i in range(warmup + args.reps):
        for key, fn in methods.items():
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            for p in pending:
                p.result() if hasattr(p, "result") else p()
            pending.clear()
            if i >= warmup:
                res[key].append(dt)
    res.update({k: v[warmup:] for k, v in parts.items()})
    with store.open_latest("tp00") as view:     # sanity: what was committed is the state
        assert torch.equal(view.tensors()["param.embedding.word"], state["param.embedding.word"])
    store.wipe()
    pool.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small states and fewer repetitions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (training runs with 1)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="disk directory for torch.save / async_save")
    ap.add_argument("--shm", default="/dev/shm/gemini_lm", help="shared-memory store root")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    work = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    sizes = {"tiny": dict(vocab=1024, hidden=64, layers=2, seq=128)}
    sizes["gpt-small" if args.quick else "gpt-100M"] = (
        dict(vocab=8192, hidden=256, layers=4, seq=256) if args.quick
        else dict(vocab=50304, hidden=768, layers=8, seq=1024))
    if args.quick:
        args.reps = min(args.reps, 3)
    try:
        results = [bench_state(name, gpt_state(**cfg), args, work) for name, cfg in sizes.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()

    med = statistics.median
    print(f"threads={args.threads}  disk={args.dir} ({filesystem_of(args.dir)})  shm={args.shm} "
          f"({filesystem_of(os.path.dirname(args.shm))})  reps={args.reps}  cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f}: median seconds the loop is blocked")
    print(f"{'state':<10} {'MB':>8} {'method':<12} {'blocked s':>10} {'GB/s':>7} {'x gemini':>9}")
    for r in results:
        g = med(r["gemini_bg_commit_s"])
        for key, label in (("gemini_bg_commit_s", "gemini"), ("gemini_s", "gemini-sync"), ("torch_save_s", "torch.save"),
                           ("async_save_s", "async_save"), ("memcpy_s", "memcpy")):
            s = med(r[key])
            print(f"{r['state']:<10} {r['state_bytes'] / 1e6:>8.1f} {label:<12} {s:>10.4f} "
                  f"{r['state_bytes'] / s / 1e9:>7.2f} {s / g:>9.2f}")
        print(f"{'':<10} {'':>8} {'  copy':<12} {med(r['gemini_copy_s']):>10.4f}   (gemini: layout.write)")
        print(f"{'':<10} {'':>8} {'  commit':<12} {med(r['gemini_commit_s']):>10.4f}   "
              f"(gemini: checksum + record; xxh3 alone {med(r['checksum_s']):.4f})")

    def summary(r: dict) -> dict:
        g = med(r["gemini_bg_commit_s"])   # the Checkpointer's behaviour is the headline
        return {"state_bytes": r["state_bytes"], "tensors": r["tensors"],
                "gemini_s": g, "gemini_sync_commit_s": med(r["gemini_s"]),
                "gemini_copy_s": med(r["gemini_copy_s"]),
                "gemini_commit_s": med(r["gemini_commit_s"]), "checksum_s": med(r["checksum_s"]),
                "torch_save_s": med(r["torch_save_s"]), "async_save_s": med(r["async_save_s"]),
                "memcpy_s": med(r["memcpy_s"]), "gemini_bg_commit_s": med(r["gemini_bg_commit_s"]),
                "fraction_of_memcpy_bandwidth_sync_commit": med(r["memcpy_s"]) / med(r["gemini_s"]),
                "ratio_torch_save_over_gemini_sync_commit": med(r["torch_save_s"]) / med(r["gemini_s"]),
                "ratio_torch_save_over_gemini": med(r["torch_save_s"]) / g,
                "ratio_async_save_over_gemini": med(r["async_save_s"]) / g,
                "fraction_of_memcpy_bandwidth": med(r["memcpy_s"]) / g,
                "raw": {k: r[k] for k in ("gemini_bg_commit_s", "gemini_s", "torch_save_s", "async_save_s",
                                          "memcpy_s")}}

    out = summary(results[-1])
    out.update(state=results[-1]["state"], threads=args.threads, checksum_on_blocking_path=False,
               load_average=os.getloadavg()[0], tiny=summary(results[0]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""--use-distributed-optimizer against the plain optimizer: optimizer-state bytes per rank
and training-step time, side by side on DP gloo ranks (spawned, 1 thread each); and the
distributed optimizer with --overlap-param-gather (column "overlap").

The three variants are built in every rank (same GPT, same batch per rank) and alternate
step by step, so machine noise hits them alike. A step is what train_step and the GEMINI
hook do: zero the grad buffer, forward, backward, DP gradient sync, optimizer step
(clipping on; with the flag: AdamW on the owned shard, then the all-gather of the updated
params), then the snapshot copy of TrainState.tensors() into a buffer (GEMINI's, every
iteration by default). With --overlap-param-gather the all-gather is launched at the end
of the update and waited for after the snapshot copy, which is what it overlaps in
training (there the next forward waits for it; here the step ends with the wait so that
no variant's traffic spills into the next one's step). A step's time is the slowest
rank's. State bytes are the optimizer's own memory per rank (masters, moments,
steps: `state_tensors()`, less the fp32 param slice the distributed one lists as its
masters, which is the params' memory). Snapshot bytes are the rank's whole GEMINI snapshot
(TrainState.tensors() as laid out in the memory store: params, optimizer, schedule, RNG,
progress), which is also what each of its peers receives and stores per replica. Without
the flag every DP rank's snapshot is the whole state; with it, its slice and no params.
Targets (issue 16): state divided by the DP size within 5%, step time <= 1.05x.

Prints a table; the last line is one JSON object.

    python tools/bench_distrib_optimizer.py --dp 2 --num-layers 4 --hidden-size 256
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemini_lm.checkpoint.snapshot import SnapshotLayout
from gemini_lm.models.config import TransformerConfig, pad_vocab_size
from gemini_lm.models.gpt import GPTModel, gpt_forward_step
from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.state import ParallelState
from gemini_lm.training.lr_schedule import OptimizerParamScheduler
from gemini_lm.training.optimizer import build_optimizer
from gemini_lm.training.state import TrainProgress, TrainState

VARIANTS = {"plain": (False, False), "distributed": (True, False), "overlap": (True, True)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=2, help="data-parallel ranks")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=50257, help="unpadded (GPT-2's by default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    return p.parse_args(argv)


def _build(args, ps, distributed: bool, overlap: bool):
    config = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=args.num_attention_heads,
                               max_position_embeddings=args.seq_length,
                               vocab_size=pad_vocab_size(args.vocab_size, 128, 1), orig_vocab_size=args.vocab_size,
                               hidden_dropout=0.0, attention_dropout=0.0)
    tracker = model_parallel_seed(1234, ps)
    model = GPTModel(config, ps, tracker).train()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    ddp = DistributedDataParallel(model, ps, use_distributed_optimizer=distributed, overlap_param_gather=overlap)
    opt = build_optimizer(model, ps, lr=1e-4, clip_grad=1.0, precision=args.precision, ddp=ddp,
                          use_distributed_optimizer=distributed)
    state = TrainState(model, opt, OptimizerParamScheduler(opt, max_lr=1e-4, lr_decay_iters=100), tracker, ps,
                       TrainProgress(), {})
    return model, ddp, opt, state


def _optimizer_bytes(opt, ddp) -> int:
    params = ddp.param_buffer
    return sum(t.numel() * t.element_size() for t in opt.state_tensors().values()
               if params is None or t.untyped_storage().data_ptr() != params.untyped_storage().data_ptr())


def _rank(rank: int, world_size: int, args, init_file: str, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    try:
        ps = ParallelState.initialize(tp_size=1)
        gen = torch.Generator().manual_seed(rank)
        batch = {"tokens": torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                                         generator=gen)}
        runs = {name: _build(args, ps, *flags) for name, flags in VARIANTS.items()}
        state_bytes = {name: _optimizer_bytes(opt, ddp) for name, (_, ddp, opt, _) in runs.items()}
        layouts = {name: SnapshotLayout.build(state.tensors(), state.metadata) for name, (*_, state) in runs.items()}
        snapshot_bytes = {name: layout.nbytes for name, layout in layouts.items()}
        slots = {name: torch.empty(layout.nbytes, dtype=torch.uint8) for name, layout in layouts.items()}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        losses: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for rep in range(args.warmup + args.reps):
            for name in (list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))):
                model, ddp, opt, state = runs[name]
                dist.barrier()
                t0 = time.perf_counter()
                ddp.zero_grad_buffer()
                loss, _ = gpt_forward_step(model, batch)
                opt.scale_loss(loss).backward()
                ddp.finish_grad_sync()
                opt.step(rep + 1)
                layouts[name].write(state.tensors(), slots[name])   # the GEMINI snapshot copy
                ddp.finish_param_sync()   # --overlap-param-gather: the next forward's wait
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slower rank sets the pace
                losses[name].append(float(loss.detach()))
                if rep >= args.warmup:
                    times[name].append(t.item())
        # The two parts the overlap puts side by side, each alone: the most it can hide is
        # the smaller (the rest of the step, fwd + bwd + AdamW, is the same in both columns).
        _, ddp, _, state = runs["distributed"]
        parts: dict[str, list[float]] = {"all_gather_s": [], "snapshot_s": []}
        for _ in range(args.reps):
            dist.barrier()
            t0 = time.perf_counter()
            ddp.start_param_sync(force_sync=True)
            t1 = time.perf_counter()
            layouts["distributed"].write(state.tensors(), slots["distributed"])
            t = torch.tensor([t1 - t0, time.perf_counter() - t1])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            parts["all_gather_s"].append(t[0].item())
            parts["snapshot_s"].append(t[1].item())
        bytes_all, snapshots_all = [None] * world_size, [None] * world_size
        dist.all_gather_object(bytes_all, state_bytes)
        dist.all_gather_object(snapshots_all, snapshot_bytes)
        if rank == 0:
            queue.put({"step_s": {n: statistics.median(ts) for n, ts in times.items()},
                       "state_bytes": bytes_all, "snapshot_bytes": snapshots_all, "same_losses": losses["plain"] == losses["distributed"] == losses["overlap"],
                       "params": sum(p.numel() for p in runs["plain"][0].parameters()),
                       **{k: statistics.median(v) for k, v in parts.items()}})
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, args.dp, args, os.path.join(tmp, "init"), queue))
                 for r in range(args.dp)]
        for p in procs:
            p.start()
        res = queue.get(timeout=3600)
        for p in procs:
            p.join()
    plain = max(b["plain"] for b in res["state_bytes"])
    dist_max = max(b["distributed"] for b in res["state_bytes"])
    over_max = max(b["overlap"] for b in res["state_bytes"])
    step = res["step_s"]
    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, batch "
          f"{args.micro_batch_size}/rank, {res['params'] / 1e6:.1f}M params, {args.precision}, DP={args.dp}; "
          f"median of {args.reps} steps, torch {torch.__version__}")
    snap = {name: max(b[name] for b in res["snapshot_bytes"]) for name in VARIANTS}
    print(f"{'optimizer':<14}{'state MB/rank':>15}{'snapshot MB/rank':>18}{'step s':>10}")
    for name in VARIANTS:
        mb = max(b[name] for b in res["state_bytes"]) / 2 ** 20
        print(f"{name:<14}{mb:>15.2f}{snap[name] / 2 ** 20:>18.2f}{step[name]:>10.4f}")
    for name, mine in (("distributed", dist_max), ("overlap", over_max)):
        print(f"{name + '/plain':<20}{mine / plain:>9.3f}{snap[name] / snap['plain']:>18.3f}"
              f"{step[name] / step['plain']:>10.3f}")
    print(f"{'overlap/distributed':<20}{'':>9}{'':>18}{step['overlap'] / step['distributed']:>10.3f}")
    print(f"alone: param all-gather {res['all_gather_s']:.4f} s, snapshot copy {res['snapshot_s']:.4f} s "
          f"(the overlap hides at most the smaller)")
    out = {"dp": args.dp, "precision": args.precision, "params": res["params"],
           "plain_state_bytes_per_rank": plain, "distributed_state_bytes_per_rank": dist_max,
           "state_ratio": round(dist_max / plain, 4), "state_ratio_target": round(1 / args.dp, 4),
           "plain_snapshot_bytes_per_rank": snap["plain"], "distributed_snapshot_bytes_per_rank": snap["distributed"],
           "snapshot_ratio": round(snap["distributed"] / snap["plain"], 4),
           "plain_step_s": round(step["plain"], 4), "distributed_step_s": round(step["distributed"], 4),
           "step_time_ratio": round(step["distributed"] / step["plain"], 3),
           "overlap_step_s": round(step["overlap"], 4),
           "overlap_step_time_ratio": round(step["overlap"] / step["plain"], 3),
           "overlap_vs_distributed": round(step["overlap"] / step["distributed"], 3),
           "all_gather_s": round(res["all_gather_s"], 4), "snapshot_s": round(res["snapshot_s"], 4),
           "losses_bit_identical": res["same_losses"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Training-step time of our GPT against Hugging Face's GPT2LMHeadModel, and TP=2 vs TP=1.

1. Ours vs HF, one process, same config, same weights, same batch, same optimizer
   (torch.optim.AdamW); one step = forward + backward + optimizer step, dropout on.
   The two models alternate, step by step, so machine noise hits both alike.
2. TP=2 vs TP=1 on 2 gloo ranks (spawned, 1 thread each, so both use the same cores):
   TP=2 runs one batch across both ranks; TP=1 runs a whole model on each rank, each on
   its own batch (aggregate throughput of the two replicas, no gradient all-reduce).

Prints a table; the last line is one JSON object.

    python tools/bench_step.py --num-layers 6 --hidden-size 384 --seq-length 256
"""
from __future__ import annotations

import os


import argparse
import datetime
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemini_lm.models.config import TransformerConfig, pad_vocab_size
from gemini_lm.models.gpt import GPTModel, gpt_forward_step
from gemini_lm.models.hf_gpt2 import full_state_dict, gpt_state_to_hf, hf_config
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.state import ParallelState


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-attention-heads", type=int, default=6)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50257, help="unpadded (GPT-2's by default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for part 1 (part 2 uses 1 per rank)")
    p.add_argument("--skip-tp", action="store_true", help="only ours vs HF")
    return p.parse_args(argv)


def single_rank_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


def make_config(args, tp_size: int) -> TransformerConfig:
    return TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                             num_attention_heads=args.num_attention_heads,
                             max_position_embeddings=args.seq_length,
                             vocab_size=pad_vocab_size(args.vocab_size, 128, tp_size),
                             orig_vocab_size=args.vocab_size)


def make_batch(args, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                                    generator=gen)}


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def ours_step_fn(model, opt, batch):
    def step():
        loss, _ = gpt_forward_step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_vs_hf(args) -> dict:
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    ps = single_rank_state()
    config = make_config(args, 1)
    tracker = model_parallel_seed(1234, ps)
    ours = GPTModel(config, ps, tracker).train()
    hf_cfg = hf_config(config)
    hf_cfg._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(hf_cfg).train()
    hf.loss_type = "ForCausalLM"  # what it falls back to anyway, minus a warning
    hf.load_state_dict(gpt_state_to_hf(full_state_dict(ours, ps), config))
    batch = make_batch(args, 0)

    def hf_step():
        # HF shifts labels itself (padding the last position with ignore_index): the same
        # [b, s] inputs and [b, s, vocab] logits as ours.
        inputs = batch["tokens"][:, :-1]
        hf(input_ids=inputs, labels=inputs, use_cache=False).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    steps = {"ours": ours_step_fn(ours, ours_opt, batch), "hf": hf_step}
    times = {"ours": [], "hf": []}
    for rep in range(args.warmup + args.reps):
        for name in (("ours", "hf") if rep % 2 == 0 else ("hf", "ours")):
            t = timed(steps[name])
            if rep >= args.warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _tp_rank(rank: int, world_size: int, args, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        runs = {}
        for tp_size in (1, 2):
            ps = ParallelState.initialize(tp_size) if tp_size == 2 else single_rank_state()
            model = GPTModel(make_config(args, tp_size), ps, model_parallel_seed(1234, ps)).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            # TP=1: each rank is a separate replica with its own batch.
            batch = make_batch(args, rank if tp_size == 1 else 0)
            runs[tp_size] = ours_step_fn(model, opt, batch)
        times = {1: [], 2: []}
        for rep in range(args.warmup + args.reps):
            for tp_size in ((1, 2) if rep % 2 == 0 else (2, 1)):
                dist.barrier()
                t = timed(runs[tp_size])
                dist.barrier()  # the slower rank sets the pace, as in training
                t_max = torch.tensor([t])
                dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
                if rep >= args.warmup:
                    times[tp_size].append(t_max.item())
        if rank == 0:
            queue.put({tp: statistics.median(ts) for tp, ts in times.items()})
    finally:
        dist.destroy_process_group()


def bench_tp(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_tp_rank, args=(r, 2, args, os.path.join(tmp, "init"), queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get(timeout=1800)
        for p in procs:
            p.join()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    tokens = args.micro_batch_size * args.seq_length
    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, "
          f"seq {args.seq_length}, batch {args.micro_batch_size}, vocab {args.vocab_size}; "
          f"median of {args.reps} steps (fwd+bwd+AdamW), torch {torch.__version__}")
    t = bench_vs_hf(args)
    out = {"ours_s": round(t["ours"], 4), "hf_s": round(t["hf"], 4),
           "ratio_ours_over_hf": round(t["ours"] / t["hf"], 3), "threads": args.threads}
    print(f"{'model':<28}{'step s':>10}{'tokens/s':>12}")
    print(f"{'ours (TP=1)':<28}{t['ours']:>10.4f}{tokens / t['ours']:>12.0f}")
    print(f"{'HF GPT2LMHeadModel (sdpa)':<28}{t['hf']:>10.4f}{tokens / t['hf']:>12.0f}")
    if not args.skip_tp:
        tp = bench_tp(args)
        tp1_tps, tp2_tps = 2 * tokens / tp[1], tokens / tp[2]
        print(f"{'TP=1 x2 replicas (2 ranks)':<28}{tp[1]:>10.4f}{tp1_tps:>12.0f}")
        print(f"{'TP=2 (2 ranks)':<28}{tp[2]:>10.4f}{tp2_tps:>12.0f}")
        out.update(tp1_step_s=round(tp[1], 4), tp2_step_s=round(tp[2], 4),
                   tp1_tokens_per_s=round(tp1_tps, 1), tp2_tokens_per_s=round(tp2_tps, 1),
                   tp2_over_tp1_throughput=round(tp2_tps / tp1_tps, 3))
    out.update(num_layers=args.num_layers, hidden_size=args.hidden_size, seq_length=args.seq_length,
               micro_batch_size=args.micro_batch_size, vocab_size=args.vocab_size)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

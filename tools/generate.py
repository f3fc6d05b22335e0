"""Generate text from a GPT checkpoint: greedy or sampled, with a KV cache, TP-aware.

    python tools/generate.py --load CKPT --prompt "Once upon" --max-new-tokens 40 --greedy
    python tools/generate.py --load CKPT --prompt "Once upon" --max-new-tokens 40 \\
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    torchrun --nproc-per-node 2 tools/generate.py --load CKPT --tensor-model-parallel-size 2 ...

Prints the prompt followed by the generated text. The checkpoint may have any TP size.
The tokenizer is the one the checkpoint records (trained here), else pass it
(--tokenizer-type ...); without either, the bundled one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gemini_lm.config import parse_config
from gemini_lm.errors import UsageError, run_cli
from gemini_lm.inference.checkpoint import (build_tool_tokenizer, check_tokenizer_fits,
                                            fit_vocab_to_tp, is_bert, read_full_model_state,
                                            recorded_tokenizer)
from gemini_lm.inference.generation import SamplingParams, generate
from gemini_lm.models.gpt import GPTModel
from gemini_lm.models.hf_gpt2 import load_full_state_dict
from gemini_lm.training.initialize import initialize_distributed


# The training flags generation uses, with their help here (None: the training help).
CONFIG_FLAGS = {
    "load": "checkpoint directory to generate from",
    "tensor_model_parallel_size": None, "distributed_backend": None, "device": None,
    "tokenizer_type": "override the tokenizer the checkpoint records (default: that one, else the bundled one)",
    "tokenizer_model": None, "vocab_file": None, "merge_file": None,
    "seed": "seed for sampling (the same on every rank)",
}


def add_generate_args(parser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--iteration", type=int, help="checkpoint iteration (default: the newest)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    g.add_argument("--temperature", type=float, help="sample with this temperature")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this mass")
    g.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false",
                   help="keep going past the end-of-document token")


def sampling_params(extra: dict) -> SamplingParams:
    sampled = extra["temperature"] is not None or extra["top_k"] or extra["top_p"] < 1.0
    if extra["greedy"] and sampled:
        raise UsageError("--greedy excludes --temperature/--top-k/--top-p")
    try:
        return SamplingParams(greedy=not sampled, temperature=extra["temperature"] or 1.0,
                              top_k=extra["top_k"], top_p=extra["top_p"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    world = dist.get_world_size() if dist.is_initialized() else None   # else torchrun's WORLD_SIZE
    cfg = parse_config(argv, extra_args_provider=add_generate_args, world_size=world, only=CONFIG_FLAGS,
                       description=__doc__)
    extra, d = cfg.extra, cfg.data
    if not cfg.checkpoint.load:
        raise UsageError("--load CKPT_DIR is required")
    if extra["max_new_tokens"] < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    params = sampling_params(extra)
    tokenizer = build_tool_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file,
                                     recorded_tokenizer(cfg.checkpoint.load, extra["iteration"]))
    full, config, _ = read_full_model_state(cfg.checkpoint.load, extra["iteration"])
    if is_bert(config):
        raise UsageError(f"{cfg.checkpoint.load} holds a BERT model; generation needs a GPT checkpoint")
    check_tokenizer_fits(tokenizer, config)
    prompt_ids = tokenizer.tokenize(extra["prompt"])
    if not prompt_ids:
        raise UsageError("--prompt encodes to no tokens")
    if len(prompt_ids) + extra["max_new_tokens"] > config.max_position_embeddings:
        raise UsageError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens exceeds the model's "
                         f"{config.max_position_embeddings} positions")

    ps = initialize_distributed(cfg)
    full, config = fit_vocab_to_tp(full, config, ps.tp_size)
    model = GPTModel(config, ps).to(ps.device).eval()
    load_full_state_dict(model, full, ps)
    # The same seed on every rank: all TP ranks see the same gathered logits and draw alike.
    generator = torch.Generator(device=ps.device).manual_seed(cfg.training.seed)
    prompt = torch.tensor([prompt_ids], device=ps.device)
    out = generate(model, prompt, extra["max_new_tokens"], params, generator,
                   eod=tokenizer.eod if extra["stop_at_eod"] else None)[0].tolist()
    if ps.rank == 0:
        text, prefix = tokenizer.detokenize(out), tokenizer.detokenize(prompt_ids)
        # Print the prompt as given; detokenizing may normalize it (e.g. spacing).
        print(extra["prompt"] + text[len(prefix):] if text.startswith(prefix) else text, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main, hard_exit=True)

"""The range of every numeric training flag, checked as a class (issue 13): a value outside
it is one UsageError naming the flag and the range, before anything runs or is written.

Non-finite floats (nan, inf) never get this far: UsageArgumentParser refuses them for every
flag of every tool. Each numeric field of config.py must have an entry here (a test checks),
so a new flag cannot slip in unchecked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gemini_lm.errors import UsageError


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # lo itself is excluded
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def describe(self, kind: str) -> str:
        if self.hi is None:
            return f"{kind} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{kind} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1, hi_open=True)     # dropout, Adam betas: 1 would never forget / drop all

BOUNDS: dict[str, Range] = {
    # model
    "num_layers": AT_LEAST_1, "hidden_size": AT_LEAST_1, "num_attention_heads": AT_LEAST_1,
    "ffn_hidden_size": AT_LEAST_1, "seq_length": AT_LEAST_1, "max_position_embeddings": AT_LEAST_1,
    "hidden_dropout": PROBABILITY, "attention_dropout": PROBABILITY, "init_method_std": POSITIVE,
    "make_vocab_size_divisible_by": AT_LEAST_1,
    # parallelism
    "tensor_model_parallel_size": AT_LEAST_1, "distributed_timeout_minutes": POSITIVE,
    "distributed_timeout_seconds": POSITIVE,
    # training
    "micro_batch_size": AT_LEAST_1, "global_batch_size": AT_LEAST_1, "train_iters": AT_LEAST_1,
    "lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "lr_warmup_iters": NON_NEGATIVE, "lr_decay_iters": AT_LEAST_1,
    "weight_decay": NON_NEGATIVE, "adam_beta1": PROBABILITY, "adam_beta2": PROBABILITY, "adam_eps": POSITIVE,
    "clip_grad": NON_NEGATIVE, "loss_scale": POSITIVE, "initial_loss_scale": POSITIVE,
    "seed": Range(0, 2 ** 32 - 1),           # numpy's seed range
    "eval_interval": NON_NEGATIVE, "eval_iters": NON_NEGATIVE, "exit_interval": AT_LEAST_1,
    # persistent checkpoints
    "save_interval": AT_LEAST_1, "save_keep": AT_LEAST_1, "persistent_bandwidth_mbs": NON_NEGATIVE,
    # logging
    "log_interval": AT_LEAST_1,
    # GEMINI
    "gemini_interval": AT_LEAST_1, "gemini_replicas": AT_LEAST_1, "gemini_hang_timeout": NON_NEGATIVE,
    "gemini_spares": NON_NEGATIVE, "gemini_profile_iters": NON_NEGATIVE,
    "gemini_replication_interval": NON_NEGATIVE, "gemini_buffer_mb": POSITIVE,
    "gemini_sub_buffers": AT_LEAST_1, "gemini_gap_safety": Range(0, 1, lo_open=True),
}


def check_bounds(sections: dict) -> None:
    """`sections`: name -> a config section (dataclass instance). UsageError on the first
    numeric flag outside its range; None (not given) is always accepted."""
    for section in sections.values():
        for f in dataclasses.fields(section):
            value, bound = getattr(section, f.name), BOUNDS.get(f.name)
            if bound is None or value is None or isinstance(value, bool):
                continue
            if value not in bound:
                kind = "an integer" if isinstance(value, int) else "a number"
                raise UsageError(f"--{f.name.replace('_', '-')} {value}: must be {bound.describe(kind)}")

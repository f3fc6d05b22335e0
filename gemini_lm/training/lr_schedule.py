"""Learning-rate schedule with Megatron's OptimizerParamScheduler semantics.

The schedule counts optimizer updates (`num_steps`; skipped fp16 steps do not count):
linear warmup from `lr_warmup_init` to `max_lr` over `lr_warmup_iters`, then decay to
`min_lr` at `lr_decay_iters` (constant, linear or cosine), then `min_lr` for good.
`step()` sets the lr of every param group for the next update (times the group's
optional `lr_mult`), so construction already sets the lr of the first update.
"""
from __future__ import annotations

import math

import torch

from gemini_lm.errors import UsageError

DECAY_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    def __init__(self, optimizer, *, max_lr: float, min_lr: float = 0.0,
                 lr_warmup_iters: int = 0, lr_warmup_fraction: float | None = None,
                 lr_decay_iters: int, lr_decay_style: str = "linear", lr_warmup_init: float = 0.0):
        if lr_decay_style not in DECAY_STYLES:
            raise UsageError(f"lr decay style must be one of {DECAY_STYLES}, got {lr_decay_style!r}")
        if not 0.0 <= min_lr <= max_lr:
            raise UsageError(f"need 0 <= min-lr <= lr, got min-lr {min_lr}, lr {max_lr}")
        if not 0.0 <= lr_warmup_init <= max_lr:
            raise UsageError(f"need 0 <= lr-warmup-init <= lr, got {lr_warmup_init}")
        if lr_decay_iters < 1:
            raise UsageError(f"lr-decay-iters must be positive, got {lr_decay_iters}")
        if lr_warmup_fraction is not None:
            if not 0.0 <= lr_warmup_fraction <= 1.0:
                raise UsageError(f"lr-warmup-fraction must be in [0, 1], got {lr_warmup_fraction}")
            lr_warmup_iters = int(lr_warmup_fraction * lr_decay_iters)
        if not 0 <= lr_warmup_iters <= lr_decay_iters:
            raise UsageError(f"need 0 <= lr-warmup-iters <= lr-decay-iters, got {lr_warmup_iters} "
                             f"and {lr_decay_iters}")
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.lr_warmup_init = lr_warmup_init
        self.lr_warmup_iters = lr_warmup_iters
        self.lr_decay_iters = lr_decay_iters
        self.lr_decay_style = lr_decay_style
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        """The lr of the next update (before any per-group lr_mult)."""
        n = self.num_steps
        if self.lr_warmup_iters > 0 and n <= self.lr_warmup_iters:
            return self.lr_warmup_init + (self.max_lr - self.lr_warmup_init) * n / self.lr_warmup_iters
        if self.lr_decay_style == "constant":
            return self.max_lr
        if n > self.lr_decay_iters:
            return self.min_lr
        # Here warmup < n <= decay, so the denominator is positive.
        decay_ratio = (n - self.lr_warmup_iters) / (self.lr_decay_iters - self.lr_warmup_iters)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int = 1) -> None:
        """Count `increment` completed updates and set the lr for the next one."""
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"num_steps": torch.tensor(self.num_steps, dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"num_steps"}:
            raise ValueError(f"LR scheduler state has keys {sorted(tensors)}, expected ['num_steps']")
        self.num_steps = int(tensors["num_steps"])
        self.step(0)

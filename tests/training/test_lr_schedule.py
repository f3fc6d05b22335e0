"""OptimizerParamScheduler against the closed forms of Megatron's schedule."""
from __future__ import annotations

import math

import pytest
import torch

from gemini_lm.errors import UsageError
from gemini_lm.training.lr_schedule import OptimizerParamScheduler

MAX_LR, MIN_LR, WARMUP, DECAY = 3e-3, 3e-4, 10, 50


def _optimizer() -> torch.optim.Optimizer:
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_mult": 0.5}], lr=123.0)


def _expected(n: int, style: str) -> float:
    if n <= WARMUP:
        return MAX_LR * n / WARMUP
    if style == "constant":
        return MAX_LR
    if n > DECAY:
        return MIN_LR
    ratio = (n - WARMUP) / (DECAY - WARMUP)
    coeff = 1.0 - ratio if style == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return MIN_LR + (MAX_LR - MIN_LR) * coeff


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_schedule_matches_closed_form(style):
    opt = _optimizer()
    sched = OptimizerParamScheduler(opt, max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_iters=WARMUP,
                                    lr_decay_iters=DECAY, lr_decay_style=style)
    for n in range(DECAY + 20):
        expected = _expected(n, style)
        assert sched.get_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15), n
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * expected, rel=1e-12, abs=1e-15)
        sched.step()


def test_landmarks():
    sched = OptimizerParamScheduler(_optimizer(), max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_iters=WARMUP,
                                    lr_decay_iters=DECAY, lr_decay_style="cosine")
    assert sched.get_lr() == 0.0                       # the first update of a warmup has lr 0
    sched.step(WARMUP)
    assert sched.get_lr() == MAX_LR                    # the end of warmup reaches max_lr
    sched.step((DECAY - WARMUP) // 2)
    assert sched.get_lr() == pytest.approx((MAX_LR + MIN_LR) / 2)   # cosine midpoint
    sched.step(DECAY)
    assert sched.get_lr() == MIN_LR                    # stays at min_lr after decay


def test_warmup_fraction_and_warmup_init():
    sched = OptimizerParamScheduler(_optimizer(), max_lr=1.0, min_lr=0.0, lr_warmup_fraction=0.1,
                                    lr_decay_iters=100, lr_decay_style="linear", lr_warmup_init=0.2)
    assert sched.lr_warmup_iters == 10
    assert sched.get_lr() == pytest.approx(0.2)
    sched.step(5)
    assert sched.get_lr() == pytest.approx(0.6)


def test_state_round_trip():
    a = OptimizerParamScheduler(_optimizer(), max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_iters=WARMUP,
                                lr_decay_iters=DECAY, lr_decay_style="cosine")
    a.step(17)
    opt = _optimizer()
    b = OptimizerParamScheduler(opt, max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_iters=WARMUP,
                                lr_decay_iters=DECAY, lr_decay_style="cosine")
    state = a.state_tensors()
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == {"num_steps": (torch.int64, ())}
    b.load_state_tensors({k: v.clone() for k, v in state.items()})
    assert b.num_steps == 17 and b.get_lr() == a.get_lr()
    assert opt.param_groups[0]["lr"] == a.get_lr()      # applied to the optimizer at once


@pytest.mark.parametrize("kwargs", [
    {"lr_decay_style": "exponential"},
    {"min_lr": 1.0},
    {"lr_warmup_iters": 60},
    {"lr_decay_iters": 0},
    {"lr_warmup_fraction": 1.5},
])
def test_bad_configuration_is_a_usage_error(kwargs):
    args = {"max_lr": 0.1, "min_lr": 0.01, "lr_warmup_iters": 5, "lr_decay_iters": 50, **kwargs}
    with pytest.raises(UsageError):
        OptimizerParamScheduler(_optimizer(), **args)

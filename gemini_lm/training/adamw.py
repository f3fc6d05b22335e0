"""AdamW for CPU without torch.optim: the same foreach ops, in the same order, as torch's.

torch.optim.Optimizer's constructor calls a @torch._disable_dynamo-wrapped add_param_group,
which imports torch._dynamo (sympy, fx, inductor): ~2 s of every cold start on 2 CPU cores,
and every step() imports it again. A worker restarted after a failure pays that before it
can train, so on CPU we run torch 2.13's `_multi_tensor_adam` ourselves (decoupled weight
decay; no amsgrad, maximize, capturable or tensor lr), which on CPU is bitwise identical
to torch.optim.AdamW with foreach=True and with foreach=False (tests/training/test_adamw.py).
On CUDA the optimizer uses torch's fused AdamW: a GPU job pays the import once at start.

Interface, as an LR scheduler and MegatronOptimizer expect: `param_groups` (dicts with
params, lr, betas, eps, weight_decay) and `state[param]` = {step, exp_avg, exp_avg_sq},
created eagerly (the snapshot layout is fixed from the first iteration).
"""
from __future__ import annotations

import torch


class ForeachAdamW:
    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0}
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        # torch keeps `step` as a CPU float tensor (float64 under a float64 default dtype).
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {
            p: {"step": torch.zeros((), dtype=step_dtype),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            for g in self.param_groups for p in g["params"]}
        self._one = torch.tensor(1.0)   # torch steps CPU step counters by a tensor, not a Python 1

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            lr, (beta1, beta2), eps, wd = float(g["lr"]), g["betas"], g["eps"], g["weight_decay"]
            # torch groups a param group's tensors by device and dtype, in parameter order.
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in g["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                grads = [p.grad for p in params]
                states = [self.state[p] for p in params]
                exp_avgs = [s["exp_avg"] for s in states]
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, self._one, alpha=1.0)
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
                bias_correction1 = [1 - beta1 ** s.item() for s in steps]
                bias_correction2 = [1 - beta2 ** s.item() for s in steps]
                step_size = [(lr / bc) * -1 for bc in bias_correction1]
                bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

"""AdamW with Megatron's mixed-precision step: fp32 masters, loss scaling, global-norm clipping.

One class covers fp32, bf16 and fp16 models. Every low-precision parameter gets an fp32
master copy that AdamW updates and that is copied back into the model after the step; an
fp32 parameter is its own master. Gradients come from `param.main_grad` (the fp32 DDP
buffer) when present, else from `param.grad`.

A step (`step(iteration)`), as in megatron/core:
  1. master grads <- model grads (no copy when they are fp32 already)
  2. fp16/loss scale: unscale, check for inf/nan on every rank, skip the step if found,
     update the loss scale
  3. global L2 norm over the whole model (TP shards summed, replicas counted once), clip
  4. AdamW on the masters, copy masters into the model, zero the gradients

Adam's state is created eagerly at construction (zeros, step 0, exactly what torch would
create lazily), so `state_tensors()` has the same names, shapes and dtypes from the first
iteration on: the GEMINI snapshot layout is decided once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gemini_lm.errors import UsageError
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.state import ParallelState
from gemini_lm.training.adamw import ForeachAdamW
from gemini_lm.training.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepResult:
    update_successful: bool           # False: fp16 overflow, the step was skipped
    grad_norm: float | None           # None when clipping is off or the step was skipped
    num_zeros_in_grad: int | None     # None unless log_num_zeros_in_grad
    loss_scale: float | None          # None without loss scaling


def _is_tp_duplicate(param: torch.Tensor, ps: ParallelState) -> bool:
    """A replicated param on tp_rank > 0: the same values as on tp_rank 0, counted once."""
    return not getattr(param, "tensor_model_parallel", False) and ps.tp_rank > 0


def _all_reduce(tensor: torch.Tensor, group_name: str, ps: ParallelState,
                op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """Blocking all-reduce over ps.tp_group or ps.dp_group, recorded on the timeline."""
    size, group = (ps.tp_size, ps.tp_group) if group_name == "tp" else (ps.dp_size, ps.dp_group)
    if size == 1:
        return
    with peer_failures(f"{group_name.upper()} all-reduce"), \
            ps.timeline.span("all_reduce", group_name, tensor.numel() * tensor.element_size()):
        dist.all_reduce(tensor, op=op, group=group)


@torch.no_grad()
def clip_grad_norm_fp32(grads: list[torch.Tensor], grads_for_norm: list[torch.Tensor],
                        max_norm: float, ps: ParallelState) -> float:
    """Clip `grads` in place to a global L2 norm of `max_norm`; return the norm before clipping.

    `grads_for_norm` are this rank's contributions (its TP shards, and replicated params
    only on tp_rank 0), so the sum of squares over the TP group is the full model's.
    """
    device = grads[0].device if grads else torch.device("cpu")
    sumsq = torch.zeros((), dtype=torch.float64, device=device)
    if grads_for_norm:
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads_for_norm])
        sumsq = norms.double().square().sum()
    sumsq = sumsq.reshape(1)
    _all_reduce(sumsq, "tp", ps)
    total_norm = math.sqrt(float(sumsq))
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)
    return total_norm


def _init_adam_state(adam: torch.optim.AdamW) -> None:
    """Create the state torch.optim.AdamW would create lazily at its first step."""
    for group in adam.param_groups:
        on_device = bool(group.get("fused")) or bool(group.get("capturable"))
        # Mirrors torch.optim.optimizer._get_scalar_dtype.
        step_dtype = (torch.float64 if torch.get_default_dtype() == torch.float64
                      and not group.get("fused") else torch.float32)
        for p in group["params"]:
            adam.state[p] = {
                "step": torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def make_adamw(decay: list[torch.Tensor], no_decay: list[torch.Tensor], device: torch.device, *,
               lr: float, weight_decay: float, betas: tuple[float, float], eps: float):
    """AdamW over two groups (decayed, not decayed), its state created eagerly."""
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if device.type == "cuda":
        adam = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        _init_adam_state(adam)
        return adam
    return ForeachAdamW(groups, lr=lr, betas=betas, eps=eps)   # torch.optim imports torch._dynamo (adamw.py)


class MegatronOptimizer:
    """AdamW over (name, param) pairs; build it with `build_optimizer`. See the module doc."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], ps: ParallelState, *,
                 lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                 clip_grad: float, grad_scaler: MegatronGradScaler | None,
                 ddp: DistributedDataParallel | None = None, log_num_zeros_in_grad: bool = False):
        self.ps = ps
        self.clip_grad = clip_grad
        self.grad_scaler = grad_scaler
        self.ddp = ddp
        self.log_num_zeros_in_grad = log_num_zeros_in_grad

        if not named_params:
            raise ValueError("no trainable parameters to optimize")
        self.device = named_params[0][1].device
        self._build(named_params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def _build(self, named_params: list[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
               betas: tuple[float, float], eps: float) -> None:
        """Masters and AdamW over every parameter (the distributed optimizer: over a shard)."""
        # (name, model param, master). An fp32 param is its own master.
        self._params: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, p in named_params:
            master = p if p.dtype == torch.float32 else p.detach().float()
            self._params.append((name, p, master))
        decay = [m for n, p, m in self._params if not _is_no_decay(n, p)]
        no_decay = [m for n, p, m in self._params if _is_no_decay(n, p)]
        self.adam = make_adamw(decay, no_decay, self.device, lr=lr, weight_decay=weight_decay,
                               betas=betas, eps=eps)

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's groups; the LR scheduler writes `lr` into them."""
        return self.adam.param_groups

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What to call backward() on: the loss times the current loss scale."""
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale

    def finish_param_sync(self) -> None:
        """Wait for an overlapped param all-gather (--overlap-param-gather) in flight: call
        before reading or writing the whole params outside a forward (the forward's
        pre-hook waits by itself). A no-op when there is none, as always without the flag."""
        if self.ddp is not None:
            self.ddp.finish_param_sync()

    def zero_grad(self) -> None:
        for _, p, master in self._params:
            p.grad = None
            master.grad = None
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()

    @torch.no_grad()
    def step(self, iteration: int) -> StepResult:
        if self.ddp is not None:
            self.ddp.finish_grad_sync()   # a no-op when the training loop already did it
        grads = self._prepare_master_grads()

        loss_scale = None
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check_for_inf(grads)
            self.grad_scaler.update(found_inf)
            loss_scale = self.grad_scaler.scale   # after the update, as Megatron logs it
            if found_inf:
                self.zero_grad()
                return StepResult(False, None, None, loss_scale)

        grads_for_norm = [g for (_, p, _), g in zip(self._params, grads) if not _is_tp_duplicate(p, self.ps)]
        num_zeros = self._count_zeros(grads_for_norm) if self.log_num_zeros_in_grad else None
        grad_norm = None
        if self.clip_grad > 0.0:
            grad_norm = clip_grad_norm_fp32(grads, grads_for_norm, self.clip_grad, self.ps)
            if not math.isfinite(grad_norm) and self.grad_scaler is None:
                # Megatron's --check-for-nan-in-loss-and-grad: never write NaN into the
                # state (the last good in-memory checkpoint must stay the newest).
                raise FloatingPointError(f"gradient norm is {grad_norm} at iteration {iteration}")

        self._update(grads)
        self.zero_grad()
        return StepResult(True, grad_norm, num_zeros, loss_scale)

    def _update(self, grads: list[torch.Tensor]) -> None:
        """AdamW on the masters (whose .grad are `grads`), then the model params from them."""
        self.adam.step()
        for _, p, master in self._params:
            if master is not p:
                p.copy_(master)

    def _prepare_master_grads(self) -> list[torch.Tensor]:
        grads = []
        for _, p, master in self._params:
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is None:
                # No gradient at all (an unused param without DDP): a zero gradient keeps
                # every param's Adam step count in lockstep, as Megatron's buffer does.
                g = torch.zeros_like(master)
            master.grad = g if g.dtype == torch.float32 else g.float()
            grads.append(master.grad)
        return grads

    def _unscale_and_check_for_inf(self, grads: list[torch.Tensor]) -> bool:
        found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        inv_scale = torch.full((1,), self.grad_scaler.inv_scale, dtype=torch.float32,
                               device=self.device)
        # The fused kernel torch's own GradScaler uses: grads *= inv_scale, found_inf = 1
        # if any grad is inf or nan.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        # Every rank must take the same decision, or the replicas diverge.
        _all_reduce(found_inf, "tp", self.ps, dist.ReduceOp.MAX)
        _all_reduce(found_inf, "dp", self.ps, dist.ReduceOp.MAX)
        return bool(found_inf.item() > 0)

    def _count_zeros(self, grads_for_norm: list[torch.Tensor]) -> int:
        zeros = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads_for_norm:
            zeros += (g == 0).sum()
        _all_reduce(zeros, "tp", self.ps)
        return int(zeros.item())

    def state_tensors(self, gathered: bool = False) -> dict[str, torch.Tensor]:
        """Every optimizer-side tensor, keyed by stable names. Live tensors, not copies:
        copy them before the next step changes them. fp32 params are their own masters
        and are saved with the model, so only low-precision params have a master entry.
        `gathered`: the layout that does not depend on the DP size (persistent checkpoints);
        this optimizer's state is whole on every rank, so it is the same."""
        out: dict[str, torch.Tensor] = {}
        for name, p, master in self._params:
            if master is not p:
                out[f"optimizer/master/{name}"] = master
            state = self.adam.state[master]
            out[f"optimizer/exp_avg/{name}"] = state["exp_avg"]
            out[f"optimizer/exp_avg_sq/{name}"] = state["exp_avg_sq"]
            out[f"optimizer/step/{name}"] = state["step"]
        if self.grad_scaler is not None:
            out.update({f"optimizer/grad_scaler/{k}": v
                        for k, v in self.grad_scaler.state_tensors().items()})
        return out

    def restores_params(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether load_state_tensors(tensors) sets the params too (see the distributed optimizer)."""
        return False

    def param_names_from_masters(self) -> list[str]:
        """Params that state_tensors() determines, so a rank's own state need not hold them:
        none here (the distributed optimizer: all)."""
        return []

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `state_tensors()` output, in place; also refreshes the model params
        from the masters so the two can never disagree."""
        own = self.state_tensors()
        if set(tensors) != set(own):
            missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"optimizer state mismatch: missing {missing[:3]} ({len(missing)}), "
                             f"unexpected {unexpected[:3]} ({len(unexpected)})")
        scaler_prefix = "optimizer/grad_scaler/"
        for key, dst in own.items():
            if key.startswith(scaler_prefix):
                continue
            src = tensors[key]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"{key}: checkpoint has {src.dtype}{list(src.shape)}, "
                                 f"optimizer has {dst.dtype}{list(dst.shape)}")
            dst.copy_(src)
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_tensors(
                {k[len(scaler_prefix):]: v for k, v in tensors.items() if k.startswith(scaler_prefix)})
        for _, p, master in self._params:
            if master is not p:
                p.copy_(master)


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and every other 1-D param are not weight-decayed."""
    return param.ndim <= 1 or name.endswith("bias") or "norm" in name


def build_optimizer(model: nn.Module, ps: ParallelState, *, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    clip_grad: float = 1.0, precision: str = "fp32", loss_scale: float | None = None,
                    initial_loss_scale: float = 2.0 ** 32, min_loss_scale: float = 1.0,
                    loss_scale_window: int = 1000, hysteresis: int = 2,
                    ddp: DistributedDataParallel | None = None,
                    log_num_zeros_in_grad: bool = False,
                    use_distributed_optimizer: bool = False) -> MegatronOptimizer:
    """The optimizer for `model` (the bare module; a DDP wrapper is unwrapped and used as `ddp`).

    Parameter names, and so state names, are those of the bare module. fp16 gets dynamic
    loss scaling unless `loss_scale` fixes it; a fixed `loss_scale` also applies to bf16.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if lr < 0 or weight_decay < 0 or clip_grad < 0 or eps <= 0:
        raise UsageError("lr, weight decay and clip-grad must be >= 0 and adam eps > 0")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise UsageError(f"adam betas must be in [0, 1), got {betas}")
    if isinstance(model, DistributedDataParallel):
        ddp, model = ddp or model, model.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    allowed = {torch.float32, PRECISIONS[precision]}
    wrong = [(n, p.dtype) for n, p in named if p.dtype not in allowed]
    if wrong:
        raise UsageError(f"precision {precision} but parameter {wrong[0][0]} is {wrong[0][1]}")

    grad_scaler: MegatronGradScaler | None = None
    if loss_scale is not None:
        if precision == "fp32":
            raise UsageError("a loss scale needs fp16 or bf16 training")
        grad_scaler = ConstantGradScaler(loss_scale)
    elif precision == "fp16":
        grad_scaler = DynamicGradScaler(initial_scale=initial_loss_scale, min_scale=min_loss_scale,
                                        growth_interval=loss_scale_window, hysteresis=hysteresis)
    if use_distributed_optimizer:
        from gemini_lm.training.distrib_optimizer import DistributedOptimizer
        if ddp is None or ddp.param_buffer is None:
            raise ValueError("the distributed optimizer needs DistributedDataParallel(use_distributed_optimizer=True)")
        cls = DistributedOptimizer
    else:
        cls = MegatronOptimizer
    return cls(named, ps, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
               clip_grad=clip_grad, grad_scaler=grad_scaler, ddp=ddp,
               log_num_zeros_in_grad=log_num_zeros_in_grad)

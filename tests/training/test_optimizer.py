"""MegatronOptimizer: grouping, eager Adam state, mixed precision, loss scaling, TP clipping,
bit-exact state round trip, post-step hooks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gemini_lm.errors import UsageError
from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import shard_tensor
from gemini_lm.training.grad_scaler import DynamicGradScaler
from gemini_lm.training.lr_schedule import OptimizerParamScheduler
from gemini_lm.training.optimizer import _init_adam_state, build_optimizer, clip_grad_norm_fp32
from tests.dist import run_ranks


def _single_process_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _batch(iteration: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + iteration)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g)


def _backward(ddp: DistributedDataParallel, opt, iteration: int) -> None:
    dtype = next(ddp.module.parameters()).dtype
    x, y = _batch(iteration, dtype)
    loss = nn.functional.mse_loss(ddp(x).float(), y)
    opt.scale_loss(loss).backward()
    ddp.finish_grad_sync()


def _setup(precision: str, seed: int = 0, **kw):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ps = _single_process_state()
    model = _Net(dtype, seed)
    ddp = DistributedDataParallel(model, ps)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "clip_grad": 0.5, **kw}
    opt = build_optimizer(model, ps, precision=precision, ddp=ddp, **kw)
    return ps, model, ddp, opt


def test_no_weight_decay_on_biases_and_norms():
    ps = _single_process_state()
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.final_norm = nn.LayerNorm(4)
    model.pos_embed = nn.Parameter(torch.zeros(5, 4))   # 2-D and replicated: decayed
    model.scale = nn.Parameter(torch.ones(4))           # 1-D: not decayed
    opt = build_optimizer(model, ps, lr=1.0, weight_decay=0.1, clip_grad=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {0.1: ["pos_embed", "proj.weight"],
                      0.0: ["final_norm.bias", "final_norm.weight", "proj.bias", "scale"]}


@pytest.mark.parametrize("kernel", [{"foreach": True}, {"fused": True}])
def test_eager_adam_state_matches_lazy_torch_bit_for_bit(kernel):
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(3)]
    lazy_params = [p.clone().requires_grad_() for p in init]
    eager_params = [p.clone().requires_grad_() for p in init]

    def make(params):
        return torch.optim.AdamW([{"params": [params[0]], "weight_decay": 0.1},
                                  {"params": [params[1]], "weight_decay": 0.0}],
                                 lr=1e-2, betas=(0.9, 0.95), **kernel)
    lazy, eager = make(lazy_params), make(eager_params)
    _init_adam_state(eager)
    assert all(s["step"].item() == 0 for s in eager.state.values())
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(lazy_params, eager_params):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        lazy.step()
        eager.step()
    for a, b in zip(lazy_params, eager_params):
        assert torch.equal(a, b)
        sa, sb = lazy.state[a], eager.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert (sa[k].dtype, sa[k].device, sa[k].shape) == (sb[k].dtype, sb[k].device, sb[k].shape)
            assert torch.equal(sa[k], sb[k]), k


def _reference_adamw(names: list[str], params: list[torch.Tensor]) -> torch.optim.AdamW:
    """Plain torch AdamW with _Net's grouping and the hyper-parameters of _setup()."""
    decay = {"fc1.weight", "fc2.weight"}
    return torch.optim.AdamW([{"params": [p for n, p in zip(names, params) if n in decay],
                               "weight_decay": 0.1},
                              {"params": [p for n, p in zip(names, params) if n not in decay],
                               "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def test_bf16_params_step_on_fp32_masters():
    ps, model, ddp, opt = _setup("bf16", clip_grad=0.0)
    names = [n for n, _ in model.named_parameters()]
    state = opt.state_tensors()
    masters = [state[f"optimizer/master/{n}"] for n in names]
    assert all(m.dtype == torch.float32 for m in masters)
    # Reference: plain AdamW on fp32 copies, fed the same fp32 main grads.
    ref_params = [m.clone() for m in masters]
    ref = _reference_adamw(names, ref_params)
    for it in range(1, 3):
        _backward(ddp, opt, it)
        for n, p, r in zip(names, model.parameters(), ref_params):
            assert p.main_grad.dtype == torch.float32
            r.grad = p.main_grad.clone()
        ref.step()
        assert opt.step(it).update_successful
        for n, p, m, r in zip(names, model.parameters(), masters, ref_params):
            assert torch.equal(m, r), n
            assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16)), n


def _fp16_with_inf(opt, ddp, it: int) -> None:
    _backward(ddp, opt, it)
    ddp.module.fc1.weight.main_grad[0, 0] = float("inf")


def test_fp16_dynamic_loss_scale_skips_overflow_and_backs_off():
    ps, model, ddp, opt = _setup("fp16", initial_loss_scale=2.0 ** 10, hysteresis=2, clip_grad=0.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    masters_before = {k: v.clone() for k, v in opt.state_tensors().items()}
    loss = torch.tensor(3.0)
    assert opt.scale_loss(loss).item() == 3.0 * 2 ** 10

    _fp16_with_inf(opt, ddp, 1)
    r1 = opt.step(1)
    assert (r1.update_successful, r1.grad_norm, r1.loss_scale) == (False, None, 2.0 ** 10)  # hysteresis
    _fp16_with_inf(opt, ddp, 2)
    r2 = opt.step(2)
    assert (r2.update_successful, r2.loss_scale) == (False, 2.0 ** 9)                       # backed off
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for k, v in opt.state_tensors().items():
        if not k.startswith("optimizer/grad_scaler/"):
            assert torch.equal(v, masters_before[k]), k       # masters, moments and steps untouched
    assert ddp.grad_buffer.abs().sum() == 0                   # the bad grads are gone

    # A clean step: the grads are unscaled before AdamW sees them.
    _backward(ddp, opt, 3)
    main_grads = [p.main_grad.clone() for p in model.parameters()]
    masters = [opt.state_tensors()[f"optimizer/master/{n}"] for n, _ in model.named_parameters()]
    ref_params = [m.clone() for m in masters]
    for r, g in zip(ref_params, main_grads):
        r.grad = g * (1.0 / 2 ** 9)
    ref = _reference_adamw([n for n, _ in model.named_parameters()], ref_params)
    ref.step()
    r3 = opt.step(3)
    assert r3.update_successful and r3.loss_scale == 2.0 ** 9
    for m, r in zip(masters, ref_params):
        assert torch.equal(m, r)
    assert all(v.item() == 1 for k, v in opt.state_tensors().items() if k.startswith("optimizer/step/"))


def test_dynamic_grad_scaler_megatron_semantics():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    scales = []
    for found_inf in [True, False, True, True, True, True, False, False, False, False]:
        s.update(found_inf)
        scales.append(s.scale)
    # Overflow 1: hysteresis absorbs it; the clean step does not refill the hysteresis;
    # overflows 2-4 halve down to min_scale; 3 clean steps grow it and reset the hysteresis.
    assert scales == [8.0, 8.0, 4.0, 2.0, 2.0, 2.0, 2.0, 2.0, 4.0, 4.0]
    assert s.hysteresis_tracker == 2 and s.growth_tracker == 1
    copy = DynamicGradScaler()
    copy.load_state_tensors({k: v.clone() for k, v in s.state_tensors().items()})
    assert (copy.scale, copy.growth_tracker, copy.hysteresis_tracker) == (4.0, 1, 2)


def test_nonfinite_grad_norm_without_loss_scaling_raises():
    ps, model, ddp, opt = _setup("bf16")
    _backward(ddp, opt, 1)
    model.fc2.bias.main_grad[0] = float("nan")
    before = model.fc2.weight.clone()
    with pytest.raises(FloatingPointError, match="iteration 1"):
        opt.step(1)
    assert torch.equal(model.fc2.weight, before)


def test_bad_configuration_is_a_usage_error():
    ps = _single_process_state()
    with pytest.raises(UsageError, match="precision"):
        build_optimizer(_Net(), ps, lr=1.0, precision="fp8")
    with pytest.raises(UsageError, match="loss scale"):
        build_optimizer(_Net(), ps, lr=1.0, precision="fp32", loss_scale=128.0)
    with pytest.raises(UsageError, match="bfloat16"):
        build_optimizer(_Net(torch.bfloat16), ps, lr=1.0, precision="fp16")


# -- state round trip --------------------------------------------------------------------

def _train(ps, model, ddp, opt, sched, iterations: range) -> None:
    for it in iterations:
        _backward(ddp, opt, it)
        if it == 2 and opt.grad_scaler is not None:
            model.fc2.weight.main_grad[0, 0] = float("inf")    # exercise the skip path
        if opt.step(it).update_successful:
            sched.step()


def _full_state(model, opt, sched) -> dict[str, torch.Tensor]:
    out = {f"model/{n}": p.detach() for n, p in model.named_parameters()}
    out.update(opt.state_tensors())
    out.update({f"scheduler/{k}": v for k, v in sched.state_tensors().items()})
    return {k: v.clone() for k, v in out.items()}


def _with_scheduler(precision: str, seed: int = 0):
    kw = {"initial_loss_scale": 2.0 ** 12, "loss_scale_window": 2} if precision == "fp16" else {}
    ps, model, ddp, opt = _setup(precision, seed, **kw)
    sched = OptimizerParamScheduler(opt, max_lr=1e-2, min_lr=1e-3, lr_warmup_iters=2,
                                    lr_decay_iters=6, lr_decay_style="cosine")
    return ps, model, ddp, opt, sched


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_state_round_trip_continues_bit_for_bit(precision):
    ps, model, ddp, opt, sched = _with_scheduler(precision)
    layout = {k: (v.shape, v.dtype) for k, v in opt.state_tensors().items()}
    _train(ps, model, ddp, opt, sched, range(1, 7))
    assert {k: (v.shape, v.dtype) for k, v in opt.state_tensors().items()} == layout
    uninterrupted = _full_state(model, opt, sched)

    ps, model, ddp, opt, sched = _with_scheduler(precision)
    _train(ps, model, ddp, opt, sched, range(1, 4))
    snapshot = _full_state(model, opt, sched)

    # A fresh process: different initial weights, everything comes from the snapshot.
    ps, model, ddp, opt, sched = _with_scheduler(precision, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snapshot[f"model/{n}"])
    opt.load_state_tensors({k: v for k, v in snapshot.items() if k.startswith("optimizer/")})
    sched.load_state_tensors({"num_steps": snapshot["scheduler/num_steps"]})
    _train(ps, model, ddp, opt, sched, range(4, 7))
    resumed = _full_state(model, opt, sched)

    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    if precision == "fp16":
        assert uninterrupted["scheduler/num_steps"].item() == 5        # one skipped update
        assert uninterrupted["optimizer/grad_scaler/scale"].item() != 2.0 ** 12


def test_load_rejects_a_different_layout():
    _, _, _, opt = _setup("bf16")
    state = {k: v.clone() for k, v in opt.state_tensors().items()}
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_tensors({k: v for k, v in state.items() if "fc1" not in k})
    state["optimizer/exp_avg/fc1.weight"] = state["optimizer/exp_avg/fc1.weight"].double()
    with pytest.raises(ValueError, match="fc1.weight"):
        opt.load_state_tensors(state)


# -- two ranks: clipping across TP shards, agreement on overflow across DP ---------------

class _TPNet(nn.Module):
    """fc1 column-parallel (weight and bias sharded), fc2 row-parallel (weight sharded, bias
    replicated), norm replicated; at tp_size 1 it is the full model."""

    def __init__(self, tp_size: int):
        super().__init__()
        self.fc1 = nn.Linear(8, 16 // tp_size)
        self.fc2 = nn.Linear(16 // tp_size, 8)
        self.norm = nn.LayerNorm(8)
        for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight):
            p.tensor_model_parallel = True


SHARD_DIM = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}


def _full_grads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in _TPNet(1).named_parameters()}
    grads["fc1.weight"][:, :3] = 0.0   # some zeros to count
    grads["norm.bias"][:2] = 0.0
    return grads


def _shard(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    return {n: shard_tensor(g, SHARD_DIM[n], tp_rank, tp_size) if n in SHARD_DIM else g.clone()
            for n, g in full.items()}


def _two_rank_body(rank: int, world_size: int):
    ps = ParallelState.initialize(tp_size=2)
    grads = _shard(_full_grads(), ps.tp_rank, ps.tp_size)

    # clip_grad_norm_fp32 directly: the norm and the clipped shards.
    model = _TPNet(2)
    params = dict(model.named_parameters())
    clipped = {n: g.clone() for n, g in grads.items()}
    for_norm = [clipped[n] for n in clipped if n in SHARD_DIM or ps.tp_rank == 0]
    norm = clip_grad_norm_fp32(list(clipped.values()), for_norm, 1.0, ps)

    # Through the optimizer: DDP buffers, norm in the StepResult, a "tp" span on the timeline.
    ddp = DistributedDataParallel(model, ps)
    opt = build_optimizer(model, ps, lr=1e-3, clip_grad=1.0, ddp=ddp, log_num_zeros_in_grad=True)
    for n, g in grads.items():
        params[n].main_grad.copy_(g)
    ps.timeline.begin_iteration(1)
    result = opt.step(1)
    ps.timeline.end_iteration()
    tp_spans = [s for s in ps.timeline.iterations()[-1].spans if s.group == "tp"]

    # fp16 on a DP=2 layout: an overflow on rank 0 alone must skip the step on both ranks.
    ps_dp = ParallelState.initialize(tp_size=1)
    model16 = _Net(torch.float16)
    ddp16 = DistributedDataParallel(model16, ps_dp)
    opt16 = build_optimizer(model16, ps_dp, lr=1e-3, precision="fp16", ddp=ddp16,
                            initial_loss_scale=2.0 ** 8)
    _backward(ddp16, opt16, 1)
    assert opt16.step(1).update_successful   # the scale is small enough not to overflow
    _backward(ddp16, opt16, 2)
    if rank == 0:
        model16.fc1.bias.main_grad[0] = float("inf")
    skipped = not opt16.step(2).update_successful
    return (norm, {n: g.numpy() for n, g in clipped.items()}, result.grad_norm,
            result.num_zeros_in_grad, len(tp_spans), skipped)


@pytest.mark.slow
def test_two_ranks_clip_norm_over_tp_and_overflow_agreement(tmp_path):
    full = _full_grads()
    full_norm = math.sqrt(sum(float(g.double().square().sum()) for g in full.values()))
    clip = 1.0 / (full_norm + 1e-6)
    full_zeros = sum(int((g == 0).sum()) for g in full.values())
    assert full_norm > 1.0   # so clipping does something
    for tp_rank, (norm, clipped, step_norm, zeros, n_tp_spans, skipped) in enumerate(
            run_ranks(_two_rank_body, world_size=2, tmp_path=tmp_path)):
        assert norm == pytest.approx(full_norm, rel=1e-6)
        assert step_norm == pytest.approx(full_norm, rel=1e-6)
        assert zeros == full_zeros
        expected = _shard({n: g * clip for n, g in full.items()}, tp_rank, 2)
        for n, g in expected.items():
            torch.testing.assert_close(torch.from_numpy(clipped[n]), g, rtol=1e-6, atol=1e-7)
        assert n_tp_spans == 2   # the norm and the zero count
        assert skipped

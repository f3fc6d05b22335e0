"""ForeachAdamW (CPU) is torch.optim.AdamW, bit for bit, without importing torch._dynamo."""
import subprocess
import sys

import pytest
import torch

from gemini_lm.training.adamw import ForeachAdamW


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _groups(params):   # as MegatronOptimizer builds them: decay and no-decay
    return [{"params": params[:2] + params[3:], "weight_decay": 0.1}, {"params": params[2:3], "weight_decay": 0.0}]


@pytest.mark.parametrize("foreach", [True, False])
def test_bitwise_identical_to_torch_adamw_over_many_steps(foreach):
    ours_p, ref_p = _params(0), _params(0)
    ours = ForeachAdamW(_groups(ours_p), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(_groups(ref_p), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=foreach)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 31):
        lr = 1e-2 * (0.5 + 0.5 * (step % 7) / 7)        # a scheduler writes lr into the groups
        for opt in (ours, ref):
            for group in opt.param_groups:
                group["lr"] = lr
        grads = [torch.randn(p.shape, generator=g) * (10 if step % 5 == 0 else 1) for p in ours_p]
        for ps in (ours_p, ref_p):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        if step == 3:
            ours_p[1].grad = ref_p[1].grad = None        # a parameter without a gradient is skipped
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            assert torch.equal(a, b), step
    for a, b in zip(ours_p, ref_p):
        sa, sb = ours.state[a], ref.state[b]
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_training_on_cpu_never_imports_dynamo():
    code = ("import sys, torch\n"
            "from gemini_lm.parallel.state import ParallelState\n"
            "from gemini_lm.training.optimizer import build_optimizer\n"
            "import torch.distributed as dist\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "ps = ParallelState.initialize(1)\n"
            "model = torch.nn.Linear(4, 4)\n"
            "opt = build_optimizer(model, ps, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,\n"
            "                      clip_grad=1.0, precision='fp32', loss_scale=None, initial_loss_scale=1.0)\n"
            "model(torch.ones(2, 4)).sum().backward()\n"
            "opt.step(1)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

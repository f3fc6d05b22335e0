"""The trainable state of a run: model, DDP wrapper, optimizer, LR schedule, TrainState.

One function builds it for pretrain() and for tools that write checkpoints pretrain()
must accept (tools/convert_to_hf.py --from-hf): same code path, so the same flags give
the same tensor names, shapes, dtypes and snapshot layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from gemini_lm.config import Config
from gemini_lm.data.tokenizer import tokenizer_spec
from gemini_lm.models.config import TransformerConfig
from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.random import RNGStatesTracker
from gemini_lm.parallel.state import ParallelState
from gemini_lm.training.lr_schedule import OptimizerParamScheduler
from gemini_lm.training.optimizer import build_optimizer
from gemini_lm.training.state import TrainProgress, TrainState


@dataclass
class TrainingSetup:
    model: torch.nn.Module
    config: TransformerConfig      # the model's own (a provider may adapt the flags' config)
    ddp: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    progress: TrainProgress
    state: TrainState


def model_config_dict(tcfg: TransformerConfig) -> dict:
    """JSON-able TransformerConfig (dtypes as strings), as stored in checkpoint metadata."""
    return dataclasses.asdict(
        tcfg, dict_factory=lambda kv: {k: str(v) if isinstance(v, torch.dtype) else v for k, v in kv})


def build_training_setup(cfg: Config, tcfg: TransformerConfig, model_provider: Callable,
                         ps: ParallelState, tracker: RNGStatesTracker) -> TrainingSetup:
    t = cfg.training
    model = model_provider(cfg, tcfg, ps, tracker).to(ps.device)
    tcfg = getattr(model, "config", tcfg)   # a provider may adapt it (BERT: post-LN, padding mask)
    if t.bf16 or t.fp16:
        model = model.to(tcfg.params_dtype)
    distributed_optimizer = cfg.parallel.use_distributed_optimizer
    ddp = DistributedDataParallel(model, ps, use_distributed_optimizer=distributed_optimizer,
                                  overlap_param_gather=cfg.parallel.overlap_param_gather)
    optimizer = build_optimizer(model, ps, lr=t.lr, weight_decay=t.weight_decay,
                                betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                clip_grad=t.clip_grad,
                                precision="bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
                                loss_scale=t.loss_scale, initial_loss_scale=t.initial_loss_scale,
                                ddp=ddp, log_num_zeros_in_grad=t.log_num_zeros_in_grad,
                                use_distributed_optimizer=distributed_optimizer)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=t.lr, min_lr=t.min_lr,
                                        lr_warmup_iters=t.lr_warmup_iters,
                                        lr_decay_iters=t.lr_decay_iters,
                                        lr_decay_style=t.lr_decay_style)
    progress = TrainProgress()
    d = cfg.data
    tokenizer = tokenizer_spec(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file) \
        if d.tokenizer_type else None
    state = TrainState(model, optimizer, scheduler, tracker, ps, progress, model_config_dict(tcfg), tokenizer)
    return TrainingSetup(model, tcfg, ddp, optimizer, scheduler, progress, state)

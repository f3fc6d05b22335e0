"""pretrain(): the generic training driver shared by GPT and BERT.

Entry points stay thin: they give a model provider, a datasets provider and a forward
step. Everything else — process groups, seeds, tokenizer, optimizer, checkpointer,
data position, logging — is built here from the typed config and passed explicitly.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.persistent import check_writable
from gemini_lm.checkpoint.protocol import Checkpointer
from gemini_lm.config import Config, num_micro_batches
from gemini_lm.data.samplers import micro_batches
from gemini_lm.data.tokenizer import build_tokenizer
from gemini_lm.errors import UsageError
from gemini_lm.gemini.topology import machine_id
from gemini_lm.log import get_logger, setup_logging
from gemini_lm.models.config import TransformerConfig, pad_vocab_size
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.utils import is_tensor_parallel
from gemini_lm.resilience.handler import FailureHandler
from gemini_lm.resilience.recovery_report import RecoveryReporter
from gemini_lm.training.checkpointing import PersistentCheckpointer
from gemini_lm.training.initialize import all_ranks_or_none, initialize_distributed
from gemini_lm.training.metrics import MetricsLogger
from gemini_lm.training.setup import build_training_setup
from gemini_lm.training.state import TrainState
from gemini_lm.training.step import evaluate, reduce_mean_over_dp, train_step

log = get_logger(__name__)


def build_tokenizer_and_data(cfg: Config):
    """The user's data and tokenizer, or the bundled sample corpus and its tokenizer."""
    d = cfg.data
    if d.data_path is None:
        from gemini_lm.data.sample_corpus import ensure_default_corpus

        corpus = ensure_default_corpus()
        d.data_path = corpus.data_prefix
        if d.tokenizer_type is None:
            d.tokenizer_type, d.tokenizer_model = "SentencePieceTokenizer", corpus.tokenizer_model
    if d.tokenizer_type is None:
        raise UsageError("--data-path needs --tokenizer-type (the tokenizer the data was encoded with)")
    tok = build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model,
                          vocab_file=d.vocab_file, merge_file=d.merge_file)
    return tok


def build_transformer_config(cfg: Config, vocab_size: int, tp_size: int, **overrides) -> TransformerConfig:
    m = cfg.model
    flags = {k: getattr(m, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                         "ffn_hidden_size", "hidden_dropout", "attention_dropout")
             if getattr(m, k) is not None}
    if m.max_position_embeddings is not None:
        flags["max_position_embeddings"] = m.max_position_embeddings
    elif m.seq_length is not None:
        flags["max_position_embeddings"] = m.seq_length
    padded = pad_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp_size)
    params_dtype = torch.bfloat16 if cfg.training.bf16 else torch.float16 if cfg.training.fp16 else torch.float32
    # orig_vocab_size: padding rows get no probability mass (they would otherwise skew the loss).
    tcfg = TransformerConfig.from_preset(m.model_size, padded, orig_vocab_size=vocab_size,
                                         init_method_std=m.init_method_std,
                                         params_dtype=params_dtype, **{**flags, **overrides})
    if m.seq_length is None:
        m.seq_length = tcfg.max_position_embeddings
    if m.seq_length > tcfg.max_position_embeddings:
        raise UsageError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                         f"{tcfg.max_position_embeddings}")
    tcfg.validate(tp_size)
    return tcfg


def default_job_id(cfg: Config) -> str:
    if cfg.gemini.gemini_job_id:
        return cfg.gemini.gemini_job_id
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ["TORCHELASTIC_RUN_ID"] != "none":
        return os.environ["TORCHELASTIC_RUN_ID"]
    # Same --log-dir ⇒ same job: a restarted `python pretrain_gpt.py` finds its memory.
    import hashlib

    return "job-" + hashlib.sha1(os.path.abspath(cfg.logging.log_dir).encode()).hexdigest()[:12]


def check_output_dirs(cfg: Config, ps) -> None:
    """--log-dir and --save must be writable: fail at start-up, not at the first write."""
    if ps.rank == 0:   # the only rank that logs; checked without creating anything
        existing = os.path.abspath(cfg.logging.log_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--log-dir {cfg.logging.log_dir}: {existing} is not a writable directory")
    if cfg.checkpoint.save:
        check_writable(cfg.checkpoint.save)


def build_checkpointer(cfg: Config, state: TrainState, ps) -> Checkpointer:
    if cfg.gemini.gemini:
        from gemini_lm.gemini.checkpointer import Checkpointer as GeminiCheckpointer

        return GeminiCheckpointer(cfg, state, ps, job_id=default_job_id(cfg))
    return PersistentCheckpointer(cfg, state, ps)


def pretrain(cfg: Config, model_provider: Callable, datasets_provider: Callable,
             forward_step: Callable) -> int:
    t_start = time.time()
    ps = initialize_distributed(cfg)
    setup_logging(ps.rank)
    # Built right after rendezvous (its construction time is "rendezvous done"): a peer
    # failure, a hang or SIGTERM from here on → record it and exit EXIT_RESTART.
    failures = FailureHandler(cfg.logging.log_dir, ps.rank, machine_id(), cfg.gemini.gemini_hang_timeout)
    t = cfg.training
    n_micro = num_micro_batches(cfg, ps.world_size)
    gbs = t.global_batch_size
    # Validation re-reads the same first batches each time; the test split is not used in training.
    num_samples = (t.train_iters * gbs, t.eval_iters * gbs if t.eval_interval else 0, 0)

    def read_inputs():
        c = cfg.checkpoint
        # --load equal to --save may not exist yet (the first run of a job); any other may not.
        if c.load and c.load != c.save and not os.path.isdir(c.load):
            raise UsageError(f"--load {c.load}: no such directory")
        tokenizer = build_tokenizer_and_data(cfg)
        tcfg = build_transformer_config(cfg, tokenizer.vocab_size, ps.tp_size)
        return tcfg, datasets_provider(cfg, tokenizer, num_samples)

    # Bad input fails here, on every rank alike, before anything is written anywhere.
    try:
        tcfg, (train_ds, valid_ds, _) = all_ranks_or_none(ps, read_inputs)
        tracker = model_parallel_seed(t.seed, ps)
        setup = build_training_setup(cfg, tcfg, model_provider, ps, tracker)
        all_ranks_or_none(ps, lambda: check_output_dirs(cfg, ps))
    except UsageError:
        # Nothing to flush or restart: torchrun's SIGTERM to a sibling that has not exited
        # yet must just end it, not record a failure and print a second line.
        failures.close()
        dist.destroy_process_group()   # every rank is here alike (all_ranks_or_none): leave quietly
        raise
    model, tcfg, ddp, state = setup.model, setup.config, setup.ddp, setup.state
    optimizer, scheduler, progress = setup.optimizer, setup.scheduler, setup.progress
    logger = MetricsLogger(cfg.logging.log_dir, enabled=ps.rank == 0,
                           wandb_project=cfg.logging.wandb_project,
                           wandb_exp_name=cfg.logging.wandb_exp_name,
                           wandb_save_dir=cfg.logging.wandb_save_dir,
                           run_id=default_job_id(cfg), config=cfg.to_dict())

    # The reporter completes the restore's recovery record after the first iteration.
    reporter = RecoveryReporter(logger.log_recovery, logger.metrics_path, cfg.logging.log_dir,
                                failures.rendezvous_done_at, enabled=ps.rank == 0)
    with failures.guard():
        checkpointer = build_checkpointer(cfg, state, ps)
        # Sets progress (iteration, consumed samples), weights, optimizer, RNG, ...
        reporter.restored(checkpointer.restore())
    failures.attach(checkpointer)
    failures.start_watchdog()
    start_iteration = progress.iteration
    # Shards count TP times, replicated parameters (LayerNorms, positions) once.
    nparams = sum(p.numel() * (ps.tp_size if is_tensor_parallel(p) else 1) for p in model.parameters())
    log.info(
        f"gemini_lm: world {ps.world_size} (TP {ps.tp_size} x DP {ps.dp_size}) on {ps.device}; "
        f"{tcfg.num_layers} layers, hidden {tcfg.hidden_size}, {nparams / 1e6:.2f}M params; "
        f"global batch {gbs} = {t.micro_batch_size} x {n_micro} micro x {ps.dp_size} DP; "
        f"iterations {start_iteration} -> {t.train_iters}; set-up {time.time() - t_start:.1f}s")

    data_iter = micro_batches(train_ds, progress.consumed_samples, t.micro_batch_size,
                              ps.dp_rank, ps.dp_size)
    valid_iter_factory = (lambda: micro_batches(valid_ds, 0, t.micro_batch_size, ps.dp_rank, ps.dp_size)) \
        if valid_ds is not None else (lambda: None)
    tokens_per_iter = gbs * cfg.model.seq_length
    window_t0, window_iters, window_loss = time.perf_counter(), 0, 0.0
    iteration = start_iteration
    clean = False
    try:
        while iteration < t.train_iters:
            iteration += 1
            t_iter = time.perf_counter()
            out = train_step(forward_step, data_iter, model, ddp, optimizer, scheduler, progress,
                             iteration=iteration, num_micro_batches=n_micro, global_batch_size=gbs,
                             ps=ps, before_update=checkpointer.before_update,
                             after_update=checkpointer.after_step)
            failures.progress(iteration)
            if iteration == start_iteration + 1:
                reporter.first_iteration_done(iteration)
            iter_time = time.perf_counter() - t_iter
            window_iters += 1
            window_loss = window_loss + out.loss.detach()
            if iteration % cfg.logging.log_interval == 0 or iteration == t.train_iters:
                # Megatron's reported loss: the mean over the log interval, not one noisy batch.
                loss = reduce_mean_over_dp(window_loss / window_iters, ps)
                elapsed = (time.perf_counter() - window_t0) / window_iters
                window_t0, window_iters, window_loss = time.perf_counter(), 0, 0.0
                record = {"iteration": iteration, "loss": loss, "lr": scheduler.get_lr(),
                          "iter_time_s": elapsed, "last_iter_time_s": iter_time,
                          "tokens_per_s": tokens_per_iter / elapsed, "grad_norm": out.grad_norm,
                          "loss_scale": out.loss_scale, "consumed_samples": progress.consumed_samples,
                          **checkpointer.stats()}
                if out.num_zeros_in_grad is not None:
                    record["num_zeros_in_grad"] = out.num_zeros_in_grad
                logger.log_iteration(record)
                eta = elapsed * (t.train_iters - iteration)
                log.info(f"iter {iteration:6d}/{t.train_iters} | loss {loss:.4f} | "
                               f"lr {record['lr']:.2e} | {elapsed * 1000:.0f} ms/it | "
                               f"{record['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s")
            if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.train_iters):
                val = evaluate(forward_step, valid_iter_factory, model, eval_iters=t.eval_iters,
                               num_micro_batches=n_micro, ps=ps)
                if val is not None:
                    logger.log_eval(iteration, {"loss": val})
                    log.info(f"validation at iter {iteration}: loss {val:.4f}")
            if t.exit_interval and iteration % t.exit_interval == 0:
                break
        clean = True
    except BaseException as exc:
        failures.handle(exc)   # a collective failure exits here, skipping the clean-up below
        raise
    finally:
        checkpointer.close(iteration, clean=clean)
        logger.close()
        failures.close()
    if dist.is_initialized():
        with peer_failures("final barrier"):
            dist.barrier()
        dist.destroy_process_group()
    return 0

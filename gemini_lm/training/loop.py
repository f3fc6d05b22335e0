"""pretrain(): the generic training driver shared by GPT and BERT.

Entry points stay thin: they give a model provider, a datasets provider and a forward
step. Everything else — process groups, seeds, tokenizer, optimizer, checkpointer,
data position, logging — is built here from the typed config and passed explicitly.

With GEMINI and in-place recovery (the default), the process that runs pretrain() is
its slot's supervisor: it loads everything once and trains in a forked child, which it
re-forks warm when it dies (resilience/supervisor.py). A training process that sees a
peer fail does not exit: it rejoins the next generation and rolls back in place
(training/inplace.py), and the loop goes on from the restored iteration.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from gemini_lm.checkpoint.protocol import Checkpointer
from gemini_lm.config import Config, num_micro_batches, training_world_size
from gemini_lm.data.samplers import micro_batches
from gemini_lm.errors import EXIT_REFORK, EXIT_RESTART, EXIT_UNSAVED, UsageError
from gemini_lm.gemini.topology import machine_id
from gemini_lm.log import ALL_RANKS, get_logger, setup_logging
from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.utils import is_tensor_parallel
from gemini_lm.resilience.events import record_failure
from gemini_lm.resilience.handler import FailureHandler, is_peer_failure
from gemini_lm.resilience.membership import StoreLost
from gemini_lm.resilience.recovery_report import RecoveryReporter
from gemini_lm.resilience.supervisor import ChildContext, Supervisor
from gemini_lm.training import report
from gemini_lm.training.checkpointing import PersistentCheckpointer
from gemini_lm.training.initialize import all_ranks_or_none, collective_timeout, initialize_distributed
from gemini_lm.training.inplace import ColdFallback, InPlace, publish_worker
from gemini_lm.training.inputs import (build_tokenizer_and_data, build_transformer_config, check_output_dirs,
                                       default_job_id)
from gemini_lm.training.metrics import MetricsLogger
from gemini_lm.training.setup import build_training_setup
from gemini_lm.training.state import TrainState
from gemini_lm.training.step import evaluate, reduce_mean_over_dp, train_step

log = get_logger(__name__)


def build_checkpointer(cfg: Config, state: TrainState, ps) -> Checkpointer:
    if cfg.gemini.gemini:
        from gemini_lm.gemini.checkpointer import Checkpointer as GeminiCheckpointer

        # The distributed optimizer's persistent saves gather over DP: the collective path's.
        persistent = PersistentCheckpointer(cfg, state, ps) \
            if cfg.parallel.use_distributed_optimizer and cfg.checkpoint.save else None
        return GeminiCheckpointer(cfg, state, ps, job_id=default_job_id(cfg), persistent=persistent)
    return PersistentCheckpointer(cfg, state, ps)


def pretrain(cfg: Config, model_provider: Callable, datasets_provider: Callable,
             forward_step: Callable) -> int:
    """Train; the exit code. Supervised (see the module doc) unless in-place recovery is off,
    GEMINI is off, or the caller already made the process group (then it trains here)."""
    g = cfg.gemini
    if not (g.gemini and g.gemini_inplace) or dist.is_initialized():
        return train(cfg, model_provider, datasets_provider, forward_step, None)
    supervisor = Supervisor(slot=int(os.environ.get("RANK", "0")), machine=machine_id(),
                            local_rank=int(os.environ.get("LOCAL_RANK", "0")), log_dir=cfg.logging.log_dir,
                            multi_rank=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    supervisor.start(collective_timeout(cfg))
    threads = warm_up()
    return supervisor.run(lambda ctx: train(cfg, model_provider, datasets_provider, forward_step, ctx,
                                            threads=threads))


def train(cfg: Config, model_provider: Callable, datasets_provider: Callable, forward_step: Callable,
          ctx: ChildContext | None, threads: int | None = None) -> int:
    """Set up and run the training loop in this process. `ctx`: this process is a
    supervisor's forked child (in-place recovery)."""
    t_start = time.time()
    inplace = None
    if ctx is not None:
        if threads:
            torch.set_num_threads(threads)   # the supervisor forks single-threaded (resilience/supervisor.py)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            inplace = InPlace(ctx, training_world_size(cfg), cfg.logging.log_dir, collective_timeout(cfg))
            try:
                if not inplace.start():
                    return 0   # training finished while this process waited as a spare
            except (ColdFallback, StoreLost) as exc:
                record_failure(cfg.logging.log_dir, cause="inplace_fallback", rank=-1, machine=ctx.machine,
                               iteration=0, detail=str(exc))
                return EXIT_RESTART
    marks = [("join", time.time())]   # set-up phases, printed with the first console line
    try:
        ps = initialize_distributed(cfg, inplace.init_process_group if inplace is not None else None)
    except RuntimeError as exc:
        if inplace is None or isinstance(exc, ColdFallback):
            raise
        # A peer lost while this generation formed its groups (a second failure during a
        # re-formation): nothing was trained in it; a warm re-fork joins the next one.
        record_failure(cfg.logging.log_dir, cause="collective_error", rank=inplace.rank, machine=ctx.machine,
                       iteration=max(ctx.status.get("iteration"), 0),
                       detail=f"{type(exc).__name__} forming generation {inplace.generation}'s groups: {exc}"[:500])
        return EXIT_REFORK
    marks.append(("groups", time.time()))
    setup_logging(ps.rank)
    # Built right after rendezvous (its construction time is "rendezvous done"): from here on
    # a peer failure, a hang or SIGTERM is recorded, then recovered in place or exited for.
    # A peer failure before the loop can recover in place (during set-up) re-forks this
    # process warm when it is supervised in a multi-rank job.
    failures = FailureHandler(cfg.logging.log_dir, ps.rank, machine_id(), cfg.gemini.gemini_hang_timeout,
                              status=ctx.status if ctx is not None else None,
                              exit_code=EXIT_REFORK if inplace is not None else EXIT_RESTART)
    # A process joining a running job (a warm replacement, an adopted spare): its peers
    # checked the inputs at the job's start and do not run those collectives again.
    joining = inplace is not None and inplace.generation > 0
    check_everywhere = (lambda ps_, fn: fn()) if joining else all_ranks_or_none
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
        tcfg, (train_ds, valid_ds, _) = check_everywhere(ps, read_inputs)
        marks.append(("data", time.time()))
        tracker = model_parallel_seed(t.seed, ps)
        setup = build_training_setup(cfg, tcfg, model_provider, ps, tracker)
        check_everywhere(ps, lambda: check_output_dirs(cfg, ps))
        marks.append(("model", time.time()))
    except UsageError:
        # Nothing to flush or restart: torchrun's SIGTERM to a sibling that has not exited
        # yet must just end it, not record a failure and print a second line.
        failures.close()
        dist.destroy_process_group()   # every rank is here alike (all_ranks_or_none): leave quietly
        raise
    if inplace is not None:
        inplace.publish()
    elif ctx is not None:
        publish_worker(cfg.logging.log_dir, ctx, ps.rank, 0)   # a world of one
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
        marks.append(("checkpointer", time.time()))
        # Sets progress (iteration, consumed samples), weights, optimizer, RNG, ...
        record = checkpointer.restore()
        marks.append(("restore", time.time()))
    if record is not None and ctx is not None and (ctx.incarnation > 0 or joining):
        # a warm replacement: no Python restart, the survivors (if any) kept going
        record.update(path="inplace", reformed_at=failures.rendezvous_done_at,
                      generation=getattr(inplace, "generation", None))
    reporter.restored(record)
    if ps.rank == 0:
        report.run_started(cfg.logging.log_dir)
    failures.attach(checkpointer)
    failures.start_watchdog()
    if inplace is not None:
        inplace.training()
    start_iteration = progress.iteration
    # Shards count TP times, replicated parameters (LayerNorms, positions) once.
    nparams = sum(p.numel() * (ps.tp_size if is_tensor_parallel(p) else 1) for p in model.parameters())
    log.info(
        f"gemini_lm: world {ps.world_size} (TP {ps.tp_size} x DP {ps.dp_size}) on {ps.device}; "
        f"{tcfg.num_layers} layers, hidden {tcfg.hidden_size}, {nparams / 1e6:.2f}M params; "
        f"global batch {gbs} = {t.micro_batch_size} x {n_micro} micro x {ps.dp_size} DP; "
        f"iterations {start_iteration} -> {t.train_iters}; set-up {time.time() - t_start:.2f}s ("
        + ", ".join(f"{name} {b - a:.2f}" for (_, a), (name, b) in zip(marks, marks[1:])) + ")")
    log.info(report.outputs_line(cfg, checkpointer.memory_store()))
    for note in cfg.notes:
        log.info(f"note: {note}")   # an accepted value that changes behaviour is said once

    def train_iter():
        return micro_batches(train_ds, progress.consumed_samples, t.micro_batch_size, ps.dp_rank, ps.dp_size)
    data_iter = train_iter()
    valid_iter_factory = (lambda: micro_batches(valid_ds, 0, t.micro_batch_size, ps.dp_rank, ps.dp_size)) \
        if valid_ds is not None else (lambda: None)
    tokens_per_iter = gbs * cfg.model.seq_length
    window_t0, window_iters, window_loss = time.perf_counter(), 0, 0.0
    iteration = first_iteration = start_iteration
    last_loss = last_val = None   # for the summary at the end
    clean, unsaved = False, None
    try:
        while iteration < t.train_iters:
            try:
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
                    last_loss = loss
                    eta = elapsed * (t.train_iters - iteration)
                    log.info(f"iter {iteration:6d}/{t.train_iters} | loss {loss:.4f} | "
                             f"lr {record['lr']:.2e} | {elapsed * 1000:.0f} ms/it | "
                             f"{record['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s")
                if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.train_iters):
                    val = evaluate(forward_step, valid_iter_factory, model, eval_iters=t.eval_iters,
                                   num_micro_batches=n_micro, ps=ps)
                    if val is not None:
                        logger.log_eval(iteration, {"loss": val})
                        last_val = val
                        log.info(f"validation at iter {iteration}: loss {val:.4f}")
                if t.exit_interval and iteration % t.exit_interval == 0:
                    break
            except BaseException as exc:
                if inplace is None or not is_peer_failure(exc):
                    raise
                try:
                    reporter.restored(recover_in_place(exc, inplace, ps, ddp, checkpointer, failures,
                                                       cfg.logging.log_dir))
                except (ColdFallback, StoreLost) as why:
                    failures.exit_code = EXIT_RESTART   # the full restart, for every worker
                    failures.fail("inplace_fallback", f"{exc!r}; in-place recovery gave up: {why}")
                # Rolled back: every counter, the data position and the log window restart there.
                iteration = start_iteration = progress.iteration
                data_iter = train_iter()
                window_t0, window_iters, window_loss = time.perf_counter(), 0, 0.0
                inplace.training()
        ddp.finish_param_sync()   # --overlap-param-gather: the final params are whole before the close
        clean = True
        if inplace is not None:
            inplace.finish()
    except BaseException as exc:
        failures.handle(exc)   # a collective failure exits here, skipping the clean-up below
        raise
    finally:
        unsaved = checkpointer.close(iteration, clean=clean)
        logger.close()
        failures.close()
    if dist.is_initialized():
        with peer_failures("final barrier"):
            dist.barrier()
        dist.destroy_process_group()
    if unsaved:   # every rank exits non-zero: the run is not done until its state is on disk
        if ps.rank == 0:
            print(f"error: {unsaved}", file=sys.stderr, flush=True)
        return EXIT_UNSAVED
    if ps.rank == 0:
        report.run_finished(cfg, first_iteration=first_iteration, iteration=iteration, started_at=t_start,
                            loss=last_loss, valid_loss=last_val, memory=checkpointer.memory_store())
    return 0


def recover_in_place(exc: BaseException, inplace: InPlace, ps, ddp, checkpointer, failures, log_dir: str) -> dict:
    """A peer failed: drop this generation's groups, join the next with the same rank, re-form
    and roll back from memory. The recovery record (the restore's, with the re-formation's
    timestamps). Another failure meanwhile starts over with the generation after."""
    detected_at = time.time()
    record_failure(log_dir, cause="collective_error", rank=ps.rank, machine=machine_id(),
                   iteration=failures.iteration, detail=f"{type(exc).__name__}: {exc}; recovering in place")
    log.warning(f"{type(exc).__name__} after iteration {failures.iteration}: recovering in place", extra=ALL_RANKS)
    while True:
        failures.restarted_clock(ps.rank)
        checkpointer.abandon()
        ddp.abandon_grad_sync()
        ddp.abandon_param_sync()   # waited for, or failed with its peer, before its group goes
        ps.drop_groups()
        if dist.is_initialized():
            if "nccl" in str(dist.get_backend()):
                # NCCL communicators may still wait on the dead peer: abort them first, or
                # destroying them waits for their timeout. (gloo has nothing to abort.)
                abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                if abort is not None:
                    abort()
            dist.destroy_process_group()
        aborted_at = time.time()
        timing = inplace.rejoin()
        try:
            inplace.reinit_process_group()
            ps.rebuild_groups()
            reformed_at = time.time()
            record = checkpointer.reform()
            break
        except BaseException as again:  # noqa: BLE001 - a second failure during the re-formation
            if not is_peer_failure(again):
                raise
            log.warning(f"{type(again).__name__} during the re-formation: once more", extra=ALL_RANKS)
    failures.restarted_clock(ps.rank)
    record.update(path="inplace", detected_at=detected_at, aborted_at=aborted_at, reformed_at=reformed_at,
                  **timing)
    return record


def warm_up() -> int:
    """Before the first fork: load what a training process needs, so a re-forked one starts
    warm, and run a tiny step on one thread (a forked child must not inherit a thread pool).
    The intra-op thread count the children should restore."""
    import importlib

    import torch.nn.functional as F

    from gemini_lm.training.adamw import ForeachAdamW

    importlib.import_module("gemini_lm.gemini.checkpointer")   # what build_checkpointer imports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(2, 2, 4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    y = F.scaled_dot_product_attention(x @ w, x, x, is_causal=True)
    F.cross_entropy(y.reshape(-1, 8), torch.zeros(y.numel() // 8, dtype=torch.long)).backward()
    opt = ForeachAdamW([{"params": [w], "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    return threads

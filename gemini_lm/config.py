"""Typed configuration: dataclass sections whose fields become Megatron-style flags.

Every field `foo_bar` of a section is the flag `--foo-bar`; booleans defaulting to False
are `--foo-bar`, booleans defaulting to True are `--no-foo-bar` (their help says what the
`--no-` flag does). `parse_config()` builds the parser from the dataclasses, so a flag and
its field can never drift apart, then validates the combination and raises `UsageError`
(one line, exit 2 in the entry point). A help that states its own default ("(default: ...)")
is shown as written; otherwise the default is appended, unless it is None or a flag's.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable

from gemini_lm.errors import HelpFormatter, UsageArgumentParser, UsageError
from gemini_lm.flag_bounds import check_bounds
from gemini_lm.models.config import MODEL_PRESETS, TransformerConfig


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _from_preset(name: str) -> str:
    """'from --model-size: tiny 4, gpt2 12, ...': a size's default, read from the presets."""
    return "from --model-size: " + ", ".join(f"{size} {preset[name]}" for size, preset in MODEL_PRESETS.items())


def _model_default(name: str):
    return next(f.default for f in dataclasses.fields(TransformerConfig) if f.name == name)


@dataclass
class ModelConfig:
    model_size: str = _f("tiny", "preset for the sizes not given", choices=list(MODEL_PRESETS))
    num_layers: int | None = _f(None, f"transformer layers (default: {_from_preset('num_layers')})")
    hidden_size: int | None = _f(None, f"hidden size (default: {_from_preset('hidden_size')})")
    num_attention_heads: int | None = _f(None, f"attention heads (default: {_from_preset('num_attention_heads')})")
    ffn_hidden_size: int | None = _f(None, "MLP hidden size (default: 4 x --hidden-size)")
    seq_length: int | None = _f(None, "tokens per sample (default: --max-position-embeddings)")
    max_position_embeddings: int | None = _f(None, "position table size (default: --seq-length if given, "
                                                   f"else {_from_preset('max_position_embeddings')})")
    hidden_dropout: float | None = _f(None, f"dropout on hidden states (default: {_model_default('hidden_dropout')})")
    attention_dropout: float | None = _f(None, "dropout on attention probabilities "
                                               f"(default: {_model_default('attention_dropout')})")
    init_method_std: float = _f(0.02, "std of the normal weight init")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this times TP")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "ranks sharing each layer (consecutive ranks)", job=True)
    distributed_backend: str = _f("auto", "auto = nccl on CUDA, gloo on CPU", choices=["auto", "gloo", "nccl"])
    device: str = _f("auto", "auto = cuda when available", choices=["auto", "cpu", "cuda"])
    distributed_timeout_minutes: float = _f(10.0, "collective timeout (Megatron's flag)")
    distributed_timeout_seconds: float | None = _f(None, "seconds-level override, so a dead peer is noticed fast")
    use_distributed_optimizer: bool = _f(False, "shard the fp32 masters and Adam moments over data-parallel "
                                                "ranks (ZeRO-1)")
    overlap_param_gather: bool = _f(False, "with --use-distributed-optimizer: all-gather the updated params "
                                           "asynchronously, waited for at the next forward")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(4, "samples per micro-batch per data-parallel rank")
    global_batch_size: int | None = _f(None, "samples per iteration (default: --micro-batch-size x data-parallel size)")
    train_iters: int = _f(300, "iterations to train")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of decay")
    lr_decay_style: str = _f("cosine", "decay after warmup", choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = _f(30, "linear warmup iterations")
    lr_decay_iters: int | None = _f(None, "decay length (default: --train-iters)")
    weight_decay: float = _f(0.1, "AdamW decay (not on biases and norms)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    log_num_zeros_in_grad: bool = _f(False, "log the number of zero gradient entries", job=False)
    bf16: bool = _f(False, "bf16 params with fp32 master weights")
    fp16: bool = _f(False, "fp16 params, fp32 masters, dynamic loss scaling")
    loss_scale: float | None = _f(None, "static loss scale for fp16 (default: dynamic)")
    initial_loss_scale: float = _f(2.0 ** 16, "initial dynamic loss scale")
    seed: int = _f(1234, "seed for weights, dropout and data order")
    eval_interval: int = _f(100, "validate every this many iterations (0 = never)", job=False)
    eval_iters: int = _f(5, "validation iterations", job=False)
    exit_interval: int | None = _f(None, "stop after an iteration divisible by this", job=False)


@dataclass
class DataConfig:
    data_path: str | None = _f(None, "prefix of a .bin/.idx pair, or either file (default: the bundled sample corpus)")
    split: str = _f("969,30,1", "train,valid,test weights")
    tokenizer_type: str | None = _f(None, "SentencePieceTokenizer | HuggingFaceTokenizer | GPT2BPETokenizer | "
                                           "ByteLevelTokenizer (default: the bundled corpus's; needed with --data-path)")
    tokenizer_model: str | None = _f(None, "sentencepiece model file or Hugging Face tokenizer directory")
    vocab_file: str | None = _f(None, "GPT-2 BPE vocab.json")
    merge_file: str | None = _f(None, "GPT-2 BPE merges.txt")


@dataclass
class CheckpointConfig:
    save: str | None = _f(None, "directory for persistent checkpoints")
    load: str | None = _f(None, "directory to resume from (default: --save)")
    save_interval: int | None = _f(None, "persist every this many iterations")
    save_keep: int | None = _f(None, "keep only the newest K persistent checkpoints")
    async_save: bool = _f(False, "without GEMINI: copy the state to a CPU buffer at the save point and write it "
                                 "in the background (GEMINI's persister always does)")
    persistent_bandwidth_mbs: float | None = _f(None, "pace every read and write of persistent shard files to "
                                                      "this many MB/s per process: models remote storage for "
                                                      "benchmarks (default: the disk's own speed; 0 = the same)")


@dataclass
class LoggingConfig:
    log_dir: str | None = _f(None, "metrics.jsonl, recovery.jsonl and console logs go here (default: "
                                   "runs/<script>-<hash of the model, data and training flags>: one directory "
                                   "per job, found again when the same command is rerun)")
    log_interval: int = _f(10, "log every this many iterations")
    wandb_project: str | None = _f(None, "log to this wandb project (offline unless wandb is configured)")
    wandb_exp_name: str | None = _f(None, "wandb run name")
    wandb_save_dir: str | None = _f(None, "wandb writes its files under <this>/wandb (default: --log-dir)")


@dataclass
class GeminiConfig:
    gemini: bool = _f(True, "turn GEMINI off: no in-memory checkpoints (without this flag, one every "
                            "--gemini-interval iterations)")
    gemini_interval: int = _f(1, "iterations between in-memory checkpoints")
    gemini_store_dir: str = _f("/dev/shm/gemini_lm", "root of the shared-memory store")
    gemini_job_id: str | None = _f(None, "job id (default: torchrun's run id, else from --log-dir)")
    gemini_keep_store: bool = _f(False, "keep the in-memory store after a clean finish")
    gemini_replicas: int = _f(2, "copies of each checkpoint (own machine + m-1 peers)")
    gemini_placement: str = _f("auto", "holder placement", choices=["auto", "group", "ring", "mixed"])
    gemini_hang_timeout: float = _f(120.0, "seconds without progress before the watchdog ends the step (0 = never)")
    gemini_inplace: bool = _f(True, "recover by restarting every process through torchrun (without this "
                                    "flag, survivors recover in place and a warm process replaces a dead one)")
    gemini_spares: int = _f(0, "machines of the launch that wait as warm spares for a lost machine "
                               "(the last ones by torchrun node rank)")
    gemini_interleave: str = _f("on", "send checkpoint traffic in idle gaps (off = eagerly)", choices=["on", "off"])
    gemini_profile_iters: int = _f(20, "iterations profiled before replication is scheduled")
    gemini_replication_interval: int = _f(0, "replicate every N-th snapshot (0 = auto: the smallest N "
                                             "whose traffic fits in the iterations between)")
    gemini_buffer_mb: float = _f(128.0, "reserved transfer buffer, MiB (per route with --gemini-transport nccl); "
                                        "checkpoint chunks are a sub-buffer's size")
    gemini_sub_buffers: int = _f(4, "sub-buffers of the transfer buffer: at most this many chunks of a route "
                                    "travel in one gap (pipelining)")
    gemini_gap_safety: float = _f(0.8, "fraction of each idle gap that may be used")
    gemini_transport: str = _f("auto", "checkpoint payload path between machines: nccl = GPU to GPU "
                                       "through the reserved GPU buffer, gloo = host to host, gloo-staged = "
                                       "nccl's staged code on host memory over gloo (auto: gloo)",
                               choices=["auto", "gloo", "nccl", "gloo-staged"])


# The help's group title of each section.
TITLES = {"model": "model", "parallel": "parallelism", "training": "training", "data": "data and tokenizer",
          "checkpoint": "persistent checkpoints", "logging": "logging", "gemini": "GEMINI in-memory checkpoints"}

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "training": TrainingConfig,
            "data": DataConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "gemini": GeminiConfig}


@dataclass
class Config:
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    gemini: GeminiConfig
    extra: dict = field(default_factory=dict)   # entry-point specific flags
    notes: list = field(default_factory=list)   # values adapted rather than refused: echoed at start

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag_type(annotation) -> type:
    """`int`, `float`, `str` or `bool` from a field's annotation (`X | None` gives X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _add_dataclass_args(parser: argparse.ArgumentParser, title: str, cls,
                        only: dict[str, str | None] | None) -> None:
    # A tool's few flags need no section titles ("training" over a lone --seed misleads).
    group = parser.add_argument_group(title) if only is None else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = (only or {}).get(f.name) or f.metadata.get("help", "")
        kind = _flag_type(hints[f.name])
        if kind is bool:
            if f.default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                   action="store_false", help=help_)
            else:
                group.add_argument(flag, dest=f.name, action="store_true", help=help_)
            continue
        group.add_argument(flag, dest=f.name, type=kind, default=f.default,
                           choices=f.metadata.get("choices"), help=help_)


def build_parser(extra_args_provider: Callable | None = None, prog: str | None = None,
                 only: dict[str, str | None] | None = None,
                 description: str = "gemini_lm pretraining") -> argparse.ArgumentParser:
    """`only`: the fields a tool uses, each with its help there (None: the field's own),
    listed untitled; the other fields are no flags and keep their defaults."""
    # usage: one line; the help lists every flag below it
    parser = UsageArgumentParser(prog=prog, usage="%(prog)s [options]", description=description,
                                 formatter_class=HelpFormatter)
    for name, cls in SECTIONS.items():
        _add_dataclass_args(parser, TITLES[name], cls, only)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


# Sections whose fields define the job (a field's metadata `job` overrides its section's).
JOB_SECTIONS = ("model", "data", "training")
_PATH_FIELDS = ("data_path", "tokenizer_model", "vocab_file", "merge_file")


def job_log_dir(entry: str, values: dict) -> str:
    """runs/<entry>-<8 hex>: the default --log-dir, from the flags that define the job (model,
    data, training, TP size) as given, so another model, data set or entry point is another
    job, while rerunning the same command finds its directory (and, through it, its memory
    store: the GEMINI job id derives from --log-dir). `values`: field name -> parsed value."""
    job = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("job", name in JOB_SECTIONS) and f.name in values:
                v = values[f.name]
                job[f.name] = os.path.abspath(v) if f.name in _PATH_FIELDS and v is not None else v
    digest = hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{entry}-{digest}")


def default_log_dir(script: str, argv: list[str]) -> str:
    """The --log-dir `script` (e.g. pretrain_gpt.py) would take with `argv` (its flags; a
    launcher that must know it, such as tools/local_cluster.py)."""
    ns, _ = build_parser().parse_known_args(argv)
    if ns.log_dir is not None:
        return ns.log_dir
    return job_log_dir(os.path.splitext(os.path.basename(script))[0], vars(ns))


def parse_config(argv: list[str] | None = None, extra_args_provider: Callable | None = None,
                 world_size: int | None = None, only: dict[str, str | None] | None = None,
                 description: str = "gemini_lm pretraining") -> Config:
    parser = build_parser(extra_args_provider, prog=os.path.basename(sys.argv[0]), only=only,
                          description=description)
    ns = vars(parser.parse_args(argv))
    if "log_dir" in ns and ns["log_dir"] is None:   # from the flags as given, before validation fills any in
        ns["log_dir"] = job_log_dir(os.path.splitext(os.path.basename(sys.argv[0]))[0], ns)
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**{f.name: ns.pop(f.name) for f in dataclasses.fields(cls) if f.name in ns})
    cfg = Config(**sections, extra=ns)
    if world_size is None:
        world_size = training_world_size(cfg)
    validate(cfg, world_size)
    return cfg


def training_world_size(cfg: Config) -> int:
    """The ranks that train: the launch's (torchrun WORLD_SIZE) minus the spare machines' slots."""
    g = cfg.gemini
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if g.gemini_spares < 0:
        raise UsageError("--gemini-spares must be >= 0")
    if g.gemini_spares and not (g.gemini and g.gemini_inplace):
        raise UsageError("--gemini-spares needs in-place recovery (GEMINI on, no --no-gemini-inplace)")
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    machines = launched // per_machine
    if g.gemini_spares >= machines:
        raise UsageError(f"--gemini-spares {g.gemini_spares}: the launch has {machines} machine(s) "
                         f"(torchrun --nnodes) of {per_machine} process(es); at least one must train")
    return launched - g.gemini_spares * per_machine


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need only the flags and the world size; model checks live with the model."""
    check_bounds({name: getattr(cfg, name) for name in SECTIONS})   # every number in its range
    p, t = cfg.parallel, cfg.training
    tp = p.tensor_model_parallel_size
    if tp < 1 or world_size % tp:
        hint = f" (launch ranks with torchrun --nproc-per-node {tp})" if world_size == 1 and tp > 1 else ""
        raise UsageError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}{hint}")
    dp = world_size // tp
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UsageError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                         f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
    if t.bf16 and t.fp16:
        raise UsageError("--bf16 and --fp16 are mutually exclusive")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise UsageError("--overlap-param-gather needs --use-distributed-optimizer")
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters
    if t.lr_warmup_iters > t.lr_decay_iters:
        cfg.notes.append(f"--lr-warmup-iters {t.lr_warmup_iters} > --lr-decay-iters {t.lr_decay_iters}: "
                         f"warmup shortened to {t.lr_decay_iters}")
        t.lr_warmup_iters = t.lr_decay_iters
    try:
        weights = [float(x) for x in cfg.data.split.replace("/", ",").split(",")]
    except ValueError:
        raise UsageError(f"--split {cfg.data.split!r}: expected comma-separated numbers like 969,30,1") from None
    if len(weights) > 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--split {cfg.data.split!r}: expected up to three non-negative weights")
    if weights[0] == 0:
        raise UsageError(f"--split {cfg.data.split!r} leaves nothing to train on (the first weight is 0)")
    c = cfg.checkpoint
    if c.load is None:
        c.load = c.save
    if c.save_interval is not None and not c.save:
        raise UsageError("--save-interval needs --save")
    if c.async_save and not c.save:
        raise UsageError("--async-save needs --save")


def dp_size(cfg: Config, world_size: int) -> int:
    return world_size // cfg.parallel.tensor_model_parallel_size


def num_micro_batches(cfg: Config, world_size: int) -> int:
    t = cfg.training
    return t.global_batch_size // (t.micro_batch_size * dp_size(cfg, world_size))

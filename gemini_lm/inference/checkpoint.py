"""Model weights out of a persisted checkpoint, at any TP size, for inference and export.

A checkpoint holds one safetensors file per TP shard; its metadata carries the model's
TransformerConfig. `read_full_model_state` reads every shard and unshards each parameter
with its partition_dim/stride (taken from a TP=1 model of the same config: the sharding
attributes do not depend on the TP size), so a checkpoint written at TP=N can be served
or exported at any other TP size.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from gemini_lm.checkpoint.persistent import latest_iteration, read_manifest, read_shard
from gemini_lm.errors import UsageError
from gemini_lm.models.bert import BertModel
from gemini_lm.models.config import TransformerConfig, pad_vocab_size
from gemini_lm.models.gpt import GPTModel
from gemini_lm.parallel.random import RNGStatesTracker
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import is_tensor_parallel, unshard_tensors

MODEL_PREFIX = "model/"


def single_process_state(tp_rank: int = 0, tp_size: int = 1,
                         device: torch.device | str = "cpu") -> ParallelState:
    """A ParallelState without process groups: for building (not running) shard tp_rank."""
    return ParallelState(rank=tp_rank, world_size=tp_size, tp_size=tp_size, tp_rank=tp_rank,
                         dp_size=1, dp_rank=0, tp_group=None, dp_group=None,
                         tp_ranks=list(range(tp_size)), dp_ranks=[tp_rank], device=torch.device(device))


def config_from_metadata(metadata: dict[str, str]) -> TransformerConfig:
    try:
        fields = json.loads(metadata["model_config"])
    except (KeyError, ValueError):
        raise UsageError("checkpoint metadata has no readable model_config") from None
    fields["params_dtype"] = getattr(torch, str(fields.get("params_dtype", "torch.float32")).split(".")[-1])
    return TransformerConfig(**fields)


def is_bert(config: TransformerConfig) -> bool:
    return config.post_layer_norm


def build_model(config: TransformerConfig, ps: ParallelState,
                tracker: RNGStatesTracker | None = None) -> nn.Module:
    """GPTModel or BertModel, whichever the config describes."""
    return (BertModel if is_bert(config) else GPTModel)(config, ps, tracker)


def read_full_model_state(load_dir: str, iteration: int | None = None
                          ) -> tuple[dict[str, torch.Tensor], TransformerConfig, int]:
    """(full, unsharded parameters by our names, the model config, the iteration) of the
    newest checkpoint in `load_dir` (or of `iteration`)."""
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            raise UsageError(f"--load {load_dir}: no checkpoint there "
                             "(no latest_checkpointed_iteration.txt)")
    tp_size = int(read_manifest(load_dir, iteration)["tp_size"])
    shards = []
    config = None
    for tp_rank in range(tp_size):
        tensors, metadata = read_shard(load_dir, iteration, tp_rank, tp_size)
        if config is None:
            config = config_from_metadata(metadata)
        shards.append({k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)})
    reference = build_model(config, single_process_state())   # sharding attributes only
    full = {}
    for name, param in reference.named_parameters():
        if name not in shards[0]:
            raise UsageError(f"checkpoint {load_dir} iteration {iteration} lacks model/{name}")
        parts = [s[name] for s in shards]
        full[name] = (unshard_tensors(parts, param.partition_dim, param.partition_stride)
                      if is_tensor_parallel(param) and tp_size > 1 else parts[0].clone())
    return full, config, iteration


_VOCAB_PARALLEL = ("wte.weight", "word_embeddings.weight", "lm_head.bias")


def fit_vocab_to_tp(full: dict[str, torch.Tensor], config: TransformerConfig, tp_size: int
                    ) -> tuple[dict[str, torch.Tensor], TransformerConfig]:
    """Zero rows appended to the vocab-parallel tensors so they split over `tp_size` ranks
    (a checkpoint padded for another TP size may not); rows past orig_vocab_size are
    padding whose logits are masked, so the model computes the same function."""
    vocab = pad_vocab_size(config.vocab_size, 1, tp_size)
    if vocab == config.vocab_size:
        return full, config
    full = dict(full)
    for name in _VOCAB_PARALLEL:
        if name in full:
            t = full[name]
            full[name] = torch.cat([t, t.new_zeros(vocab - t.size(0), *t.shape[1:])])
    orig = config.orig_vocab_size or config.vocab_size
    return full, dataclasses.replace(config, vocab_size=vocab, orig_vocab_size=orig)


def recorded_tokenizer(load_dir: str, iteration: int | None = None) -> dict | None:
    """The tokenizer spec (data.tokenizer.tokenizer_spec) the checkpoint's manifest records,
    if any (checkpoints written before it was recorded have none)."""
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            return None
    spec = read_manifest(load_dir, iteration).get("tokenizer")
    return spec if isinstance(spec, dict) and spec.get("tokenizer_type") else None


def build_tool_tokenizer(tokenizer_type: str | None, tokenizer_model: str | None = None,
                         vocab_file: str | None = None, merge_file: str | None = None,
                         recorded: dict | None = None):
    """The tokenizer a checkpoint was trained with: as flagged; else (no --tokenizer-type)
    the one the checkpoint records; else the bundled sample corpus's, which pretraining
    uses without --data-path."""
    from gemini_lm.data.tokenizer import build_tokenizer

    if tokenizer_type is None and recorded is not None:
        missing = [p for p in (recorded.get("tokenizer_model"), recorded.get("vocab_file"),
                               recorded.get("merge_file")) if p and os.path.isabs(p) and not os.path.exists(p)]
        if missing:
            raise UsageError(f"the checkpoint was trained with a {recorded['tokenizer_type']} from {missing[0]}, "
                             "which is gone; pass the tokenizer (--tokenizer-type ...)")
        return build_tokenizer(recorded["tokenizer_type"], tokenizer_model=recorded.get("tokenizer_model"),
                               vocab_file=recorded.get("vocab_file"), merge_file=recorded.get("merge_file"))
    if tokenizer_type is None:
        from gemini_lm.data.sample_corpus import ensure_default_corpus

        corpus = ensure_default_corpus()
        tokenizer_type, tokenizer_model = corpus.tokenizer_type, corpus.tokenizer_model
    return build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model,
                           vocab_file=vocab_file, merge_file=merge_file)


def check_tokenizer_fits(tokenizer, config: TransformerConfig) -> None:
    vocab = config.orig_vocab_size or config.vocab_size
    if tokenizer.vocab_size != vocab:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model was trained "
                         f"with {vocab}; pass the tokenizer it was trained with (--tokenizer-type ...)")

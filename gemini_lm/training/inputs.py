"""What a run is built from: its data and tokenizer, its model's config, its job id, and
the checks of its outputs, all from the typed config."""
from __future__ import annotations

import hashlib
import os

import torch

from gemini_lm.checkpoint.persistent import check_writable
from gemini_lm.config import Config
from gemini_lm.data.indexed_dataset import check_vocabulary
from gemini_lm.data.tokenizer import build_tokenizer
from gemini_lm.errors import UsageError
from gemini_lm.models.config import TransformerConfig, pad_vocab_size


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
    check_vocabulary(d.data_path, tok.vocab_size, d.tokenizer_type)   # and the index, at open
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

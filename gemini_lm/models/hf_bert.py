"""Weights between our BertModel and Hugging Face's BertForPreTraining (full tensors;
`hf_gpt2.full_state_dict` / `load_full_state_dict` move between full tensors and TP shards).

Both use nn.Linear's [out, in] layout, so weights map without transposes. Our fused QKV
weight is [Wq; Wk; Wv] (see transformer.ParallelAttention), HF keeps query, key and
value apart. The MLM decoder is tied to the word embedding in both; its bias is our
lm_head.bias (HF stores it twice: cls.predictions.bias and .decoder.bias, one tensor).
Our word embedding and output bias have padded vocab rows that HF does not.
"""
from __future__ import annotations

import torch

from gemini_lm.errors import UsageError
from gemini_lm.models.bert import NUM_TOKENTYPES
from gemini_lm.models.config import TransformerConfig, pad_vocab_size

_LAYER_MAP = {   # our suffix -> HF suffix, per layer; QKV is handled apart
    "self_attention.dense.weight": "attention.output.dense.weight",
    "self_attention.dense.bias": "attention.output.dense.bias",
    "post_attention_layernorm.weight": "attention.output.LayerNorm.weight",
    "post_attention_layernorm.bias": "attention.output.LayerNorm.bias",
    "mlp.dense_h_to_4h.weight": "intermediate.dense.weight",
    "mlp.dense_h_to_4h.bias": "intermediate.dense.bias",
    "mlp.dense_4h_to_h.weight": "output.dense.weight",
    "mlp.dense_4h_to_h.bias": "output.dense.bias",
    "output_layernorm.weight": "output.LayerNorm.weight",
    "output_layernorm.bias": "output.LayerNorm.bias",
}
_GLOBAL_MAP = {
    "word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "tokentype_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embedding_layernorm.weight": "bert.embeddings.LayerNorm.weight",
    "embedding_layernorm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layernorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layernorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
    "binary_head.weight": "cls.seq_relationship.weight",
    "binary_head.bias": "cls.seq_relationship.bias",
}
_QKV = ("query", "key", "value")
_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}
_HF_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def _layer_names(i: int) -> tuple[str, str]:
    return f"transformer.layers.{i}.", f"bert.encoder.layer.{i}."


def bert_state_to_hf(full_state: dict[str, torch.Tensor], config: TransformerConfig,
                     orig_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our full state -> BertForPreTraining state (tied tensors shared, as HF has them).
    Vocab rows beyond `orig_vocab_size` (default config.orig_vocab_size) are dropped."""
    vocab = orig_vocab_size or config.orig_vocab_size or config.vocab_size
    if vocab > config.vocab_size:
        raise UsageError(f"vocab size {vocab} exceeds the model's {config.vocab_size}")
    try:
        hf = {theirs: full_state[ours].clone() for ours, theirs in _GLOBAL_MAP.items()}
        for i in range(config.num_layers):
            ours, theirs = _layer_names(i)
            hf.update({theirs + t: full_state[ours + o].clone() for o, t in _LAYER_MAP.items()})
            for kind in ("weight", "bias"):
                q, k, v = full_state[f"{ours}self_attention.query_key_value.{kind}"].chunk(3)
                for name, part in zip(_QKV, (q, k, v)):
                    hf[f"{theirs}attention.self.{name}.{kind}"] = part.clone()
    except KeyError as exc:
        raise UsageError(f"BERT state lacks {exc.args[0]}") from None
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
        hf[name] = hf[name][:vocab].clone()
    for tied, source in _TIED.items():
        hf[tied] = hf[source]
    return hf


def _normalize_hf_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints call LayerNorm parameters gamma/beta."""
    out = {}
    for k, v in hf_state.items():
        if k.endswith(".gamma"):
            k = k[:-len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[:-len("beta")] + "bias"
        out[k] = v
    return out


def hf_to_bert_state(hf_state: dict[str, torch.Tensor],
                     config: TransformerConfig) -> dict[str, torch.Tensor]:
    """BertForPreTraining state -> our full state, vocab padded with zero rows."""
    hf_state = _normalize_hf_names(hf_state)
    for tied, source in _TIED.items():   # tied tensors are often stored once
        if tied in hf_state and source in hf_state and not torch.equal(hf_state[tied], hf_state[source]):
            raise UsageError(f"{tied} is not tied to {source}; BertModel ties them")
    expected = set(_GLOBAL_MAP.values())
    for i in range(config.num_layers):
        _, theirs = _layer_names(i)
        expected |= {theirs + t for t in _LAYER_MAP.values()}
        expected |= {f"{theirs}attention.self.{n}.{k}" for n in _QKV for k in ("weight", "bias")}
    known = expected | set(_TIED) | set(_HF_BUFFERS)
    missing = sorted(expected - hf_state.keys())
    unexpected = sorted(k for k in hf_state if k not in known)
    if missing or unexpected:
        raise UsageError(f"HF BERT state does not match a {config.num_layers}-layer "
                         f"BertForPreTraining: missing {missing[:3]}, unexpected {unexpected[:3]}")
    full = {ours: hf_state[theirs].clone() for ours, theirs in _GLOBAL_MAP.items()}
    for i in range(config.num_layers):
        ours, theirs = _layer_names(i)
        full.update({ours + o: hf_state[theirs + t].clone() for o, t in _LAYER_MAP.items()})
        for kind in ("weight", "bias"):
            full[f"{ours}self_attention.query_key_value.{kind}"] = torch.cat(
                [hf_state[f"{theirs}attention.self.{n}.{kind}"] for n in _QKV])
    vocab = full["word_embeddings.weight"].size(0)
    if vocab > config.vocab_size:
        raise UsageError(f"HF vocab size {vocab} exceeds the model's {config.vocab_size}")
    pad = config.vocab_size - vocab
    full["word_embeddings.weight"] = torch.cat(
        [full["word_embeddings.weight"], full["word_embeddings.weight"].new_zeros(pad, config.hidden_size)])
    full["lm_head.bias"] = torch.cat([full["lm_head.bias"], full["lm_head.bias"].new_zeros(pad)])
    return full


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def hf_config(config: TransformerConfig, orig_vocab_size: int | None = None,
              token_ids: dict[str, int | None] | None = None):
    """The transformers.BertConfig of the same architecture. `token_ids` (pad_token_id,
    eos_token_id) name the tokenizer's special tokens."""
    from transformers import BertConfig  # imported late: training never needs it
    if not config.post_layer_norm or config.attn_mask_type != "padding":
        raise UsageError("only post-LN models with a padding mask are BERT")
    return BertConfig(
        **(token_ids or {}),
        vocab_size=orig_vocab_size or config.orig_vocab_size or config.vocab_size,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.ffn_hidden_size,
        hidden_act="gelu" if config.activation == "gelu" else "gelu_new",
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=NUM_TOKENTYPES,
        initializer_range=config.init_method_std, layer_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=True)


def config_from_hf(hf_cfg, tp_size: int = 1, make_vocab_size_divisible_by: int = 128
                   ) -> TransformerConfig:
    """Our TransformerConfig for a transformers.BertConfig, vocab padded for `tp_size`."""
    if hf_cfg.hidden_act not in _HF_ACTIVATIONS:
        raise UsageError(f"unsupported BERT activation {hf_cfg.hidden_act!r}")
    if getattr(hf_cfg, "position_embedding_type", "absolute") != "absolute":
        raise UsageError("only absolute position embeddings are supported")
    if hf_cfg.type_vocab_size != NUM_TOKENTYPES:
        raise UsageError(f"type_vocab_size must be {NUM_TOKENTYPES}, got {hf_cfg.type_vocab_size}")
    return TransformerConfig(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        vocab_size=pad_vocab_size(hf_cfg.vocab_size, make_vocab_size_divisible_by, tp_size),
        orig_vocab_size=hf_cfg.vocab_size, ffn_hidden_size=hf_cfg.intermediate_size,
        hidden_dropout=hf_cfg.hidden_dropout_prob,
        attention_dropout=hf_cfg.attention_probs_dropout_prob,
        layernorm_epsilon=hf_cfg.layer_norm_eps, init_method_std=hf_cfg.initializer_range,
        activation=_HF_ACTIVATIONS[hf_cfg.hidden_act], post_layer_norm=True,
        attn_mask_type="padding")


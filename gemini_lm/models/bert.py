"""BERT, tensor-parallel, in the original post-LayerNorm form of Hugging Face's
BertForPreTraining: word + position + token-type embeddings and a LayerNorm, post-LN
transformer with a padding mask, a masked-LM head whose output layer is tied to the word
embedding, and a pooler + binary head for next-sentence prediction.

Only the word embedding, the output bias and the transformer's inner dimensions are
sharded; the heads act on replicated activations, like the rest of the residual stream.
MLM logits stay split along the vocabulary and go straight into the vocab-parallel
cross-entropy, as in GPT.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from gemini_lm.models.config import TransformerConfig
from gemini_lm.models.transformer import ParallelTransformer, _activation, layer_norm
from gemini_lm.parallel.cross_entropy import vocab_parallel_cross_entropy
from gemini_lm.parallel.layers import (VocabParallelEmbedding, mark_replicated_params,
                                       set_tensor_model_parallel_attributes)
from gemini_lm.parallel.mappings import copy_to_tensor_model_parallel_region
from gemini_lm.parallel.random import RNGStatesTracker
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import InitMethod, init_method_normal

NUM_TOKENTYPES = 2   # segment A / segment B
BERT_LAYERNORM_EPSILON = 1e-12   # the original BERT's; HF checkpoints carry it


def bert_config(config: TransformerConfig) -> TransformerConfig:
    """The BERT variant of a (GPT-shaped) config from the flags: post-LN, bidirectional
    attention with a padding mask, exact GELU, BERT's LayerNorm epsilon."""
    return dataclasses.replace(config, post_layer_norm=True, attn_mask_type="padding",
                               activation="gelu", layernorm_epsilon=BERT_LAYERNORM_EPSILON)


def _replicated_linear(in_features: int, out_features: int, init_method: InitMethod,
                       ps: ParallelState, dtype: torch.dtype) -> nn.Linear:
    """nn.Linear, same on every TP rank: drawn on CPU in fp32 (like the parallel layers),
    so init does not depend on the device or TP size. Bias starts at zero."""
    linear = nn.Linear(in_features, out_features, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        init_method(linear.weight)
        linear.bias.zero_()
    return linear.to(ps.device, dtype)


def _replicated_embedding(num: int, dim: int, init_method: InitMethod, ps: ParallelState,
                          dtype: torch.dtype) -> nn.Embedding:
    table = torch.empty(num, dim)
    init_method(table)
    return nn.Embedding.from_pretrained(table.to(ps.device, dtype), freeze=False)


class BertLMHead(nn.Module):
    """dense -> activation -> LayerNorm, then the tied output layer with its own bias
    (vocab-parallel: rank r holds the bias of its vocabulary slice)."""

    def __init__(self, config: TransformerConfig, ps: ParallelState, init_method: InitMethod,
                 vocab_per_partition: int):
        super().__init__()
        dtype = config.params_dtype
        self.dense = _replicated_linear(config.hidden_size, config.hidden_size, init_method, ps, dtype)
        self.activation = _activation(config.activation)
        self.layernorm = layer_norm(config, ps)
        self.bias = nn.Parameter(torch.zeros(vocab_per_partition, device=ps.device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.bias, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.activation(self.dense(x)))


class BertModel(nn.Module):
    """`tracker` supplies the per-TP-rank stream for attention dropout; it may be None
    only when tp_size == 1 or attention dropout is off."""

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 tracker: RNGStatesTracker | None = None):
        super().__init__()
        config.validate(ps.tp_size)
        if not config.post_layer_norm or config.attn_mask_type != "padding":
            raise ValueError("BERT is a post-LN model with padding-mask attention (see bert_config)")
        self.config, self.ps = config, ps
        h, dtype = config.hidden_size, config.params_dtype
        init_method = init_method_normal(config.init_method_std)

        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h, ps,
                                                      init_method=init_method, params_dtype=dtype)
        self.position_embeddings = _replicated_embedding(config.max_position_embeddings, h,
                                                         init_method, ps, dtype)
        self.tokentype_embeddings = _replicated_embedding(NUM_TOKENTYPES, h, init_method, ps, dtype)
        self.embedding_layernorm = layer_norm(config, ps)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.transformer = ParallelTransformer(config, ps, tracker)
        self.pooler = _replicated_linear(h, h, init_method, ps, dtype)
        self.lm_head = BertLMHead(config, ps, init_method,
                                  self.word_embeddings.num_embeddings_per_partition)
        self.binary_head = _replicated_linear(h, 2, init_method, ps, dtype)
        # Logits of vocab padding ids get a constant -inf bias: no probability mass (as GPT).
        self.register_buffer("output_padding_bias",
                             self.word_embeddings.padding_logit_bias(config.orig_vocab_size, dtype), persistent=False)
        mark_replicated_params(self)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor,
                tokentype_ids: torch.Tensor | None = None, lm_labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, padding_mask (1 = real token), tokentype_ids: [b, s].

        Returns (MLM output, NSP logits [b, 2]). The MLM output is the per-token loss
        [b, s] (fp32) when `lm_labels` is given, else vocab-parallel logits [b, s, vocab / tp].
        """
        seq_len = tokens.size(1)
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        position_ids = torch.arange(seq_len, device=tokens.device).unsqueeze(0)
        if tokentype_ids is None:
            tokentype_ids = torch.zeros_like(tokens)
        x = (self.word_embeddings(tokens) + self.position_embeddings(position_ids)
             + self.tokentype_embeddings(tokentype_ids))
        x = self.embedding_dropout(self.embedding_layernorm(x))
        # [b, 1, 1, s]: every query may attend to every real (non-padding) key.
        attention_mask = padding_mask.to(torch.bool)[:, None, None, :]
        x = self.transformer(x, attention_mask)

        nsp_logits = self.binary_head(torch.tanh(self.pooler(x[:, 0])))
        bias = self.lm_head.bias
        if self.output_padding_bias is not None:
            bias = bias + self.output_padding_bias
        # Tied output layer: a column-parallel linear whose weight is the word embedding.
        logits = F.linear(copy_to_tensor_model_parallel_region(self.lm_head(x), self.ps),
                          self.word_embeddings.weight, bias)
        if lm_labels is None:
            return logits, nsp_logits
        # Unmasked positions carry label -1: no rank owns it, and loss_mask drops them.
        return vocab_parallel_cross_entropy(logits, lm_labels, self.ps), nsp_logits


def bert_forward_step(model: BertModel, batch: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked-LM loss (mean over masked positions) + next-sentence loss, from a batch of
    bert_dataset samples: tokens, tokentype_ids, padding_mask, labels, loss_mask, is_random."""
    device = model.ps.device
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    lm_losses, nsp_logits = model(b["tokens"], b["padding_mask"], b["tokentype_ids"],
                                  lm_labels=b["labels"])
    loss_mask = b["loss_mask"].to(lm_losses.dtype)
    lm_loss = (lm_losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    nsp_loss = F.cross_entropy(nsp_logits.float(), b["is_random"])
    loss = lm_loss + nsp_loss
    return loss, {"lm loss": lm_loss.detach(), "nsp loss": nsp_loss.detach()}

"""GPT-2, tensor-parallel: vocab-parallel token embedding, learned positions, pre-LN
transformer, and an output layer tied to the token embedding.

The logits stay split along the vocabulary ([b, s, vocab / tp] per rank) and go straight
into the vocab-parallel cross-entropy, so the full [b, s, vocab] tensor never exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemini_lm.models.config import TransformerConfig
from gemini_lm.models.transformer import ParallelTransformer
from gemini_lm.parallel.cross_entropy import vocab_parallel_cross_entropy
from gemini_lm.parallel.layers import VocabParallelEmbedding, mark_replicated_params
from gemini_lm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from gemini_lm.parallel.random import RNGStatesTracker
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import init_method_normal


class GPTModel(nn.Module):
    """`tracker` supplies the per-TP-rank stream for attention dropout; it may be None
    only when tp_size == 1 or attention dropout is off."""

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 tracker: RNGStatesTracker | None = None):
        super().__init__()
        config.validate(ps.tp_size)
        if config.post_layer_norm or config.attn_mask_type != "causal":
            raise ValueError("GPT is a pre-LN model with causal attention")
        self.config, self.ps = config, ps
        h, dtype = config.hidden_size, config.params_dtype
        init_method = init_method_normal(config.init_method_std)

        self.wte = VocabParallelEmbedding(config.vocab_size, h, ps, init_method=init_method,
                                          params_dtype=dtype)
        # Drawn on CPU in fp32, like the parallel layers, so init is the same on any device.
        wpe = torch.empty(config.max_position_embeddings, h)
        init_method(wpe)
        self.wpe = nn.Embedding.from_pretrained(wpe.to(ps.device, dtype), freeze=False)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.transformer = ParallelTransformer(config, ps, tracker)
        # With orig_vocab_size set, the output layer gets a constant bias of -inf on the
        # logits of padding ids in this rank's vocab slice (cheaper than masking in place).
        self.register_buffer("output_padding_bias",
                             self.wte.padding_logit_bias(config.orig_vocab_size, dtype), persistent=False)
        mark_replicated_params(self)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> per-token loss [b, s] (fp32) if labels are given, else
        vocab-parallel logits [b, s, vocab / tp]."""
        seq_len = tokens.size(1)
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=tokens.device).unsqueeze(0)
        x = self.embedding_dropout(self.wte(tokens) + self.wpe(position_ids))
        x = self.transformer(x)
        # Tied output layer: a column-parallel linear whose weight is the embedding table.
        logits = F.linear(copy_to_tensor_model_parallel_region(x, self.ps), self.wte.weight,
                          self.output_padding_bias)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.ps)


def gather_logits(vocab_parallel_logits: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Full [..., padded vocab] logits on every TP rank (inference, evaluation)."""
    return gather_from_tensor_model_parallel_region(vocab_parallel_logits, ps)


def gpt_forward_step(model: GPTModel, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token loss of batch["tokens"] [b, s+1] (inputs tokens[:, :-1], labels
    tokens[:, 1:]); an optional batch["loss_mask"] [b, s] excludes positions (0 = skip).

    Returns (loss to backpropagate, {"lm loss": detached loss} for logging).
    """
    tokens = batch["tokens"].to(model.ps.device, non_blocking=True)
    losses = model(tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss = losses.mean()
    else:
        loss_mask = loss_mask.to(losses.device, losses.dtype)
        loss = (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach()}

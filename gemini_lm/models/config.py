"""TransformerConfig: the shape of a GPT-2 / BERT transformer, shared by both models.

Sizes are *full* (unsharded) sizes; layers divide them by the tensor-parallel size.
`vocab_size` is the padded size (see `pad_vocab_size`), so the embedding table splits
evenly across TP ranks. When `orig_vocab_size` is set, the logits of the padding ids are
masked to -inf, so they take no probability mass (Megatron leaves them in the softmax;
for weights imported from HF GPT-2 that would change the loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gemini_lm.errors import UsageError

ACTIVATIONS = ("gelu_tanh", "gelu")
ATTN_MASK_TYPES = ("causal", "padding")

# Model shapes by name; the caller adds vocab_size (padded) and may override any field.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # Trains on 2 CPU cores with the loss falling visibly within a couple of minutes.
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, max_position_embeddings=256),
    "gpt2": dict(num_layers=12, hidden_size=768, num_attention_heads=12, max_position_embeddings=1024),
    "gpt2-medium": dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                        max_position_embeddings=1024),
}


def pad_vocab_size(orig_vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padding: round up to a multiple of divisible_by * tp_size.

    Each TP rank then holds an equal, nicely aligned slice of the embedding table.
    """
    if orig_vocab_size < 1 or divisible_by < 1 or tp_size < 1:
        raise UsageError(f"cannot pad vocab size {orig_vocab_size} to a multiple of "
                         f"{divisible_by} x {tp_size}")
    multiple = divisible_by * tp_size
    return -(-orig_vocab_size // multiple) * multiple


@dataclass
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    max_position_embeddings: int
    vocab_size: int                      # padded
    orig_vocab_size: int | None = None   # the tokenizer's; logits of padding ids are masked
    ffn_hidden_size: int | None = None   # None: 4 * hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    activation: str = "gelu_tanh"        # GPT-2's "gelu_new"; BERT uses exact "gelu"
    post_layer_norm: bool = False        # False: GPT-2 pre-LN; True: original BERT post-LN
    attn_mask_type: str = "causal"       # "padding": bidirectional with a padding mask (BERT)
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "TransformerConfig":
        if name not in MODEL_PRESETS:
            raise UsageError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], "vocab_size": vocab_size, **overrides})

    def validate(self, tp_size: int = 1) -> None:
        """Raise UsageError unless this shape is valid and splits across `tp_size` ranks."""
        for name in ("num_layers", "hidden_size", "num_attention_heads",
                     "max_position_embeddings", "vocab_size", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if tp_size < 1:
            raise UsageError(f"tensor-model-parallel size must be positive, got {tp_size}")
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(f"hidden size {self.hidden_size} is not divisible by the number "
                             f"of attention heads {self.num_attention_heads}")
        for what, size in (("number of attention heads", self.num_attention_heads),
                           ("ffn hidden size", self.ffn_hidden_size),
                           ("vocab size", self.vocab_size)):
            if size % tp_size:
                raise UsageError(f"{what} {size} is not divisible by the tensor-model-parallel "
                                 f"size {tp_size}" + (" (pad it with pad_vocab_size)"
                                                      if what == "vocab size" else ""))
        if self.orig_vocab_size is not None and not 1 <= self.orig_vocab_size <= self.vocab_size:
            raise UsageError(f"orig_vocab_size {self.orig_vocab_size} must be in "
                             f"[1, vocab_size {self.vocab_size}]")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.attn_mask_type not in ATTN_MASK_TYPES:
            raise UsageError(f"attn_mask_type must be one of {ATTN_MASK_TYPES}, "
                             f"got {self.attn_mask_type!r}")
        if self.init_method_std <= 0 or self.layernorm_epsilon <= 0:
            raise UsageError("init_method_std and layernorm_epsilon must be positive")

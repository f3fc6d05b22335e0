"""Tensor-parallel transformer blocks shared by GPT (pre-LN, causal) and BERT (post-LN).

Activations are batch-first, [b, s, h]. Megatron's split of one layer over TP ranks:
attention heads and the MLP's inner dimension are sharded; each block enters with a
column-parallel linear (input replicated) and leaves with a row-parallel linear whose
all-reduce makes the output replicated again. So every tensor outside the two blocks —
residual stream, layer norms, hidden dropout — is the same on every TP rank.

Randomness follows from that: hidden dropout acts on replicated activations and draws
from the default generator (seeded alike on all ranks, so the masks agree); attention
dropout acts on this rank's heads only and draws from the tracker's per-rank stream.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from gemini_lm.models.config import TransformerConfig
from gemini_lm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gemini_lm.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import InitMethod, divide, init_method_normal, scaled_init_method_normal


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


def layer_norm(config: TransformerConfig, ps: ParallelState) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                        device=ps.device, dtype=config.params_dtype)


class ParallelMLP(nn.Module):
    """h -> ffn (column-parallel) -> activation -> h (row-parallel). No communication inside."""

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        h, ffn, dtype = config.hidden_size, config.ffn_hidden_size, config.params_dtype
        self.dense_h_to_4h = ColumnParallelLinear(h, ffn, ps, init_method=init_method,
                                                  params_dtype=dtype)
        self.dense_4h_to_h = RowParallelLinear(ffn, h, ps, init_method=output_init_method,
                                               params_dtype=dtype)
        self.activation = _activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.dense_h_to_4h(x)
        out, _ = self.dense_4h_to_h(self.activation(x))
        return out


class ParallelAttention(nn.Module):
    """Multi-head self-attention with this rank's heads (num_heads / tp of them).

    The fused QKV weight is sharded with stride 3, so the full weight is exactly
    [Wq; Wk; Wv] (HF GPT-2's c_attn, transposed) and rank r's slice is [q_r; k_r; v_r]:
    the q, k and v of the same heads.
    """

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 tracker: RNGStatesTracker | None,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        h, dtype = config.hidden_size, config.params_dtype
        self.ps, self.tracker = ps, tracker
        self.num_heads_per_partition = divide(config.num_attention_heads, ps.tp_size)
        self.head_dim = divide(h, config.num_attention_heads)
        self.causal = config.attn_mask_type == "causal"
        self.attention_dropout = config.attention_dropout
        self.query_key_value = ColumnParallelLinear(h, 3 * h, ps, stride=3, init_method=init_method,
                                                    params_dtype=dtype)
        self.dense = RowParallelLinear(h, h, ps, init_method=output_init_method, params_dtype=dtype)

    def _dropout_rng(self, dropout_p: float):
        if dropout_p == 0.0:
            return contextlib.nullcontext()
        if self.tracker is None:
            if self.ps.tp_size > 1:
                raise RuntimeError("attention dropout at tp_size > 1 needs the RNG tracker")
            return contextlib.nullcontext()
        return self.tracker.fork(MODEL_PARALLEL_RNG)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, s, h]. attention_mask (padding type only): bool, broadcastable to
        [b, heads, s, s], True where a query may attend to a key (SDPA's convention)."""
        if self.causal and attention_mask is not None:
            raise ValueError("causal attention takes no attention_mask")
        b, s, _ = x.shape
        qkv, _ = self.query_key_value(x)                      # [b, s, 3 * np * hn]
        q, k, v = qkv.view(b, s, 3, self.num_heads_per_partition, self.head_dim) \
                     .permute(2, 0, 3, 1, 4).unbind(0)        # each [b, np, s, hn]
        dropout_p = self.attention_dropout if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                                     dropout_p=dropout_p, is_causal=self.causal)
        context = context.transpose(1, 2).reshape(b, s, -1)   # [b, s, np * hn]
        out, _ = self.dense(context)
        return out


class TransformerLayer(nn.Module):
    """One block. Pre-LN (GPT-2):  x + drop(attn(ln(x))), then x + drop(mlp(ln(x))).
    Post-LN (BERT):  ln(x + drop(attn(x))), then ln(x + drop(mlp(x)))."""

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 tracker: RNGStatesTracker | None,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        self.post_layer_norm = config.post_layer_norm
        self.hidden_dropout = config.hidden_dropout
        if not self.post_layer_norm:
            self.input_layernorm = layer_norm(config, ps)
        self.self_attention = ParallelAttention(config, ps, tracker, init_method, output_init_method)
        self.post_attention_layernorm = layer_norm(config, ps)
        self.mlp = ParallelMLP(config, ps, init_method, output_init_method)
        if self.post_layer_norm:
            self.output_layernorm = layer_norm(config, ps)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.hidden_dropout, self.training)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_layer_norm:
            x = self.post_attention_layernorm(x + self._dropout(self.self_attention(x, attention_mask)))
            return self.output_layernorm(x + self._dropout(self.mlp(x)))
        x = x + self._dropout(self.self_attention(self.input_layernorm(x), attention_mask))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))


class ParallelTransformer(nn.Module):
    """The layer stack, plus the final layer norm that pre-LN models need."""

    def __init__(self, config: TransformerConfig, ps: ParallelState,
                 tracker: RNGStatesTracker | None):
        super().__init__()
        init_method = init_method_normal(config.init_method_std)
        # GPT-2: projections that add into the residual stream get std / sqrt(2 * layers),
        # so the stream's variance does not grow with depth.
        output_init_method = scaled_init_method_normal(config.init_method_std, config.num_layers)
        self.layers = nn.ModuleList(
            TransformerLayer(config, ps, tracker, init_method, output_init_method)
            for _ in range(config.num_layers))
        self.final_layernorm = None if config.post_layer_norm else layer_norm(config, ps)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x if self.final_layernorm is None else self.final_layernorm(x)

"""Autoregressive generation from our GPTModel with a key/value cache, tensor-parallel.

The cached forward reuses the model's own modules (embeddings, each layer's layer norms,
fused QKV, projections, MLP) and replays TransformerLayer's pre-LN arithmetic with keys
and values of earlier positions kept per layer, so each new token costs one position's
work. On TP ranks every module works on its own heads and the row-parallel all-reduces
run as in training; the vocab-parallel logits are all-gathered, so every rank sees the
full distribution and, with the same seeded generator, picks the same token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemini_lm.models.gpt import GPTModel, gather_logits
from gemini_lm.parallel.mappings import copy_to_tensor_model_parallel_region


@dataclass
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0        # 0: no top-k cut
    top_p: float = 1.0    # 1.0: no nucleus cut

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("need temperature > 0, top_k >= 0 and 0 < top_p <= 1")


class KVCache:
    """Per layer, keys and values [b, heads/tp, positions, head_dim] seen so far."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].size(2)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _attention(attn, x: torch.Tensor, cache: KVCache, layer: int, past: int) -> torch.Tensor:
    b, s, _ = x.shape
    qkv, _ = attn.query_key_value(x)
    q, k, v = qkv.view(b, s, 3, attn.num_heads_per_partition, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    k, v = cache.extend(layer, k, v)
    # New query i sits at position past + i and may see keys 0 .. past + i.
    mask = None
    if s > 1:
        mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, _ = attn.dense(context.transpose(1, 2).reshape(b, s, -1))
    return out


@torch.no_grad()
def forward_with_cache(model: GPTModel, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Full-vocabulary logits [b, padded vocab] of the last position of `tokens` [b, s],
    which continue the positions already in `cache` (updated in place)."""
    past = cache.length
    positions = torch.arange(past, past + tokens.size(1), device=tokens.device).unsqueeze(0)
    x = model.wte(tokens) + model.wpe(positions)
    for i, layer in enumerate(model.transformer.layers):
        # TransformerLayer's pre-LN path (eval mode: no dropout).
        x = x + _attention(layer.self_attention, layer.input_layernorm(x), cache, i, past)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = model.transformer.final_layernorm(x[:, -1:])
    logits = F.linear(copy_to_tensor_model_parallel_region(x, model.ps), model.wte.weight,
                      model.output_padding_bias)
    return gather_logits(logits, model.ps)[:, -1].float()


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [b] from logits [b, vocab]: argmax, or a draw after temperature, top-k, top-p."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPTModel, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
             generator: torch.Generator | None = None, eod: int | None = None) -> torch.Tensor:
    """prompt [b, s] -> [b, s + n] with n <= max_new_tokens new tokens (stops early once
    every sequence has produced `eod`, if given). Must run on every TP rank alike."""
    if prompt.size(1) + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    model.eval()
    cache = KVCache(len(model.transformer.layers))
    out, step_input = prompt, prompt
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        next_token = sample_next(forward_with_cache(model, step_input, cache), params, generator)
        out = torch.cat([out, next_token.unsqueeze(1)], dim=1)
        step_input = next_token.unsqueeze(1)
        if eod is not None:
            done |= next_token == eod
            if bool(done.all()):
                break
    return out

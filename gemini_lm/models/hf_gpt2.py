"""Weights between our GPTModel and Hugging Face's GPT2LMHeadModel, and between TP shards
and full tensors.

Two steps, kept apart so each is testable on its own:
- `full_state_dict` / `load_full_state_dict`: our sharded parameters <-> full
  (unsharded) tensors under our names, using each parameter's partition_dim/stride.
- `gpt_state_to_hf` / `hf_to_gpt_state`: our full names <-> GPT2LMHeadModel's. HF's
  Conv1D stores weights [in, out], the transpose of nn.Linear's [out, in]; our fused QKV
  weight is [Wq; Wk; Wv] like c_attn, so it maps by a transpose alone. Our embedding has
  padded vocab rows that HF does not; lm_head is tied to wte in both.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from gemini_lm.errors import UsageError
from gemini_lm.models.config import TransformerConfig, pad_vocab_size
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import is_tensor_parallel, shard_tensor, unshard_tensors

# Per layer: our suffix -> (HF suffix, transposed?).
_LAYER_MAP = {
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "self_attention.query_key_value.weight": ("attn.c_attn.weight", True),
    "self_attention.query_key_value.bias": ("attn.c_attn.bias", False),
    "self_attention.dense.weight": ("attn.c_proj.weight", True),
    "self_attention.dense.bias": ("attn.c_proj.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "mlp.dense_h_to_4h.weight": ("mlp.c_fc.weight", True),
    "mlp.dense_h_to_4h.bias": ("mlp.c_fc.bias", False),
    "mlp.dense_4h_to_h.weight": ("mlp.c_proj.weight", True),
    "mlp.dense_4h_to_h.bias": ("mlp.c_proj.bias", False),
}
_GLOBAL_MAP = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "transformer.final_layernorm.weight": "transformer.ln_f.weight",
    "transformer.final_layernorm.bias": "transformer.ln_f.bias",
}
# Causal-mask buffers that older HF checkpoints carry; not weights.
_HF_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _name_pairs(config: TransformerConfig) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed?) for every parameter."""
    pairs = [(ours, hf, False) for ours, hf in _GLOBAL_MAP.items()]
    for i in range(config.num_layers):
        pairs += [(f"transformer.layers.{i}.{ours}", f"transformer.h.{i}.{hf}", t)
                  for ours, (hf, t) in _LAYER_MAP.items()]
    return pairs


def gpt_state_to_hf(full_state: dict[str, torch.Tensor], config: TransformerConfig,
                    orig_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our full state -> GPT2LMHeadModel state. The padding rows beyond `orig_vocab_size`
    (default: config.orig_vocab_size) are dropped; with neither, they are kept.
    lm_head.weight is the same tensor as transformer.wte.weight."""
    orig_vocab_size = orig_vocab_size or config.orig_vocab_size
    missing = [ours for ours, _, _ in _name_pairs(config) if ours not in full_state]
    if missing:
        raise UsageError(f"GPT state lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    hf = {}
    for ours, hf_name, transposed in _name_pairs(config):
        tensor = full_state[ours]
        hf[hf_name] = tensor.t().contiguous() if transposed else tensor.clone()
    if orig_vocab_size is not None:
        if orig_vocab_size > config.vocab_size:
            raise UsageError(f"vocab size {orig_vocab_size} exceeds the model's {config.vocab_size}")
        hf["transformer.wte.weight"] = hf["transformer.wte.weight"][:orig_vocab_size].clone()
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    return hf


def hf_to_gpt_state(hf_state: dict[str, torch.Tensor],
                    config: TransformerConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel (or GPT2Model) state -> our full state, vocab padded with zero rows."""
    hf_state = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                for k, v in hf_state.items()}
    pairs = _name_pairs(config)
    known = {hf for _, hf, _ in pairs} | {"lm_head.weight"}
    unexpected = [k for k in hf_state if k not in known and not _HF_BUFFERS.match(k)]
    missing = [hf for _, hf, _ in pairs if hf not in hf_state]
    if unexpected or missing:
        raise UsageError(f"HF GPT-2 state does not match a {config.num_layers}-layer model: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    wte = hf_state["transformer.wte.weight"]
    lm_head = hf_state.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise UsageError("lm_head is not tied to wte; GPTModel ties them")
    if wte.size(0) > config.vocab_size:
        raise UsageError(f"HF vocab size {wte.size(0)} exceeds the model's {config.vocab_size}")

    full = {}
    for ours, hf_name, transposed in pairs:
        tensor = hf_state[hf_name]
        full[ours] = tensor.t().contiguous() if transposed else tensor.clone()
    padding = wte.new_zeros(config.vocab_size - wte.size(0), wte.size(1))
    full["wte.weight"] = torch.cat([full["wte.weight"], padding])
    return full


GPT2_END_OF_TEXT = 50256   # GPT2Config's default bos/eos: GPT-2's <|endoftext|>


def hf_config(config: TransformerConfig, orig_vocab_size: int | None = None,
              token_ids: dict[str, int | None] | None = None):
    """The transformers.GPT2Config of the same architecture (vocab: orig_vocab_size,
    else config.orig_vocab_size, else the padded size). `token_ids` (bos_token_id,
    eos_token_id, pad_token_id) name the tokenizer's special tokens."""
    from transformers import GPT2Config  # imported late: training never needs it
    if config.post_layer_norm or config.activation != "gelu_tanh":
        raise UsageError("only pre-LN, gelu_tanh models are GPT-2")
    vocab_size = orig_vocab_size or config.orig_vocab_size or config.vocab_size
    # Left to GPT2Config, bos/eos would be 50256 in any vocabulary: no token of a smaller one,
    # and transformers warns about it when the config is built.
    end_of_text = GPT2_END_OF_TEXT if GPT2_END_OF_TEXT < vocab_size else None
    token_ids = {"bos_token_id": end_of_text, "eos_token_id": end_of_text, **(token_ids or {})}
    return GPT2Config(
        vocab_size=vocab_size, **token_ids,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_attention_heads,
        n_inner=config.ffn_hidden_size, activation_function="gelu_new",
        resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layernorm_epsilon,
        initializer_range=config.init_method_std, tie_word_embeddings=True)


def config_from_hf(hf_cfg, tp_size: int = 1, make_vocab_size_divisible_by: int = 128
                   ) -> TransformerConfig:
    """Our TransformerConfig for a transformers.GPT2Config, vocab padded for `tp_size`."""
    if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UsageError(f"unsupported GPT-2 activation {hf_cfg.activation_function!r}")
    if hf_cfg.scale_attn_by_inverse_layer_idx or not hf_cfg.scale_attn_weights:
        raise UsageError("only GPT-2's plain 1/sqrt(head_dim) attention scaling is supported")
    return TransformerConfig(
        num_layers=hf_cfg.n_layer, hidden_size=hf_cfg.n_embd,
        num_attention_heads=hf_cfg.n_head, max_position_embeddings=hf_cfg.n_positions,
        vocab_size=pad_vocab_size(hf_cfg.vocab_size, make_vocab_size_divisible_by, tp_size),
        orig_vocab_size=hf_cfg.vocab_size,
        ffn_hidden_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
        hidden_dropout=hf_cfg.resid_pdrop, attention_dropout=hf_cfg.attn_pdrop,
        layernorm_epsilon=hf_cfg.layer_norm_epsilon, init_method_std=hf_cfg.initializer_range)


def gather_full_tensor(shard: torch.Tensor, param: nn.Parameter, ps: ParallelState) -> torch.Tensor:
    """The full value of `shard`, a tensor split over TP like `param` (the parameter itself,
    or its gradient). Collective over the TP group; every rank gets the result."""
    if not is_tensor_parallel(param) or ps.tp_size == 1:
        return shard.detach().clone()
    shard = shard.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(ps.tp_size)]
    dist.all_gather(parts, shard, group=ps.tp_group)
    return unshard_tensors(parts, param.partition_dim, param.partition_stride)


def full_state_dict(model: nn.Module, ps: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model`, unsharded, on every TP rank (collective)."""
    return {name: gather_full_tensor(t, t, ps) for name, t in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], ps: ParallelState) -> None:
    """Copy full tensors into `model`, each rank keeping its own TP shard."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(own.keys() - full.keys()), sorted(full.keys() - own.keys())
    if missing or unexpected:
        raise UsageError(f"state does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, target in own.items():
        src, full_shape = full[name], list(target.shape)
        if is_tensor_parallel(target):
            full_shape[target.partition_dim] *= ps.tp_size
        if list(src.shape) != full_shape:
            raise UsageError(f"{name}: shape {tuple(src.shape)} does not fit the model's "
                             f"{tuple(full_shape)}")
        if is_tensor_parallel(target):
            src = shard_tensor(src, target.partition_dim, ps.tp_rank, ps.tp_size,
                               target.partition_stride)
        target.copy_(src)

"""Checkpoints between gemini_lm and Hugging Face transformers, offline.

Export a persisted checkpoint (any TP size) to a directory that AutoModelForCausalLM
(GPT) or BertForPreTraining (BERT) and AutoTokenizer load from disk:

    python tools/convert_to_hf.py --load CKPT_DIR --out HF_DIR \
        [--tokenizer-type ... --tokenizer-model ...]    # default: the one the checkpoint records

Import a local Hugging Face GPT-2 or BERT directory (model.safetensors) as an iteration-0
checkpoint at a chosen TP size, to continue training with `pretrain_gpt.py --load CKPT_DIR`
(or pretrain_bert.py); pretraining flags (--bf16, --seed, --lr, ...) may follow and must
match the ones training continues with:

    python tools/convert_to_hf.py --from-hf HF_DIR --save CKPT_DIR --tensor-model-parallel-size 2
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from gemini_lm.data.tokenizer import tokenizer_spec
from gemini_lm.errors import UsageArgumentParser, UsageError, run_cli
from gemini_lm.inference.checkpoint import (build_tool_tokenizer, check_tokenizer_fits,
                                            is_bert, read_full_model_state, recorded_tokenizer,
                                            single_process_state)
from gemini_lm.models import hf_bert, hf_gpt2


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = UsageArgumentParser(description=__doc__.split("\n\n")[0])   # bad flags: one line, exit 2
    p.add_argument("--load", help="our checkpoint directory to export")
    p.add_argument("--iteration", type=int, help="export this iteration (default: the newest)")
    p.add_argument("--out", help="Hugging Face directory to write")
    p.add_argument("--from-hf", help="Hugging Face directory to import")
    p.add_argument("--save", help="our checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the import")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--tokenizer-type", help="the tokenizer the checkpoint was trained with")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    args, rest = p.parse_known_args(argv)
    if bool(args.load) == bool(args.from_hf):
        raise UsageError("give either --load CKPT --out HF_DIR or --from-hf HF_DIR --save CKPT")
    if args.load and not args.out:
        raise UsageError("--load needs --out HF_DIR")
    if args.from_hf and not args.save:
        raise UsageError("--from-hf needs --save CKPT_DIR")
    if args.load and rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


# ---------------------------------------------------------------- ours -> Hugging Face

def export_to_hf(load: str, out: str, tokenizer=None, iteration: int | None = None) -> str:
    """Write config.json, model.safetensors and (given a tokenizer) tokenizer files."""
    from transformers import BertForPreTraining, GPT2LMHeadModel

    full, config, iteration = read_full_model_state(load, iteration)
    token_ids = None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config)
        token_ids = {"pad_token_id": tokenizer.pad, "eos_token_id": tokenizer.eod}
        if not is_bert(config):
            token_ids["bos_token_id"] = tokenizer.eod
    if is_bert(config):
        state, cls = hf_bert.bert_state_to_hf(full, config), BertForPreTraining
        hf_cfg = hf_bert.hf_config(config, token_ids=token_ids)
    else:
        state, cls = hf_gpt2.gpt_state_to_hf(full, config), GPT2LMHeadModel
        hf_cfg = hf_gpt2.hf_config(config, token_ids=token_ids)
    model = cls(hf_cfg).to(config.params_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing}, unexpected {unexpected}")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        from gemini_lm.inference.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, out)
    return f"exported {load} iteration {iteration} ({type(model).__name__}) to {out}"


# ---------------------------------------------------------------- Hugging Face -> ours

def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards an index names. Pickled .bin weights are refused."""
    from safetensors.torch import load_file

    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        state = {}
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            state.update(load_file(os.path.join(hf_dir, shard)))
        return state
    raise UsageError(f"{hf_dir}: no model.safetensors (pickled pytorch_model.bin is not read; "
                     "re-save the model with safe_serialization=True)")


def _shape_flags(config, seq_length: int | None) -> list[str]:
    """Pretraining flags that build this shape (pass the same ones to continue training)."""
    return ["--num-layers", str(config.num_layers), "--hidden-size", str(config.hidden_size),
            "--num-attention-heads", str(config.num_attention_heads),
            "--ffn-hidden-size", str(config.ffn_hidden_size),
            "--max-position-embeddings", str(config.max_position_embeddings),
            "--seq-length", str(seq_length or config.max_position_embeddings),
            "--hidden-dropout", str(config.hidden_dropout),
            "--attention-dropout", str(config.attention_dropout),
            "--init-method-std", str(config.init_method_std)]


_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "max_position_embeddings", "vocab_size", "orig_vocab_size", "activation",
                 "post_layer_norm", "attn_mask_type", "layernorm_epsilon")


def import_from_hf(hf_dir: str, save: str, tp_size: int, extra_flags: list[str],
                   make_vocab_size_divisible_by: int = 128) -> str:
    """An iteration-0 checkpoint of the HF model, built exactly as pretrain() builds its
    state for the same flags (model, fresh optimizer, LR schedule, RNG), one shard per TP rank."""
    from transformers import AutoConfig

    import pretrain_bert
    import pretrain_gpt
    from gemini_lm.config import parse_config
    from gemini_lm.checkpoint.snapshot import SnapshotLayout
    from gemini_lm.models.hf_gpt2 import load_full_state_dict
    from gemini_lm.parallel.random import model_parallel_seed
    from gemini_lm.checkpoint.naming import shard_id
    from gemini_lm.checkpoint.persistent import check_writable, finalize_checkpoint, partial_dir, write_shard_file
    from gemini_lm.training.inputs import build_transformer_config
    from gemini_lm.training.setup import build_training_setup

    try:
        hf_cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{hf_dir}: not a Hugging Face model directory ({str(exc).splitlines()[0]})") from None
    kinds = {"gpt2": (hf_gpt2.config_from_hf, hf_gpt2.hf_to_gpt_state, pretrain_gpt.model_provider),
             "bert": (hf_bert.config_from_hf, hf_bert.hf_to_bert_state, pretrain_bert.model_provider)}
    if hf_cfg.model_type not in kinds:
        raise UsageError(f"{hf_dir}: model type {hf_cfg.model_type!r}; only gpt2 and bert are supported")
    config_from_hf, to_ours, model_provider = kinds[hf_cfg.model_type]
    target = config_from_hf(hf_cfg, tp_size, make_vocab_size_divisible_by)
    full = to_ours(read_hf_weights(hf_dir), target)

    flags = _shape_flags(target, None) + ["--tensor-model-parallel-size", str(tp_size),
                                          "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by)]
    cfg = parse_config(flags + extra_flags, world_size=tp_size)
    check_writable(save)
    partial = partial_dir(save, 0)
    shards, metadata = {}, None
    for tp_rank in range(tp_size):   # each rank's shard, built as that rank of pretrain() would
        ps = single_process_state(tp_rank, tp_size)
        tracker = model_parallel_seed(cfg.training.seed, ps)
        tcfg = build_transformer_config(cfg, target.orig_vocab_size, tp_size)

        def provider(cfg_, tcfg_, ps_, tracker_):
            model = model_provider(cfg_, tcfg_, ps_, tracker_)
            mismatch = [f for f in _SHAPE_FIELDS if getattr(model.config, f) != getattr(target, f)]
            if mismatch:
                raise UsageError(f"the flags build a model unlike {hf_dir}: {mismatch}")
            load_full_state_dict(model, full, ps_)   # before the optimizer copies master weights
            return model

        state = build_training_setup(cfg, tcfg, provider, ps, tracker).state
        tensors, metadata = state.tensors(), metadata or state.metadata
        layout = SnapshotLayout.build(tensors, state.metadata)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.write(tensors, buf)
        shards[shard_id(tp_rank)] = write_shard_file(partial, tp_rank, memoryview(buf.numpy()))
    manifest = {"metadata": metadata}
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        manifest["tokenizer"] = tokenizer_spec("HuggingFaceTokenizer", hf_dir)   # tools find it by themselves
    finalize_checkpoint(save, 0, tp_size, shards, manifest, keep=None)
    entry = "pretrain_bert.py" if hf_cfg.model_type == "bert" else "pretrain_gpt.py"
    return (f"imported {hf_dir} as {save} iteration 0 at TP={tp_size}; continue with:\n  {entry} --load {save} "
            + " ".join(flags + extra_flags) + " --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
            + f"{hf_dir} --data-path ...")


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.load:
        tokenizer = build_tool_tokenizer(args.tokenizer_type, args.tokenizer_model,
                                         args.vocab_file, args.merge_file,
                                         recorded_tokenizer(args.load, args.iteration))
        print(export_to_hf(args.load, args.out, tokenizer, args.iteration))
    else:
        print(import_from_hf(args.from_hf, args.save, args.tensor_model_parallel_size, rest,
                             args.make_vocab_size_divisible_by))
    return 0


if __name__ == "__main__":
    run_cli(main)

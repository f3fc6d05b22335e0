"""End-to-end helpers: a tiny byte-level corpus, tiny GPT flags, and pretrain() on N gloo ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT = ("Checkpoints in memory make failures cheap. A machine fails, its peers still hold "
        "its state, and training continues from the last iteration instead of the last hour. ")


def build_byte_corpus(directory) -> str:
    """A small .bin/.idx corpus encoded with the byte-level tokenizer (no training needed)."""
    src = os.path.join(str(directory), "docs.jsonl")
    with open(src, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"Document {i}. " + TEXT * (1 + i % 5)}) + "\n")
    prefix = os.path.join(str(directory), "bytes")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", src, "--output-prefix", prefix,
                    "--tokenizer-type", "ByteLevelTokenizer", "--append-eod", "--workers", "1"],
                   check=True, capture_output=True)
    return prefix + "_text_document"


def tiny_gpt_args(data_path: str, log_dir: str, *extra: str) -> list[str]:
    """A 2-layer GPT that runs an iteration in milliseconds, without dropout (for equivalence)."""
    return ["--data-path", data_path, "--tokenizer-type", "ByteLevelTokenizer",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0",
            "--log-dir", log_dir, *extra]


def read_metrics(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def read_losses(log_dir: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in read_metrics(log_dir)]


def read_recoveries(log_dir: str) -> list[dict]:
    path = os.path.join(log_dir, "recovery.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def pretrain_body(rank: int, world_size: int, argv: list[str], machines: list[str] | None):
    """Run pretrain_gpt on this rank; `machines[rank]` simulates the machine it runs on."""
    if machines is not None:
        os.environ["GEMINI_MACHINE_ID"] = machines[rank]
    import pretrain_gpt
    from gemini_lm.config import parse_config

    cfg = parse_config(argv, world_size=world_size)
    return pretrain_gpt.pretrain(cfg, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                                 pretrain_gpt.gpt_forward_step)


def run_pretrain(tmp_path, argv: list[str], world_size: int = 1, machines: list[str] | None = None,
                 timeout_s: float = 120.0, backend: str = "gloo"):
    from tests.dist import run_ranks

    return run_ranks(pretrain_body, world_size, tmp_path, args=(argv, machines), timeout_s=timeout_s,
                     backend=backend)


def unsharded_state(save_dir: str, iteration: int) -> dict:
    """A persistent checkpoint's state as one TP=1 rank would hold it: every parameter and its
    optimizer state (fp32 master, Adam's exp_avg and exp_avg_sq) put together from the TP
    shards by the parameter's declared partition, plus the step counters, the LR schedule
    and the data position (equal on every shard). RNG states are left out: each TP rank
    has its own model-parallel stream by design."""
    import torch
    from safetensors.torch import load_file

    from gemini_lm.checkpoint.persistent import read_manifest
    from gemini_lm.inference.checkpoint import build_model, config_from_metadata, single_process_state
    from gemini_lm.parallel.utils import is_tensor_parallel, unshard_tensors

    tp_size = int(read_manifest(save_dir, iteration)["tp_size"])
    files = [os.path.join(save_dir, f"iter_{iteration:07d}", f"tp_rank_{r:02d}.safetensors") for r in range(tp_size)]
    shards = [load_file(f) for f in files]
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:
        params = dict(build_model(config_from_metadata(f.metadata()), single_process_state()).named_parameters())
    out = {}
    for key in shards[0]:
        if key.startswith("rng/"):
            continue
        name = next((key[len(p):] for p in ("model/", "optimizer/master/", "optimizer/exp_avg/",
                                            "optimizer/exp_avg_sq/") if key.startswith(p)), None)
        parts = [s[key] for s in shards]
        if name is not None and is_tensor_parallel(params[name]) and tp_size > 1:
            out[key] = unshard_tensors(parts, params[name].partition_dim, params[name].partition_stride)
        else:
            assert all(torch.equal(parts[0], p) for p in parts[1:]), f"{key} differs between TP shards"
            out[key] = parts[0]
    return out


def assert_same_state(reference: dict, got: dict, params_atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Every tensor of `got` equals `reference`'s up to the rounding of another reduction
    order (integers, step counters and positions exactly).

    Parameters within `params_atol`: where a gradient is pure rounding noise (a key bias,
    which softmax cannot see), Adam normalizes the noise into steps of up to the learning
    rate, so such elements drift by ~1e-6 while real differences move them by ~lr per step.
    Optimizer moments within 1e-4 of their tensor's largest magnitude (they span 1e-14 to
    1e-2): a missing or doubled gradient average changes exp_avg 2x and exp_avg_sq 4x.
    """
    import torch

    assert reference.keys() == got.keys(), sorted(reference.keys() ^ got.keys())[:5]
    for key in reference:
        a, b = reference[key], got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape)
        if a.is_floating_point():
            atol = params_atol if key.startswith("model/") else 1e-4 * float(a.abs().max())
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(a, b), key

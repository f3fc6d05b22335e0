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

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = ("Checkpoints in memory make failures cheap. A machine fails, its peers still hold "
        "its state, and training continues from the last iteration instead of the last hour. ")


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory):
    """A small .bin/.idx corpus encoded with the byte-level tokenizer (no training needed)."""
    d = tmp_path_factory.mktemp("corpus")
    src = d / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"Document {i}. " + TEXT * (1 + i % 5)}) + "\n")
    prefix = d / "bytes"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", str(src), "--output-prefix", str(prefix),
                    "--tokenizer-type", "ByteLevelTokenizer", "--append-eod", "--workers", "1"],
                   check=True, capture_output=True)
    return str(prefix) + "_text_document"


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

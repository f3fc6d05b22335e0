"""The default training corpus, built on first use from English text that ships with Python.

Documents are the `pydoc_data.topics` help pages and the longer docstrings of the
standard library's top-level modules (read with `ast`, never imported): about 1.3 MB of
English prose and code. A SentencePiece tokenizer is trained on it and it is tokenized
into `.bin`/`.idx` with the same code as tools/preprocess_data.py, so `pretrain_gpt.py`
runs out of the box without downloading anything.

The result is cached under `$GEMINI_LM_CACHE` (default `~/.cache/gemini_lm`) in a
directory named by CORPUS_VERSION and the Python version (the text comes from Python).
It is built in a temporary directory and renamed into place under an exclusive file
lock, so concurrent ranks build it once and nobody sees a partial corpus.
"""
from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

from gemini_lm.data.preprocess import preprocess_jsonl
from gemini_lm.data.tokenizer import train_sentencepiece

CORPUS_VERSION = "v1"
VOCAB_SIZE = 4096  # small: a tiny CPU model spends less on the embedding and softmax
_MIN_DOCSTRING_CHARS = 80


@dataclass(frozen=True)
class DefaultCorpus:
    data_prefix: str       # pass as --data-path
    tokenizer_model: str   # pass as --tokenizer-model
    tokenizer_type: str = "SentencePieceTokenizer"


def default_cache_dir() -> str:
    return os.environ.get("GEMINI_LM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gemini_lm")


def corpus_documents() -> list[str]:
    """The corpus text, in a fixed order: help topics, then docstrings file by file."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(os.listdir(stdlib)) if os.path.isdir(stdlib) else []
    for name in names:
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an odd file in someone's install costs a few documents, no more
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    documents.append(doc)
    return documents


def ensure_default_corpus(cache_dir: str | None = None) -> DefaultCorpus:
    """Build the default corpus unless it is cached; safe to call from many processes."""
    root = cache_dir or default_cache_dir()
    version = ".".join(map(str, sys.version_info[:3]))
    final = os.path.join(root, f"sample_corpus-{CORPUS_VERSION}-py{version}")
    if not os.path.isdir(final):  # the directory appears complete, by rename, or not at all
        os.makedirs(root, exist_ok=True)
        with open(final + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not os.path.isdir(final):      # another process may have built it meanwhile
                tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=root)
                try:
                    _build(tmp)
                    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache
                    os.rename(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return DefaultCorpus(data_prefix=os.path.join(final, "corpus_text_document"),
                         tokenizer_model=os.path.join(final, "tokenizer.model"))


def _build(directory: str) -> None:
    documents = corpus_documents()
    jsonl = os.path.join(directory, "corpus.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")
    model = train_sentencepiece(documents, os.path.join(directory, "tokenizer"), VOCAB_SIZE)
    preprocess_jsonl(jsonl, os.path.join(directory, "corpus"),
                     {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model},
                     append_eod=True)

"""JSONL text → tokenized `.bin`/`.idx` pairs; the engine behind tools/preprocess_data.py.

One output pair per JSON key, named as Megatron names them:
`{output_prefix}_{key}_document` (or `_sentence` with sentence splitting). Lines are
tokenized by a worker pool and written in input order, so the output is the same for
any number of workers.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

from gemini_lm.data.indexed_dataset import (IndexedDatasetBuilder, data_file_path,
                                            index_file_path, optimal_dtype)
from gemini_lm.data.tokenizer import Tokenizer, build_tokenizer
from gemini_lm.errors import UsageError

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by
# whitespace and a capital, digit or opening quote; a blank line always ends one.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])|\n\s*\n")


def split_sentences(text: str, keep_newlines: bool = False) -> list[str]:
    """A regex sentence splitter (no nltk download). With `keep_newlines` the whitespace
    after a sentence stays attached to it, so the pieces concatenate back to `text`."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        # Keep a closing quote/bracket with its sentence; the whitespace goes after it.
        end = match.start() + len(match.group(0)) - len(match.group(0).lstrip("\"')]"))
        cut = match.end() if keep_newlines else end
        pieces.append(text[start:cut])
        start = match.end()
    pieces.append(text[start:])
    if not keep_newlines:
        pieces = [p.strip() for p in pieces]
    return [p for p in pieces if p.strip()]


class _Encoder:
    """Per-worker state: the tokenizer is built once per process, not pickled."""

    tokenizer: Tokenizer

    def __init__(self, tokenizer_kwargs: dict, json_keys: Sequence[str], sentences: bool,
                 keep_newlines: bool, append_eod: bool) -> None:
        self.tokenizer_kwargs = tokenizer_kwargs
        self.json_keys = json_keys
        self.sentences = sentences
        self.keep_newlines = keep_newlines
        self.append_eod = append_eod

    def initialize(self) -> None:
        self.tokenizer = build_tokenizer(**self.tokenizer_kwargs)

    def __getstate__(self) -> dict:
        # Workers rebuild the tokenizer from its arguments instead of unpickling it.
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}

    def encode(self, item: tuple[int, bytes]) -> tuple[int, dict[str, list[list[int]]] | str, int]:
        """(line number, raw line) → (line number, {key: sequences} or an error, bytes)."""
        lineno, raw = item
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return lineno, "is not valid UTF-8", len(raw)
        except json.JSONDecodeError as e:
            return lineno, f"is not valid JSON ({e.msg})", len(raw)
        if not isinstance(record, dict):
            return lineno, "is not a JSON object", len(raw)
        out = {}
        for key in self.json_keys:
            text = record.get(key)
            if not isinstance(text, str):
                return lineno, f"has no string field {key!r}", len(raw)
            parts = split_sentences(text, self.keep_newlines) if self.sentences else [text]
            sequences = [ids for ids in map(self.tokenizer.tokenize, parts) if ids]
            if sequences and self.append_eod:
                sequences[-1].append(self.tokenizer.eod)
            out[key] = sequences
        return lineno, out, len(raw)


_worker_encoder: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _worker_encoder  # the pool's per-process state; nothing else uses it
    _worker_encoder = encoder
    encoder.initialize()


def _encode_in_worker(item: tuple[int, bytes]):
    assert _worker_encoder is not None
    return _worker_encoder.encode(item)


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def preprocess_jsonl(input_path: str, output_prefix: str, tokenizer_kwargs: dict, *,
                     json_keys: Sequence[str] = ("text",), append_eod: bool = False,
                     split_sentences: bool = False, keep_newlines: bool = False,
                     workers: int = 1, log_interval: int = 0) -> dict[str, str]:
    """Tokenize every line of `input_path`; returns {json key: output path prefix}.

    Bad input raises UsageError naming the line, and leaves no output files behind.
    """
    try:
        with open(input_path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"cannot read --input {input_path}: {e.strerror}") from None
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output-prefix {output_prefix}: directory {out_dir} does not exist")
    encoder = _Encoder(dict(tokenizer_kwargs), list(json_keys), split_sentences,
                       keep_newlines, append_eod)
    encoder.initialize()  # fail fast on a bad tokenizer, and learn its vocabulary size
    if append_eod and encoder.tokenizer.eod is None:
        raise UsageError(f"--append-eod: tokenizer {tokenizer_kwargs['tokenizer_type']} "
                         "has no end-of-document token")
    level = "sentence" if split_sentences else "document"
    prefixes = {key: f"{output_prefix}_{key}_{level}" for key in json_keys}
    dtype = optimal_dtype(encoder.tokenizer.vocab_size)

    with contextlib.ExitStack() as stack:
        builders = {key: stack.enter_context(IndexedDatasetBuilder(data_file_path(p), dtype))
                    for key, p in prefixes.items()}
        if workers == 1:
            results = map(encoder.encode, _read_lines(input_path))
        else:
            pool = stack.enter_context(multiprocessing.get_context().Pool(
                workers, initializer=_init_worker, initargs=(encoder,)))
            results = pool.imap(_encode_in_worker, _read_lines(input_path), chunksize=32)

        start, total_bytes, documents = time.monotonic(), 0, 0
        for lineno, encoded, nbytes in results:
            if isinstance(encoded, str):
                raise UsageError(f"{input_path}:{lineno} {encoded}")
            for key, sequences in encoded.items():
                if not sequences:
                    continue  # an empty document would only be an empty index entry
                for ids in sequences:
                    builders[key].add_item(ids)
                builders[key].end_document()
            documents += 1
            total_bytes += nbytes
            if log_interval and documents % log_interval == 0:
                elapsed = time.monotonic() - start
                print(f"processed {documents} documents ({documents / elapsed:.0f} docs/s, "
                      f"{total_bytes / elapsed / 2**20:.2f} MB/s)", file=sys.stderr)
        for key, p in prefixes.items():
            builders[key].finalize(index_file_path(p))
    return prefixes

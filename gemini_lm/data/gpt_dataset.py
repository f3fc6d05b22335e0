"""Megatron's GPTDataset: fixed-length samples cut from a shuffled stream of documents.

Three indices, as in megatron/core/datasets/gpt_dataset.py:
  document index  the split's documents repeated for enough epochs, shuffled by seed;
  sample index    where sample j starts in the stream that document index spells out:
                  (position in the document index, token offset);
  shuffle index   a permutation of the samples.
Sample j is tokens [j*seq_length, j*seq_length + seq_length + 1) of that stream, so
consecutive samples share one token (the last input is the next sample's first) and
samples run across document boundaries. Everything is numpy and a pure function of
(sequence lengths, split, seq_length, num_samples, seed): every rank builds the same
indices without talking to the others, once: they are cached on disk (index_cache.py).
"""
from __future__ import annotations

import hashlib

import numpy as np

from gemini_lm.data.index_cache import cache_key, cached
from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.errors import UsageError

SPLIT_NAMES = ("train", "valid", "test")


class GPTDataset:
    def __init__(self, indexed_dataset: IndexedDataset, documents: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, name: str = "train") -> None:
        self.indexed_dataset = indexed_dataset
        self.name = name
        self.seq_length = seq_length
        sizes = indexed_dataset.sequence_lengths
        tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
        if tokens_per_epoch <= 1:
            raise UsageError(f"{indexed_dataset.path_prefix}: the {name} split has "
                             f"{tokens_per_epoch} tokens, too few for any sample")
        num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)

        # Megatron shuffles a short final epoch on its own, so the samples taken from it
        # are a uniform draw over its documents rather than whatever sorts first.
        separate_final_epoch = False
        samples_before_final = 0
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
            samples_per_epoch = (tokens_per_epoch - 1) // seq_length
            from_final = num_samples - samples_before_final
            separate_final_epoch = from_final < int(0.80 * samples_per_epoch)

        def build():
            rng = np.random.RandomState(seed)
            document_index = _build_document_index(documents, num_epochs, rng, separate_final_epoch)
            sample_index = _build_sample_index(sizes, document_index, seq_length, num_epochs * tokens_per_epoch)
            total = len(sample_index) - 1
            shuffle_index = _build_shuffle_index(samples_before_final if separate_final_epoch else total,
                                                 total, rng)
            return document_index, sample_index, shuffle_index

        key = cache_key("GPTDataset", indexed_dataset.path_prefix, name=name, seed=seed, seq_length=seq_length,
                        num_samples=num_samples,
                        documents=hashlib.sha256(np.ascontiguousarray(documents, dtype=np.int64)).hexdigest())
        self.document_index, self.sample_index, self.shuffle_index = cached(
            key, ("document_index", "sample_index", "shuffle_index"), build)

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.sample(int(self.shuffle_index[i]))}

    def sample(self, j: int) -> np.ndarray:
        """Sample j in stream order (before shuffling): seq_length + 1 tokens."""
        (first, first_offset), (last, last_offset) = self.sample_index[j], self.sample_index[j + 1]
        if first == last:
            doc = int(self.document_index[first])
            tokens = self.indexed_dataset.get(doc, int(first_offset),
                                              int(last_offset - first_offset + 1))
            return tokens.astype(np.int64)
        parts = [self.indexed_dataset.get(int(self.document_index[first]), int(first_offset))]
        parts += [self.indexed_dataset.get(int(self.document_index[k]))
                  for k in range(first + 1, last)]
        parts.append(self.indexed_dataset.get(int(self.document_index[last]), 0,
                                              int(last_offset) + 1))
        return np.concatenate(parts).astype(np.int64)


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """The fewest epochs whose tokens give num_samples samples (one extra token each)."""
    num_epochs = 1
    while (num_epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        num_epochs += 1
    return num_epochs


def _build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                          separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = _build_document_index(documents, num_epochs - 1, rng, False)
    last = _build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                        total_tokens: int) -> np.ndarray:
    """[num_samples + 1, 2] rows (position in document_index, offset): sample j spans
    from row j to row j+1 inclusive. Megatron's C++ helper, as one searchsorted."""
    num_samples = (total_tokens - 1) // seq_length
    doc_starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(sizes[document_index], out=doc_starts[1:])
    # Row j+1 is token (j+1)*seq_length: the last of sample j and the first of j+1.
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: a token lies in the last document starting
    # at or before it.
    position = np.searchsorted(doc_starts, starts, side="right") - 1
    return np.stack([position, starts - doc_starts[position]], axis=1)


def _build_shuffle_index(num_samples: int, total_size: int,
                         rng: np.random.RandomState) -> np.ndarray:
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate((first, last))


def parse_split(split: str) -> list[float]:
    """Megatron's "969,30,1" (any weights, up to three) → fractions summing to 1."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise UsageError(f"--split must be comma-separated numbers, got {split!r}") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--split needs up to three non-negative weights, got {split!r}")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_boundaries(fractions: list[float], size: int) -> list[int]:
    """Megatron's rounding: [0, end of train, end of valid, size]."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * size)))
    excess = bounds[-1] - size
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def build_gpt_datasets(data_prefix: str, split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int]
                       ) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """(train, valid, test) over contiguous ranges of the corpus's sequences; a split with
    weight 0 is None. Each repeats epochs until it has at least its num_samples."""
    indexed = IndexedDataset(data_prefix)
    fractions = parse_split(split)
    bounds = split_boundaries(fractions, len(indexed))
    datasets: list[GPTDataset | None] = []
    for k, name in enumerate(SPLIT_NAMES):
        documents = np.arange(bounds[k], bounds[k + 1], dtype=np.int32)
        if fractions[k] == 0:
            datasets.append(None)
        elif len(documents) == 0:
            if num_samples[k] > 0:
                raise UsageError(f"--split {split} leaves the {name} split 0 of the "
                                 f"{len(indexed)} documents in {data_prefix}; give it a larger "
                                 f"weight or use a larger corpus")
            datasets.append(None)
        else:
            datasets.append(GPTDataset(indexed, documents, num_samples[k], seq_length, seed, name))
    return datasets[0], datasets[1], datasets[2]

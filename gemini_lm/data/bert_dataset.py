"""BERT pretraining samples: sentence pairs with masked tokens, over a `.bin/.idx` corpus
made with `tools/preprocess_data.py --split-sentences` (a sequence per sentence).

As in Megatron's BertDataset, a *samples mapping* is built once per split: documents
are cut into runs of consecutive sentences of a target length (usually the full
`seq_length - 3`, with probability `short_seq_prob` a random shorter one), over as many
epochs as `num_samples` needs, then shuffled. Sample i is built on access from its run
with `np.random.RandomState(seed + i)`:

- segment A is the run's first k sentences (k random); segment B is the rest of the run
  ("is next", label 0) or, with probability 1/2, sentences from a random other document
  ("is random", label 1): BERT's next-sentence prediction;
- the pair is trimmed to the target length, one token at a time from the longer segment,
  at its front or back at random;
- [CLS] A [SEP] B [SEP], then 15 % of the non-special tokens are predicted: 80 % of them
  replaced by [MASK], 10 % by a random token, 10 % left as they are.

Everything is a pure function of (corpus, split, seq_length, seed, num_samples), so every
rank builds the same samples and a restart that knows `consumed_samples` resumes exactly.
"""
from __future__ import annotations

import numpy as np

from gemini_lm.data.gpt_dataset import SPLIT_NAMES, parse_split, split_boundaries
from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.data.tokenizer import Tokenizer
from gemini_lm.errors import UsageError

MASKED_LM_PROB = 0.15
SHORT_SEQ_PROB = 0.1


class BertDataset:
    def __init__(self, indexed_dataset: IndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, tokenizer: Tokenizer, name: str = "train",
                 masked_lm_prob: float = MASKED_LM_PROB, short_seq_prob: float = SHORT_SEQ_PROB):
        specials = {k: getattr(tokenizer, k) for k in ("cls", "sep", "mask", "pad")}
        missing = [k for k, v in specials.items() if v is None]
        if missing:
            raise UsageError(f"BERT needs a tokenizer with cls/sep/mask/pad tokens; "
                             f"{type(tokenizer).__name__} lacks {missing}")
        if seq_length < 5:
            raise UsageError(f"--seq-length {seq_length} is too short for a BERT sentence pair")
        self.indexed_dataset, self.name, self.seed = indexed_dataset, name, seed
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seq_length, self.masked_lm_prob = seq_length, masked_lm_prob
        self.cls, self.sep, self.mask, self.pad = (specials[k] for k in ("cls", "sep", "mask", "pad"))
        # Random replacements come from the ordinary tokens only.
        not_special = {v for v in (*specials.values(), tokenizer.eod) if v is not None}
        self.vocab_ids = np.array([i for i in range(tokenizer.vocab_size) if i not in not_special])
        self.samples = build_samples_mapping(indexed_dataset, self.documents, num_samples,
                                             seq_length - 3, short_seq_prob, seed, name)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        first, end, doc, target = (int(x) for x in self.samples[i])
        rng = np.random.RandomState((self.seed + i) % 2**32)
        a, b, is_random = self._segments(rng, first, end, doc, target)
        a, b = _truncate_pair(a, b, target, rng)
        tokens = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int64)
        tokentypes = np.zeros_like(tokens)
        tokentypes[len(a) + 2:] = 1
        tokens, labels, loss_mask = self._mask(tokens, rng)
        pad = self.seq_length - len(tokens)
        return {
            "tokens": np.pad(tokens, (0, pad), constant_values=self.pad),
            "tokentype_ids": np.pad(tokentypes, (0, pad)),
            "padding_mask": np.pad(np.ones_like(tokens), (0, pad)),
            "labels": np.pad(labels, (0, pad), constant_values=-1),
            "loss_mask": np.pad(loss_mask, (0, pad)),
            "is_random": np.array(int(is_random), dtype=np.int64),
        }

    def _sentences(self, first: int, end: int) -> np.ndarray:
        return np.concatenate([self.indexed_dataset.get(k) for k in range(first, end)])

    def _segments(self, rng: np.random.RandomState, first: int, end: int, doc: int, target: int):
        a_end = first + (1 if end - first == 2 else rng.randint(1, end - first))
        a = self._sentences(first, a_end)
        if len(self.documents) > 1 and rng.random_sample() < 0.5:
            return a, self._random_segment(rng, doc, max(1, target - len(a))), True
        return a, self._sentences(a_end, end), False

    def _random_segment(self, rng: np.random.RandomState, doc: int, length: int) -> np.ndarray:
        """About `length` tokens of consecutive sentences from a document other than `doc`."""
        other = doc
        while other == doc:
            other = int(self.documents[rng.randint(len(self.documents))])
        doc_index = self.indexed_dataset.document_indices
        start, stop = int(doc_index[other]), int(doc_index[other + 1])
        end = first = rng.randint(start, stop)
        total = 0
        while end < stop and total < length:
            total += int(self.indexed_dataset.sequence_lengths[end])
            end += 1
        return self._sentences(first, end)

    def _mask(self, tokens: np.ndarray, rng: np.random.RandomState):
        candidates = np.flatnonzero((tokens != self.cls) & (tokens != self.sep))
        num = min(len(candidates), max(1, int(round(len(tokens) * self.masked_lm_prob))))
        positions = np.sort(rng.permutation(candidates)[:num])
        labels = np.full_like(tokens, -1)
        labels[positions] = tokens[positions]
        loss_mask = np.zeros_like(tokens)
        loss_mask[positions] = 1
        draw = rng.random_sample(num)
        replacements = self.vocab_ids[rng.randint(len(self.vocab_ids), size=num)]
        out = tokens.copy()
        out[positions] = np.where(draw < 0.8, self.mask,
                                  np.where(draw < 0.9, tokens[positions], replacements))
        return out, labels, loss_mask


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.RandomState):
    """Trim the longer segment, a token at a time from its front or back, until they fit."""
    bounds = [[0, len(a)], [0, len(b)]]
    while (bounds[0][1] - bounds[0][0]) + (bounds[1][1] - bounds[1][0]) > max_tokens:
        longer = bounds[0] if bounds[0][1] - bounds[0][0] > bounds[1][1] - bounds[1][0] else bounds[1]
        if rng.random_sample() < 0.5:
            longer[0] += 1
        else:
            longer[1] -= 1
    return a[bounds[0][0]:bounds[0][1]], b[bounds[1][0]:bounds[1][1]]


def build_samples_mapping(indexed: IndexedDataset, documents: np.ndarray, num_samples: int,
                          max_num_tokens: int, short_seq_prob: float, seed: int,
                          name: str = "train") -> np.ndarray:
    """Rows (first sentence, end sentence, document, target length), shuffled; at least
    `num_samples` rows (whole epochs over the documents), at least one epoch."""
    rng = np.random.RandomState(seed)
    lengths, doc_index = indexed.sequence_lengths, indexed.document_indices

    def draw_target() -> int:
        return rng.randint(2, max_num_tokens + 1) if rng.random_sample() < short_seq_prob \
            else max_num_tokens

    rows: list[tuple[int, int, int, int]] = []
    while True:
        before = len(rows)
        for doc in documents:
            start, stop = int(doc_index[doc]), int(doc_index[doc + 1])
            if stop - start < 2:
                continue   # a pair needs two sentences
            first, total, target = start, 0, draw_target()
            for s in range(start, stop):
                total += int(lengths[s])
                count, remaining = s + 1 - first, stop - s - 1
                if (total >= target and count >= 2 and remaining >= 2) or remaining == 0:
                    if count >= 2:
                        rows.append((first, s + 1, int(doc), target))
                    first, total, target = s + 1, 0, draw_target()
        if len(rows) == before:
            raise UsageError(f"{indexed.path_prefix}: the {name} split has no document with two "
                             "sentences; BERT data needs tools/preprocess_data.py --split-sentences")
        if len(rows) >= num_samples:
            break
    mapping = np.array(rows, dtype=np.int64)
    return mapping[rng.permutation(len(mapping))]


def build_bert_datasets(data_prefix: str, split: str, seq_length: int, seed: int,
                        num_samples: tuple[int, int, int], tokenizer: Tokenizer
                        ) -> tuple[BertDataset | None, BertDataset | None, BertDataset | None]:
    """(train, valid, test) over contiguous ranges of the corpus's *documents*; a split
    with weight 0 or no samples wanted is None."""
    indexed = IndexedDataset(data_prefix)
    fractions = parse_split(split)
    bounds = split_boundaries(fractions, indexed.num_documents)
    datasets: list[BertDataset | None] = []
    for k, name in enumerate(SPLIT_NAMES):
        documents = np.arange(bounds[k], bounds[k + 1], dtype=np.int64)
        if fractions[k] == 0 or num_samples[k] == 0:
            datasets.append(None)
        elif len(documents) == 0:
            raise UsageError(f"--split {split} leaves the {name} split 0 of the "
                             f"{indexed.num_documents} documents in {data_prefix}")
        else:
            datasets.append(BertDataset(indexed, documents, num_samples[k], seq_length, seed,
                                        tokenizer, name))
    return datasets[0], datasets[1], datasets[2]

"""The default corpus split into sentences, for BERT (`pretrain_bert.py` with no --data-path).

Same documents and tokenizer as the GPT default (sample_corpus.py), preprocessed with
sentence splitting and without end-of-document tokens, next to it in the cache. The
`.idx` appears last (IndexedDatasetBuilder renames it into place after the `.bin`), and an
exclusive lock makes concurrent ranks build it once.
"""
from __future__ import annotations

import fcntl
import os

from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.data.preprocess import preprocess_jsonl
from gemini_lm.data.sample_corpus import DefaultCorpus, ensure_default_corpus


def ensure_default_bert_corpus(cache_dir: str | None = None) -> DefaultCorpus:
    corpus = ensure_default_corpus(cache_dir)
    directory = os.path.dirname(corpus.data_prefix)
    prefix = os.path.join(directory, "corpus_text_sentence")
    if not IndexedDataset.exists(prefix):
        with open(prefix + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
            if not IndexedDataset.exists(prefix):
                preprocess_jsonl(os.path.join(directory, "corpus.jsonl"),
                                 os.path.join(directory, "corpus"),
                                 {"tokenizer_type": corpus.tokenizer_type,
                                  "tokenizer_model": corpus.tokenizer_model},
                                 split_sentences=True)
    return DefaultCorpus(data_prefix=prefix, tokenizer_model=corpus.tokenizer_model)

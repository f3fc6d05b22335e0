import os

import numpy as np
import pytest

from gemini_lm.data.gpt_dataset import GPTDataset, build_gpt_datasets
from gemini_lm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from gemini_lm.errors import UsageError


@pytest.fixture
def corpus(tmp_path) -> str:
    """50 documents of 1..30 tokens; token k of document d is 1000*d + k, so every
    token says where it came from. Each document ends with an eod (0), as --append-eod."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus")
    with IndexedDatasetBuilder(prefix + ".bin", np.int32) as builder:
        for d in range(50):
            n = int(rng.integers(1, 30))
            builder.add_item(np.append(1000 * (d + 1) + np.arange(n), 0))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    return prefix


def stream(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed_dataset[int(d)] for d in ds.document_index])


def megatron_sample_index(sizes, document_index, seq_length, num_samples):
    """Megatron's helpers.cpp build_sample_idx, transcribed line by line."""
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    document_idx_index, doc_offset = 0, 0
    for sample_index in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[document_index[document_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                document_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (document_idx_index, doc_offset)
    return sample_idx


@pytest.mark.parametrize("seq_length,num_samples", [(16, 10), (7, 400), (64, 50), (1, 30)])
def test_samples_cover_the_stream_contiguously(corpus, seq_length, num_samples):
    indexed = IndexedDataset(corpus)
    ds = GPTDataset(indexed, np.arange(50), num_samples, seq_length, seed=1234)
    assert len(ds) >= num_samples
    tokens = stream(ds)
    assert len(ds) == (len(tokens) - 1) // seq_length
    np.testing.assert_array_equal(
        ds.sample_index, megatron_sample_index(indexed.sequence_lengths, ds.document_index,
                                               seq_length, len(ds)))
    seen = np.zeros(len(tokens), dtype=bool)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        sample = ds[i]["tokens"]
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
        np.testing.assert_array_equal(sample, tokens[j * seq_length: (j + 1) * seq_length + 1])
        seen[j * seq_length: (j + 1) * seq_length + 1] = True
    # Every token but a final partial sample's is in some sample; samples cross documents.
    assert seen[: len(ds) * seq_length + 1].all()
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_epochs_repeat_every_document(corpus):
    indexed = IndexedDataset(corpus)
    one_epoch = (int(indexed.sequence_lengths.sum()) - 1) // 8
    ds = GPTDataset(indexed, np.arange(50), 3 * one_epoch + one_epoch // 2, 8, seed=3)
    counts = np.bincount(ds.document_index, minlength=50)
    assert (counts == 4).all()
    # A short final epoch is shuffled on its own (Megatron's separate_final_epoch).
    assert sorted(ds.document_index[-50:].tolist()) == list(range(50))
    before_final = (3 * int(indexed.sequence_lengths.sum()) - 1) // 8
    assert sorted(ds.shuffle_index[:before_final].tolist()) == list(range(before_final))


def test_deterministic_across_builds(corpus):
    a = GPTDataset(IndexedDataset(corpus), np.arange(50), 200, 16, seed=7)
    b = GPTDataset(IndexedDataset(corpus), np.arange(50), 200, 16, seed=7)
    c = GPTDataset(IndexedDataset(corpus), np.arange(50), 200, 16, seed=8)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)


def test_splits(corpus):
    train, valid, test = build_gpt_datasets(corpus, "8,1,1", 8, 1, (100, 10, 10))
    assert sorted(set(train.document_index.tolist())) == list(range(40))
    assert sorted(set(valid.document_index.tolist())) == list(range(40, 45))
    assert sorted(set(test.document_index.tolist())) == list(range(45, 50))
    assert len(train) >= 100 and len(valid) >= 10 and len(test) >= 10
    # Tokens are 1000*(doc+1)+k: each split holds only its own documents' tokens.
    assert all(t == 0 or t // 1000 - 1 >= 45 for t in test[0]["tokens"])

    train, valid, test = build_gpt_datasets(corpus, "969,30,1", 8, 1, (100, 10, 0))
    assert train is not None and valid is not None and test is None  # 0.05 documents
    train, valid, test = build_gpt_datasets(corpus, "1,0,0", 8, 1, (100, 10, 10))
    assert valid is None and test is None
    assert sorted(set(train.document_index.tolist())) == list(range(50))


def test_the_bin_or_idx_file_builds_the_same_datasets_as_the_prefix(corpus):
    expected = build_gpt_datasets(corpus, "8,1,1", 8, 1, (100, 10, 10))
    for given in (corpus + ".bin", corpus + ".idx"):
        for ds, want in zip(build_gpt_datasets(given, "8,1,1", 8, 1, (100, 10, 10)), expected):
            assert len(ds) == len(want)
            assert all(np.array_equal(ds[i]["tokens"], want[i]["tokens"]) for i in range(len(ds)))


def test_bad_splits(corpus):
    with pytest.raises(UsageError, match="test split 0 of the 50 documents"):
        build_gpt_datasets(corpus, "969,30,1", 8, 1, (100, 10, 10))
    with pytest.raises(UsageError, match="--split"):
        build_gpt_datasets(corpus, "a,b", 8, 1, (1, 1, 1))
    with pytest.raises(UsageError, match="--split"):
        build_gpt_datasets(corpus, "1,1,1,1", 8, 1, (1, 1, 1))


def test_indices_are_cached_and_rebuilt_when_the_corpus_changes(corpus, tmp_path, monkeypatch):
    from gemini_lm.data.index_cache import cache_dir

    monkeypatch.setenv("GEMINI_LM_CACHE", str(tmp_path / "cache"))
    prefix = corpus
    first = GPTDataset(IndexedDataset(prefix), np.arange(5, dtype=np.int32), 8, 4, seed=3)
    files = sorted(os.listdir(cache_dir()))
    assert len(files) == 3 and all(f.endswith(".npy") for f in files)
    again = GPTDataset(IndexedDataset(prefix), np.arange(5, dtype=np.int32), 8, 4, seed=3)
    assert isinstance(again.shuffle_index, np.memmap)                 # read back, not rebuilt
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert [again[i]["tokens"].tolist() for i in range(len(again))] == \
        [first[i]["tokens"].tolist() for i in range(len(first))]
    os.utime(prefix + ".bin", ns=(1, 1))                               # the corpus changed: a new key
    GPTDataset(IndexedDataset(prefix), np.arange(5, dtype=np.int32), 8, 4, seed=3)
    assert len(os.listdir(cache_dir())) == 6

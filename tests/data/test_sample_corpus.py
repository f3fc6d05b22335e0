"""The default corpus: built once, concurrently safe, cached, and usable end to end."""
import json
import multiprocessing
import os

import numpy as np
import pytest

from gemini_lm.data.gpt_dataset import build_gpt_datasets
from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.data.sample_corpus import DefaultCorpus, ensure_default_corpus
from gemini_lm.data.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow   # builds the corpus in two processes


def _build(queue) -> None:
    corpus = ensure_default_corpus()  # finds the cache through $GEMINI_LM_CACHE
    queue.put((corpus, os.path.getmtime(corpus.data_prefix + ".idx")))


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory):
    """Two processes race to build the corpus in a fresh cache; the tests share the result."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMINI_LM_CACHE", str(cache))
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_build, args=(queue,)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
    # The variable is gone again: later tests in this session must not find this cache.
    return cache, results


def test_concurrent_builds_produce_one_corpus(default_corpus):
    cache, results = default_corpus
    (a, a_mtime), (b, b_mtime) = results
    assert a == b and a_mtime == b_mtime  # the second process used the first one's build
    entries = sorted(os.listdir(cache))
    assert len(entries) == 2 and entries[1] == entries[0] + ".lock"  # no temporary dirs


def _files(directory) -> dict[str, tuple[int, int, int]]:
    """Every file under `directory`: (inode, size, mtime in ns) — a rebuild would change them."""
    out = {}
    for d, _, names in os.walk(directory):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), directory)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_cached_call_reads_the_cache_without_rebuilding(default_corpus):
    cache, results = default_corpus
    before = _files(cache)
    corpus = ensure_default_corpus(str(cache))
    assert corpus == results[0][0]
    assert isinstance(corpus, DefaultCorpus)
    assert _files(cache) == before   # nothing written, replaced or added


def test_the_cache_variable_does_not_leak(default_corpus):
    assert "GEMINI_LM_CACHE" not in os.environ or os.environ["GEMINI_LM_CACHE"] != str(default_corpus[0])


def test_corpus_content_and_tokenizer(default_corpus):
    corpus = default_corpus[1][0][0]
    tok = build_tokenizer(corpus.tokenizer_type, tokenizer_model=corpus.tokenizer_model)
    assert 4096 <= tok.vocab_size <= 8192
    assert None not in (tok.cls, tok.sep, tok.mask, tok.pad)
    ds = IndexedDataset(corpus.data_prefix)
    tokens = int(ds.sequence_lengths.sum())
    assert len(ds) > 1000 and 200_000 < tokens < 2_000_000
    assert all(ds[i][-1] == tok.eod for i in range(0, len(ds), 97))  # --append-eod
    with open(os.path.join(os.path.dirname(corpus.data_prefix), "corpus.jsonl")) as f:
        first = json.loads(f.readline())["text"]
    assert tok.detokenize(ds[0][:-1]) == first and len(first) > 100
    assert all(np.count_nonzero(ds[i] == tok.eod) == 1 for i in range(20))


def test_corpus_feeds_the_default_split(default_corpus):
    corpus = default_corpus[1][0][0]
    train, valid, test = build_gpt_datasets(corpus.data_prefix, "969,30,1", 128, 1234,
                                            (2000, 100, 20))
    assert len(train) >= 2000 and len(valid) >= 100 and len(test) >= 20
    assert train[0]["tokens"].shape == (129,)

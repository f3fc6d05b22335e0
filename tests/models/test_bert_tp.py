"""BERT end to end through pretrain(): a sentence-split byte corpus, the dataset's
determinism, and TP=2 == TP=1 (same seed, same padded vocabulary, no dropout), loss by loss
and in the whole final state: weights and Adam's moments."""
import os

import numpy as np
import pytest

from gemini_lm.data.bert_dataset import build_bert_datasets
from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.data.preprocess import preprocess_jsonl
from gemini_lm.data.tokenizer import ByteLevelTokenizer
from gemini_lm.errors import UsageError
from tests.e2e import assert_same_state, read_losses, read_metrics, tiny_gpt_args, unsharded_state


def build_bert_byte_corpus(byte_corpus: str) -> str:
    """The byte corpus's documents (tests/e2e.py), one sequence per sentence."""
    directory = os.path.dirname(byte_corpus)
    prefix = os.path.join(directory, "bert_bytes")
    if not IndexedDataset.exists(prefix + "_text_sentence"):
        preprocess_jsonl(os.path.join(directory, "docs.jsonl"), prefix,
                         {"tokenizer_type": "ByteLevelTokenizer"}, split_sentences=True)
    return prefix + "_text_sentence"


@pytest.fixture
def bert_corpus(byte_corpus):
    return build_bert_byte_corpus(byte_corpus)


def bert_pretrain_body(rank: int, world_size: int, argv: list[str]):
    import pretrain_bert
    from gemini_lm.config import parse_config

    cfg = pretrain_bert.use_default_corpus(parse_config(argv, world_size=world_size))
    return pretrain_bert.pretrain(cfg, pretrain_bert.model_provider, pretrain_bert.datasets_provider,
                                  pretrain_bert.bert_forward_step)


def run_bert(tmp_path, data, name, world, *extra):
    from tests.dist import run_ranks

    log_dir = str(tmp_path / name)
    run_ranks(bert_pretrain_body, world, tmp_path, args=(tiny_gpt_args(data, log_dir, "--no-gemini", *extra),),
              timeout_s=120.0)
    return read_losses(log_dir)


def test_dataset_samples_are_deterministic_and_well_formed(bert_corpus):
    tok = ByteLevelTokenizer()
    train, valid, test = build_bert_datasets(bert_corpus, "90,10,0", 48, 7, (300, 10, 0), tok)
    again, _, _ = build_bert_datasets(bert_corpus, "90,10,0", 48, 7, (300, 10, 0), tok)
    assert len(train) >= 300 and valid is not None and test is None
    randoms = 0
    for i in range(0, 300, 7):
        s, t = train[i], again[i]
        assert all(np.array_equal(s[k], t[k]) for k in s)
        n = int(s["padding_mask"].sum())
        tokens, types = s["tokens"], s["tokentype_ids"]
        assert tokens[0] == tok.cls and tokens[n - 1] == tok.sep and np.all(tokens[n:] == tok.pad)
        seps = np.flatnonzero(tokens[:n] == tok.sep)
        assert len(seps) == 2 and np.all(types[:seps[0] + 1] == 0) and np.all(types[seps[0] + 1:n] == 1)
        masked = s["loss_mask"].astype(bool)
        assert masked.sum() == max(1, round(n * 0.15)) and not masked[n:].any()
        assert np.all(s["labels"][~masked] == -1) and np.all(s["labels"][masked] < 256)
        randoms += int(s["is_random"])
    assert 0 < randoms < 43   # both kinds of pairs occur
    with pytest.raises(UsageError, match="split-sentences"):
        # A document-level corpus has one sequence per document: no sentence pairs.
        build_bert_datasets(bert_corpus.replace("bert_bytes_text_sentence", "bytes_text_document"),
                            "1", 48, 7, (10, 0, 0), tok)


@pytest.mark.slow
def test_tp2_equals_tp1(bert_corpus, tmp_path):
    iters = 16   # 2 of warm-up, then enough Adam steps for the moments to steer the updates
    flags = ("--train-iters", str(iters))
    # Same padded vocabulary (512) in both: padding is a multiple of divisible-by x TP.
    ref = run_bert(tmp_path, bert_corpus, "tp1", 1, *flags, "--make-vocab-size-divisible-by", "256",
                   "--save", str(tmp_path / "ck1"))
    tp2 = run_bert(tmp_path, bert_corpus, "tp2", 2, *flags, "--tensor-model-parallel-size", "2",
                   "--save", str(tmp_path / "ck2"))
    assert [i for i, _ in ref] == [i for i, _ in tp2] == list(range(1, iters + 1))
    for (i, x), (_, y) in zip(ref, tp2):
        assert abs(x - y) <= 1e-5, (i, x, y)
    assert ref[0][1] > 4.0   # ln(261) + ln(2): an untrained MLM + NSP loss, not a degenerate one
    assert ref[-1][1] < ref[0][1] - 0.5   # and it trained: the updates were not negligible
    # Gradient norms before clipping (which would hide a gradient off by a constant factor)
    norms = [[r["grad_norm"] for r in read_metrics(str(tmp_path / n))] for n in ("tp1", "tp2")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    assert_same_state(unsharded_state(str(tmp_path / "ck1"), iters), unsharded_state(str(tmp_path / "ck2"), iters))

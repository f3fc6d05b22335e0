import pytest

from gemini_lm.data.tokenizer import TOKENIZER_TYPES, build_tokenizer
from gemini_lm.errors import UsageError

TEXT = ("The `with` statement wraps a block:\n\n    with open(path) as f:\n\tdata = f.read()\n"
        "Unicode too: naïve café, 日本語, emoji \U0001F600.")


def check_round_trip(tok, text=TEXT):
    ids = tok.tokenize(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == text
    assert tok.eod is not None and 0 <= tok.eod < tok.vocab_size


def test_byte_level():
    tok = build_tokenizer("ByteLevelTokenizer")
    check_round_trip(tok)
    assert tok.tokenize("A") == [65]
    specials = [tok.eod, tok.pad, tok.cls, tok.sep, tok.mask]
    assert len(set(specials)) == 5 and min(specials) >= 256
    assert tok.vocab_size == max(specials) + 1
    assert tok.detokenize([104, 105, tok.eod]) == "hi"


def test_sentencepiece(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    check_round_trip(tok)
    assert tok.vocab_size == 600
    specials = [tok.eod, tok.pad, tok.cls, tok.sep, tok.mask]
    assert None not in specials and len(set(specials)) == 5
    # Frequent words are single pieces, not bytes.
    assert len(tok.tokenize("the statement")) <= 4


def test_sentencepiece_adds_missing_specials(tmp_path):
    # A model without <cls>/<sep>/<mask>/<pad>: like Megatron, ids past its vocabulary.
    import sentencepiece

    from tests.data.conftest import sample_texts

    prefix = str(tmp_path / "bare")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts()[:10]), model_prefix=prefix, vocab_size=400,
        model_type="bpe", minloglevel=2, num_threads=1, byte_fallback=True)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")
    assert tok.vocab_size == 400 + 4
    assert sorted([tok.cls, tok.sep, tok.mask, tok.pad]) == [400, 401, 402, 403]
    assert tok.eod < 400  # the model's own </s>
    hello = tok.tokenize("hello")
    assert tok.detokenize([tok.cls] + hello + [tok.sep]) == "<cls>hello<sep>"


def test_gpt2_bpe_and_hugging_face_directory(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    check_round_trip(tok)
    assert tok.vocab_size == 500
    assert tok.tokenize("<|endoftext|>") == [tok.eod]
    assert tok.cls is None and tok.mask is None

    tok.save_pretrained(str(tmp_path / "hf"))
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    check_round_trip(hf)
    assert hf.tokenize(TEXT) == tok.tokenize(TEXT)
    assert (hf.vocab_size, hf.eod) == (tok.vocab_size, tok.eod)
    long_text = "the statement " * 5000  # longer than any model context: no error
    assert hf.detokenize(hf.tokenize(long_text)) == long_text


def test_bad_tokenizer_arguments(tmp_path, gpt2_files):
    with pytest.raises(UsageError) as e:
        build_tokenizer("BertWordPieceLowerCase")
    assert all(name in str(e.value) for name in TOKENIZER_TYPES)
    with pytest.raises(UsageError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(UsageError, match="not found"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "no.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "junk.model"))
    with pytest.raises(UsageError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0])
    with pytest.raises(UsageError, match="local directory"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot load"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "empty"))

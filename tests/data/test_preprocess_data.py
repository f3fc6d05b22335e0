"""tools/preprocess_data.py and tools/train_tokenizer.py, run as a user runs them."""
import os
import subprocess
import sys

import numpy as np
import pytest

from gemini_lm.data.indexed_dataset import IndexedDataset
from gemini_lm.data.preprocess import split_sentences
from gemini_lm.data.tokenizer import build_tokenizer
from tests.data.conftest import sample_texts, write_jsonl

pytestmark = pytest.mark.slow   # spawns processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join("tools", name), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def records():
    texts = sample_texts()[:12]
    return [{"text": t, "title": t[:40]} for t in texts] + [{"text": "", "title": "empty"}]


def test_preprocess_end_to_end_with_workers(tmp_path, sp_model):
    jsonl = write_jsonl(tmp_path / "in.jsonl", records())
    common = ["--input", jsonl, "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", sp_model, "--json-keys", "text", "title", "--append-eod"]
    two = run_tool("preprocess_data.py", *common, "--output-prefix", tmp_path / "w2",
                   "--workers", 2)
    assert two.returncode == 0, two.stderr
    one = run_tool("preprocess_data.py", *common, "--output-prefix", tmp_path / "w1")
    assert one.returncode == 0, one.stderr
    for suffix in ("text_document.bin", "text_document.idx", "title_document.idx"):
        assert (tmp_path / f"w2_{suffix}").read_bytes() == (tmp_path / f"w1_{suffix}").read_bytes()

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    ds = IndexedDataset(str(tmp_path / "w2_text_document"))
    assert ds.dtype == np.uint16
    assert len(ds) == ds.num_documents == 12  # the empty document is skipped
    for i, record in enumerate(records()[:12]):
        assert ds[i].tolist() == tok.tokenize(record["text"]) + [tok.eod]
        assert tok.detokenize(ds[i][:-1]) == record["text"]
    titles = IndexedDataset(str(tmp_path / "w2_title_document"))
    assert len(titles) == 13 and tok.detokenize(titles[12][:-1]) == "empty"


def test_split_sentences(tmp_path, sp_model):
    text = "First sentence here. Second one? Yes! \"Quoted.\" Done.\n\nNew paragraph"
    assert split_sentences(text) == ["First sentence here.", "Second one?", "Yes!",
                                     "\"Quoted.\"", "Done.", "New paragraph"]
    assert "".join(split_sentences(text, keep_newlines=True)) == text
    assert split_sentences("e.g. this is not split. 3.14 neither") == [
        "e.g. this is not split.", "3.14 neither"]

    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": text}, {"text": "Only one."}])
    result = run_tool("preprocess_data.py", "--input", jsonl, "--output-prefix", tmp_path / "s",
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      sp_model, "--split-sentences", "--append-eod", "--workers", 2)
    assert result.returncode == 0, result.stderr
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    assert ds.document_indices.tolist() == [0, 6, 7]
    assert tok.detokenize(ds[1]) == "Second one?"
    assert ds[5][-1] == tok.eod and ds[4][-1] != tok.eod  # eod ends the document only
    assert ds[6].tolist() == tok.tokenize("Only one.") + [tok.eod]


@pytest.mark.parametrize("case", ["missing", "bad_json", "no_key", "tokenizer", "out_dir"])
def test_bad_input_exits_2_without_output(tmp_path, sp_model, case):
    good = {"text": "fine"}
    lines = {"missing": None, "bad_json": None, "no_key": [good, {"body": "x"}],
             "tokenizer": [good], "out_dir": [good]}[case]
    jsonl = tmp_path / "in.jsonl"
    if case == "bad_json":
        jsonl.write_text('{"text": "ok"}\n' * 100 + '{"text": broken\n')
    elif lines is not None:
        write_jsonl(jsonl, lines)
    tokenizer = "NoSuchTokenizer" if case == "tokenizer" else "SentencePieceTokenizer"
    before = set(os.listdir(tmp_path))
    out = tmp_path / "no_such_dir" / "out" if case == "out_dir" else tmp_path / "out"
    result = run_tool("preprocess_data.py", "--input", jsonl, "--output-prefix",
                      out, "--tokenizer-type", tokenizer, "--tokenizer-model",
                      sp_model, "--workers", 2)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    expected = {"missing": "cannot read --input", "bad_json": "in.jsonl:101 is not valid JSON",
                "no_key": "in.jsonl:2 has no string field 'text'",
                "tokenizer": "unknown tokenizer type", "out_dir": "does not exist"}[case]
    assert expected in result.stderr
    assert set(os.listdir(tmp_path)) == before  # no .bin/.idx, no temporary files


def test_train_tokenizer_cli(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"body": t} for t in sample_texts()])
    result = run_tool("train_tokenizer.py", "--input", jsonl, "--output-prefix", tmp_path / "tok",
                      "--vocab-size", 500, "--model-type", "unigram", "--json-key", "body")
    assert result.returncode == 0, result.stderr
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "tok.model"))
    assert tok.vocab_size == 500
    assert tok.detokenize(tok.tokenize(sample_texts()[0])) == sample_texts()[0]

    bad = run_tool("train_tokenizer.py", "--input", jsonl, "--output-prefix", tmp_path / "x",
                   "--vocab-size", 500)  # the default key "text" is absent
    assert bad.returncode == 2 and "in.jsonl:1 has no string field 'text'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.model").exists()
    too_big = run_tool("train_tokenizer.py", "--input", jsonl, "--output-prefix", tmp_path / "y",
                       "--vocab-size", 10_000_000, "--json-key", "body")
    assert too_big.returncode == 2 and "Traceback" not in too_big.stderr
    assert [p for p in os.listdir(tmp_path) if p.startswith(("x.", "y."))] == []

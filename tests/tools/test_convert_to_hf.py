"""tools/convert_to_hf.py: Hugging Face -> ours (TP=2) -> Hugging Face is exact for GPT-2
and BERT; the import is a checkpoint pretraining continues from; exported tokenizers load
with AutoTokenizer offline and give our ids. Models are built from local configs."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForPreTraining, GPT2LMHeadModel

from gemini_lm.data.tokenizer import ByteLevelTokenizer, SentencePieceTokenizer, train_sentencepiece
from gemini_lm.inference.hf_tokenizer import save_hf_tokenizer
import convert_to_hf
from tests.e2e import ROOT, run_pretrain, tiny_gpt_args
from tests.models import test_bert_hf, test_gpt_hf


def _assert_same_state(hf_dir: str, cls, original: dict) -> None:
    back = cls.from_pretrained(hf_dir, local_files_only=True).state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_to_ours_tp2_to_hf_is_exact(kind, tmp_path):
    hf, cls = (test_gpt_hf.make_hf(), GPT2LMHeadModel) if kind == "gpt2" else \
        (test_bert_hf.make_hf(), BertForPreTraining)
    hf.save_pretrained(tmp_path / "in")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    convert_to_hf.main(["--from-hf", str(tmp_path / "in"), "--save", ckpt, "--tensor-model-parallel-size", "2"])
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000000"))) == \
        ["manifest.json", "tp_rank_00.safetensors", "tp_rank_01.safetensors"]
    convert_to_hf.export_to_hf(ckpt, out)
    _assert_same_state(out, cls, hf.state_dict())
    # A full training state, each shard holding its half of the vocab-parallel table (256 padded).
    shard = load_file(os.path.join(ckpt, "iter_0000000", "tp_rank_01.safetensors"))
    embedding = "model/wte.weight" if kind == "gpt2" else "model/word_embeddings.weight"
    assert shard[embedding].shape == (128, 64)
    assert int(shard["train/iteration"][0]) == 0 and any(k.startswith("optimizer/") for k in shard)


@pytest.mark.slow
def test_import_continues_training(byte_corpus, tmp_path):
    """pretrain_gpt.py --load the import (TP=2): with lr 0 the weights survive a step exactly."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(test_gpt_hf.GPT2Config(vocab_size=261, n_positions=32, n_embd=64, n_layer=2,
                                                 n_head=4)).eval()
    hf.save_pretrained(tmp_path / "in")
    ckpt = str(tmp_path / "ckpt")
    convert_to_hf.main(["--from-hf", str(tmp_path / "in"), "--save", ckpt, "--tensor-model-parallel-size", "2"])
    run_pretrain(tmp_path, tiny_gpt_args(byte_corpus, str(tmp_path / "log"), "--no-gemini", "--train-iters", "1",
                                         "--tensor-model-parallel-size", "2", "--load", ckpt,
                                         "--save", str(tmp_path / "after"), "--lr", "0", "--min-lr", "0"), 2)
    assert open(tmp_path / "after" / "latest_checkpointed_iteration.txt").read().strip() == "1"
    convert_to_hf.export_to_hf(str(tmp_path / "after"), str(tmp_path / "out"), ByteLevelTokenizer())
    _assert_same_state(str(tmp_path / "out"), GPT2LMHeadModel, hf.state_dict())


TEXTS = ["Hello world!  Two  spaces.\nNew line\n\n    indented", "naïve café — 日本語 😀", " leading space",
         "def f(x):\n    return x ** 2  # squared", "The quick brown fox jumps over the lazy dog. 12345"]


def test_an_imported_checkpoint_records_the_hf_tokenizer(tmp_path):
    from gemini_lm.inference.checkpoint import build_tool_tokenizer, recorded_tokenizer

    test_gpt_hf.make_hf().save_pretrained(tmp_path / "in")   # vocab 256 + padding: byte tokens fit
    save_hf_tokenizer(ByteLevelTokenizer(), str(tmp_path / "in"))
    ckpt = str(tmp_path / "ck")
    convert_to_hf.main(["--from-hf", str(tmp_path / "in"), "--save", ckpt])
    spec = recorded_tokenizer(ckpt)
    assert spec["tokenizer_type"] == "HuggingFaceTokenizer" and spec["tokenizer_model"] == str(tmp_path / "in")
    tok = build_tool_tokenizer(None, recorded=spec)
    assert tok.tokenize("hello") == ByteLevelTokenizer().tokenize("hello")


def test_exported_tokenizers_load_offline_with_our_ids(tmp_path):
    model = train_sentencepiece([t * 3 for t in TEXTS] + ["some more words for merges"] * 5,
                                str(tmp_path / "sp"), vocab_size=400)
    for tok in (SentencePieceTokenizer(model), ByteLevelTokenizer()):
        out = tmp_path / type(tok).__name__
        save_hf_tokenizer(tok, str(out))
        hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert len(hf) == tok.vocab_size
        assert (hf.eos_token_id, hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == \
            (tok.eod, tok.pad, tok.cls, tok.sep, tok.mask)
        for text in TEXTS:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == tok.tokenize(text), text
            assert hf.decode(ids) == text


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow   # runs the tool as a user would: the process's exit code and its one line
def test_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"pickled weights: never read")
    config = test_gpt_hf.make_hf().config
    config.bos_token_id = config.eos_token_id = 0   # in the tiny vocabulary: transformers says nothing
    config.save_pretrained(tmp_path / "hf")
    for args, message in [
        (["--out", str(tmp_path / "o")], "either"),
        (["--load", str(tmp_path), "--out", str(tmp_path / "o"), "--tokenizer-type", "ByteLevelTokenizer"],
         "no checkpoint"),
        (["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")], "model.safetensors"),
        (["--load"], "expected one argument"),
    ]:
        out = _cli(tmp_path, *args)
        lines = out.stderr.splitlines()
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, out.stderr)
        assert out.stdout == "" and not (tmp_path / "o").exists() and not (tmp_path / "ck").exists()

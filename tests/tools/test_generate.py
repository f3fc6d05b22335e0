"""tools/generate.py and the KV-cache generator: greedy output equals Hugging Face's
`generate(do_sample=False)` on the exported model token for token, at TP=1 and TP=2."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gemini_lm.data.tokenizer import ByteLevelTokenizer
from gemini_lm.errors import UsageError
from gemini_lm.inference.generation import SamplingParams, generate, sample_next
from tests.dist import run_ranks
from tests.e2e import ROOT, run_pretrain, tiny_gpt_args
from tests.models.test_gpt_hf import make_hf, ours_from_hf
import convert_to_hf
import generate as generate_tool

PROMPT = "Checkpoints "   # 12 byte tokens + 20 new fit the 32 positions


@pytest.fixture(scope="module")
def trained(byte_corpus, tmp_path_factory):
    """A tiny GPT trained for a few iterations at TP=2, and its Hugging Face export."""
    tmp = tmp_path_factory.mktemp("gen")
    ckpt, hf_dir = str(tmp / "ckpt"), str(tmp / "hf")
    run_pretrain(tmp, tiny_gpt_args(byte_corpus, str(tmp / "log"), "--no-gemini", "--train-iters", "8",
                                    "--lr", "1e-2", "--tensor-model-parallel-size", "2", "--save", ckpt), 2)
    convert_to_hf.export_to_hf(ckpt, hf_dir, ByteLevelTokenizer())
    return ckpt, _hf_greedy(hf_dir, 20)


def _tool(name, *args) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _hf_greedy(hf_dir: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
    out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0])


@pytest.mark.slow
def test_cli_greedy_equals_hf_generate(trained):
    ckpt, expected = trained
    ours = _tool("generate.py", "--load", ckpt, "--tokenizer-type", "ByteLevelTokenizer", "--prompt", PROMPT,
                 "--max-new-tokens", "20", "--greedy", "--no-stop-at-eod")
    assert ours == expected + "\n"
    assert ours.startswith(PROMPT) and len(ours) > len(PROMPT) + 1


@pytest.mark.slow
def test_cli_uses_the_tokenizer_the_checkpoint_records(trained):
    ckpt, expected = trained   # trained with ByteLevelTokenizer; no tokenizer flags now
    ours = _tool("generate.py", "--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "20", "--greedy",
                 "--no-stop-at-eod")
    assert ours == expected + "\n"


def test_a_recorded_tokenizer_whose_file_is_gone_is_a_usage_error():
    from gemini_lm.inference.checkpoint import build_tool_tokenizer

    gone = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/nonexistent/tok.model"}
    with pytest.raises(UsageError, match="/nonexistent/tok.model, which is gone"):
        build_tool_tokenizer(None, recorded=gone)


def _generate_body(rank, world_size, ckpt):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_tool.main(["--load", ckpt, "--tokenizer-type", "ByteLevelTokenizer", "--prompt", PROMPT,
                   "--max-new-tokens", "20", "--greedy", "--no-stop-at-eod",
                   "--tensor-model-parallel-size", str(world_size)])
    return out.getvalue()


@pytest.mark.slow
def test_tp2_greedy_equals_tp1(trained, tmp_path):
    ckpt, expected = trained
    outputs = run_ranks(_generate_body, 2, tmp_path, args=(ckpt,))
    assert outputs[0] == expected + "\n" and outputs[1] == ""   # only rank 0 prints


def test_kv_cache_matches_full_recompute_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = ours_from_hf(make_hf())
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, prompt, 12, SamplingParams())
    full = prompt
    with torch.no_grad():
        for _ in range(12):   # no cache: the whole sequence every step
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, full)
    params = SamplingParams(greedy=False, temperature=0.7, top_k=10, top_p=0.9)
    a = generate(model, prompt, 12, params, torch.Generator().manual_seed(1))
    b = generate(model, prompt, 12, params, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, SamplingParams(greedy=False, top_k=1)).item() == 1
    # top_p keeps the smallest prefix reaching p: here only the likeliest token.
    assert sample_next(torch.tensor([[0.0, 9.0, 1.0]]), SamplingParams(greedy=False, top_p=0.5)).item() == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--greedy", "--top-k", "5"], "excludes"),
    (["--max-new-tokens", "40"], "positions"),
    (["--temperature", "hot"], "invalid float value"),
])
def test_bad_input_exits_2_with_one_line(trained, extra, message):
    ckpt, _ = trained
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", ckpt,
                           "--tokenizer-type", "ByteLevelTokenizer", "--prompt", "x", *extra],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""

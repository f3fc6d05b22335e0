"""`--help` of every script works on its own (exit 0, usage on stdout), and the training
flags' help states each default once, in words a user can act on."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from gemini_lm.config import parse_config
from gemini_lm.models.config import MODEL_PRESETS
from tests.e2e import ROOT

SCRIPTS = sorted([os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))]
                 + ["pretrain_gpt.py", "pretrain_bert.py"])


@pytest.mark.slow   # one Python per script
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_prints_help_and_exits_0(script, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []   # --help writes nothing


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """Each option's help, joined over its wrapped lines: {'--num-layers': 'transformer layers ...'}."""
    options, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"  (-{1,2}[\w-]+)(?:[ ,]\S+)*(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            options[current] = m.group(2) or ""
        elif current and line.startswith(" " * 10):
            options[current] += " " + line.strip()
        else:
            current = None
    return {flag: text.strip() for flag, text in options.items()}


def test_local_cluster_help_needs_no_training_script(capsys):
    import local_cluster

    out = _help(local_cluster.parse_args, ["--help"], capsys)
    assert "--machines" in out and "-- SCRIPT.py" in out


def test_training_help_states_each_default_once(capsys):
    out = _help(parse_config, ["--help"], capsys)
    assert not re.search(r"^\w*Config:", out, re.M), "a group is titled with a class name"
    options = _options(out)
    for flag, text in options.items():
        assert text.count("(default") <= 1, f"{flag}: {text}"
        assert "(default: None)" not in text and "(default: True)" not in text, f"{flag}: {text}"
    for field in ("num_layers", "hidden_size", "num_attention_heads"):
        stated = ", ".join(f"{name} {preset[field]}" for name, preset in MODEL_PRESETS.items())
        assert f"(default: from --model-size: {stated})" in options["--" + field.replace("_", "-")]
    gemini = options["--no-gemini"]
    assert not gemini.startswith("take") and "on by default" not in gemini, gemini


def test_generate_help_lists_only_what_generation_uses(capsys):
    import generate

    options = _options(_help(generate.main, ["--help"], capsys))
    for flag in ("--load", "--prompt", "--max-new-tokens", "--tokenizer-type", "--tensor-model-parallel-size",
                 "--seed"):
        assert flag in options
    for flag in ("--lr", "--adam-beta1", "--train-iters", "--save", "--data-path", "--gemini-interval",
                 "--num-layers", "--log-dir"):
        assert flag not in options

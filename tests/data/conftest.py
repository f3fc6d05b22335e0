"""Small tokenizers built once per test session, in temporary directories."""
import json

import pytest

from gemini_lm.data.tokenizer import train_sentencepiece


def sample_texts() -> list[str]:
    """English prose and code from Python's own help topics."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)[:30]]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    return train_sentencepiece(sample_texts(), str(prefix), vocab_size=600)


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory) -> tuple[str, str]:
    """A tiny GPT-2 style vocab.json + merges.txt, trained with the `tokenizers` library."""
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sample_texts(), vocab_size=500, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    vocab, merges = bpe.save_model(str(directory))
    return vocab, merges

"""Train a SentencePiece tokenizer on a JSONL corpus.

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok --vocab-size 8192

writes tok.model (use with --tokenizer-type SentencePieceTokenizer) and tok.vocab.
"""
import argparse
import json
import sys


from gemini_lm.data.tokenizer import train_sentencepiece
from gemini_lm.errors import UsageError


def read_texts(path: str, json_key: str) -> list[str]:
    """All texts of the JSONL file; bad lines are a UsageError naming the line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read --input {path}: {e.strerror}") from None
    texts = []
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UsageError(f"{path}:{lineno} is not valid UTF-8 JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise UsageError(f"{path}:{lineno} has no string field {json_key!r}")
            texts.append(record[json_key])
    if not texts:
        raise UsageError(f"{path}: no documents to train on")
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--json-key", default="text", help="the key holding each document's text")
    args = p.parse_args(argv)
    try:
        texts = read_texts(args.input, args.json_key)
        model = train_sentencepiece(texts, args.output_prefix, args.vocab_size, args.model_type)
    except UsageError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

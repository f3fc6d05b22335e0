"""Tokenize a JSONL corpus into Megatron `.bin`/`.idx` pairs (Megatron's CLI).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

writes data/corpus_text_document.bin/.idx (`_sentence` with --split-sentences).
"""
import argparse
import os
import sys


from gemini_lm.data.preprocess import preprocess_jsonl
from gemini_lm.data.tokenizer import TOKENIZER_TYPES
from gemini_lm.errors import UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL file, one document per line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON object")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence; documents group them (for BERT)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="keep the whitespace between sentences when splitting")
    group = p.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       help=f"one of: {', '.join(TOKENIZER_TYPES)}")
    group.add_argument("--tokenizer-model", help="SentencePiece .model file or HF directory")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json")
    group.add_argument("--merge-file", help="GPT-2 merges.txt")
    group.add_argument("--append-eod", action="store_true",
                       help="append an end-of-document token to every document")
    group = p.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the outputs")
    group = p.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="report progress every N documents (0: never)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    tokenizer_kwargs = dict(tokenizer_type=args.tokenizer_type,
                            tokenizer_model=args.tokenizer_model,
                            vocab_file=args.vocab_file, merge_file=args.merge_file)
    try:
        prefixes = preprocess_jsonl(
            args.input, args.output_prefix, tokenizer_kwargs, json_keys=args.json_keys,
            append_eod=args.append_eod, split_sentences=args.split_sentences,
            keep_newlines=args.keep_newlines, workers=args.workers,
            log_interval=args.log_interval)
    except UsageError as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    for prefix in prefixes.values():
        print(f"wrote {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())

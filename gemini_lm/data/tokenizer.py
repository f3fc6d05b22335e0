"""Tokenizers behind one small interface, chosen by Megatron's `--tokenizer-type` names.

Every tokenizer exposes `vocab_size`, `eod`, `pad`, `cls`, `sep`, `mask` (None where the
vocabulary has no such token), `tokenize(text) -> list[int]` and `detokenize(ids) -> str`.
Nothing here touches the network: Hugging Face files are read from local paths only.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from gemini_lm.errors import UsageError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer",
                   "ByteLevelTokenizer")


class Tokenizer(ABC):
    vocab_size: int
    eod: int | None
    pad: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; the special tokens follow."""

    def __init__(self) -> None:
        self.eod, self.pad, self.cls, self.sep, self.mask = 256, 257, 258, 259, 260
        self.vocab_size = 261

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Specials missing from its vocabulary get ids past its end,
    as Megatron's SentencePieceTokenizer does, so BERT always has cls/sep/mask."""

    _CANDIDATES = {
        "cls": ("<cls>", "[CLS]", "<CLS>"),
        "sep": ("<sep>", "[SEP]", "<SEP>"),
        "mask": ("<mask>", "[MASK]", "<MASK>"),
        "pad": ("<pad>", "[PAD]", "<PAD>"),
        "eod": ("<eod>", "</s>", "<EOD>"),
    }

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        if not os.path.isfile(model_file):
            raise UsageError(f"sentencepiece model not found: {model_file}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise UsageError(f"{model_file}: not a sentencepiece model ({e})") from None
        base = self._sp.get_piece_size()
        self._extra: dict[int, str] = {}  # id past the model's vocabulary -> piece
        reserved = {"eod": self._sp.eos_id(), "pad": self._sp.pad_id()}
        for name, pieces in self._CANDIDATES.items():
            token_id = reserved.get(name, -1)
            if token_id < 0:
                token_id = next((self._sp.piece_to_id(p) for p in pieces
                                 if self._sp.piece_to_id(p) != self._sp.unk_id()), -1)
            if token_id < 0:
                token_id = base + len(self._extra)
                self._extra[token_id] = pieces[0]
            setattr(self, name, token_id)
        self.vocab_size = base + len(self._extra)

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        # Added specials are not in the model: render them by name between decoded runs.
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._extra:
                out.append(self._sp.decode(run) + self._extra[i])
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)


class HuggingFaceTokenizer(Tokenizer):
    """Any tokenizer `transformers.AutoTokenizer` loads from a local directory."""

    def __init__(self, path: str | None = None, *, hf_tokenizer=None) -> None:
        if hf_tokenizer is None:
            if not path or not os.path.isdir(path):
                raise UsageError(f"HuggingFaceTokenizer needs --tokenizer-model DIR, "
                                 f"a local directory; got {path!r}")
            from transformers import AutoTokenizer

            try:
                hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UsageError(f"{path}: cannot load a Hugging Face tokenizer "
                                 f"({str(e).splitlines()[0]})") from None
        # Documents are longer than any model context; silence the length warning.
        hf_tokenizer.model_max_length = 1 << 62
        self._tok = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eod = hf_tokenizer.eos_token_id
        self.pad = hf_tokenizer.pad_token_id
        self.cls = hf_tokenizer.cls_token_id
        self.sep = hf_tokenizer.sep_token_id
        self.mask = hf_tokenizer.mask_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer where AutoTokenizer (and HuggingFaceTokenizer) can load it."""
        self._tok.save_pretrained(directory)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from local `vocab.json` and `merges.txt`."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str | None, merge_file: str | None) -> None:
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise UsageError(f"GPT2BPETokenizer needs {flag} FILE; not found: {path!r}")
        from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # Assembled by hand rather than via GPT2TokenizerFast, whose file arguments
        # changed between transformers 4 and 5.
        try:
            bpe = RustTokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on bad files
            raise UsageError(f"{vocab_file}, {merge_file}: not a GPT-2 vocabulary "
                             f"({str(e).splitlines()[0]})") from None
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        if bpe.token_to_id(self.EOD_TOKEN) is None:
            raise UsageError(f"{vocab_file}: no {self.EOD_TOKEN} token in the vocabulary")
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=self.EOD_TOKEN)
        super().__init__(hf_tokenizer=tok)


def tokenizer_spec(tokenizer_type: str, tokenizer_model: str | None = None,
                   vocab_file: str | None = None, merge_file: str | None = None) -> dict:
    """What build_tokenizer needs, with absolute paths: checkpoints record it, so tools
    that load them (generate, convert_to_hf) rebuild the same tokenizer without flags."""
    def absolute(path):
        return os.path.abspath(path) if path and os.path.exists(path) else path
    return {"tokenizer_type": tokenizer_type, "tokenizer_model": absolute(tokenizer_model),
            "vocab_file": absolute(vocab_file), "merge_file": absolute(merge_file)}


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: str | None = None,
                    vocab_file: str | None = None, merge_file: str | None = None) -> Tokenizer:
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise UsageError("SentencePieceTokenizer needs --tokenizer-model FILE.model")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    raise UsageError(f"unknown tokenizer type {tokenizer_type!r}; "
                     f"valid: {', '.join(TOKENIZER_TYPES)}")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe") -> str:
    """Train a deterministic SentencePiece model on `texts`; returns the .model path.

    Normalization is the identity and bytes fall back to byte pieces, so detokenize
    inverts tokenize exactly (newlines and indentation included). The specials are
    pad=0, unk=1, bos=2, eos=3 (our eod), then <cls>, <sep>, <mask>.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise UsageError(f"--model-type must be bpe or unigram, got {model_type!r}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output-prefix {model_prefix}: directory {out_dir} does not exist")
    # SentencePiece trains on lines; a newline is left to the byte fallback.
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=tmp_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            user_defined_symbols=["<cls>", "<sep>", "<mask>"],
            num_threads=1, minloglevel=2)  # one thread: the same model on every machine
    except RuntimeError as e:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.unlink(tmp_prefix + suffix)
        raise UsageError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
    os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
    os.replace(tmp_prefix + ".model", model_prefix + ".model")
    return model_prefix + ".model"

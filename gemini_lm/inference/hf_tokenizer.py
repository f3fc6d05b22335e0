"""Our tokenizers as Hugging Face fast tokenizers (`tokenizer.json`), so an exported model
directory loads with `AutoTokenizer.from_pretrained(dir)`, offline, with the same ids.

- HuggingFaceTokenizer / GPT2BPETokenizer: saved as they are.
- SentencePieceTokenizer (BPE models, as train_sentencepiece makes): the same vocabulary
  and merges in a `tokenizers` BPE with byte fallback; the normalizer adds SentencePiece's
  dummy prefix and turns spaces into "▁", the decoder undoes both (the recipe of
  transformers' LlamaConverter). User-defined pieces (<cls>, <sep>, <mask>) and specials
  past the model's vocabulary become added tokens with the same ids.
- ByteLevelTokenizer: bytes 0..255 in GPT-2's byte-to-unicode alphabet, no merges, then
  its specials.
"""
from __future__ import annotations

from gemini_lm.data.tokenizer import (ByteLevelTokenizer, HuggingFaceTokenizer,
                                      SentencePieceTokenizer, Tokenizer)
from gemini_lm.errors import UsageError

_SPECIALS = ("eod", "pad", "cls", "sep", "mask")
_HF_SPECIAL_NAMES = {"eod": "eos_token", "pad": "pad_token", "cls": "cls_token",
                     "sep": "sep_token", "mask": "mask_token"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (ByteLevel's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level(tok: ByteLevelTokenizer):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    names = {getattr(tok, name): f"<{name}>" for name in _SPECIALS}
    return rust, [names[i] for i in sorted(names)]


def _sentencepiece(tok: SentencePieceTokenizer):
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, normalizers

    from sentencepiece import sentencepiece_model_pb2

    sp = tok._sp
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE or not proto.normalizer_spec.add_dummy_prefix:
        raise UsageError("only SentencePiece BPE models with a dummy prefix can be exported")
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    ordinary = [p.piece for p in proto.pieces if p.type == Piece.NORMAL]
    # BPE merges: every way a piece splits into two pieces, ranked by the merged piece.
    merges = sorted(((left, right, vocab[p]) for p in ordinary if len(p) > 1
                     for left, right in ((p[:k], p[k:]) for k in range(1, len(p)))
                     if left in vocab and right in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                                    unk_token=proto.pieces[sp.unk_id()].piece, fuse_unk=True,
                                    byte_fallback=True))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # Whole-piece matches in raw text, as SentencePiece treats user-defined symbols.
    rust.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                             if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)])
    extra = [tok._extra[i] for i in sorted(tok._extra)]   # specials past the model's vocabulary
    return rust, extra


def to_hf_tokenizer(tok: Tokenizer):
    """A transformers PreTrainedTokenizerFast with our tokenizer's ids and special tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, HuggingFaceTokenizer):
        return tok._tok
    if isinstance(tok, ByteLevelTokenizer):
        rust, extra = _byte_level(tok)
    elif isinstance(tok, SentencePieceTokenizer):
        rust, extra = _sentencepiece(tok)
    else:
        raise UsageError(f"cannot export a {type(tok).__name__} to Hugging Face")
    first_extra = rust.get_vocab_size(with_added_tokens=True)
    rust.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in extra])
    for k, piece in enumerate(extra):   # appended in id order: check they landed where we use them
        if rust.token_to_id(piece) != first_extra + k:
            raise UsageError(f"special token {piece!r} would get another id in the export")
    specials = {}
    for name in _SPECIALS:
        token_id = getattr(tok, name)
        if token_id is not None:
            specials[_HF_SPECIAL_NAMES[name]] = rust.id_to_token(token_id)
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, **specials)
    hf.model_max_length = 1 << 62
    return hf


def save_hf_tokenizer(tok: Tokenizer, directory: str) -> None:
    """Write tokenizer.json and friends into `directory`."""
    to_hf_tokenizer(tok).save_pretrained(directory)

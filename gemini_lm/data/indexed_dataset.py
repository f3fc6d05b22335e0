"""Token sequences on disk in Megatron's MMIDIDX format: a flat `.bin` and an `.idx` index.

The `.idx` layout, byte for byte as Megatron-LM writes it (little endian):

    b"MMIDIDX\\x00\\x00"          magic, 9 bytes
    <Q  version (1)
    <B  dtype code (see DTYPE_CODES)
    <Q  sequence count S
    <Q  document count D       (number of documents + 1: document_indices starts at 0)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into `.bin`
    int64[D]  document indices: document k is sequences [doc[k], doc[k+1])

With `--split-sentences` a sequence is a sentence and documents group them (BERT);
otherwise every document is one sequence (GPT).
"""
from __future__ import annotations

import os
import struct
from types import TracebackType

import numpy as np

from gemini_lm.errors import UsageError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def dtype_code(dtype: np.dtype | type) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no MMIDIDX code")


def optimal_dtype(vocab_size: int) -> type[np.generic]:
    """Megatron's choice: uint16 while every token id fits, int32 beyond."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def dataset_prefix(path: str) -> str:
    """The prefix of a .bin/.idx pair named by its prefix, its .bin or its .idx file.

    Users pass the file they see; a prefix that itself ends in .bin or .idx is kept while
    its pair exists.
    """
    root, ext = os.path.splitext(path)
    if ext in (".bin", ".idx") and not IndexedDataset.exists(path):
        return root
    return path


class IndexedDataset:
    """Read-only, memory-mapped view of a `.bin`/`.idx` pair; `ds[i]` is sequence i."""

    def __init__(self, path: str) -> None:
        """`path`: the prefix of the pair, or its .bin or .idx file."""
        self.path_prefix = path_prefix = dataset_prefix(path)
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for file in (idx_path, bin_path):
            if not os.path.isfile(file):
                raise UsageError(f"indexed dataset file not found: {file} (a data path is the prefix "
                                 f"of a .bin/.idx pair, or one of its two files)")

        self.dtype, sequence_count, document_count = _read_index_header(idx_path)
        expected = _HEADER_SIZE + sequence_count * (4 + 8) + document_count * 8
        actual = os.path.getsize(idx_path)
        if actual != expected:
            raise UsageError(f"{idx_path}: truncated or corrupt index "
                             f"({actual} bytes, its header implies {expected})")

        self._index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._index, np.int32, sequence_count, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(self._index, np.int64, sequence_count, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(self._index, np.int64, document_count, offset)

        itemsize = np.dtype(self.dtype).itemsize
        expected_bin = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
                        if sequence_count else 0)
        actual_bin = os.path.getsize(bin_path)
        if actual_bin != expected_bin:
            raise UsageError(f"{bin_path}: size {actual_bin} bytes does not match its index "
                             f"{idx_path} ({expected_bin} bytes); the pair is truncated or mismatched")
        self._check_index(idx_path, actual_bin, itemsize)
        # np.memmap cannot map an empty file.
        self._bin = (np.memmap(bin_path, mode="r", dtype=np.uint8) if actual_bin
                     else np.zeros(0, np.uint8))

    def _check_index(self, idx_path: str, bin_size: int, itemsize: int) -> None:
        """Every sequence inside the .bin and every document inside the sequences: checked
        once here (vectorized), so a bad pointer is one line now, not a ValueError at some batch."""
        lengths, pointers = self.sequence_lengths.astype(np.int64), self.sequence_pointers
        bad = np.flatnonzero((lengths < 0) | (pointers < 0) | (pointers + lengths * itemsize > bin_size))
        if bad.size:
            i = int(bad[0])
            raise UsageError(f"{idx_path}: sequence {i} (pointer {int(pointers[i])}, {int(lengths[i])} tokens) "
                             f"runs past the end of its .bin ({bin_size} bytes): the index is corrupt")
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) < 0):
            raise UsageError(f"{idx_path}: document indices are not an increasing cover of the "
                             f"{len(lengths)} sequences: the index is corrupt")

    def token_id_range(self) -> tuple[int, int]:
        """(smallest, largest) token id in the .bin ((0, -1) if empty): a scan in chunks, cached
        on disk with the dataset's indices (keyed by the files' size and mtime), so it runs once."""
        from gemini_lm.data.index_cache import cache_key, cached

        def scan():
            tokens, step = np.frombuffer(self._bin, self.dtype), 1 << 26
            chunks = [tokens[i:i + step] for i in range(0, len(tokens), step)]
            lo = min((int(c.min()) for c in chunks), default=0)
            hi = max((int(c.max()) for c in chunks), default=-1)
            return (np.array([lo, hi], np.int64),)
        (ids,) = cached(cache_key("token_id_range", self.path_prefix), ("ids",), scan)
        return int(ids[0]), int(ids[1])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i, a read-only view into the mmap."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.path_prefix}")
        i %= n
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {i} "
                             f"of length {size}")
        start = int(self.sequence_pointers[i]) + offset * np.dtype(self.dtype).itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return (os.path.isfile(index_file_path(path_prefix))
                and os.path.isfile(data_file_path(path_prefix)))


def _read_index_header(idx_path: str) -> tuple[type[np.generic], int, int]:
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_SIZE)
    if len(header) < _HEADER_SIZE:
        raise UsageError(f"{idx_path}: truncated index ({len(header)} bytes, "
                         f"shorter than the {_HEADER_SIZE}-byte header)")
    if header[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise UsageError(f"{idx_path}: not an MMIDIDX index (bad magic bytes)")
    version, code, sequence_count, document_count = struct.unpack_from(
        "<QBQQ", header, len(INDEX_HEADER))
    if version != INDEX_VERSION:
        raise UsageError(f"{idx_path}: unsupported MMIDIDX version {version}")
    if code not in DTYPE_CODES:
        raise UsageError(f"{idx_path}: unknown dtype code {code}")
    return DTYPE_CODES[code], sequence_count, document_count


class IndexedDatasetBuilder:
    """Appends sequences to `.bin`, then `finalize(idx_path)` writes the index.

    Both files are written under temporary names and renamed only in `finalize`, the
    `.idx` last: a `.idx` on disk always has its complete `.bin` beside it. Used as a
    context manager, an exception removes the temporary files.
    """

    def __init__(self, bin_path: str, dtype: type | np.dtype = np.int32) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject unsupported dtypes now, not at finalize
        self._tmp_bin = f"{bin_path}.tmp-{os.getpid()}"
        self._tmp_idx: str | None = None
        self._file = open(self._tmp_bin, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tokens) -> None:
        """Append one sequence (a document, or a sentence with --split-sentences)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"add_item expects a 1-D token sequence, got shape {array.shape}")
        self._file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.append(len(array))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form it."""
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tmp_idx = f"{idx_path}.tmp-{os.getpid()}"
        with open(self._tmp_idx, "wb") as f:
            f.write(encode_index(self.dtype, self.sequence_lengths, self.document_indices))
            f.flush()
            os.fsync(f.fileno())
        # Drop a stale .idx first so no moment pairs it with the new .bin.
        if os.path.exists(idx_path):
            os.unlink(idx_path)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, idx_path)
        self._tmp_idx = None

    def abort(self) -> None:
        """Remove the temporary files; nothing is left under the final names."""
        if not self._file.closed:
            self._file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path and os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()


def encode_index(dtype: np.dtype | type, sequence_lengths: list[int],
                 document_indices: list[int]) -> bytes:
    """The `.idx` bytes for these sequences (Megatron's `_IndexWriter.write`)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    return b"".join([
        INDEX_HEADER,
        struct.pack("<Q", INDEX_VERSION),
        struct.pack("<B", dtype_code(dtype)),
        struct.pack("<Q", len(lengths)),
        struct.pack("<Q", len(documents)),
        lengths.tobytes(order="C"),
        pointers.tobytes(order="C"),
        documents.tobytes(order="C"),
    ])


def check_vocabulary(path: str, vocab_size: int, tokenizer_type: str) -> None:
    """Data encoded with another tokenizer: a token id the model's embedding does not have is
    one line at start-up, not an IndexError deep in the first forward pass."""
    lo, hi = IndexedDataset(path).token_id_range()
    if lo < 0 or hi >= vocab_size:
        raise UsageError(f"{path}: token id {hi if hi >= vocab_size else lo} is outside the vocabulary of --tokenizer-type "
                         f"{tokenizer_type} ({vocab_size} tokens): the data was encoded with another tokenizer")

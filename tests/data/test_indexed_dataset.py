import os
import struct

import numpy as np
import pytest

from gemini_lm.data.indexed_dataset import (DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder,
                                            data_file_path, dataset_prefix, index_file_path)
from gemini_lm.errors import UsageError


def build(prefix, sequences, dtype, doc_ends=None):
    """Write sequences; doc_ends lists after which sequence indices a document ends."""
    doc_ends = set(range(len(sequences))) if doc_ends is None else set(doc_ends)
    with IndexedDatasetBuilder(data_file_path(prefix), dtype) as builder:
        for i, seq in enumerate(sequences):
            builder.add_item(seq)
            if i in doc_ends:
                builder.end_document()
        builder.finalize(index_file_path(prefix))
    return prefix


@pytest.mark.parametrize("dtype", list(DTYPE_CODES.values()), ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 120, size=n).astype(dtype) for n in (5, 1, 0, 17, 3)]
    ds = IndexedDataset(build(str(tmp_path / "d"), sequences, dtype, doc_ends=[1, 4]))
    assert ds.dtype == dtype
    assert len(ds) == 5 and ds.num_documents == 2
    assert ds.document_indices.tolist() == [0, 2, 5]
    assert ds.sequence_lengths.tolist() == [5, 1, 0, 17, 3]
    for i, seq in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], seq)
        assert ds[i].dtype == dtype
    np.testing.assert_array_equal(ds.get(3, offset=2, length=4), sequences[3][2:6])
    np.testing.assert_array_equal(ds.get(3, offset=10), sequences[3][10:])
    np.testing.assert_array_equal(ds[-1], sequences[-1])
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=3)
    with pytest.raises(IndexError):
        ds[5]


def megatron_layout(lengths, documents, code, itemsize) -> bytes:
    """The .idx bytes as Megatron-LM's _IndexWriter writes them, spelled out field by field."""
    pointers, position = [], 0
    for n in lengths:
        pointers.append(position)
        position += n * itemsize
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents))
            + struct.pack(f"<{len(lengths)}i", *lengths)
            + struct.pack(f"<{len(pointers)}q", *pointers)
            + struct.pack(f"<{len(documents)}q", *documents))


# Megatron-LM's DType codes (megatron/core/datasets/indexed_dataset.py) and the struct
# format of one element, written out here rather than taken from our module.
MEGATRON_DTYPES = [(np.uint8, 1, "B"), (np.int8, 2, "b"), (np.int16, 3, "h"), (np.int32, 4, "i"),
                   (np.int64, 5, "q"), (np.float64, 6, "d"), (np.float32, 7, "f"), (np.uint16, 8, "H")]


@pytest.mark.parametrize("dtype, code, fmt", MEGATRON_DTYPES, ids=lambda x: getattr(x, "__name__", None))
def test_megatron_layout_byte_for_byte(tmp_path, dtype, code, fmt):
    # Three sentences in two documents: [[1,2,3],[4,5]] and [[6]] (126 fits every dtype).
    values = [1, 2, 3, 4, 126, 6]
    itemsize = struct.calcsize("<" + fmt)
    expected_idx = megatron_layout([3, 2, 1], [0, 2, 3], code=code, itemsize=itemsize)
    expected_bin = struct.pack(f"<6{fmt}", *values)
    sentences = [values[:3], values[3:5], values[5:]]

    hand = tmp_path / "hand"
    (tmp_path / "hand.idx").write_bytes(expected_idx)
    (tmp_path / "hand.bin").write_bytes(expected_bin)
    ds = IndexedDataset(str(hand))
    assert ds.dtype == dtype
    assert [ds[i].tolist() for i in range(len(ds))] == sentences
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.sequence_pointers.tolist() == [0, 3 * itemsize, 5 * itemsize]

    ours = build(str(tmp_path / "ours"), [np.array(s, dtype=dtype) for s in sentences], dtype, doc_ends=[1, 2])
    assert (tmp_path / "ours.idx").read_bytes() == expected_idx
    assert (tmp_path / "ours.bin").read_bytes() == expected_bin
    assert IndexedDataset(ours).document_indices.tolist() == [0, 2, 3]


def test_we_know_exactly_megatrons_dtypes():
    assert {c: np.dtype(d) for c, d in DTYPE_CODES.items()} == {c: np.dtype(d) for d, c, _ in MEGATRON_DTYPES}


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(build(str(tmp_path / "e"), [], np.int32))
    assert len(ds) == 0 and ds.num_documents == 0


def test_truncated_bin_is_a_usage_error(tmp_path):
    prefix = build(str(tmp_path / "t"), [[1, 2, 3], [4, 5, 6, 7]], np.int32)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 4)
    with pytest.raises(UsageError, match=r"t\.bin.*does not match its index"):
        IndexedDataset(prefix)


def test_missing_idx_is_a_usage_error(tmp_path):
    prefix = build(str(tmp_path / "m"), [[1, 2]], np.int32)
    os.unlink(prefix + ".idx")
    with pytest.raises(UsageError, match=r"not found: .*m\.idx"):
        IndexedDataset(prefix)
    with pytest.raises(UsageError, match=r"not found: .*nothing\.idx"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_a_data_path_may_name_the_prefix_the_bin_or_the_idx(tmp_path):
    prefix = build(str(tmp_path / "c"), [[1, 2, 3], [4]], np.int32)
    for given in (prefix, prefix + ".bin", prefix + ".idx"):
        assert dataset_prefix(given) == prefix
        ds = IndexedDataset(given)
        assert ds.path_prefix == prefix and [s.tolist() for s in ds] == [[1, 2, 3], [4]]
    # A prefix that itself ends in .bin is taken as it is while its pair exists.
    odd = build(str(tmp_path / "odd.bin"), [[5]], np.int32)
    assert dataset_prefix(odd) == odd and IndexedDataset(odd)[0].tolist() == [5]
    with pytest.raises(UsageError, match=r"not found: .*gone\.idx \(.*prefix"):
        IndexedDataset(str(tmp_path / "gone.bin"))


def test_truncated_or_foreign_idx_is_a_usage_error(tmp_path):
    prefix = build(str(tmp_path / "x"), [[1, 2], [3]], np.int32)
    full = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "x.idx").write_bytes(full[:-8])
    with pytest.raises(UsageError, match=r"x\.idx: truncated"):
        IndexedDataset(prefix)
    (tmp_path / "x.idx").write_bytes(full[:20])
    with pytest.raises(UsageError, match=r"x\.idx: truncated"):
        IndexedDataset(prefix)
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX!" + full[9:])
    with pytest.raises(UsageError, match="bad magic"):
        IndexedDataset(prefix)


def test_writes_are_atomic(tmp_path):
    prefix = str(tmp_path / "a")
    build(prefix, [[1, 2, 3]], np.int32)
    # A failure while writing leaves the previous pair intact and no temporary files.
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(data_file_path(prefix), np.int32) as builder:
            builder.add_item([9, 9])
            raise RuntimeError("crash mid-write")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx"]
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
    # Until finalize, nothing appears under the final names.
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), np.int32)
    builder.add_item([4])
    assert not IndexedDataset.exists(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "b.idx"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]
    # Rewriting replaces the pair.
    build(prefix, [[7], [8]], np.int32)
    assert [IndexedDataset(prefix)[i].tolist() for i in range(2)] == [[7], [8]]


def _patch_index(prefix: str, field: str, i: int, value: int) -> None:
    """Overwrite entry i of an .idx array ("pointers" or "documents") after its 34-byte header: a well-formed
    file whose numbers disagree with its .bin."""
    sequences = IndexedDataset(prefix).sequence_lengths.size
    offset = {"pointers": 34 + 4 * sequences, "documents": 34 + 12 * sequences}[field] + 8 * i
    with open(prefix + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<q", value))


def test_an_index_pointing_past_its_bin_is_a_usage_error(tmp_path):
    """Issue 13, item 5: the sizes agree (the last sequence ends at the .bin's end), but the
    first pointer runs past it: one line at open, not a ValueError at the first batch."""
    prefix = build(str(tmp_path / "p"), [[1, 2, 3], [4, 5, 6, 7]], np.int32)
    _patch_index(prefix, "pointers", 0, 1000)
    with pytest.raises(UsageError, match=r"p\.idx: sequence 0 \(pointer 1000, 3 tokens\) runs past the end"):
        IndexedDataset(prefix)
    prefix = build(str(tmp_path / "d"), [[1, 2, 3], [4, 5, 6, 7]], np.int32)
    _patch_index(prefix, "documents", 1, 7)
    with pytest.raises(UsageError, match=r"d\.idx: document indices are not an increasing cover"):
        IndexedDataset(prefix)


def test_token_ids_outside_the_vocabulary_are_a_usage_error(tmp_path, monkeypatch):
    """Data encoded with another tokenizer (ids >= its vocabulary) is one line at start-up, not an
    IndexError in the embedding; the scan is cached beside the dataset indices."""
    from gemini_lm.data.indexed_dataset import check_vocabulary

    monkeypatch.setenv("GEMINI_LM_CACHE", str(tmp_path / "cache"))
    prefix = build(str(tmp_path / "v"), [[1, 2, 3], [4, 300, 6]], np.uint16)
    check_vocabulary(prefix, 301, "X")
    with pytest.raises(UsageError, match=r"v: token id 300 is outside the vocabulary of --tokenizer-type "
                                         r"ByteLevelTokenizer \(261 tokens\)"):
        check_vocabulary(prefix, 261, "ByteLevelTokenizer")
    assert IndexedDataset(prefix).token_id_range() == (1, 300)
    assert len(os.listdir(tmp_path / "cache" / "indices")) == 1   # scanned once, then read back
    negative = build(str(tmp_path / "n"), [[1, -5]], np.int32)
    with pytest.raises(UsageError, match="token id -5 is outside"):
        check_vocabulary(negative, 261, "ByteLevelTokenizer")

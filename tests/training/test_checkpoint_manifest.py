"""A damaged persistent checkpoint is bad input: one clear UsageError, never a KeyError."""
import json

import pytest

from gemini_lm.checkpoint.persistent import read_shard
from gemini_lm.errors import UsageError


@pytest.mark.parametrize("manifest,message", [
    ({}, "lacks 'tp_size'"),
    ({"tp_size": 1}, "lacks 'shards'"),
    ({"tp_size": 1, "shards": {"tp00": {"file": "x"}}}, "lacks 'nbytes'"),
    ({"tp_size": 2, "shards": {}}, "tensor-parallel size 2, this run uses 1"),
    ({"tp_size": 1, "shards": {"tp00": {"file": "x", "nbytes": 1, "checksum": "0"}}}, "unreadable"),
])
def test_damaged_manifest_is_a_usage_error(tmp_path, manifest, message):
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=message):
        read_shard(str(tmp_path), 5, 0, 1)


def test_truncated_shard_file_fails_its_checksum(tmp_path):
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / "tp_rank_00.safetensors").write_bytes(b"abc")
    manifest = {"tp_size": 1, "shards": {"tp00": {"file": "tp_rank_00.safetensors", "nbytes": 4,
                                                   "checksum": "0"}}}
    (tmp_path / "iter_0000005" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="checksum mismatch"):
        read_shard(str(tmp_path), 5, 0, 1)

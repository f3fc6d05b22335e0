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


def test_a_shard_file_from_another_rank_is_refused(tmp_path):
    """Issue 13, item 5: tp_rank_01's file copied over tp_rank_00 (checksum updated in the
    manifest): same shapes, wrong weights; its own header says which shard it is."""
    import torch
    from safetensors.torch import save

    from gemini_lm.checkpoint.checksum import checksum

    payload = save({"w": torch.zeros(4)}, metadata={"tp_rank": "1", "tp_size": "2"})
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / "tp_rank_00.safetensors").write_bytes(payload)
    entry = {"file": "tp_rank_00.safetensors", "nbytes": len(payload), "checksum": checksum(payload)}
    manifest = {"tp_size": 2, "shards": {"tp00": entry, "tp01": entry}}
    (tmp_path / "iter_0000005" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="its header says tp_rank 1 of 2, the manifest puts it at tp_rank 0 of 2"):
        read_shard(str(tmp_path), 5, 0, 2)
    assert read_shard(str(tmp_path), 5, 1, 2)[1]["tp_rank"] == "1"

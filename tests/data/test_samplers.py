import numpy as np
import torch

from gemini_lm.data.gpt_dataset import GPTDataset
from gemini_lm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from gemini_lm.data.samplers import MegatronPretrainingSampler, micro_batches


def gpt_dataset(tmp_path, seq_length=5, num_samples=64) -> GPTDataset:
    prefix = str(tmp_path / "c")
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for d in range(20):
            builder.add_item(np.arange(d * 50, d * 50 + 7 + d % 5))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    return GPTDataset(IndexedDataset(prefix), np.arange(20), num_samples, seq_length, seed=0)


def sample_ids(ds, batch) -> list[int]:
    """Which dataset items a micro-batch holds (samples are distinct token windows)."""
    lookup = {tuple(ds[i]["tokens"].tolist()): i for i in range(len(ds))}
    return [lookup[tuple(row)] for row in batch["tokens"].tolist()]


def test_collated_micro_batch(tmp_path):
    ds = gpt_dataset(tmp_path)
    batch = next(micro_batches(ds, 0, micro_batch_size=3, dp_rank=0, dp_size=1))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (3, 6)
    np.testing.assert_array_equal(batch["tokens"].numpy(), np.stack([ds[i]["tokens"]
                                                                     for i in range(3)]))


def test_resumption_continues_exactly(tmp_path):
    ds = gpt_dataset(tmp_path)
    full = [b["tokens"] for b in micro_batches(ds, 0, 2, 0, 1)]
    assert len(full) == len(ds) // 2
    resumed = [b["tokens"] for b in micro_batches(ds, 14, 2, 0, 1)]
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed):
        assert torch.equal(a, b)


def test_dp1_and_dp2_see_the_same_global_batches(tmp_path):
    ds = gpt_dataset(tmp_path)
    # Global batch 4: DP=1 runs 2 micro-batches of 2; DP=2 runs 1 micro-batch of 2 per rank.
    dp1 = list(micro_batches(ds, 8, 2, 0, 1))
    rank0 = list(micro_batches(ds, 8, 2, 0, 2))
    rank1 = list(micro_batches(ds, 8, 2, 1, 2))
    assert len(rank0) == len(rank1) == len(dp1) // 2
    for step, (r0, r1) in enumerate(zip(rank0, rank1)):
        assert torch.equal(r0["tokens"], dp1[2 * step]["tokens"])
        assert torch.equal(r1["tokens"], dp1[2 * step + 1]["tokens"])
    assert sample_ids(ds, rank1[0]) == [10, 11]  # consumed 8, then rank 1's slice [2:4]


def test_sampler_indices_and_partial_step():
    sampler = MegatronPretrainingSampler(total_samples=23, consumed_samples=4,
                                         micro_batch_size=3, data_parallel_rank=1,
                                         data_parallel_size=2)
    # Steps of 6 from 4: [4, 10), [10, 16), [16, 22); the partial step [22, 23) is dropped.
    assert list(sampler) == [[7, 8, 9], [13, 14, 15], [19, 20, 21]]
    assert len(sampler) == 3
    assert list(MegatronPretrainingSampler(10, 10, 2, 0, 1)) == []

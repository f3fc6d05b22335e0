"""Megatron's pretraining sampler: the data position is one integer, `consumed_samples`.

Each step of `micro_batch_size * dp_size` consecutive sample indices is cut into
contiguous slices, data-parallel rank r taking [r*mbs, (r+1)*mbs). So the samples a
global batch covers do not depend on how it is split across ranks and micro-batches,
and a restart that knows consumed_samples continues exactly where the run stopped.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class MegatronPretrainingSampler:
    """Yields this rank's list of sample indices for each micro-batch; drops a last
    partial step, as Megatron does (every rank must run the same number of steps)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside "
                             f"[0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-sample arrays into [micro_batch_size, ...] tensors; integer arrays
    (token ids of any on-disk dtype) become int64, others keep their dtype."""
    batch = {}
    for key in samples[0]:
        array = np.stack([s[key] for s in samples])
        if array.dtype.kind in "iu":
            array = array.astype(np.int64)
        batch[key] = torch.from_numpy(array)
    return batch


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from `consumed_samples` (global samples, all ranks
    together) to the end of the dataset, e.g. {"tokens": LongTensor [mbs, seq+1]}."""
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         dp_rank, dp_size)
    for indices in sampler:
        yield collate([dataset[i] for i in indices])

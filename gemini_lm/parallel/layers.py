"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Weights follow the nn.Linear convention ([out, in], y = x W^T + b). Initialization does
not depend on the TP size: every rank draws the full fp32 master weight on CPU from the
default torch generator (identically seeded on all ranks) and keeps its own shard, as
Megatron does with use_cpu_initialization. So TP=1 and TP=2 runs with the same seed
start from the same model.

Sharded parameters carry `tensor_model_parallel`, `partition_dim` and `partition_stride`
(gradient-norm and checkpoint-conversion code read them); replicas carry
`tensor_model_parallel = False`.

The linear layers return `(output, bias)` like Megatron: bias is None unless
`skip_bias_add`, in which case it is returned unadded so the caller can fuse it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemini_lm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.utils import InitMethod, divide, init_method_normal, shard_tensor


def set_tensor_model_parallel_attributes(param: nn.Parameter, is_parallel: bool,
                                         dim: int = 0, stride: int = 1) -> None:
    param.tensor_model_parallel = is_parallel
    if is_parallel:
        param.partition_dim = dim
        param.partition_stride = stride


def mark_replicated_params(module: nn.Module) -> None:
    """Mark every parameter the parallel layers did not mark as replicated across TP."""
    for param in module.parameters():
        if not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, False)


def _sharded_weight(full_shape: tuple[int, ...], init_method: InitMethod | None,
                    partition_dim: int, stride: int, ps: ParallelState,
                    params_dtype: torch.dtype) -> nn.Parameter:
    """Draw the full master weight on CPU (same numbers on every rank), keep our shard."""
    master = torch.empty(full_shape, dtype=torch.float32)
    (init_method or init_method_normal(0.02))(master)
    shard = shard_tensor(master, partition_dim, ps.tp_rank, ps.tp_size, stride)
    param = nn.Parameter(shard.to(device=ps.device, dtype=params_dtype))
    set_tensor_model_parallel_attributes(param, True, partition_dim, stride)
    return param


def _zero_bias(size: int, ps: ParallelState, params_dtype: torch.dtype, is_parallel: bool,
               stride: int = 1) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(size, device=ps.device, dtype=params_dtype))
    set_tensor_model_parallel_attributes(param, is_parallel, 0, stride)
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim: rank r computes Y's r-th slice.

    The input is needed whole on every rank (its gradient is all-reduced); the output
    stays split unless `gather_output`. `stride` > 1 shards a fused weight (e.g. QKV)
    part by part, so each rank's slice holds matching pieces of every part.
    """

    def __init__(self, input_size: int, output_size: int, ps: ParallelState, *,
                 bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod | None = None, stride: int = 1,
                 skip_bias_add: bool = False, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if gather_output and stride > 1:
            raise ValueError("gather_output would interleave the parts of a strided weight")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, ps.tp_size)
        divide(self.output_size_per_partition, stride)  # each part splits evenly across ranks
        self.ps, self.gather_output, self.skip_bias_add = ps, gather_output, skip_bias_add
        self.weight = _sharded_weight((output_size, input_size), init_method, 0, stride,
                                      ps, params_dtype)
        self.bias = (_zero_bias(self.output_size_per_partition, ps, params_dtype, True, stride)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = copy_to_tensor_model_parallel_region(x, self.ps)
        bias = None if self.skip_bias_add else self.bias
        out = F.linear(x, self.weight, bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.ps)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, "
                f"out_per_partition={self.output_size_per_partition}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim: rank r multiplies X's r-th slice.

    The partial products are all-reduced; the bias is replicated and added after the
    reduce (adding it before would count it tp_size times).
    """

    def __init__(self, input_size: int, output_size: int, ps: ParallelState, *,
                 bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod | None = None, skip_bias_add: bool = False,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, ps.tp_size)
        self.ps, self.input_is_parallel, self.skip_bias_add = ps, input_is_parallel, skip_bias_add
        self.weight = _sharded_weight((output_size, input_size), init_method, 1, 1,
                                      ps, params_dtype)
        self.bias = _zero_bias(output_size, ps, params_dtype, False) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.ps)
        out = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), self.ps)
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, "
                f"in_per_partition={self.input_size_per_partition}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: rank r holds a contiguous id range.

    Each rank looks up the ids it owns, zeroes the rows for ids it does not, and the
    partial results are summed over TP (every id is owned by exactly one rank).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ps: ParallelState, *,
                 init_method: InitMethod | None = None,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, ps.tp_size)
        self.vocab_start_index = ps.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.ps = ps
        self.weight = _sharded_weight((num_embeddings, embedding_dim), init_method, 0, 1,
                                      ps, params_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, self.ps)

    def padding_logit_bias(self, orig_vocab_size: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """A bias for tied output logits of this rank's vocab slice: -inf on padding ids
        (>= orig_vocab_size), so they take no probability mass; None if none is padding.
        A constant bias is cheaper than masking the logits in place."""
        orig = self.vocab_end_index if orig_vocab_size is None else orig_vocab_size
        if orig >= self.vocab_end_index:
            return None
        bias = torch.zeros(self.num_embeddings_per_partition, device=self.weight.device, dtype=dtype)
        bias[max(orig, self.vocab_start_index) - self.vocab_start_index:] = float("-inf")
        return bias

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"per_partition={self.num_embeddings_per_partition}")

"""Random-number state for tensor parallelism, and every RNG state as plain tensors.

Two streams, as in Megatron:
- the default generators (torch, CUDA, numpy, python) are seeded identically on every
  rank, so replicated work (weight init, dropout outside TP regions) agrees across ranks;
- the tracker's "model-parallel-rng" is seeded per TP rank (seed + 2718 + tp_rank) and
  entered with `tracker.fork()` for randomness on sharded activations (e.g. attention
  dropout), which must differ between TP ranks.

`get_rng_state_tensors` / `set_rng_state_tensors` encode all of it as uint8/int64/float64
tensors with fixed keys and shapes (no pickle), so a GEMINI snapshot can hold them and
a restored run draws exactly the same numbers as the original would have.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from gemini_lm.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's offset between the default and the TP stream
_TRACKER_PREFIX = "rng/tracker/"
_REQUIRED_KEYS = (
    "rng/torch_cpu",
    "rng/numpy/key", "rng/numpy/pos", "rng/numpy/has_gauss", "rng/numpy/cached_gaussian",
    "rng/python/version", "rng/python/state", "rng/python/has_gauss_next",
    "rng/python/gauss_next",
)


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that `fork()` swaps in for the default one on `device`.

    On CPU the forked generator is torch's CPU generator; on CUDA the device's.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG state")
        # A fresh generator gives the seeded state without touching the default one.
        self._states[name] = torch.Generator(device=self.device).manual_seed(seed).get_state()
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from `name`'s stream inside the block; the default stream is left as it was."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = _get_state(self.device)
        _set_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(outer, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every tracked state (seeds are not restored: they only guard `add`)."""
        self._states = {name: state.clone() for name, state in states.items()}


def model_parallel_seed(seed: int, ps: ParallelState) -> RNGStatesTracker:
    """Seed every default generator with `seed` (all ranks alike) and the TP stream per rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device, lazily
    tracker = RNGStatesTracker(ps.device)
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + ps.tp_rank)
    return tracker


def get_rng_state_tensors(tracker: RNGStatesTracker) -> dict[str, torch.Tensor]:
    """Every RNG state of this process as CPU tensors, keyed "rng/...".

    The CUDA state is included when the run uses CUDA (the tracker's device): a CPU run
    on a GPU host then neither creates a CUDA context nor changes its snapshot layout.
    """
    out = {"rng/torch_cpu": torch.get_rng_state()}
    if tracker.device.type == "cuda":
        out["rng/torch_cuda"] = torch.cuda.get_rng_state(tracker.device)

    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    assert kind == "MT19937", kind
    out["rng/numpy/key"] = torch.from_numpy(key.astype(np.int64))
    out["rng/numpy/pos"] = torch.tensor([pos], dtype=torch.int64)
    out["rng/numpy/has_gauss"] = torch.tensor([has_gauss], dtype=torch.int64)
    out["rng/numpy/cached_gaussian"] = torch.tensor([cached_gaussian], dtype=torch.float64)

    version, internal, gauss_next = random.getstate()
    out["rng/python/version"] = torch.tensor([version], dtype=torch.int64)
    out["rng/python/state"] = torch.tensor(internal, dtype=torch.int64)  # 624 words + index
    out["rng/python/has_gauss_next"] = torch.tensor([gauss_next is not None], dtype=torch.int64)
    out["rng/python/gauss_next"] = torch.tensor([gauss_next or 0.0], dtype=torch.float64)

    for name, state in tracker.get_states().items():
        out[_TRACKER_PREFIX + name] = state
    return out


def set_rng_state_tensors(tensors: dict[str, torch.Tensor], tracker: RNGStatesTracker) -> None:
    """Restore what get_rng_state_tensors saved; later draws repeat the saved run's."""
    missing = [key for key in _REQUIRED_KEYS if key not in tensors]
    if missing:
        raise KeyError(f"RNG state tensors lack {missing}")
    saved_on_cuda = "rng/torch_cuda" in tensors
    if saved_on_cuda != (tracker.device.type == "cuda"):
        raise ValueError(f"RNG state saved on {'CUDA' if saved_on_cuda else 'CPU'} cannot be "
                         f"restored into a run on {tracker.device}")

    # clone(): the tensors may be views into a snapshot buffer (offset, read-only), which
    # the generator's set_state does not handle (it crashed the process).
    torch.set_rng_state(tensors["rng/torch_cpu"].to(torch.uint8).clone())
    if saved_on_cuda:
        torch.cuda.set_rng_state(tensors["rng/torch_cuda"].to(torch.uint8).clone(), tracker.device)

    np.random.set_state((
        "MT19937",
        tensors["rng/numpy/key"].numpy().astype(np.uint32),
        int(tensors["rng/numpy/pos"].item()),
        int(tensors["rng/numpy/has_gauss"].item()),
        float(tensors["rng/numpy/cached_gaussian"].item()),
    ))

    gauss_next = (float(tensors["rng/python/gauss_next"].item())
                  if tensors["rng/python/has_gauss_next"].item() else None)
    random.setstate((int(tensors["rng/python/version"].item()),
                     tuple(int(v) for v in tensors["rng/python/state"].tolist()), gauss_next))

    tracker.set_states({key[len(_TRACKER_PREFIX):]: state.to(torch.uint8).clone()
                        for key, state in tensors.items() if key.startswith(_TRACKER_PREFIX)})

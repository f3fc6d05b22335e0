"""TrainState: everything one rank needs to continue bit for bit, as named tensors.

The GEMINI snapshot and the persistent checkpoint both store exactly `tensors()`: the
model shard, the optimizer (fp32 masters, moments, steps, loss scaler), the LR schedule,
every RNG stream and the training progress. Names, shapes and dtypes are fixed for a run,
so the snapshot layout is decided once. `tensors()` returns live tensors (no copies):
the snapshot copies them straight into shared memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from gemini_lm.checkpoint.naming import FORMAT
from gemini_lm.parallel.random import get_rng_state_tensors, set_rng_state_tensors


@dataclass
class TrainProgress:
    iteration: int = 0          # iterations completed
    consumed_samples: int = 0   # global samples consumed: where the data loader resumes


class TrainState:
    def __init__(self, model: torch.nn.Module, optimizer, scheduler, tracker, ps,
                 progress: TrainProgress, model_config: dict, tokenizer: dict | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.tracker, self.ps, self.progress = tracker, ps, progress
        self._params = {f"model/{n}": p for n, p in model.named_parameters()}
        self.metadata = {
            "format": FORMAT,
            "shard": ps.shard_id,
            "tp_rank": str(ps.tp_rank),
            "tp_size": str(ps.tp_size),
            "model_config": json.dumps(model_config, sort_keys=True),
        }
        # What a persisted checkpoint's manifest records beside its shards. The tokenizer
        # (data.tokenizer.tokenizer_spec) lives only there: its paths must not enter the
        # snapshot layout, whose hash recovery matches on.
        self.manifest = {"metadata": self.metadata, **({"tokenizer": tokenizer} if tokenizer else {})}

    def tensors(self, gathered: bool = False) -> dict[str, torch.Tensor]:
        """`gathered`: the optimizer state in the layout that does not depend on the DP size
        (persistent checkpoints; a collective over DP under the distributed optimizer)."""
        out: dict[str, torch.Tensor] = {}
        out["train/iteration"] = torch.tensor([self.progress.iteration], dtype=torch.int64)
        out["train/consumed_samples"] = torch.tensor([self.progress.consumed_samples], dtype=torch.int64)
        out.update({k: p.detach() for k, p in self._params.items()})
        out.update(self.optimizer.state_tensors(gathered))
        out.update({f"scheduler/{k}": v for k, v in self.scheduler.state_tensors().items()})
        out.update(get_rng_state_tensors(self.tracker))
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore in place from tensors produced by `tensors()` (possibly in another process).
        ValueError, before anything changes, unless every tensor this run has (RNG streams
        aside: a CPU run has no CUDA generator) is there with its shape and dtype. The optimizer
        checks its own part: the distributed optimizer takes this rank's slice or the gathered,
        DP-independent layout, whose names differ from its live ones."""
        live = {k: v for k, v in self.tensors().items() if not k.startswith("optimizer/")}
        missing = [k for k in live if k not in tensors and not k.startswith("rng/")]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        for k, src in tensors.items():
            want = live.get(k)
            if want is not None and (src.shape != want.shape or src.dtype != want.dtype):
                raise ValueError(f"{k}: checkpoint has {src.dtype} {tuple(src.shape)}, "
                                 f"this run {want.dtype} {tuple(want.shape)}")
        for k, p in self._params.items():
            p.copy_(tensors[k])
        self.optimizer.load_state_tensors({k: v for k, v in tensors.items() if k.startswith("optimizer/")})
        self.scheduler.load_state_tensors({k[len("scheduler/"):]: v for k, v in tensors.items()
                                           if k.startswith("scheduler/")})
        set_rng_state_tensors({k: v for k, v in tensors.items() if k.startswith("rng/")}, self.tracker)
        self.progress.iteration = int(tensors["train/iteration"][0])
        self.progress.consumed_samples = int(tensors["train/consumed_samples"][0])

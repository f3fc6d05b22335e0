"""TrainState: everything one rank needs to continue bit for bit, as named tensors.

The GEMINI snapshot stores `tensors()`, the persistent checkpoint `tensors(gathered=True)`:
the model shard, the optimizer (fp32 masters, moments, steps, loss scaler), the LR schedule,
every RNG stream and the training progress. Names, shapes and dtypes are fixed for a run,
so the snapshot layout is decided once. `tensors()` returns live tensors (no copies):
the snapshot copies them straight into shared memory.

The two differ only under the distributed optimizer. A rank's snapshot then holds its
optimizer slice and no params: the params are a function of every DP rank's fp32 masters
(an fp32 param is its master; a low-precision one its master's cast), so a copy of them in
every DP rank's snapshot, and in every peer's replica of it, would be redundant. Loading
a slice writes this rank's owned pieces and all-gathers the rest over DP. The gathered
layout keeps the `model/` entries: the HF converter and generate.py read them.
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
        # Params a rank's own snapshot leaves out: the optimizer's slices determine them.
        self._from_masters = {f"model/{n}" for n in optimizer.param_names_from_masters()}
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
        (persistent checkpoints; a collective over DP under the distributed optimizer).
        Without it, the params the optimizer's own state determines are left out: under the
        distributed optimizer a rank's snapshot holds its slice and no param at all."""
        if gathered:   # the params are read whole: an overlapped all-gather must be done
            self.optimizer.finish_param_sync()
        params = {k: p.detach() for k, p in self._params.items() if gathered or k not in self._from_masters}
        return self._ordered(params, self.optimizer.state_tensors(gathered), self._rest())

    def _rest(self) -> dict[str, torch.Tensor]:
        """Progress, LR schedule and RNG streams: neither model nor optimizer."""
        out = {"train/iteration": torch.tensor([self.progress.iteration], dtype=torch.int64),
               "train/consumed_samples": torch.tensor([self.progress.consumed_samples], dtype=torch.int64)}
        out.update({f"scheduler/{k}": v for k, v in self.scheduler.state_tensors().items()})
        out.update(get_rng_state_tensors(self.tracker))
        return out

    @staticmethod
    def _ordered(params: dict, optimizer: dict, rest: dict) -> dict[str, torch.Tensor]:
        # One order for every layout: it fixes the file's bytes (SnapshotLayout keeps it).
        progress = {k: v for k, v in rest.items() if k.startswith("train/")}
        return {**progress, **params, **optimizer, **{k: v for k, v in rest.items() if k not in progress}}

    def gathered_from_slices(self, snapshots: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """tensors(gathered=True) of the iteration `snapshots` hold (every DP rank's tensors(),
        in DP rank order), computed from them alone: no collective (the SIGTERM flush under
        the distributed optimizer). What is not optimizer state is DP rank 0's, as in the
        collective save, which DP rank 0 writes."""
        first = snapshots[0]
        names, opt = self.optimizer.gathered_from_slices(
            [{k: v for k, v in s.items() if k.startswith("optimizer/")} for s in snapshots])
        params = {k: names[k[len("model/"):]] if k in self._from_masters else first[k] for k in self._params}
        return self._ordered(params, opt, {k: first[k] for k in self._rest()})

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore in place from tensors produced by `tensors()` (possibly in another process).
        ValueError, before anything changes, unless every tensor this run has (RNG streams
        aside: a CPU run has no CUDA generator) is there with its shape and dtype. The optimizer
        checks its own part: the distributed optimizer takes this rank's slice or the gathered,
        DP-independent layout, whose names differ from its live ones. From a slice it also
        sets the params, with an all-gather over DP: then every DP rank must load at once
        (restore_state does)."""
        self.optimizer.finish_param_sync()   # nothing in flight may write over what loads here
        opt = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
        from_slice = self.optimizer.restores_params(opt)
        params = {k: p for k, p in self._params.items() if not (from_slice and k in self._from_masters)}
        live = self._ordered({k: p.detach() for k, p in params.items()}, {}, self._rest())
        missing = [k for k in live if k not in tensors and not k.startswith("rng/")]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        shapes = {**live, **{k: p.detach() for k, p in self._params.items()}}
        for k, src in tensors.items():
            want = shapes.get(k)
            if want is not None and (src.shape != want.shape or src.dtype != want.dtype):
                raise ValueError(f"{k}: checkpoint has {src.dtype} {tuple(src.shape)}, "
                                 f"this run {want.dtype} {tuple(want.shape)}")
        for k, p in params.items():
            p.copy_(tensors[k])
        self.optimizer.load_state_tensors(opt)
        self.scheduler.load_state_tensors({k[len("scheduler/"):]: v for k, v in tensors.items()
                                           if k.startswith("scheduler/")})
        set_rng_state_tensors({k: v for k, v in tensors.items() if k.startswith("rng/")}, self.tracker)
        self.progress.iteration = int(tensors["train/iteration"][0])
        self.progress.consumed_samples = int(tensors["train/consumed_samples"][0])

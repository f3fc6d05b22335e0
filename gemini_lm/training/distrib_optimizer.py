"""The distributed optimizer (`--use-distributed-optimizer`, ZeRO stage 1), as in megatron/core.

DistributedDataParallel(use_distributed_optimizer=True) keeps every parameter in one flat
`param_buffer` laid out like the gradient buffer; DP rank r owns the contiguous range
`ddp.shard_range(r)` of both. This optimizer keeps the fp32 masters (low-precision
params only: an fp32 param is its own master) and the AdamW moments of that range only,
as flat tensors, so its state per rank is the plain optimizer's divided by the DP size.

A step:
  1. the gradients are averaged over DP (the DDP buckets' all-reduce, as without the flag)
  2. unscale / inf check, global norm and clipping: exactly the plain optimizer's code on
     the full gradients (MegatronOptimizer.step)
  3. AdamW on the owned pieces of each parameter (views into the flat state)
  4. the owned range of the param buffer is all-gathered over DP into every rank's buffer
     (ddp.start_param_sync); with --overlap-param-gather asynchronously, see below

--overlap-param-gather (Megatron's flag): the all-gather is launched at the end of the
update and waited for (ddp.finish_param_sync) just before the params are next read: by a
forward pre-hook (training and evaluation), by a persistent save (state_tensors(gathered=
True)), by loading, at the end of training, and by in-place recovery before it destroys
the group (ddp.abandon_param_sync). Megatron overlaps it bucket by bucket with the next
forward, each layer waiting only for its own bucket; that needs every DP rank to own a
piece of every bucket. Here DP rank r owns a contiguous range of the whole buffer, so the
first layer's params come from every rank only once the whole all-gather is done: what
the flag overlaps is what runs between the update and the next forward (the GEMINI
snapshot, which reads only this rank's own range; logging; the next batch's loading),
and a per-bucket overlap would need another slice layout (and another snapshot layout).
Losses are bit-identical with and without it: the same bytes land in the same buffer.

Why an all-reduce and not Megatron's reduce-scatter: losses must equal the plain
optimizer's bit for bit. gloo's reduce_scatter_tensor did give exactly the all-reduce's
bits here (DP 3 and 4, torch 2.13), but the clipping norm is the plain path's per-parameter
fp32 norms summed in fp64, which needs every parameter's whole reduced gradient; a norm
summed from shards rounds differently, so the clip coefficient and every update after it
would drift. The all-reduce costs one all-gather's worth more traffic than ZeRO-1; what
the flag saves here is optimizer memory. AdamW is elementwise, so a piece of a tensor
gets exactly the bits the whole tensor would (tests/training/test_distrib_optimizer.py).

State layouts:
  state_tensors()               this rank's slice (`optimizer/shard/...`): what the GEMINI
                                snapshot holds, unique per DP rank. Its `master` is the
                                fp32 masters of the owned range for every precision (fp32:
                                a view of the param buffer, which is its own master), so
                                the slices determine the params and the snapshot holds none
                                (training/state.py)
  state_tensors(gathered=True)  collective over DP: the plain optimizer's names and shapes,
                                independent of the DP size (persistent checkpoints), so a
                                run can --load it with another DP size or without the flag
  gathered_from_slices()        the same from every rank's slice, without a collective
                                (the SIGTERM flush, gemini/flush.py)
load_state_tensors() takes either layout. From a slice it also sets the params: owned
pieces from the masters, the rest by the all-gather, so every DP rank must load at once.
"""
from __future__ import annotations

import torch
from torch import nn

from gemini_lm.parallel.comm import peer_failures
from gemini_lm.parallel.data_parallel import all_gather_into_tensor
from gemini_lm.training.optimizer import MegatronOptimizer, _is_no_decay, make_adamw

SHARD = "optimizer/shard/"


class _Piece:
    """The part [start, end) of one parameter (flattened) that this rank owns."""

    def __init__(self, index: int, start: int, end: int, local: slice, master: torch.Tensor):
        self.index = index          # into self._params
        self.start, self.end = start, end
        self.local = local          # where it sits in this rank's flat state
        self.master = master        # view: of the param buffer (fp32) or of the flat masters


class DistributedOptimizer(MegatronOptimizer):
    """MegatronOptimizer whose masters and moments cover this DP rank's shard only."""

    def _build(self, named_params: list[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
               betas: tuple[float, float], eps: float) -> None:
        ddp = self.ddp
        # Whole params, for the norm and the inf check; the "master" slot is unused here.
        self._params = [(name, p, p) for name, p in named_params]
        self._lo, self._hi = ddp.shard_range(self.ps.dp_rank)
        n = self._hi - self._lo
        if n == 0:
            raise ValueError(f"data-parallel rank {self.ps.dp_rank} owns no parameters: "
                             f"{ddp.grad_buffer.numel()} elements over {self.ps.dp_size} ranks")
        low_precision = named_params[0][1].dtype != torch.float32
        f32 = {"dtype": torch.float32, "device": self.device}
        self._master = torch.empty(n, **f32) if low_precision else None
        # The slice's fp32 masters as one flat tensor: an fp32 param is its own master, so
        # there it is the owned range of the param buffer itself (a view, no copy).
        self._flat_master = self._master if low_precision else ddp.param_buffer[self._lo:self._hi]
        self._exp_avg, self._exp_avg_sq = torch.zeros(n, **f32), torch.zeros(n, **f32)

        self._pieces: list[_Piece] = []
        for i, (_, p) in enumerate(named_params):
            start, end = ddp.param_range[id(p)]
            a, b = max(start, self._lo), min(end, self._hi)
            if a >= b:
                continue
            local = slice(a - self._lo, b - self._lo)
            flat = p.detach().view(-1)[a - start:b - start]
            if self._master is None:
                master = flat                      # updated in place: it is the param buffer
            else:
                master = self._master[local]
                master.copy_(flat)
            self._pieces.append(_Piece(i, a - start, b - start, local, master))

        decay = [x.master for x in self._pieces if not _is_no_decay(*named_params[x.index])]
        no_decay = [x.master for x in self._pieces if _is_no_decay(*named_params[x.index])]
        self.adam = make_adamw(decay, no_decay, self.device, lr=lr, weight_decay=weight_decay,
                               betas=betas, eps=eps)
        for x in self._pieces:   # the moments live in the flat state: one tensor to snapshot
            state = self.adam.state[x.master]
            state["exp_avg"], state["exp_avg_sq"] = self._exp_avg[x.local], self._exp_avg_sq[x.local]

    def zero_grad(self) -> None:
        for _, p, _ in self._params:
            p.grad = None
        for x in self._pieces:
            x.master.grad = None
        self.ddp.zero_grad_buffer()

    def _prepare_master_grads(self) -> list[torch.Tensor]:
        """Every param's whole fp32 gradient (the buffer's views when it is fp32)."""
        return [p.main_grad if p.main_grad.dtype == torch.float32 else p.main_grad.float()
                for _, p, _ in self._params]

    def _update(self, grads: list[torch.Tensor]) -> None:
        for x in self._pieces:
            x.master.grad = grads[x.index].view(-1)[x.start:x.end]
        self.adam.step()
        if self._master is not None:
            for x in self._pieces:
                self._params[x.index][1].detach().view(-1)[x.start:x.end].copy_(x.master)
        self.ddp.start_param_sync()   # --overlap-param-gather: in flight until the next forward

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's flat slice -> the whole flat tensor (the param buffer's layout)."""
        size = self.ddp.shard_size
        if self.ps.dp_size == 1:
            return flat
        own = torch.zeros(size, dtype=flat.dtype, device=flat.device)
        own[:flat.numel()] = flat
        out = torch.empty(size * self.ps.dp_size, dtype=flat.dtype, device=flat.device)
        with peer_failures("optimizer state all-gather"):
            all_gather_into_tensor(out, own, self.ps.dp_group)
        return out

    def _step_counter(self) -> torch.Tensor:
        # Every piece takes every step (skipped steps skip all of them), so one counter says it.
        return self.adam.state[self._pieces[0].master]["step"]

    def state_tensors(self, gathered: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if gathered:
            self.finish_param_sync()   # the caller reads the whole params with these
            flats = {"exp_avg": self._gather(self._exp_avg), "exp_avg_sq": self._gather(self._exp_avg_sq)}
            if self._master is not None:
                flats["master"] = self._gather(self._master)
            for name, p, _ in self._params:
                start, end = self.ddp.param_range[id(p)]
                for kind in ("master", "exp_avg", "exp_avg_sq"):
                    if kind in flats:
                        out[f"optimizer/{kind}/{name}"] = flats[kind][start:end].view(p.shape)
                out[f"optimizer/step/{name}"] = self._step_counter().clone()
        else:
            out[SHARD + "range"] = torch.tensor([self._lo, self._hi, self.ddp.grad_buffer.numel()],
                                                dtype=torch.int64)
            # The params' owned range follows from it. With fp32 params it is the owned range
            # of param_buffer, which an overlapped all-gather (--overlap-param-gather) may be
            # writing while the GEMINI snapshot copies it: with this rank's own input, cloned
            # from exactly this range after the update, so every byte written equals the byte
            # already there and any interleaving of the two copies reads the same values.
            # No wait and no copy needed; the moments and bf16 masters it never touches.
            out[SHARD + "master"] = self._flat_master
            out[SHARD + "exp_avg"] = self._exp_avg
            out[SHARD + "exp_avg_sq"] = self._exp_avg_sq
            out[SHARD + "step"] = self._step_counter()
        if self.grad_scaler is not None:
            out.update({f"optimizer/grad_scaler/{k}": v for k, v in self.grad_scaler.state_tensors().items()})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """From this rank's slice (same DP layout) or from the gathered layout (any DP size)."""
        self.finish_param_sync()   # an all-gather in flight must not write over what loads here
        shard = SHARD + "range" in tensors
        own = self._own_keys(shard)
        if set(tensors) != own:
            missing, unexpected = sorted(own - set(tensors)), sorted(set(tensors) - own)
            raise ValueError(f"optimizer state mismatch: missing {missing[:3]} ({len(missing)}), "
                             f"unexpected {unexpected[:3]} ({len(unexpected)})")
        if shard:
            got = tensors[SHARD + "range"].tolist()
            mine = [self._lo, self._hi, self.ddp.grad_buffer.numel()]
            if got != mine:
                raise ValueError(f"optimizer shard covers {got}, this rank owns {mine} "
                                 "(another data-parallel size or model)")
            for kind, dst in (("master", self._flat_master), ("exp_avg", self._exp_avg),
                              ("exp_avg_sq", self._exp_avg_sq)):
                _copy(SHARD + kind, tensors[SHARD + kind], dst)
            steps = [tensors[SHARD + "step"]] * len(self._pieces)
        else:
            steps = []
            for x in self._pieces:
                name, p, _ = self._params[x.index]
                for kind, dst in (("master", self._master), ("exp_avg", self._exp_avg),
                                  ("exp_avg_sq", self._exp_avg_sq)):
                    if dst is not None:
                        src = tensors[f"optimizer/{kind}/{name}"]
                        if src.shape != p.shape or src.dtype != torch.float32:
                            raise ValueError(f"optimizer/{kind}/{name}: checkpoint has {src.dtype}{list(src.shape)}, "
                                             f"optimizer has torch.float32{list(p.shape)}")
                        dst[x.local].copy_(src.reshape(-1)[x.start:x.end])
                steps.append(tensors[f"optimizer/step/{name}"])
        for x, step in zip(self._pieces, steps):
            _copy("step", step, self.adam.state[x.master]["step"])
        if self.grad_scaler is not None:
            prefix = "optimizer/grad_scaler/"
            self.grad_scaler.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items()
                                                 if k.startswith(prefix)})
        if self._master is not None:   # the model's owned pieces from the masters, as the plain one
            for x in self._pieces:
                self._params[x.index][1].detach().view(-1)[x.start:x.end].copy_(x.master)
        if shard:   # the slice carries no params: every rank's owned pieces make them whole
            self.ddp.start_param_sync(force_sync=True)

    def restores_params(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether loading `tensors` (optimizer state) also sets the params: this rank's slice
        does (collectively over DP); the gathered layout does not, the model's own entries do."""
        return SHARD + "range" in tensors

    def param_names_from_masters(self) -> list[str]:
        """The params this rank's slice determines (with every other DP rank's): all of them."""
        return [name for name, _, _ in self._params]

    def gathered_from_slices(self, slices: list[dict[str, torch.Tensor]]
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the params by name, state_tensors(gathered=True)) from every DP rank's
        state_tensors(), in DP rank order, without a collective: the SIGTERM flush puts a
        persistent checkpoint together from slices it reads in a memory store. Pure: the
        slices and this rank's DDP layout (the same on every DP rank) say it all."""
        total = self.ddp.grad_buffer.numel()
        want = [[*self.ddp.shard_range(r), total] for r in range(self.ps.dp_size)]
        got = [s[SHARD + "range"].tolist() for s in slices]
        if got != want:
            raise ValueError(f"optimizer slices cover {got}, this layout has {want}")
        flats = {kind: torch.cat([s[SHARD + kind] for s in slices]) for kind in ("master", "exp_avg", "exp_avg_sq")}
        step = slices[0][SHARD + "step"]
        params, out = {}, {}
        for name, p, _ in self._params:
            start, end = self.ddp.param_range[id(p)]
            # As the step copies masters into low-precision params: the same rounding.
            params[name] = flats["master"][start:end].view(p.shape).to(p.dtype)
            for kind in ("master", "exp_avg", "exp_avg_sq"):
                if kind != "master" or self._master is not None:
                    out[f"optimizer/{kind}/{name}"] = flats[kind][start:end].view(p.shape)
            out[f"optimizer/step/{name}"] = step.clone()
        if self.grad_scaler is not None:   # the same on every DP rank (the inf check is all-reduced)
            keys = [f"optimizer/grad_scaler/{k}" for k in self.grad_scaler.state_tensors()]
            out.update({k: slices[0][k] for k in keys})
        return params, out

    def _own_keys(self, shard: bool) -> set[str]:
        scaler = {f"optimizer/grad_scaler/{k}" for k in self.grad_scaler.state_tensors()} \
            if self.grad_scaler is not None else set()
        kinds = ["exp_avg", "exp_avg_sq", "step"] + (["master"] if self._master is not None else [])
        if shard:
            return {SHARD + k for k in ["exp_avg", "exp_avg_sq", "step", "master", "range"]} | scaler
        return {f"optimizer/{k}/{name}" for k in kinds for name, _, _ in self._params} | scaler


def _copy(key: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"{key}: checkpoint has {src.dtype}{list(src.shape)}, optimizer has "
                         f"{dst.dtype}{list(dst.shape)}")
    dst.copy_(src)

"""The distributed optimizer (ZeRO-1): bit-identical to the plain optimizer, state divided
by the DP size, its two state layouts round-trip bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gemini_lm.parallel.data_parallel import DistributedDataParallel
from gemini_lm.parallel.state import ParallelState
from gemini_lm.parallel.timeline import CollectiveTimeline
from gemini_lm.training.distrib_optimizer import DistributedOptimizer
from gemini_lm.training.optimizer import build_optimizer
from tests.dist import run_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUCKET_MB = 100 * 4 / 2 ** 20   # several buckets, so shards cut through buckets and params


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype, hidden: int = 13):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(7, hidden)      # odd sizes: shards end inside parameters
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 5)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _build(ps, precision: str, distributed: bool, hidden: int = 13, overlap: bool = False):
    model = _Net(DTYPES[precision], hidden)
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=BUCKET_MB, use_distributed_optimizer=distributed,
                                  overlap_param_gather=overlap)
    # clip_grad small enough to clip every step: the norm must agree bit for bit too
    opt = build_optimizer(model, ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), clip_grad=0.05,
                          precision=precision, ddp=ddp, initial_loss_scale=2.0 ** 10,
                          use_distributed_optimizer=distributed)
    return model, ddp, opt


def _step(ps, model, ddp, opt, iteration: int):
    g = torch.Generator().manual_seed(100 + iteration)
    x, y = torch.randn(4 * ps.dp_size, 7, generator=g), torch.randn(4 * ps.dp_size, 5, generator=g)
    x, y = x[4 * ps.dp_rank:4 * (ps.dp_rank + 1)], y[4 * ps.dp_rank:4 * (ps.dp_rank + 1)]
    ps.timeline.begin_iteration(iteration)
    loss = nn.functional.mse_loss(ddp(x.to(next(model.parameters()).dtype)).float(), y)
    opt.scale_loss(loss).backward()
    ddp.finish_grad_sync()
    if iteration == 3 and opt.grad_scaler is not None and ps.dp_rank == 0:
        model.fc2.bias.main_grad[0] = float("inf")   # an overflow on one rank skips the step on all
    result = opt.step(iteration)
    ps.timeline.end_iteration()
    return float(loss.detach()), result.grad_norm, result.update_successful


def _train(ps, precision: str, distributed: bool, iters: int = 6):
    model, ddp, opt = _build(ps, precision, distributed)
    log = [_step(ps, model, ddp, opt, i) for i in range(1, iters + 1)]
    return model, ddp, opt, log


def _np(tensors: dict) -> dict:
    return {k: v.detach().float().numpy().copy() for k, v in tensors.items()}


def _equivalence_body(rank: int, world_size: int):
    # One spawn for every precision: starting ranks costs seconds, the checks do not.
    ps = ParallelState.initialize(tp_size=1)
    return {precision: _equivalence(ps, precision) for precision in DTYPES}


def _equivalence(ps, precision: str):
    ps.timeline = CollectiveTimeline()
    plain_model, _, plain_opt, plain_log = _train(ps, precision, False)
    model, ddp, opt, log = _train(ps, precision, True)
    assert isinstance(opt, DistributedOptimizer)
    out = {"plain_log": plain_log, "log": log,
           "plain_params": _np(dict(plain_model.named_parameters())), "params": _np(dict(model.named_parameters())),
           "plain_state": _np(plain_opt.state_tensors()), "gathered": _np(opt.state_tensors(gathered=True)),
           "plain_bytes": sum(t.numel() * t.element_size() for t in plain_opt.state_tensors().values()),
           # fp32: the slice's masters are the param buffer's owned range, no optimizer memory
           "bytes": sum(t.numel() * t.element_size() for k, t in opt.state_tensors().items()
                        if not (precision == "fp32" and k == "optimizer/shard/master")),
           "spans": sorted({s.kind for it in ps.timeline.iterations() for s in it.spans if s.group == "dp"})}

    # Round trips: the shard layout into a fresh optimizer of the same layout, the gathered
    # one likewise; both must continue exactly as the original.
    shard = {k: v.clone() for k, v in opt.state_tensors().items()}
    gathered = {k: v.clone() for k, v in opt.state_tensors(gathered=True).items()}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    continued = [_step(ps, model, ddp, opt, i) for i in (7, 8)]
    for layout in (shard, gathered):
        m2, ddp2, opt2 = _build(ps, precision, True)
        with torch.no_grad():
            for n, p in m2.named_parameters():
                p.copy_(params[n])
        opt2.load_state_tensors(layout)
        assert [_step(ps, m2, ddp2, opt2, i) for i in (7, 8)] == continued
        assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in m2.named_parameters())
    return out


@pytest.mark.slow
def test_distributed_optimizer_equals_plain_bit_for_bit_dp3(tmp_path):
    # DP=3: the all-reduce's summation order matters (a+b+c), the last shard is padded.
    for precision, r in [(p, r) for ranks in run_ranks(_equivalence_body, world_size=3, tmp_path=tmp_path)
                         for p, r in ranks.items()]:
        assert r["log"] == r["plain_log"]                  # losses, grad norms, skipped steps
        assert any(norm is not None and norm > 0.05 for _, norm, _ in r["log"])   # clipping ran
        if precision == "fp16":
            assert [ok for _, _, ok in r["log"]][2] is False
        for k, v in r["plain_params"].items():
            assert (v == r["params"][k]).all(), k
        assert r["gathered"].keys() == r["plain_state"].keys()
        for k, v in r["plain_state"].items():
            assert (v == r["gathered"][k]).all(), k
        # a third of the state, up to the shard's range, its step and the padding
        assert r["bytes"] < r["plain_bytes"] / 3 * 1.05 + 64, (r["bytes"], r["plain_bytes"])
        assert r["spans"] == ["all_gather", "all_reduce"]


def _single_process_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


def test_dp1_is_allowed_and_equals_plain():
    ps = _single_process_state()
    plain_model, _, plain_opt, plain_log = _train(ps, "bf16", False)
    model, _, opt, log = _train(ps, "bf16", True)
    assert log == plain_log
    assert all(torch.equal(p, dict(plain_model.named_parameters())[n]) for n, p in model.named_parameters())
    gathered, plain = opt.state_tensors(gathered=True), plain_opt.state_tensors()
    assert gathered.keys() == plain.keys()
    assert all(torch.equal(gathered[k], plain[k]) for k in plain)


def test_params_live_in_the_param_buffer():
    ps = _single_process_state()
    model, ddp, _ = _build(ps, "fp32", True)
    for p in model.parameters():
        start, end = ddp.param_range[id(p)]
        assert p.data_ptr() == ddp.param_buffer[start:end].data_ptr()


def test_shard_layout_rejects_another_layout():
    ps = _single_process_state()
    _, _, opt = _build(ps, "fp32", True)
    state = {k: v.clone() for k, v in opt.state_tensors().items()}
    state["optimizer/shard/range"] = torch.tensor([0, 10, 10])
    with pytest.raises(ValueError, match="another data-parallel size"):
        opt.load_state_tensors(state)


def test_without_the_param_buffer_is_an_error():
    ps = _single_process_state()
    model = _Net(torch.float32)
    ddp = DistributedDataParallel(model, ps)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        build_optimizer(model, ps, lr=1e-3, ddp=ddp, use_distributed_optimizer=True)


def test_overlap_param_gather_needs_the_distributed_optimizer():
    with pytest.raises(ValueError, match="overlap_param_gather needs use_distributed_optimizer"):
        DistributedDataParallel(_Net(torch.float32), _single_process_state(), overlap_param_gather=True)


def _overlap_body(rank: int, world_size: int):
    ps = ParallelState.initialize(tp_size=1)
    for precision in ("fp32", "bf16"):
        ps.timeline = CollectiveTimeline()
        model, ddp, opt, log = _train(ps, precision, True)
        ps.timeline = CollectiveTimeline()
        model2, ddp2, opt2 = _build(ps, precision, True, overlap=True)
        shard = "optimizer/shard/master"
        log2 = []
        for i in range(1, 7):
            log2.append(_step(ps, model2, ddp2, opt2, i))
            assert ddp2._param_handle is not None   # in flight past the update
            # What the GEMINI snapshot reads meanwhile (fp32: a view of the buffer being
            # written): the same bytes as once the all-gather is done.
            during = {k: v.clone() for k, v in opt2.state_tensors().items()}
            if i == 6:
                ddp2.finish_param_sync()
                assert all(torch.equal(v, opt2.state_tensors()[k]) for k, v in during.items())
            assert torch.equal(during[shard], opt2.state_tensors()[shard])
        assert log2 == log                       # losses, grad norms, skipped steps: the same bits
        assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in model2.named_parameters())
        # Recorded where waited: in the next iteration (the forward's pre-hook), as its first
        # collective, so its span starts before that iteration; not in the update.
        iters = ps.timeline.iterations()
        gathers = [[s for s in it.spans if s.kind == "all_gather"] for it in iters]
        assert [len(g) for g in gathers] == [0, 1, 1, 1, 1, 1]
        assert all(it.spans[0].kind == "all_gather" and it.spans[0].start < 0 for it in iters[1:])
        # Loading waits for one in flight; abandoning drops it once it is done or failed.
        _step(ps, model2, ddp2, opt2, 7)
        opt2.load_state_tensors({k: v.clone() for k, v in opt.state_tensors().items()})
        assert ddp2._param_handle is None
        assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in model2.named_parameters())
        _step(ps, model2, ddp2, opt2, 7)
        ddp2.abandon_param_sync()
        assert ddp2._param_handle is None and ddp2._param_input is None
    return True


@pytest.mark.slow
def test_overlap_param_gather_same_bits_waited_at_the_next_forward_dp2(tmp_path):
    assert run_ranks(_overlap_body, world_size=2, tmp_path=tmp_path) == [True, True]


def test_each_dp_rank_is_its_own_gemini_shard():
    from gemini_lm.checkpoint.naming import shard_id, tp_rank_of
    assert shard_id(1) == "tp01" and shard_id(1, 2) == "tp01dp02"
    assert tp_rank_of("tp01dp02") == 1


def _train_state(ps, precision: str, distributed: bool):
    """A TrainState over _Net, big enough that the tensors dwarf the RNG states."""
    from gemini_lm.parallel.random import RNGStatesTracker
    from gemini_lm.training.lr_schedule import OptimizerParamScheduler
    from gemini_lm.training.state import TrainProgress, TrainState
    model, ddp, opt = _build(ps, precision, distributed, hidden=1001)
    scheduler = OptimizerParamScheduler(opt, max_lr=1e-2, lr_decay_iters=10)
    state = TrainState(model, opt, scheduler, RNGStatesTracker(), ps, TrainProgress(), {"net": precision})
    return model, ddp, opt, state


def _snapshot_body(rank: int, world_size: int):
    import torch.distributed as dist
    from gemini_lm.checkpoint.snapshot import SnapshotLayout
    ps = ParallelState.initialize(tp_size=1)
    out = {}
    for precision in ("fp32", "bf16"):
        ps.timeline = CollectiveTimeline()
        sizes = {}
        for distributed in (False, True):
            model, ddp, opt, state = _train_state(ps, precision, distributed)
            for i in (1, 2, 3):
                _step(ps, model, ddp, opt, i)
            state.progress.iteration = 3
            snap = state.tensors()
            layout = SnapshotLayout.build(snap, state.metadata)
            sizes[distributed] = {"nbytes": layout.nbytes, "data": sum(e.nbytes for e in layout.entries.values()),
                                  "rest": sum(t.numel() * t.element_size() for k, t in snap.items()
                                              if not k.startswith(("model/", "optimizer/"))),
                                  "params": sorted(k for k in snap if k.startswith("model/"))}
        saved = {k: v.clone() for k, v in snap.items()}   # the distributed one's: no params in it
        params = {n: p.detach().clone() for n, p in model.named_parameters()}

        # The flush's assembly from every rank's slice equals the collective gather, byte for
        # byte on DP rank 0, whose RNG states both take (a spawned process seeds Python's own).
        slices = [None] * world_size
        dist.all_gather_object(slices, saved)
        gathered = state.tensors(gathered=True)
        assembled = state.gathered_from_slices(slices)
        assert list(assembled) == list(gathered)
        assert all(torch.equal(assembled[k], t) for k, t in gathered.items() if not k.startswith("rng/"))
        if rank == 0:
            files = []
            for tensors in (gathered, assembled):
                lay = SnapshotLayout.build(tensors, state.metadata)
                buf = torch.empty(lay.nbytes, dtype=torch.uint8)
                lay.write(tensors, buf)
                files.append(buf)
            assert torch.equal(*files)

        # The restored params come only from the slices, through the all-gather: wreck the live
        # ones (and the moments), load the snapshot, continue exactly as without the detour.
        continued = [_step(ps, model, ddp, opt, i) for i in (4, 5)]
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        for t in opt.state_tensors().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        state.load(saved)
        assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
        assert [_step(ps, model, ddp, opt, i) for i in (4, 5)] == continued
        out[precision] = sizes
    return out


@pytest.mark.slow
def test_snapshot_holds_the_slice_and_no_param_copy_dp2(tmp_path):
    from gemini_lm.gemini.topology import GeminiTopology, RankInfo
    ranks = run_ranks(_snapshot_body, world_size=2, tmp_path=tmp_path)
    for precision in ("fp32", "bf16"):
        plain, dist = ranks[0][precision][False], [r[precision][True] for r in ranks]
        assert plain["params"] and not any(d["params"] for d in dist)
        # Nothing duplicated: the slices together hold the plain snapshot's bytes, plus each
        # extra rank's progress, schedule and RNG, plus a range and a step per slice.
        assert sum(d["data"] for d in dist) <= plain["data"] + plain["rest"] + 2 * 64
        for d in dist:   # the state itself halves; header and RNG states do not
            assert d["data"] - d["rest"] <= (plain["data"] - plain["rest"]) / 2 + 64, (precision, d, plain)
            assert d["nbytes"] < plain["nbytes"] * 0.6
        # On the wire (2 machines, 2 replicas): each slice once, to the one peer; the plain
        # optimizer's DP copies already are the replicas.
        infos = [RankInfo(r, f"m{r}", f"tp00dp0{r}", "h", d["nbytes"]) for r, d in enumerate(dist)]
        topo = GeminiTopology.from_infos(0, infos, 2, "group")
        assert sum(infos[r.src_rank].nbytes for r in topo.routes) == sum(d["nbytes"] for d in dist)

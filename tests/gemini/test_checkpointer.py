"""GEMINI end to end on real gloo ranks simulating machines: snapshot every iteration,
replicas on peers by placement, and recovery (local, peer, newest common iteration,
corrupt copy, persistent fallback, renumbered ranks) continuing bit for bit."""
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from gemini_lm.gemini.placement import plan_placement
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.checkpointer import machine_id
from tests.e2e import read_losses, read_recoveries, run_pretrain, tiny_gpt_args

JOB = "t"


def _args(data, tmp_path, name, iters, *extra):
    log_dir = str(tmp_path / name)
    return log_dir, tiny_gpt_args(data, log_dir, "--train-iters", str(iters), "--lr-decay-iters", "20",
                                  "--gemini-store-dir", str(tmp_path / "shm"), "--gemini-job-id", JOB,
                                  "--gemini-keep-store", "--gemini-profile-iters", "2", *extra)


def _store(tmp_path, machine):
    return MemoryStore(str(tmp_path / "shm"), JOB, machine)


def _verified(store):
    """{(shard, iteration): record} of every slot whose bytes match its checksum."""
    out = {}
    for rec in store.records():
        with store.open(rec, verify=True):
            out[(rec.shard, rec.iteration)] = rec
    return out


def test_single_process_restart_continues_bit_for_bit(byte_corpus, tmp_path):
    dropout = ("--hidden-dropout", "0.1", "--attention-dropout", "0.1")   # RNG state must round-trip
    ref_log, ref = _args(byte_corpus, tmp_path / "ref", "ref", 6, *dropout, "--save", str(tmp_path / "ck_ref"))
    run_pretrain(tmp_path, ref)
    log, first = _args(byte_corpus, tmp_path, "run", 3, *dropout)
    run_pretrain(tmp_path, first)
    assert {it for (_, it) in _verified(_store(tmp_path, machine_id()))} == {2, 3}
    _, second = _args(byte_corpus, tmp_path, "run", 6, *dropout, "--save", str(tmp_path / "ck"))
    run_pretrain(tmp_path, second)
    [rec] = read_recoveries(log)
    assert (rec["source"], rec["iteration"]) == ("local", 3)
    assert read_losses(log) == read_losses(ref_log)   # iterations 1-3, then 4-6 after the restart
    a = safe_open(str(tmp_path / "ck_ref" / "iter_0000006" / "tp_rank_00.safetensors"), "pt")
    b = safe_open(str(tmp_path / "ck" / "iter_0000006" / "tp_rank_00.safetensors"), "pt")
    for k in a.keys():   # params, optimizer, scheduler, every RNG, data position
        assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("placement", ["group", "ring"])
def test_every_shard_is_held_by_m_machines(byte_corpus, tmp_path, placement):
    machines = ["m0", "m1", "m2", "m3"]
    _, argv = _args(byte_corpus, tmp_path, "repl", 3, "--tensor-model-parallel-size", "4",
                    "--gemini-replicas", "2", "--gemini-placement", placement)
    run_pretrain(tmp_path, argv, world_size=4, machines=machines)
    plan = plan_placement(machines, 2, placement)
    held = {m: _verified(_store(tmp_path, m)) for m in machines}
    for tp_rank, owner in enumerate(machines):   # TP=4, one rank per machine: rank r holds tp0r
        shard = f"tp{tp_rank:02d}"
        holders = {m for m in machines if (shard, 3) in held[m]}
        assert holders == set(plan.holders(owner)), (shard, holders)
        checksums = {held[m][(shard, 3)].checksum for m in holders}
        assert len(checksums) == 1


def test_data_parallel_copies_count_toward_m(byte_corpus, tmp_path):
    # TP=2 x DP=2 on 2 machines of 2 ranks: each machine natively holds both shards, so
    # m=2 needs no checkpoint traffic at all.
    _, argv = _args(byte_corpus, tmp_path, "dp", 3, "--tensor-model-parallel-size", "2")
    run_pretrain(tmp_path, argv, world_size=4, machines=["m0", "m0", "m1", "m1"])
    for m in ("m0", "m1"):
        recs = _store(tmp_path, m).records()
        assert {(r.shard, r.source) for r in recs if r.iteration == 3} == {("tp00", "local"), ("tp01", "local")}


def test_recovery_sources_on_two_machines(byte_corpus, tmp_path):
    """One chain of restarts on TP=2 over 2 machines (m=2: each holds its shard and the
    other's replica), each continuing bit for bit like the uninterrupted run."""
    machines = ["m0", "m1"]
    tp2 = ("--tensor-model-parallel-size", "2")
    save = ("--save", str(tmp_path / "ck"), "--save-interval", "2")
    ref_log, ref = _args(byte_corpus, tmp_path / "ref", "ref", 14, "--tensor-model-parallel-size", "2")
    run_pretrain(tmp_path, ref, world_size=2, machines=machines)
    reference = dict(read_losses(ref_log))

    def run(iters, machine_ids=machines, persist=False):
        log, argv = _args(byte_corpus, tmp_path, f"run{iters}", iters, *tp2, *(save if persist else ()))
        run_pretrain(tmp_path, argv, world_size=2, machines=machine_ids)
        recs = read_recoveries(log)
        for it, loss in read_losses(log):
            assert loss == reference[it], (iters, it)   # bit for bit
        return recs[-1] if recs else None

    assert run(5) is None                                       # first start
    shutil.rmtree(tmp_path / "shm" / JOB / "m0")                # m0's memory is lost
    rec = run(8)
    assert (rec["source"], rec["iteration"], rec["peer_ranks"]) == ("peer", 5, [0])
    assert rec["bytes_moved"] > 0

    # A flipped byte in m0's newest copy of its own shard: detected, m1's replica used.
    s0 = _store(tmp_path, "m0")
    newest = max((r for r in s0.records("tp00")), key=lambda r: r.iteration)
    path = os.path.join(s0.path, f"tp00.{newest.slot}.bin")
    with open(path, "r+b") as f:
        f.seek(newest.nbytes - 1)
        b = f.read(1)
        f.seek(newest.nbytes - 1)
        f.write(bytes([b[0] ^ 0xFF]))
    rec = run(10)
    assert (rec["source"], rec["iteration"]) == ("peer", 8)

    # Iteration 10 of shard tp01 lost everywhere (a crash mid-write): the newest iteration
    # complete for every shard is 9.
    for m in machines:
        st = _store(tmp_path, m)
        for r in st.records("tp01"):
            if r.iteration == 10:
                st.discard("tp01", r.slot)
    rec = run(12)
    assert (rec["source"], rec["iteration"]) == ("local", 9)

    # Ranks renumbered: rank 0 now runs on m1, which holds tp00 as a replica.
    rec = run(13, machine_ids=["m1", "m0"], persist=True)
    assert (rec["source"], rec["iteration"]) == ("local", 12)

    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000013", "latest_checkpointed_iteration.txt"]
    # Every copy gone: the persistent checkpoint (written at the end of the last run).
    shutil.rmtree(tmp_path / "shm" / JOB)
    rec = run(14, persist=True)
    assert (rec["source"], rec["iteration"]) == ("persistent", 13)

"""GEMINI end to end on real gloo ranks simulating machines: snapshot every iteration,
replicas on peers by placement, and recovery (local, peer, newest common iteration,
a corrupt own copy or replica, no good copy left: persistent fallback or a loud fresh
start, renumbered ranks) continuing bit for bit, dropout on, losses and the whole final
state. A corrupt copy is never loaded."""
import shutil

import pytest
import torch
from safetensors import safe_open

from gemini_lm.checkpoint.naming import shard_id
from gemini_lm.gemini.placement import plan_placement
from gemini_lm.gemini.store import MemoryStore
from gemini_lm.gemini.topology import machine_id
from tests.e2e import read_losses, read_recoveries, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow   # spawns processes

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
        shard = shard_id(tp_rank)
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


# ---- recovery sources, TP=2 over 2 machines (m=2: each holds its shard and the other's replica)
TP2, MACHINES, BASE_ITERS, ITERS = ("--tensor-model-parallel-size", "2"), ["m0", "m1"], 5, 8
DROPOUT = ("--hidden-dropout", "0.1", "--attention-dropout", "0.1")   # RNG state must round-trip


@pytest.fixture(scope="module")
def two_machines(byte_corpus, tmp_path_factory):
    """A failure-free reference of ITERS iterations (a persistent checkpoint of every one),
    and a run stopped after BASE_ITERS whose memory stores each scenario starts from."""
    root = tmp_path_factory.mktemp("two_machines")
    ref_log, ref = _args(byte_corpus, root, "ref", ITERS, *TP2, *DROPOUT,
                         "--save", str(root / "ref_ck"), "--save-interval", "1")
    ref = [a.replace(str(root / "shm"), str(root / "ref_shm")) for a in ref]
    run_pretrain(root, ref, world_size=2, machines=MACHINES)
    _, base = _args(byte_corpus, root, "base", BASE_ITERS, *TP2, *DROPOUT, "--save", str(root / "base_ck"))
    run_pretrain(root, base, world_size=2, machines=MACHINES)
    return root, dict(read_losses(ref_log))


def _check(log, root, reference, tmp_path):
    got = read_losses(log)
    assert [it for it, _ in got] == list(range(min(it for it, _ in got), ITERS + 1))
    for it, loss in got:
        assert loss == reference[it], it                     # bit for bit, dropout on
    for tp in range(2):                                      # params, Adam moments, schedule, RNG, data
        name = f"iter_{ITERS:07d}/tp_rank_{tp:02d}.safetensors"
        a, b = safe_open(str(root / "ref_ck" / name), "pt"), safe_open(str(tmp_path / "ck" / name), "pt")
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    [rec] = read_recoveries(log)
    return rec


def _scenario(byte_corpus, two_machines, tmp_path, damage, machine_ids=MACHINES, disk=False):
    """Continue the base run to ITERS from a copy of its memory (and, with `disk`, its
    persistent checkpoint), after `damage`; every loss and the whole final state must
    equal the reference's. The recovery record."""
    root, reference = two_machines
    shutil.copytree(root / "shm", tmp_path / "shm")
    if disk:
        shutil.copytree(root / "base_ck", tmp_path / "ck")
    log, argv = _args(byte_corpus, tmp_path, "run", ITERS, *TP2, *DROPOUT, "--save", str(tmp_path / "ck"))
    damage(tmp_path)
    run_pretrain(tmp_path, argv, world_size=2, machines=machine_ids)
    return _check(log, root, reference, tmp_path)


def test_lost_machine_memory_comes_from_its_peer(byte_corpus, two_machines, tmp_path):
    rec = _scenario(byte_corpus, two_machines, tmp_path,
                    lambda t: shutil.rmtree(t / "shm" / JOB / "m0"))
    assert (rec["source"], rec["iteration"], rec["peer_ranks"]) == ("peer", BASE_ITERS, [0])
    assert rec["bytes_moved"] > 0


def _flip_last_byte(t, machine, shard, iterations=None) -> int:
    """Damage `machine`'s copies of `shard` (those of `iterations`, default all) in place,
    behind the store's back, as a bad DIMM would; how many were damaged."""
    store = _store(t, machine)
    damaged = 0
    for rec in store.records(shard):
        if iterations is None or rec.iteration in iterations:
            with open(store.payload_path(rec), "r+b") as f:
                f.seek(rec.nbytes - 1)
                b = f.read(1)
                f.seek(rec.nbytes - 1)
                f.write(bytes([b[0] ^ 0xFF]))
            damaged += 1
    return damaged


def test_a_corrupt_local_copy_is_skipped_for_the_peer_replica(byte_corpus, two_machines, tmp_path):
    rec = _scenario(byte_corpus, two_machines, tmp_path,
                    lambda t: _flip_last_byte(t, "m0", "tp00", {BASE_ITERS}))
    assert (rec["source"], rec["iteration"], rec["corrupt_copies"]) == ("peer", BASE_ITERS, 1)


def test_a_corrupt_replica_on_the_peer_is_never_loaded(byte_corpus, two_machines, tmp_path):
    # m0's memory is lost, so tp00 exists only as m1's replicas, and the newest is damaged:
    # the one before it is the newest complete copy of tp00.
    def lose_m0_and_damage_m1s_newest_replica(t):
        shutil.rmtree(t / "shm" / JOB / "m0")
        assert _flip_last_byte(t, "m1", "tp00", {BASE_ITERS}) == 1
    rec = _scenario(byte_corpus, two_machines, tmp_path, lose_m0_and_damage_m1s_newest_replica)
    assert (rec["source"], rec["iteration"], rec["peer_ranks"]) == ("peer", BASE_ITERS - 1, [0])
    assert rec["corrupt_copies"] == 1


def test_the_newest_iteration_complete_for_every_shard_wins(byte_corpus, two_machines, tmp_path):
    def lose_tp01s_newest_everywhere(t):   # a crash mid-write of iteration 5's shard tp01
        for m in MACHINES:
            store = _store(t, m)
            for r in store.records("tp01"):
                if r.iteration == BASE_ITERS:
                    store.discard("tp01", r.slot)
    rec = _scenario(byte_corpus, two_machines, tmp_path, lose_tp01s_newest_everywhere)
    assert (rec["source"], rec["iteration"]) == ("local", BASE_ITERS - 1)


def test_renumbered_ranks_find_their_shards_by_machine(byte_corpus, two_machines, tmp_path):
    # Rank 0 now runs on m1, which holds tp00 as a replica: still local, nothing moves.
    rec = _scenario(byte_corpus, two_machines, tmp_path, lambda t: None, machine_ids=["m1", "m0"])
    assert (rec["source"], rec["iteration"], rec["bytes_moved"]) == ("local", BASE_ITERS, 0)


def test_no_good_copy_left_falls_back_to_the_persistent_checkpoint(byte_corpus, two_machines, tmp_path):
    # m0's memory is lost and every replica of tp00 on m1 is damaged: no iteration is
    # complete in memory, --save (the default --load) has the base run's final checkpoint.
    def lose_m0_and_damage_every_tp00_replica(t):
        shutil.rmtree(t / "shm" / JOB / "m0")
        assert _flip_last_byte(t, "m1", "tp00") == 2
    rec = _scenario(byte_corpus, two_machines, tmp_path, lose_m0_and_damage_every_tp00_replica, disk=True)
    assert (rec["source"], rec["iteration"], rec["memory_iteration"]) == ("persistent", BASE_ITERS, None)
    assert rec["corrupt_copies"] == 2


def test_only_corrupt_copies_and_no_checkpoint_start_fresh_loudly(byte_corpus, two_machines, tmp_path, capfd):
    # Every copy of tp00, own and replica, is damaged and there is no persistent checkpoint:
    # training starts again from iteration 0, says so, and records it as a recovery (this
    # log dir is new: only the memory tells that the job ran before).
    def damage_every_copy_of_tp00(t):
        assert sum(_flip_last_byte(t, m, "tp00") for m in MACHINES) == 4
    rec = _scenario(byte_corpus, two_machines, tmp_path, damage_every_copy_of_tp00)
    assert (rec["source"], rec["iteration"], rec["corrupt_copies"]) == ("none", 0, 4)
    err = capfd.readouterr().err
    assert "found only 4 corrupt copies in memory and none on disk: STARTING FRESH FROM ITERATION 0" in err
    assert err.count("skipping corrupt copy") == 4

import itertools

import pytest

from gemini_lm.gemini.placement import plan_placement, recoverable, replication_plan


def _names(n):
    return [f"m{i:02d}" for i in range(n)]


@pytest.mark.parametrize("n", range(1, 13))
@pytest.mark.parametrize("m", range(1, 6))
@pytest.mark.parametrize("strategy", ["ring", "mixed", "auto", "group"])
def test_every_checkpoint_has_m_distinct_holders(n, m, strategy):
    machines = _names(n)
    if strategy == "group" and n % min(m, n):
        with pytest.raises(ValueError):
            plan_placement(machines, m, strategy)
        return
    p = plan_placement(machines, m, strategy)
    assert p.replicas == min(m, n)
    for mach in machines:
        holders = p.holders(mach)
        assert holders[0] == mach
        assert len(set(holders)) == len(holders) == p.replicas
        assert set(holders) <= set(machines)
    # every machine receives as many checkpoints as it sends: m-1 each
    received = [peer for mach in machines for peer in p.peers(mach)]
    assert all(received.count(mach) == p.replicas - 1 for mach in machines)
    if m > n:
        assert any("clamped" in note for note in p.notes)


def test_group_structure_n16_m2():
    machines = _names(16)
    p = plan_placement(machines, 2, "group")
    assert p.strategy == "group" and p.ring == ()
    assert [list(g) for g in p.groups] == [machines[i:i + 2] for i in range(0, 16, 2)]
    for g in p.groups:
        for mach in g:
            assert set(p.holders(mach)) == set(g)
    assert plan_placement(machines, 2, "auto").strategy == "group"


def test_ring_definition():
    machines = _names(7)
    p = plan_placement(machines, 3, "ring")
    assert p.groups == (tuple(machines),) and p.ring == tuple(machines)
    for i, mach in enumerate(machines):
        assert p.peers(mach) == [machines[(i + d) % 7] for d in (1, 2)]


def test_mixed_n5_m2():
    machines = _names(5)
    p = plan_placement(machines, 2, "auto")
    assert p.strategy == "mixed"
    assert p.groups == (("m00", "m01"), ("m02", "m03", "m04"))
    assert p.ring == ("m02", "m03", "m04")
    assert p.peers("m00") == ["m01"] and p.peers("m01") == ["m00"]
    assert p.peers("m02") == ["m03"] and p.peers("m03") == ["m04"] and p.peers("m04") == ["m02"]


@pytest.mark.parametrize("n,m", [(7, 2), (11, 3), (14, 4), (9, 4)])
def test_mixed_structure(n, m):
    machines = _names(n)
    p = plan_placement(machines, m, "mixed")
    num_groups = n // m - 1
    assert len(p.ring) == n - m * num_groups
    assert m < len(p.ring) < 2 * m
    for g in p.groups[:num_groups]:
        assert len(g) == m
        assert all(set(p.holders(x)) == set(g) for x in g)
    ring = list(p.ring)
    for i, mach in enumerate(ring):
        assert p.peers(mach) == [ring[(i + d) % len(ring)] for d in range(1, m)]


def test_m_at_least_n_everyone_holds_everything():
    machines = _names(4)
    for m in (4, 9):
        for strategy in ("auto", "ring", "mixed", "group"):
            p = plan_placement(machines, m, strategy)
            assert all(set(p.holders(x)) == set(machines) for x in machines)


def test_bad_input():
    with pytest.raises(ValueError):
        plan_placement(_names(4), 0)
    with pytest.raises(ValueError):
        plan_placement(_names(4), 2, "star")
    with pytest.raises(ValueError):
        plan_placement(["a", "a"], 1)
    with pytest.raises(ValueError):
        plan_placement([], 1)
    with pytest.raises(ValueError):
        plan_placement(_names(4), 2).peers("nope")


def test_recoverable_matches_definition():
    machines = _names(6)
    p = plan_placement(machines, 2, "ring")
    for k in range(7):
        for failed in itertools.combinations(machines, k):
            f = set(failed)
            # ring m=2: lost iff two neighbours (cyclically) both failed
            lost = any(machines[i] in f and machines[(i + 1) % 6] in f for i in range(6))
            assert recoverable(p, f) == (not lost)
            assert recoverable(p.holder_sets(), f) == (not lost)


def test_dp_replicas_count_toward_m():
    p = plan_placement(_names(4), 2)
    plan = replication_plan({"tp00": ["m00", "m02"], "tp01": ["m01", "m03"]}, p)
    assert plan == {"tp00": [], "tp01": []}


@pytest.mark.parametrize("n,m,strategy", [(4, 2, "auto"), (6, 3, "group"), (5, 2, "mixed"),
                                          (7, 3, "ring"), (3, 5, "auto"), (8, 1, "auto")])
def test_replication_plan_reaches_m_failure_domains(n, m, strategy):
    machines = _names(n)
    p = plan_placement(machines, m, strategy)
    # TP=2 inside each machine pair, DP across: a mix of 1 and 2 native holders
    shards = {f"tp{i:02d}": [machines[i % n]] for i in range(n)}
    shards["dp_shared"] = [machines[0], machines[-1]]
    plan = replication_plan(shards, p)
    assert plan == replication_plan(dict(reversed(list(shards.items()))), p)  # order-independent
    for shard, sends in plan.items():
        natives = set(shards[shard])
        dsts = [d for _, d in sends]
        assert len(dsts) == len(set(dsts))                    # each (shard, dst) once
        assert not natives & set(dsts)                        # never to a native holder
        assert all(src in natives for src, _ in sends)        # only native holders send
        assert len(natives | set(dsts)) == max(len(natives), min(m, n))
    # a machine's own shard goes exactly to its placement peers
    for i in range(n):
        assert sorted(d for _, d in plan[f"tp{i:02d}"]) == sorted(p.peers(machines[i]))


def test_replication_plan_balances_receivers():
    # 4 shards all native on m00 and m01 with m=3: the third copy should spread out
    machines = _names(6)
    p = plan_placement(machines, 3, "ring")
    shards = {f"s{i}": ["m00", "m03"] for i in range(4)}
    plan = replication_plan(shards, p)
    dsts = [sends[0][1] for sends in plan.values()]
    assert all(len(sends) == 1 for sends in plan.values())
    assert len(set(dsts)) == 4  # m01, m02, m04, m05: one shard each


def test_replication_plan_bad_input():
    p = plan_placement(_names(4), 2)
    with pytest.raises(ValueError):
        replication_plan({"tp00": []}, p)
    with pytest.raises(ValueError):
        replication_plan({"tp00": ["elsewhere"]}, p)


def test_a_placement_the_launch_cannot_honour_is_a_usage_error():
    """Issue 13, item 5: --gemini-placement group with m not dividing this launch's N is known
    only once the machines are counted: one line, not a ValueError traceback."""
    from gemini_lm.errors import UsageError
    from gemini_lm.gemini.topology import GeminiTopology, RankInfo

    infos = [RankInfo(r, f"m{r}", "tp00", "L") for r in range(3)]
    with pytest.raises(UsageError, match="--gemini-replicas 2 --gemini-placement group: group placement needs"):
        GeminiTopology.from_infos(0, infos, 2, "group")
    clamped = GeminiTopology.from_infos(0, infos, 5, "auto")   # accepted, and says so (echoed at start)
    assert clamped.placement.replicas == 3 and "clamped to 3" in clamped.placement.notes[0]

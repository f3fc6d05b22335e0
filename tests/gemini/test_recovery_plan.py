"""The recovery plan every rank computes from the published inventories (pure)."""
from gemini_lm.gemini.recovery_plan import plan_recovery, stale_records
from gemini_lm.gemini.topology import RankInfo


def _rec(shard, iteration, layout="L", job="j", checksum=None):
    return {"shard": shard, "iteration": iteration, "layout_hash": layout, "job_id": job,
            "nbytes": 100, "checksum": checksum or f"{shard}-{iteration}", "slot": "a"}


RANKS = [RankInfo(0, "m0", "tp00", "L"), RankInfo(1, "m1", "tp01", "L")]


def test_newest_iteration_complete_for_every_shard():
    inv = {"m0": [_rec("tp00", 9), _rec("tp00", 10), _rec("tp01", 9)],
           "m1": [_rec("tp01", 9), _rec("tp00", 10)]}
    plan = plan_recovery(RANKS, inv, "j")
    assert plan.iteration == 9                       # tp01 has no iteration 10 anywhere
    assert plan.source == {0: "local", 1: "local"}
    assert plan.fetches == []


def test_missing_local_copy_is_fetched_from_the_holders_lowest_rank():
    ranks = RANKS + [RankInfo(2, "m1", "tp00", "L")]
    inv = {"m0": [], "m1": [_rec("tp00", 5), _rec("tp01", 5)]}
    plan = plan_recovery(ranks, inv, "j")
    assert plan.iteration == 5
    assert plan.source == {0: "peer", 1: "local", 2: "local"}
    [f] = plan.fetches
    assert (f.src_rank, f.dst_rank, f.shard, f.src_machine) == (1, 0, "tp00", "m1")


def test_wrong_job_wrong_layout_or_dead_machine_do_not_count():
    inv = {"m0": [_rec("tp00", 7, job="other"), _rec("tp00", 6)],
           "m1": [_rec("tp01", 7, layout="X"), _rec("tp01", 6)],
           "gone": [_rec("tp00", 8), _rec("tp01", 8)]}
    assert plan_recovery(RANKS, inv, "j").iteration == 6


def test_a_shard_lost_everywhere_means_no_memory_recovery():
    inv = {"m0": [_rec("tp00", 3)], "m1": [_rec("tp00", 3)]}
    assert plan_recovery(RANKS, inv, "j").iteration is None


def test_renumbered_ranks_are_matched_by_shard_and_machine():
    # After a restart rank 0 runs on m1 and rank 1 on m0; the stores did not move.
    ranks = [RankInfo(0, "m1", "tp00", "L"), RankInfo(1, "m0", "tp01", "L")]
    inv = {"m0": [_rec("tp00", 4), _rec("tp01", 4)], "m1": [_rec("tp01", 4), _rec("tp00", 4)]}
    plan = plan_recovery(ranks, inv, "j")
    assert plan.source == {0: "local", 1: "local"}


def test_fetches_spread_over_holders_and_every_rank_agrees():
    ranks = [RankInfo(r, f"m{r}", "tp00", "L") for r in range(4)]
    inv = {"m0": [_rec("tp00", 2)], "m1": [_rec("tp00", 2)], "m2": [], "m3": []}
    plan = plan_recovery(ranks, inv, "j")
    assert sorted(f.src_machine for f in plan.fetches) == ["m0", "m1"]
    # Any rank, given the same table in another order, computes the same plan.
    again = plan_recovery(list(reversed(ranks)), dict(reversed(list(inv.items()))), "j")
    assert again.fetches == plan.fetches and again.source == plan.source


def test_stale_records_are_those_newer_than_the_agreed_iteration():
    inv = [_rec("tp00", 4), _rec("tp00", 5)]
    assert stale_records(inv, 4) == [inv[1]]

"""The next generation's membership: a pure decision over registrations and heartbeats."""
from gemini_lm.resilience.reform_plan import Fallback, Participant, Plan, Wait, plan_generation

MACHINES = {0: "m0", 1: "m0", 2: "m1", 3: "m1", 4: "m2", 5: "m2"}   # 2 slots per machine


def _reg(*slots, fresh=(), t=0.0):
    return {s: Participant(s, MACHINES[s], s % 2, s in fresh, t + s) for s in slots}


def _plan(previous, registered, silent=None, waited=0.0):
    return plan_generation(previous, registered, MACHINES, silent or {}, dead_after=1.0,
                           waited_s=waited, spare_wait=1.0)


def test_survivors_and_a_warm_replacement_keep_their_ranks():
    # slot 1's child died and was re-forked on the same machine: it registers again, fresh
    p = _plan((0, 1, 2, 3), _reg(0, 1, 2, 3, fresh=(1,), t=100.0))
    assert p == Plan((0, 1, 2, 3), (), (), (), 101.0)


def test_a_silent_but_live_slot_is_waited_for():
    assert _plan((0, 1, 2, 3), _reg(0, 1, 2), silent={3: 0.4}) == Wait((3,))


def test_a_lost_machine_moves_to_a_spare_machine_in_local_rank_order():
    # m1 (slots 2, 3: ranks 2, 3) is silent for longer than dead_after; m2 (4, 5) waits as a spare
    p = _plan((0, 1, 2, 3), _reg(0, 1, 4, 5, fresh=(4, 5)), silent={2: 1.5, 3: 1.2})
    assert isinstance(p, Plan)
    assert p.assign == (0, 1, 4, 5) and p.adopted == (2, 3) and p.dead == (2, 3) and p.spares == ()
    assert p.ready_at == 5.0


def test_a_spare_machine_too_small_is_skipped():
    # m1's two ranks need a spare machine with two live slots: m2 has one left (slot 5), m3 two
    machines = {**MACHINES, 6: "m3", 7: "m3"}
    registered = {**_reg(0, 1, 5, fresh=(5,)), 6: Participant(6, "m3", 0, True), 7: Participant(7, "m3", 1, True)}
    p = plan_generation((0, 1, 2, 3), registered, machines, {2: 3.0, 3: 3.0}, dead_after=1.0,
                        waited_s=0.0, spare_wait=1.0)
    assert p.assign == (0, 1, 6, 7) and p.spares == (5,)


def test_no_spare_waits_a_little_then_falls_back_to_the_full_restart():
    assert _plan((0, 1, 2, 3), _reg(0, 1), silent={2: 2.0, 3: 2.0}, waited=0.5) == Wait()
    fb = _plan((0, 1, 2, 3), _reg(0, 1), silent={2: 2.0, 3: 2.0}, waited=1.5)
    assert isinstance(fb, Fallback) and "m1" in fb.why


def test_spares_not_needed_stay_spares_and_dead_spares_do_not_matter():
    # slot 5 (a spare) died: it is not a member, nothing waits for it
    p = _plan((0, 1), _reg(0, 1, 4), silent={5: 9.0})
    assert p == Plan((0, 1), (4,), (), (), None)

"""The generation protocol on a real TCPStore: agreement on the next generation, one leader,
its plan seen by everyone, spares adopted, a fallback when no spare is left."""
import datetime
import threading

import pytest
import torch.distributed as dist

from gemini_lm.resilience.membership import Membership
from gemini_lm.resilience.reform_plan import Fallback, Plan

TIMEOUT = datetime.timedelta(seconds=20)


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    yield store


def _member(server, slot, machine, world=2, **kw):
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
    store = dist.PrefixStore("gemini_lm/test/round/", client)
    store.set(f"machine/{slot}", machine)
    return Membership(store, slot, machine, 0, world, dead_after=0.3, spare_wait=0.3, poll_s=0.005, **kw)


def _in_threads(*calls):
    out, errors = [None] * len(calls), []

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return out


def test_everyone_who_saw_a_generation_fail_agrees_on_the_next(server):
    members = [_member(server, s, f"m{s}", world=4) for s in range(4)]
    assert {m.current() for m in members} == {0}
    bumped = _in_threads(*[lambda m=m: m.bump(0) for m in members])
    assert bumped == [1, 1, 1, 1]
    assert members[0].bump(0) == 1            # a late observer of generation 0 lands on 1 too
    assert members[1].bump(1) == 2            # a second failure moves everyone on


def test_survivor_and_warm_replacement_form_the_next_generation(server):
    a, b = _member(server, 0, "m0"), _member(server, 1, "m1", fresh=True)
    g = a.bump(0)
    (ga, pa), (gb, pb) = _in_threads(lambda: a.join(g), lambda: b.join(g))
    assert ga == gb == 1 and pa == pb and isinstance(pa, Plan)
    assert pa.assign == (0, 1) and pa.ready_at is not None


def test_a_lost_machine_is_taken_over_by_a_spare(server):
    survivor, spare = _member(server, 0, "m0"), _member(server, 2, "m2", fresh=True)
    survivor.store.add("hb/1", 1)             # slot 1's supervisor beat once, then its machine died
    g = survivor.bump(0)
    (gs, ps), (gp, pp) = _in_threads(lambda: survivor.join(g), lambda: spare.join(spare.wait_as_spare(0)))
    assert ps == pp and ps.assign == (0, 2) and ps.adopted == (1,) and ps.dead == (1,)
    # the next planner starts from this assignment
    assert survivor.store.get("assign") == b"[0, 2]"


def test_no_spare_left_is_a_fallback_for_everyone(server):
    survivor = _member(server, 0, "m0")
    survivor.store.add("hb/1", 1)
    g, plan = survivor.join(survivor.bump(0))
    assert isinstance(plan, Fallback)


def test_training_done_releases_the_spares(server):
    spare = _member(server, 2, "m2", fresh=True)
    _member(server, 0, "m0").finish()
    assert spare.wait_as_spare(0) is None

"""The bookkeeping of shared algorithm selections (pycusparselt.gemm.selections) with the library calls recorded
instead of made: one selection per problem, handle and configuration; kept idle up to IDLE_KEPT; private
selections changed in place only when that is safe; searched ones never kept."""

from __future__ import annotations

import contextlib
import types

import pytest

from pycusparselt.gemm import descriptors, selections


class _Raw:
    def __init__(self):
        self.initialized = False
        self.attributes = {}


class _MatmulDescriptor:
    """What a plan's matmul descriptor offers here: released once."""

    def __init__(self):
        self.initialized = True

    def release(self):
        self.initialized = False


def _describe():
    """New descriptors, as a plan's maker of them gives a selection."""
    return descriptors.Descriptors([_MatmulDescriptor()], 0)


class _RawPlan:
    def __init__(self):
        self.initialized = False


@pytest.fixture
def calls(monkeypatch):
    log = []

    def init(handle, raw, descriptor):
        raw.initialized = True
        log.append(("init", descriptor))

    def set_attribute(handle, raw, attribute, value):
        raw.attributes[attribute] = value

    def destroy(raw):
        raw.initialized = False
        log.append(("destroy", raw))

    def get_attribute(handle, raw, attribute):
        return raw.attributes.get(attribute, 0)

    def plan_destroy(plan):
        plan.initialized = False
        log.append(("plan destroy", plan))

    def plan_init(handle, plan, descriptor, raw):
        plan.initialized = True
        log.append(("plan init", (descriptor, dict(raw.attributes))))

    fake = types.SimpleNamespace(RawAlgSelection=_Raw, RawMatDescriptor=type("RawMatDescriptor", (), {}),
                                 matmul_alg_selection_init=init, matmul_alg_get_attribute=get_attribute,
                                 matmul_plan_destroy=plan_destroy, RawPlan=_RawPlan, matmul_plan_init=plan_init,
                                 matmul_alg_set_attribute=set_attribute, matmul_alg_selection_destroy=destroy)
    monkeypatch.setattr(selections, "bindings", fake)
    monkeypatch.setattr(descriptors, "bindings", fake)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda device: contextlib.nullcontext()))
    monkeypatch.setattr(selections.gpu, "cupy", lambda: cupy)
    monkeypatch.setattr(selections, "_shared", {})
    monkeypatch.setattr(selections, "_idle", selections.OrderedDict())
    return log


class _Handle:
    raw = "handle"

    def checked(self):
        return self.raw


def _inits(log, kind="init"):
    return sum(1 for what, _ in log if what == kind)


def test_plans_of_one_problem_and_configuration_share_one_selection(calls):
    handle = _Handle()
    a = selections.acquire(handle, 0, ("p",), _describe, None)
    b = selections.acquire(handle, 0, ("p",), _describe, None)
    assert a is b and a.holders == 2 and _inits(calls) == 1
    c = selections.acquire(handle, 0, ("p",), _describe, (3, 1, 0, 0))  # another configuration
    d = selections.acquire(handle, 0, ("q",), _describe, None)  # another problem
    e = selections.acquire(_Handle(), 0, ("p",), _describe, None)  # another handle (thread)
    assert len({id(s) for s in (a, c, d, e)}) == 4 and _inits(calls) == 4
    assert c.raw.attributes == dict(zip(selections.ATTRIBUTES, (3, 1, 0, 0), strict=True))
    assert selections.held_count() == (4, 0)


def test_a_released_selection_is_kept_idle_for_the_next_plan_of_its_problem(calls, monkeypatch):
    monkeypatch.setattr(selections, "IDLE_KEPT", 2)
    handle = _Handle()
    first = selections.acquire(handle, 0, ("p",), _describe, None)
    selections.release(first)
    assert first.raw.initialized and selections.held_count() == (0, 1)
    again = selections.acquire(handle, 0, ("p",), _describe, None)
    assert again is first and again.holders == 1 and _inits(calls) == 1
    selections.release(again)
    others = [selections.acquire(handle, 0, (n,), _describe, None) for n in "qr"]
    for sel in others:
        selections.release(sel)
    # three idle, two kept: the oldest is destroyed
    assert selections.held_count() == (0, 2) and not first.raw.initialized
    assert all(sel.raw.initialized for sel in others)


def test_a_selection_held_by_two_plans_lives_until_both_give_it_back(calls):
    handle = _Handle()
    a = selections.acquire(handle, 0, ("p",), _describe, None)
    selections.acquire(handle, 0, ("p",), _describe, None)
    selections.release(a)
    assert selections.held_count() == (1, 0) and a.holders == 1
    selections.release(a)
    assert selections.held_count() == (0, 1)


def test_private_selections_change_in_place_only_when_safe_and_are_never_kept(calls):
    handle = _Handle()
    shared = selections.acquire(handle, 0, ("p",), _describe, None)
    assert not selections.reconfigure(shared, (1, 1, 0, 0))  # shared: never changed
    mine = selections.private(handle, 0, _describe, (1, 1, 0, 0))
    assert selections.reconfigure(mine, (2, 1, 0, 0)) == (1, 1, 0, 0)  # what it had, to set back
    assert mine.raw.attributes[selections.ATTRIBUTES[0]] == 2
    assert not selections.reconfigure(mine, (2, 4, 1, None))  # a field left to the library: a new one
    mine.searched = True
    assert not selections.reconfigure(mine, (3, 1, 0, 0))  # searched: never re-initialised over
    selections.release(mine)
    assert not mine.raw.initialized and selections.held_count() == (1, 0)


def test_a_selection_is_made_from_descriptors_of_its_own_and_first_serves_a_plan_of_its_own(calls, monkeypatch):
    monkeypatch.setattr(selections, "IDLE_KEPT", 0)  # a selection no plan holds is destroyed at once
    made = []

    def describe():
        made.append(_describe())
        return made[-1]

    handle = _Handle()
    sel = selections.acquire(handle, 0, ("p",), describe, None)
    again = selections.acquire(handle, 0, ("p",), describe, None)
    assert again is sel and len(made) == 1 and sel.descriptors is made[0]
    assert ("init", made[0].matmul) in calls  # made from its own descriptors, which no plan runs
    # before any caller's plan, one of its own over its configuration, on those descriptors
    assert [entry[1][0] for entry in calls if entry[0] == "plan init"] == [made[0].matmul]
    selections.release(sel)
    assert made[0].matmul.initialized  # held by the other plan
    selections.release(again)
    assert not sel.raw.initialized and not made[0].matmul.initialized and _inits(calls, "plan destroy") == 1


def test_each_configuration_set_in_place_first_serves_a_plan_of_the_selections_own(calls):
    mine = selections.private(_Handle(), 0, _describe, (1, 1, 0, 0))
    assert selections.reconfigure(mine, (2, 1, 0, 0)) == (1, 1, 0, 0)
    primed = [entry[1][1] for entry in calls if entry[0] == "plan init"]
    assert [attrs[selections.ATTRIBUTES[0]] for attrs in primed] == [1, 2] and len(mine.primed) == 2
    assert not mine.plans  # its own plans are not counted against PLANS_KEPT
    selections.release(mine)
    assert _inits(calls, "plan destroy") == 2


def test_a_selection_whose_first_plan_fails_is_destroyed_with_its_descriptors(calls, monkeypatch):
    made = []

    def describe():
        made.append(_describe())
        return made[-1]

    def refuse(handle, plan, descriptor, raw):
        raise ValueError("refused")

    monkeypatch.setattr(selections.bindings, "matmul_plan_init", refuse)
    with pytest.raises(ValueError, match="refused"):
        selections.acquire(_Handle(), 0, ("p",), describe, (3, 1, 0, 0))
    assert selections.held_count() == (0, 0) and not made[0].matmul.initialized
    assert _inits(calls, "destroy") == 1


class _Plan:
    def __init__(self):
        self.initialized = True


@pytest.mark.parametrize("step", ["matmul_alg_set_attribute", "matmul_plan_init"])
def test_a_refused_step_leaves_the_selection_as_it_was_and_raises(calls, monkeypatch, step):
    """A configuration refused as it is set (split-K 4) or when its own first plan is made (alg 7)."""
    mine = selections.private(_Handle(), 0, _describe, (1, 1, 0, 0))
    original = getattr(selections.bindings, step)

    def refuse(handle, raw, *rest):
        refused = (rest[0] == selections.ATTRIBUTES[1] and rest[1] == 4 if step == "matmul_alg_set_attribute"
                   else rest[1].attributes[selections.ATTRIBUTES[0]] == 7)
        if refused:
            raise ValueError("refused")
        original(handle, raw, *rest)

    monkeypatch.setattr(selections.bindings, step, refuse)
    with pytest.raises(ValueError, match="refused"):
        selections.reconfigure(mine, (7, 4, 0, 0))
    assert tuple(mine.raw.attributes[a] for a in selections.ATTRIBUTES) == (1, 1, 0, 0)
    assert selections.reconfigure(mine, (2, 1, 0, 0)) == (1, 1, 0, 0)  # still changed in place after


def test_plans_given_back_are_destroyed_with_their_selection_never_before(calls, monkeypatch):
    monkeypatch.setattr(selections, "IDLE_KEPT", 0)
    handle = _Handle()
    sel = selections.acquire(handle, 0, ("p",), _describe, None)
    old = _Plan()
    selections.retire(sel, old)  # re-made over the same selection
    other = selections.acquire(handle, 0, ("p",), _describe, None)
    last = _Plan()
    selections.release(other, last)  # the second plan closes
    assert old.initialized and last.initialized and sel.raw.initialized
    selections.release(sel, _Plan())
    assert not old.initialized and not last.initialized and not sel.raw.initialized
    kinds = [what for what, _ in calls if what in ("plan destroy", "destroy")]
    assert kinds == ["plan destroy"] * 4 + ["destroy"]  # the plans first (its own too), then the selection


def test_a_selection_that_outlived_plans_kept_serves_no_new_plan(calls, monkeypatch):
    monkeypatch.setattr(selections, "PLANS_KEPT", 2)
    handle = _Handle()
    sel = selections.acquire(handle, 0, ("p",), _describe, None)  # its own plan is not counted
    for _ in range(2):
        selections.retire(sel, _Plan())
    assert selections.acquire(handle, 0, ("p",), _describe, None) is sel
    selections.release(sel)
    selections.retire(sel, _Plan())  # over the limit: new plans make a fresh one
    fresh = selections.acquire(handle, 0, ("p",), _describe, None)
    assert fresh is not sel
    selections.release(sel)  # its last holder: destroyed with its plans, not kept
    assert not sel.raw.initialized and selections.held_count() == (1, 0)


def test_a_tuners_private_selection_becomes_the_shared_one_of_its_winner(calls):
    handle = _Handle()
    mine = selections.private(handle, 0, _describe, (5, 1, 0, 0))
    assert selections.shareable(mine, ("p",), (5, 1, 0, 0))
    assert not selections.shareable(mine, ("p",), (5, 2, 1, None))  # a field left to the library
    assert selections.share(mine, ("p",), (5, 1, 0, 0))
    later = selections.acquire(handle, 0, ("p",), _describe, (5, 1, 0, 0))
    assert later is mine and mine.holders == 2 and _inits(calls) == 1  # no selection made for the winner
    assert not selections.shareable(mine, ("p",), (6, 1, 0, 0))  # shared now: never changed in place
    other = selections.private(handle, 0, _describe, (5, 1, 0, 0))
    assert not selections.share(other, ("p",), (5, 1, 0, 0))  # one is shared already: nothing done
    searched = selections.private(handle, 0, _describe, (7, 1, 0, 0))
    searched.searched = True
    assert not selections.shareable(searched, ("q",), (7, 1, 0, 0))
    for sel in (later, mine, other, searched):
        selections.release(sel)
    assert selections.held_count() == (0, 1) and mine.raw.initialized  # the winner is kept idle

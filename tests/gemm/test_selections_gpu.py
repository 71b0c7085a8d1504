"""Algorithm selections shared by the plans of one problem (pycusparselt.gemm.selections), on the GPU: each plan
still computes its own product, with its own weight and bias, under the default and under a chosen
configuration, after tuning, and after the plan that made the selection is closed."""

from __future__ import annotations

import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import reference
from pycusparselt.gemm import selections
from pycusparselt.tuning import PlanConfig

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")


def _problem(rng, n=512, k=256, rows=128):
    w = reference.prune_2to4(rng.standard_normal((n, k)).astype(np.float32)).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float16)
    return w, b, rng.standard_normal((rows, k)).astype(np.float16)


def _check(plan, w, b, x):
    """The plan's product of x (rows, k) with its own weight w (n, k) and bias b, against the oracle."""
    wt = cp.asarray(np.ascontiguousarray(w.T))
    compressed = plan.compress(wt)
    y = plan.matmul(cp.asarray(x), compressed, bias=cp.asarray(b))
    reference.assert_close(cp.asnumpy(y).T, reference.matmul(w, x.T, bias=b), a=w, b=x.T, bias=b)
    compressed.close()


def _plan(x, w):
    return psl.SparseMatmulPlan(cp.asarray(x), cp.asarray(np.ascontiguousarray(w.T)), sparse="b", bias=True)


def test_plans_of_one_problem_share_one_selection_and_each_computes_its_own_product():
    rng = np.random.default_rng(0)
    cases = [_problem(rng) for _ in range(3)]
    before = selections.held_count()[0]
    plans = [_plan(x, w) for w, _, x in cases]
    assert selections.held_count()[0] == before + 1  # one selection for the three
    w2, _, x2 = _problem(rng, 256, 256, 64)
    other = _plan(x2, w2)  # another problem: a selection of its own
    assert selections.held_count()[0] == before + 2
    other.close()
    alg = 1 if plans[0].max_alg_id > 1 else 0
    for plan, (w, b, x) in zip(plans, cases, strict=True):
        _check(plan, w, b, x)
        plan.config = PlanConfig(alg, *plans[0].default_config[1:])  # one shared selection for this one too
    assert selections.held_count()[0] == before + 1
    assert all(plan.config.alg_id == alg for plan in plans)
    plans[1].config = plans[1].config  # the configuration it runs: the plan still holds its selection once
    plans[0].close()  # the plan the selection was made for goes; the others keep running it
    for plan, (w, b, x) in zip(plans[1:], cases[1:], strict=True):
        _check(plan, w, b, x)
    for plan in plans[1:]:
        plan.close()
    assert selections.held_count()[0] == before


def test_a_tuned_plan_and_later_plans_of_its_problem_each_compute_their_own_product(tmp_path, monkeypatch):
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(1)
    cases = [_problem(rng, 1024, 1024, 384) for _ in range(3)]
    first = _plan(cases[0][2], cases[0][0])
    w, b, x = cases[0]
    best = first.autotune(cp.asarray(x), cp.asarray(np.ascontiguousarray(w.T)), bias=cp.asarray(b), budget_s=1.0)
    assert first.tuning_report.source == "timed"
    _check(first, w, b, x)
    later = [_plan(x, w) for w, _, x in cases[1:]]
    for plan, (w, b, x) in zip(later, cases[1:], strict=True):
        plan.autotune(cp.asarray(x), cp.asarray(np.ascontiguousarray(w.T)), bias=cp.asarray(b))
        assert plan.tuning_report.source == "cache" and plan.config == best
    for plan, (w, b, x) in zip([first, *later], cases, strict=True):
        _check(plan, w, b, x)
    for plan in (first, *later):
        plan.close()


@pytest.mark.parametrize("made_by", ["tuner", "acquire"])
def test_every_configuration_shared_by_three_plans_gives_each_its_own_product(made_by, monkeypatch):
    """Each configuration id in turn: a plan sets it (as a tuner's winner, its own selection then shared; or on a
    shared selection made for it), two more plans of the problem run it on that selection, then all three are
    checked. With 0.8.0 on an H100, configurations 34 to 47 of this problem gave the first plan a wrong product
    while the selection was made from its descriptors."""
    if made_by == "acquire":
        monkeypatch.setattr(selections, "shareable", lambda *args: False)
    monkeypatch.setattr(selections, "IDLE_KEPT", 0)  # every configuration's selection made here, none reused
    rng = np.random.default_rng(2)
    probe = _plan(*_problem(rng, 1024, 1024, 384)[2::-2])
    count, default = probe.max_alg_id, probe.default_config
    probe.close()
    for alg in range(count):
        config = PlanConfig(alg, *default[1:])
        cases = [_problem(rng, 1024, 1024, 384) for _ in range(3)]
        plans = [_plan(x, w) for w, _, x in cases]
        plans[0].try_config(PlanConfig((alg + 1) % count, *default[1:]))  # a candidate before the winner
        plans[0].config = config
        for plan in plans[1:]:
            plan.config = config
        for plan, (w, b, x) in zip(plans, cases, strict=True):
            assert plan.config.alg_id == alg
            _check(plan, w, b, x)
        for plan in plans:
            plan.close()


@pytest.mark.parametrize("how", ["config", "try_config"])
def test_a_configuration_whose_workspace_cannot_be_had_leaves_the_plan_running_as_it_was(monkeypatch, how):
    """The new plan and its workspace are made before anything is swapped: a failure between them leaves the
    plan's configuration, selection and product as they were, and nothing held."""
    from pycusparselt import bindings

    rng = np.random.default_rng(5)
    w, b, x = _problem(rng)
    before = selections.held_count()[0]
    plan = _plan(x, w)
    running = plan.config
    other = PlanConfig(1 if plan.max_alg_id > 1 else 0, *plan.default_config[1:])
    real = bindings.matmul_get_workspace

    def out_of_memory(handle, raw_plan):
        raise MemoryError("a workspace of the test")

    monkeypatch.setattr(bindings, "matmul_get_workspace", out_of_memory)
    with pytest.raises(MemoryError, match="of the test"):
        if how == "config":
            plan.config = other
        else:
            plan.try_config(other)
    monkeypatch.setattr(bindings, "matmul_get_workspace", real)
    assert plan.config == running
    _check(plan, w, b, x)
    plan.config = other  # and the plan still takes a configuration
    assert plan.config == other
    _check(plan, w, b, x)
    plan.close()
    assert selections.held_count()[0] == before

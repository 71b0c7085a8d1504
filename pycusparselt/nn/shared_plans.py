"""Plans shared by layers of the same problem.

A :class:`~pycusparselt.gemm.plan.SparseMatmulPlan` depends on the problem (shapes, layouts, types, epilogue,
device), not on the weight: cuSPARSELt takes the compressed weight by address at each product. Making one costs
about 0.15 s in ``cusparseLtMatmulAlgSelectionInit`` (and tuning re-makes it for every configuration it
tries), so the 145 layers of BERT-large, of four distinct problems, make four plans and tune four times, not
145. Each layer keeps its own compressed weight, bias and scales; its launcher copies the bias and alpha
vector into the shared plan's buffers before each product (:meth:`SparseMatmulPlan.launcher`'s ``refresh``).

Plans are shared by layers first called on the same stream (a plan's workspace and epilogue buffers serve one
product at a time): layers that share a plan must not run concurrently on different streams; give concurrent
replicas their first call on their own streams. Layers release their use with ``close()``; the last user
closes the plan, and plans whose layers are all gone are closed at the next ``acquire``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

__all__ = ["acquire", "release", "count"]

# problem -> (plan, users): the layers (weakly) using the plan
_plans: dict[Hashable, tuple[Any, weakref.WeakSet]] = {}


def acquire(key: Hashable, user: Any, make: Callable[[], Any]) -> tuple[Any, bool]:
    """The open plan shared under ``key`` (made by ``make()`` if there is none), now used by ``user``; and
    whether it was made now (then ``user`` tunes it)."""
    for stale in [k for k, (plan, users) in _plans.items() if plan.closed or not users]:
        plan, _ = _plans.pop(stale)  # every layer that used it is gone
        plan.close()
    entry = _plans.get(key)
    if entry is not None:
        entry[1].add(user)
        return entry[0], False
    plan = make()
    users: weakref.WeakSet = weakref.WeakSet()
    users.add(user)
    _plans[key] = (plan, users)
    return plan, True


def release(plan: Any, user: Any) -> None:
    """``user`` no longer uses ``plan``; the plan is closed when no live user is left."""
    for key, (shared, users) in list(_plans.items()):
        if shared is plan:
            users.discard(user)
            if not users:
                del _plans[key]
                plan.close()
            return
    plan.close()  # not shared: the user owns it


def count() -> int:
    """How many shared plans are open."""
    return sum(1 for plan, _ in _plans.values() if not plan.closed)

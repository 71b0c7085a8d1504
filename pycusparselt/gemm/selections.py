"""Algorithm selections (``cusparseLtMatmulAlgSelection_t``), shared by the plans of one problem and
configuration.

``cusparseLtMatmulAlgSelectionInit`` takes about 0.23 s, whatever the problem, where
``cusparseLtMatmulPlanInit`` takes about 1 ms (H100, cuSPARSELt 0.8.0, FP16 problems of BERT-large's shapes).
One selection per plan cost a model of 145 layers half a minute at its first forward, and a tuner trying 50
configurations twelve seconds. So:

- Plans of one problem (equal descriptors but for their buffers' addresses, on one handle) and one
  configuration share one selection (:func:`acquire`). It is made once, its attributes set once, and never
  changed after. The last :data:`IDLE_KEPT` selections that no plan holds are kept for the next plan of their
  problem.
- A tuner's candidates run on one *private* selection of the plan (:func:`private`, :func:`reconfigure`),
  whose attributes are set again for each candidate. A searched selection (``cusparseLtMatmulSearch``) is
  never changed or shared: re-initialising a plan over one crashed cuSPARSELt 0.8.0.

Each plan still has its own descriptors and its own plan object: a plan shared by several weights after
tuning gave every weight after the first the first one's product. A selection is made from descriptors of its
own (``pycusparselt.gemm.descriptors``), which no plan runs and which it keeps until it is destroyed: the
library reads them again when a plan is initialised over it (a selection that outlived the descriptors it was
made from ended processes with segmentation faults), and a plan running them computed a wrong product once
another plan was initialised over the selection (configurations 34 to 47 of an FP16 problem, H100, 0.8.0).
After each setting of its configuration a selection first serves a plan of its own (:func:`_prime`), made
over those descriptors and destroyed with it, so that no caller's plan is the first made over a configuration.
"""

from __future__ import annotations

import atexit
import threading
from collections import OrderedDict
from typing import Any, Callable

from .._native import gpu
from .. import bindings
from ..enums import MatmulAlgAttribute
from .descriptors import Descriptors, release_descriptors

__all__ = ["Selection", "IDLE_KEPT", "ATTRIBUTES", "acquire", "private",
           "reconfigure", "shareable", "share", "retire", "release", "held_count", "PLANS_KEPT"]

#: Selections no plan holds, kept for the next plan of their problem and configuration.
IDLE_KEPT = 64
#: Plans given back to a shared selection, at most, before it is destroyed with them once no plan holds it.
PLANS_KEPT = 256

#: The attributes a configuration sets, in :class:`~pycusparselt.tuning.PlanConfig`'s order.
ATTRIBUTES = (MatmulAlgAttribute.ALG_CONFIG_ID, MatmulAlgAttribute.SPLIT_K, MatmulAlgAttribute.SPLIT_K_MODE,
               MatmulAlgAttribute.SPLIT_K_BUFFERS)


class Selection:
    """One initialised selection: the native object, the handle it was made with and the descriptors of its own
    it was made from (both kept alive by it), the shared key (None: private to one plan), the plans holding it,
    and whether it was searched."""

    __slots__ = ("raw", "handle", "device", "descriptors", "key", "holders", "searched", "plans", "primed")

    def __init__(self, raw: bindings.RawAlgSelection, handle: Any, device: int, descriptors: Descriptors,
                 key: tuple | None) -> None:
        self.raw, self.handle, self.device, self.descriptors, self.key = raw, handle, device, descriptors, key
        self.holders = 1
        self.searched = False
        self.plans: list = []  # plans made over it and given back: destroyed with it
        self.primed: list = []  # its own plans (_prime), not counted against PLANS_KEPT: destroyed with it


# re-entrant: a plan's finalizer, run by the garbage collector, may give back a selection on a thread that holds it
_lock = threading.RLock()
_exit_hook = False
_shared: dict[tuple, Selection] = {}
_idle: OrderedDict[tuple, Selection] = OrderedDict()


def _set(handle: Any, raw: bindings.RawAlgSelection, config: tuple) -> None:
    for attribute, value in zip(ATTRIBUTES, config, strict=True):
        if value is not None:
            bindings.matmul_alg_set_attribute(handle.raw, raw, attribute, value)


def _prime(sel: Selection) -> None:
    """A plan of the selection's own, made over it as it is configured now and destroyed with it: the first plan
    over each configuration is never a caller's (see the module's notes)."""
    plan = bindings.RawPlan()
    bindings.matmul_plan_init(sel.handle.raw, plan, sel.descriptors.matmul, sel.raw)
    with _lock:
        sel.primed.append(plan)


def _make(handle: Any, device: int, describe: Callable[[], Descriptors], config: tuple | None,
          key: tuple | None) -> Selection:
    global _exit_hook
    cupy = gpu.cupy()

    if not _exit_hook:  # registered after the first handle's finalizer, so that it runs before it at exit
        _exit_hook = True
        atexit.register(_drop_idle)

    raw = bindings.RawAlgSelection()
    with cupy.cuda.Device(device):
        checked = handle.checked()  # raises before anything is made where the handle is closed
        descriptors = describe()
        sel = Selection(raw, handle, device, descriptors, key)
        try:
            bindings.matmul_alg_selection_init(checked, raw, descriptors.matmul)
            if config is not None:
                _set(handle, raw, tuple(config))
            _prime(sel)
        except BaseException:
            _destroy([sel])
            raise
    return sel


def _destroy(selections: list) -> None:
    """Destroy each selection after the plans made over it, then give back its descriptors."""
    cupy = gpu.cupy()

    for sel in selections:
        with cupy.cuda.Device(sel.device):
            for plan in sel.plans + sel.primed:
                if plan.initialized:
                    bindings.matmul_plan_destroy(plan)
            sel.plans.clear()
            sel.primed.clear()
            if sel.raw.initialized:
                bindings.matmul_alg_selection_destroy(sel.raw)
        if sel.descriptors is not None:
            release_descriptors(sel.descriptors)
            sel.descriptors = None


def acquire(handle: Any, device: int, problem: tuple, describe: Callable[[], Descriptors],
            config: tuple | None) -> Selection:
    """The shared selection of ``problem`` (a plan's :attr:`~pycusparselt.SparseMatmulPlan.selection_key`) on
    ``handle`` with ``config`` (a :class:`~pycusparselt.tuning.PlanConfig`, or None for the library's default),
    made from new descriptors of the problem (``describe()``) if no plan holds one and none is kept. Give it
    back with :func:`release`."""
    key = (id(handle), problem, None if config is None else tuple(config))
    with _lock:
        sel = _shared.get(key)
        if sel is None:
            sel = _idle.pop(key, None)
            if sel is not None:
                sel.holders = 0
                _shared[key] = sel
        if sel is not None:
            sel.holders += 1
            return sel
    made = _make(handle, device, describe, config, key)
    with _lock:
        sel = _shared.get(key)
        if sel is None:  # another thread may have made one meanwhile: the first registered is shared
            _shared[key] = made
            return made
        sel.holders += 1
    _destroy([made])
    return sel


def private(handle: Any, device: int, describe: Callable[[], Descriptors], config: tuple | None) -> Selection:
    """A selection of one plan's own, made from new descriptors (``describe()``) with ``config``: what a tuner
    changes."""
    return _make(handle, device, describe, config, None)


def reconfigure(sel: Selection, config: tuple) -> tuple | None:
    """Set ``config`` on a private selection in place, when that is safe: never searched, and every field of
    ``config`` given (an attribute left out would keep the previous candidate's value). Returns the
    configuration it had (to set back if the plan cannot be initialised over it), or None where nothing was
    done: make a new :func:`private` one then. A refused attribute leaves the selection as it was."""
    if sel.key is not None or sel.searched or any(value is None for value in config):
        return None
    cupy = gpu.cupy()

    with cupy.cuda.Device(sel.device):
        previous = tuple(bindings.matmul_alg_get_attribute(sel.handle.raw, sel.raw, a) for a in ATTRIBUTES)
        try:
            _set(sel.handle, sel.raw, tuple(config))
            _prime(sel)
        except BaseException as failed:
            try:
                _set(sel.handle, sel.raw, previous)  # primed when it was set: the running plan runs it
            except BaseException as restoring:
                raise restoring from failed  # both reported: the selection may be neither configuration
            raise
    return previous


def shareable(sel: Selection, problem: tuple, config: tuple) -> bool:
    """Whether ``sel``, a plan's private selection, could be set to ``config`` in place (:func:`reconfigure`)
    and then serve as the shared selection of ``problem`` with it (:func:`share`): no selection of that key is
    held or kept. A tuner's winner is then made shared without making a selection for it."""
    key = (id(sel.handle), problem, tuple(config))
    with _lock:
        return (sel.key is None and not sel.searched and all(value is not None for value in config)
                and key not in _shared and key not in _idle)


def share(sel: Selection, problem: tuple, config: tuple) -> bool:
    """Register the private ``sel``, which runs ``config`` (every field given), as the shared selection of
    ``problem`` with it; False (nothing done) where it cannot be (:func:`shareable`)."""
    with _lock:  # re-entrant: the check and the registration are one step for other threads
        if not shareable(sel, problem, config):
            return False
        sel.key = (id(sel.handle), problem, tuple(config))
        _shared[sel.key] = sel
    return True


def retire(sel: Selection, plan: Any) -> None:
    """``plan`` (a ``RawPlan`` made over ``sel``) is no longer run: it is destroyed with ``sel``, never
    before (a plan destroyed while its selection served other plans ended processes with segmentation
    faults)."""
    with _lock:
        sel.plans.append(plan)
        _retire_if_full(sel)


def _retire_if_full(sel: Selection) -> None:
    """A shared selection that has outlived :data:`PLANS_KEPT` plans serves no new plan (they make a fresh
    one); its last holder destroys it with them."""
    if len(sel.plans) > PLANS_KEPT and sel.key is not None and _shared.get(sel.key) is sel:
        del _shared[sel.key]


def release(sel: Selection, plan: Any = None) -> None:
    """One plan gives ``sel`` back, with its ``RawPlan`` (:func:`retire`). A private or searched selection is
    destroyed; a shared one when no plan holds it and it falls out of the :data:`IDLE_KEPT` kept, or has
    outlived :data:`PLANS_KEPT` plans."""
    gone = []
    with _lock:
        if plan is not None:
            retire(sel, plan)
        sel.holders -= 1
        if sel.holders > 0:
            return
        if _shared.get(sel.key) is sel:
            del _shared[sel.key]
        if sel.key is None or sel.searched or len(sel.plans) > PLANS_KEPT:
            gone.append(sel)
        else:
            _idle[sel.key] = sel
            while len(_idle) > IDLE_KEPT:
                gone.append(_idle.popitem(last=False)[1])
    _destroy(gone)


def held_count() -> tuple[int, int]:
    """``(shared selections some plan holds, selections kept idle)``: for tests and leak checks."""
    with _lock:
        return len(_shared), len(_idle)


def _drop_idle() -> None:
    """At exit the kept selections (and the plans retired into them) go before the handles they hold."""
    with _lock:
        gone = list(_idle.values())
        _idle.clear()
    try:
        _destroy(gone)
    except Exception:  # noqa: BLE001 - the driver may be gone at exit; the process ends anyway
        pass

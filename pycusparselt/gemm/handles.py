"""cuSPARSELt handles: one per (device, thread), created on first use, destroyed when nothing uses them.

A handle holds the library's context for one device. Plans keep a reference to theirs, so a handle outlives
every plan made with it; the thread-local cache holds one more. A finalizer destroys the handle, with its
device current, once the last reference is gone (or at exit).
"""

from __future__ import annotations

import threading
import weakref

from .._native import gpu
from .. import bindings
from ..errors import ClosedError
from . import descriptors, selections

__all__ = ["Handle", "handle_for_device", "release_plan_objects"]


def _destroy(raw: bindings.RawHandle, device: int) -> None:
    if not raw.initialized:
        return
    cupy = gpu.cupy()

    with cupy.cuda.Device(device):
        bindings.destroy(raw)


class Handle:
    """An initialised ``cusparseLtHandle_t`` on one device."""

    def __init__(self, device: int) -> None:
        cupy = gpu.cupy()

        self.device = int(device)
        self.raw = bindings.RawHandle()
        with cupy.cuda.Device(self.device):
            bindings.init(self.raw)
        self._finalizer = weakref.finalize(self, _destroy, self.raw, self.device)

    @property
    def closed(self) -> bool:
        return not self.raw.initialized

    def checked(self) -> bindings.RawHandle:
        """The raw handle, or ClosedError."""
        if not self.raw.initialized:
            raise ClosedError("the cuSPARSELt handle was closed")
        return self.raw

    def close(self) -> None:
        """Destroy the handle now (plans made with it must be closed first). Harmless when repeated."""
        self._finalizer()


_local = threading.local()


def handle_for_device(device: int) -> Handle:
    """This thread's handle for ``device``, created on first use."""
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    handle = handles.get(device)
    if handle is None or handle.closed:
        handle = handles[device] = Handle(device)
    return handle


def release_plan_objects(handle: Handle, device: int, objects: list) -> None:
    """Release a plan's native objects in the order given, once each, with its device current (plans are
    destroyed; its algorithm selection is given back to ``pycusparselt.gemm.selections``, its descriptors released),
    then drop the plan's reference to ``handle``, which therefore outlives them. What a
    :class:`~pycusparselt.SparseMatmulPlan` releases with (its finalizer too)."""
    cupy = gpu.cupy()

    with cupy.cuda.Device(device):
        plan = None
        for obj in objects:
            if isinstance(obj, bindings.RawPlan):
                plan = obj if obj.initialized else None
            elif isinstance(obj, selections.Selection):  # shared: the plan is destroyed with it, never before
                selections.release(obj, plan)
                plan = None
            elif isinstance(obj, descriptors.Descriptors):
                descriptors.release_descriptors(obj)
        if plan is not None:  # no selection to go with
            bindings.matmul_plan_destroy(plan)
    del handle  # held until here so the handle outlives the plan's objects

"""The five opaque cuSPARSELt structures as Python objects that own 16-byte aligned storage and remember
whether they are initialised (:mod:`pycusparselt.bindings` exports them and initialises and destroys them)."""

from __future__ import annotations

from typing import Any

from ..errors import ClosedError
from .ffi import ffi

__all__ = ["Opaque", "RawHandle", "RawMatDescriptor", "RawMatmulDescriptor", "RawAlgSelection", "RawPlan",
           "live_pointer", "fresh_pointer"]

_ALIGNMENT = 16  # the header's alignas(16)


class Opaque:
    """Aligned storage for one opaque cuSPARSELt structure, tracking whether it is initialised. Not copyable:
    a copy would be a second owner of the same native object (destroyed twice)."""

    _ctype = ""
    _what = ""
    __slots__ = ("_storage", "_ptr", "_live", "__weakref__")

    def __init__(self) -> None:
        size = ffi.sizeof(self._ctype)
        # cffi ignores the header's alignas(16), so over-allocate and align by hand.
        self._storage = ffi.new("uint8_t[]", size + _ALIGNMENT)
        address = int(ffi.cast("uintptr_t", self._storage))
        self._ptr = ffi.cast(self._ctype + " *", self._storage + (-address) % _ALIGNMENT)
        self._live = False

    @property
    def initialized(self) -> bool:
        """Whether the structure was initialised and not yet destroyed."""
        return self._live

    def mark_initialized(self, initialized: bool) -> None:
        """Record that the C function that initialises (True) or destroys (False) the structure returned."""
        self._live = initialized

    @property
    def address(self) -> int:
        """Host address of the structure (16-byte aligned)."""
        return int(ffi.cast("uintptr_t", self._ptr))

    def __repr__(self) -> str:
        state = "initialized" if self._live else "not initialized"
        return f"<{type(self).__name__} at 0x{self.address:x}, {state}>"

    def __copy__(self) -> Opaque:
        raise TypeError(f"{type(self).__name__} owns a native {self._what}; it cannot be copied (make another)")

    def __deepcopy__(self, memo: dict) -> Opaque:
        return self.__copy__()

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} owns a native {self._what}; it cannot be pickled or copied")


class RawHandle(Opaque):
    """Storage for a ``cusparseLtHandle_t``; initialise with :func:`init`, release with :func:`destroy`."""

    _ctype = "cusparseLtHandle_t"
    _what = "handle"
    __slots__ = ()


class RawMatDescriptor(Opaque):
    """Storage for a ``cusparseLtMatDescriptor_t`` (dense or structured); release with
    :func:`mat_descriptor_destroy`."""

    _ctype = "cusparseLtMatDescriptor_t"
    _what = "matrix descriptor"
    __slots__ = ()


class RawMatmulDescriptor(Opaque):
    """Storage for a ``cusparseLtMatmulDescriptor_t``. The C API has no destroy for it; call
    :meth:`release` when its plan and algorithm selection are gone."""

    _ctype = "cusparseLtMatmulDescriptor_t"
    _what = "matmul descriptor"
    __slots__ = ()

    def release(self) -> None:
        """Mark the descriptor as no longer usable (it holds no resources of its own)."""
        self._live = False


class RawAlgSelection(Opaque):
    """Storage for a ``cusparseLtMatmulAlgSelection_t``; release with :func:`matmul_alg_selection_destroy`."""

    _ctype = "cusparseLtMatmulAlgSelection_t"
    _what = "algorithm selection"
    __slots__ = ()


class RawPlan(Opaque):
    """Storage for a ``cusparseLtMatmulPlan_t``; release with :func:`matmul_plan_destroy`."""

    _ctype = "cusparseLtMatmulPlan_t"
    _what = "plan"
    __slots__ = ()


def live_pointer(obj: Any, cls: type[Opaque], arg: str) -> Any:
    """The C pointer of an initialised structure, or a Python exception."""
    if type(obj) is not cls:
        raise TypeError(f"{arg}: expected a {cls.__name__}, got {type(obj).__name__}")
    if not obj._live:
        raise ClosedError(f"{arg}: the {cls._what} is not initialized (never initialized, or already destroyed)")
    return obj._ptr


def fresh_pointer(obj: Any, cls: type[Opaque], arg: str) -> Any:
    """The C pointer of a structure about to be initialised."""
    if type(obj) is not cls:
        raise TypeError(f"{arg}: expected a {cls.__name__}, got {type(obj).__name__}")
    if obj._live:
        raise ValueError(f"{arg}: the {cls._what} is already initialized; destroy it before reusing its storage")
    return obj._ptr

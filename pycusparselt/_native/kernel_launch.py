"""Kernel launches CuPy cannot make: ``cuLaunchKernelEx`` with programmatic stream serialization (programmatic
dependent launch, SM 9.0 and newer), called on the CUDA driver through cffi in ABI mode.

A kernel launched so may begin while the kernel before it on its stream is still finishing (once that one's
blocks have all run ``griddepcontrol.launch_dependents`` or exited), and so must run ``griddepcontrol.wait``
before it reads or writes anything the kernel before it may write. What it does earlier overlaps that kernel's
tail: the decode kernel prefetches its weight into L2 there (L2 is coherent with every writer, so a weight
written by the kernel before is never read stale). Under stream capture the launch becomes a programmatic edge
of the graph (CUDA 12.3 and newer drivers).
"""

from __future__ import annotations

import threading
from typing import Any

import cffi

from . import gpu
from .devices import DRIVER_LIBRARIES

__all__ = ["OverlappedLaunch", "unavailable_reason", "MIN_DRIVER_VERSION", "MIN_CC", "FFI"]

#: Programmatic edges in captured graphs need a CUDA 12.3 driver (``cuDriverGetVersion`` 12030).
MIN_DRIVER_VERSION = 12030
#: ``griddepcontrol`` and programmatic stream serialization arrived with Hopper.
MIN_CC = (9, 0)
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

# The structs as cuda.h lays them out on 64-bit platforms (CUlaunchAttribute: a 4-byte id, 4 bytes of padding,
# a 64-byte union). Handles and pointers are passed as pointer-sized integers.
_CDEF = """
typedef union { unsigned long long pad[8]; int programmaticStreamSerializationAllowed; } CUlaunchAttributeValue;
typedef struct { unsigned int id; unsigned int pad; CUlaunchAttributeValue value; } CUlaunchAttribute;
typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    uintptr_t hStream;
    CUlaunchAttribute *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;
int cuLaunchKernelEx(const CUlaunchConfig *config, uintptr_t f, uintptr_t kernelParams, uintptr_t extra);
int cuDriverGetVersion(int *version);
"""

#: The declarations (ABI mode: no compiler needed).
FFI = cffi.FFI()
FFI.cdef(_CDEF)

_lock = threading.Lock()
_loaded: tuple[Any, str | None] | None = None


def _driver() -> tuple[Any, str | None]:
    """``(lib, reason)``: the driver's cffi handle, or None and why it cannot launch so (once per process)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> tuple[Any, str | None]:
    lib = None
    for name in DRIVER_LIBRARIES:
        try:
            lib = FFI.dlopen(name)
            break
        except OSError:
            continue
    if lib is None:
        return None, "the CUDA driver library (libcuda) cannot be loaded"
    try:
        lib.cuLaunchKernelEx  # noqa: B018 - resolves the symbol now, not at the first launch
    except AttributeError:
        return None, "the CUDA driver has no cuLaunchKernelEx (a CUDA 12.0 or newer driver is needed)"
    version = FFI.new("int *")
    if lib.cuDriverGetVersion(version) != 0 or version[0] < MIN_DRIVER_VERSION:
        return None, (f"the CUDA driver is version {version[0]}; launches that overlap the kernel before them "
                      f"need {MIN_DRIVER_VERSION} (CUDA 12.3) or newer")
    return lib, None


def unavailable_reason(compute_capability: tuple[int, int]) -> str | None:
    """None where a device of ``compute_capability`` can take overlapped launches from this driver; else why not."""
    if tuple(compute_capability) < MIN_CC:
        major, minor = compute_capability
        return f"SM {major}.{minor}: programmatic dependent launch needs SM 9.0 or newer"
    return _driver()[1]


class OverlappedLaunch:
    """One kernel with fixed dimensions, shared memory and argument block, launched with programmatic stream
    serialization: ``launch(stream_ptr)``. ``params_address`` is the address of the ``void *`` array of
    argument addresses ``cuLaunchKernel`` takes, kept alive (and filled) by the caller. One thread at a time
    (the launch configuration is shared by its calls). Raises ``CUDADriverError`` (CuPy's, as CuPy's own
    launches do) for a failed launch. ``driver``: an object with ``cuLaunchKernelEx`` of :data:`FFI`'s
    declaration to call instead of the CUDA driver's (default: the driver, loaded once)."""

    __slots__ = ("_lib", "_config", "_attr", "_function", "_params", "_error")

    def __init__(self, function: int, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
                 params_address: int, *, driver: Any = None) -> None:
        if driver is None:
            driver, reason = _driver()
            if reason:
                raise RuntimeError(reason)
        self._lib = driver
        self._attr = FFI.new("CUlaunchAttribute *")
        self._attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
        self._attr.value.programmaticStreamSerializationAllowed = 1
        c = self._config = FFI.new("CUlaunchConfig *")
        c.gridDimX, c.gridDimY, c.gridDimZ = grid
        c.blockDimX, c.blockDimY, c.blockDimZ = block
        c.sharedMemBytes = shared_bytes
        c.attrs = self._attr
        c.numAttrs = 1
        self._function, self._params = int(function), int(params_address)
        gpu.cupy()
        from cupy_backends.cuda.api.driver import CUDADriverError

        self._error = CUDADriverError

    def __call__(self, stream_ptr: int) -> None:
        self._config.hStream = stream_ptr
        status = self._lib.cuLaunchKernelEx(self._config, self._function, self._params, 0)
        if status:
            raise self._error(status)

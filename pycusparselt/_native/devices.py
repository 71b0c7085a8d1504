"""What GPUs this process can use for cuSPARSELt, asked through CuPy (an optional dependency)."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

from . import gpu

__all__ = ["DeviceInfo", "cuda_devices", "gpu_unavailable_reason", "require_gpu", "nvidia_driver_found",
           "SPARSE_MIN_CC", "WITHOUT_GPU"]

#: What runs where no GPU is usable.
WITHOUT_GPU = (
    "without one, the NumPy reference runs: `python -m pycusparselt demo`, pycusparselt.reference, SparseLinear "
    "on NumPy arrays and the distributed host backend"
)

#: Sparse Tensor Cores arrived with the Ampere architecture, compute capability 8.0.
SPARSE_MIN_CC = (8, 0)


@dataclass(frozen=True)
class DeviceInfo:
    """One CUDA device as CuPy reports it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def sparse_tensor_cores(self) -> bool:
        """Whether the device has Sparse Tensor Cores (SM 8.0 or newer)."""
        return self.compute_capability >= SPARSE_MIN_CC


def cuda_devices() -> tuple[list[DeviceInfo], str | None]:
    """Return ``(devices, reason)``: the visible CUDA devices, and why there are none if so."""
    try:
        cupy = gpu.cupy()
    except ImportError:
        return [], "CuPy is not installed (pip install 'pycusparselt[cu13]' or '[cu12]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, ...
        if not nvidia_driver_found():  # the runtime calls a missing driver "insufficient"
            return [], "no NVIDIA driver found (the CUDA driver library, libcuda, cannot be loaded)"
        return [], f"no CUDA GPU is usable ({type(exc).__name__}: {exc})"
    if count == 0:
        return [], "no CUDA GPU is present"
    devices = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        devices.append(
            DeviceInfo(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                compute_capability=(int(props["major"]), int(props["minor"])),
                total_memory=int(props["totalGlobalMem"]),
            )
        )
    return devices, None


def nvidia_driver_found() -> bool:
    """Whether the NVIDIA driver's CUDA library (``libcuda.so.1``; ``nvcuda.dll`` on Windows) can be loaded."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def gpu_unavailable_reason() -> str | None:
    """``None`` if cuSPARSELt can run here (CuPy, a GPU of SM 8.0+ as device 0, and the library);
    otherwise a sentence saying what is missing."""
    devices, reason = cuda_devices()
    if reason:
        return reason
    if not devices[0].sparse_tensor_cores:
        major, minor = devices[0].compute_capability
        return f"GPU 0 ({devices[0].name}) is SM {major}.{minor}; Sparse Tensor Cores need SM 8.0 or newer"
    from .library import load
    from ..errors import LibraryNotFoundError

    try:
        load()
    except LibraryNotFoundError as exc:
        return str(exc)
    return None


def require_gpu(*, exit: bool = False) -> None:
    """Stop unless cuSPARSELt can run here; call it before the first CuPy call (or ``import cupy``) of a
    GPU-only program.

    Parameters
    ----------
    exit : bool
        False (for libraries): raise :class:`~pycusparselt.errors.GpuUnavailableError`, whose message is one
        line: why, and what runs without a GPU. True (for scripts): print that line, prefixed with the
        script's name, to stderr and exit with status 1, without a traceback.

    Examples
    --------
    >>> import pycusparselt as psl
    >>> psl.require_gpu(exit=True)  # doctest: +SKIP
    >>> import cupy  # only where a GPU is usable
    """
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    message = f"no usable GPU: {reason}; {WITHOUT_GPU}"
    if exit:
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else "python"
        raise SystemExit(f"{program}: {message}")
    from ..errors import GpuUnavailableError

    raise GpuUnavailableError(message)

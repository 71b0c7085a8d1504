"""What GPUs this process can use for cuSPARSELt, asked through CuPy (an optional dependency)."""

from __future__ import annotations

from dataclasses import dataclass

from . import gpu

__all__ = ["DeviceInfo", "cuda_devices", "gpu_unavailable_reason", "require_gpu", "exit_without_gpu", "SPARSE_MIN_CC",
           "WITHOUT_GPU"]

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


def require_gpu() -> None:
    """Raise :class:`~pycusparselt.errors.GpuUnavailableError` (one line: why, and what runs without a GPU)
    unless cuSPARSELt can run here; call it before the first CuPy call of a GPU-only program."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        from ..errors import GpuUnavailableError

        raise GpuUnavailableError(f"no usable GPU: {reason}; {WITHOUT_GPU}")


def exit_without_gpu(program: str) -> None:
    """For scripts: exit with status 1 and one line on stderr (no traceback) unless cuSPARSELt can run here."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"{program}: no usable GPU: {reason}; {WITHOUT_GPU}")

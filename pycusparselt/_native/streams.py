"""CUDA streams as pycusparselt takes them: an object with ``__cuda_stream__``, a CuPy stream, an integer
``cudaStream_t`` handle, or None for CuPy's current stream; and raw handles as CuPy stream objects."""

from __future__ import annotations

from typing import Any

from . import gpu
from .. import bindings

__all__ = ["stream_ptr", "on_stream"]


def stream_ptr(stream: Any, device: int | None = None) -> int:
    """The stream's handle; for None, CuPy's current stream of ``device`` (default: the current device)."""
    cupy = gpu.cupy()

    if stream is not None:
        return bindings.stream_handle(stream)
    if device is None or cupy.cuda.runtime.getDevice() == device:
        return cupy.cuda.get_current_stream().ptr
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


class _StreamHandle:
    """A raw handle behind the CUDA stream protocol (what CuPy 14's ``Stream.from_external`` takes)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def on_stream(ptr: int) -> Any:
    """A CuPy stream object for a raw handle, usable as a context manager (work is enqueued on it)."""
    cupy = gpu.cupy()

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr)

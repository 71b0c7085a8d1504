"""CUDA streams, in one place: what the package takes as a stream, the raw handle C functions get, the stream
a call runs on when the caller names none, and contexts that make CuPy work on a given stream or device.

A stream is an object with ``__cuda_stream__`` (the CUDA stream protocol), one with a ``ptr`` (a CuPy
stream), an integer ``cudaStream_t`` handle, or None. Nothing here imports :mod:`pycusparselt.bindings`:
the bindings convert their stream arguments with :func:`stream_handle`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import gpu

__all__ = ["stream_handle", "stream_ptr", "on_stream", "current_stream", "call_stream", "stream_context",
           "on_device", "on_given_stream"]

_HANDLE_LIMIT = 1 << 64  # a cudaStream_t is a pointer
_RAW_STREAM: Any = None  # PyTorch's current raw stream getter, looked up on first use


def stream_handle(stream: Any, arg: str = "stream") -> int:
    """The ``cudaStream_t`` handle (an integer) of ``stream``.

    Parameters
    ----------
    stream : object with ``__cuda_stream__``, CuPy stream, int or None
        None is 0, the legacy default stream.
    arg : str
        The argument's name in errors.

    Raises
    ------
    TypeError
        For anything that is not a stream or an integer handle.
    ValueError
        For an integer outside ``0 .. 2**64 - 1``.
    """
    if stream is None:
        return 0
    if hasattr(stream, "__cuda_stream__"):
        handle = stream.__cuda_stream__()[1]
    elif not isinstance(stream, int) and hasattr(stream, "ptr"):
        handle = stream.ptr
    else:
        handle = stream
    if isinstance(handle, bool) or not hasattr(handle, "__index__"):
        raise TypeError(f"{arg}: expected an integer (a cudaStream_t handle), got {type(handle).__name__}")
    handle = handle.__index__()
    if not 0 <= handle < _HANDLE_LIMIT:
        raise ValueError(f"{arg}: a cudaStream_t handle is in 0 .. 2**64 - 1, got {handle}")
    return handle


def stream_ptr(stream: Any, device: int | None = None) -> int:
    """The stream's handle; for None, CuPy's current stream of ``device`` (default: the current device)."""
    cupy = gpu.cupy()

    if stream is not None:
        return stream_handle(stream)
    if device is None or cupy.cuda.runtime.getDevice() == device:
        return cupy.cuda.get_current_stream().ptr
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once the caller imported PyTorch
    return torch is not None and isinstance(obj, torch.Tensor)


def current_stream(template: Any, device: int) -> int:
    """The stream a call on ``template`` runs on when the caller names none: PyTorch's current stream of
    ``device`` for a tensor (so the call follows ``torch.cuda.stream`` and ``torch.cuda.graph``), CuPy's
    current stream of ``device`` otherwise."""
    if _is_tensor(template):
        global _RAW_STREAM
        if _RAW_STREAM is None:
            torch = sys.modules["torch"]
            # the handle without building a Stream object (a microsecond a call); the public form otherwise
            _RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
                lambda d: torch.cuda.current_stream(d).cuda_stream)
        return int(_RAW_STREAM(device))
    return stream_ptr(None, device)


def call_stream(stream: Any, template: Any, device: int) -> int:
    """The handle a call runs on: ``stream`` when named, else :func:`current_stream` of ``template``."""
    return stream_ptr(stream) if stream is not None else current_stream(template, device)


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


def stream_context(stream: Any) -> Any:
    """A context making ``stream`` CuPy's current stream (None: leave the current one)."""
    if stream is None:
        return contextlib.nullcontext()
    cupy = gpu.cupy()

    if isinstance(stream, cupy.cuda.Stream):
        return stream
    return on_stream(stream_ptr(stream))


def on_device(device: int | None) -> Any:
    """A context making ``device`` CuPy's current device (None: leave the current one)."""
    if device is None:
        return contextlib.nullcontext()
    cupy = gpu.cupy()

    return cupy.cuda.Device(device)


def on_given_stream(stream: Any, device: int | None) -> Any:
    """CuPy's own work (slicing, padding, concatenating) on the stream a layer was asked to use; nothing
    changes where no stream or no device is named."""
    if stream is None or device is None:
        return contextlib.nullcontext()
    return on_stream(stream_ptr(stream, device))

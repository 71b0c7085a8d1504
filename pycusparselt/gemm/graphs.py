"""Whole networks as one CUDA graph: :func:`capture` a function of device arrays once, replay it with new inputs.

A network of :class:`~pycusparselt.SparseLinear` layers, plan products and the CuPy or PyTorch operations
between them costs one host call per replay instead of one per kernel::

    layers = [psl.SparseLinear(w, b, activation="relu") for w, b in params]

    def ffn(x):
        for layer in layers:
            x = layer(x)
        return x

    run = psl.capture(ffn, x_example)    # runs ffn eagerly (tunes, compresses, prepares), then captures it
    y = run(x)                           # copies x into the graph's input buffer, replays, returns its output

The function runs eagerly ``warmup`` times first, on the stream it is captured on, so that every plan is made
and tuned and every layer has prepared its buffers before capture (tuning cannot be captured). Its inputs are
copied into buffers the graph owns; its outputs are the graph's own arrays, overwritten by the next replay
(copy them to keep them). Memory the function allocates while captured comes from a pool kept with the graph
(CuPy) or from PyTorch's graph pool, so replays never write memory that was handed to anything else.

PyTorch tensors are captured with ``torch.cuda.graph``; the layers also work inside a ``torch.cuda.graph``
block of the caller's own (each layer runs on PyTorch's current stream and allocates through PyTorch), after
one eager call with inputs of each shape.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .._native import gpu
from .. import _arrays

__all__ = ["capture", "CapturedGraph"]


class CapturedGraph:
    """A captured function: ``graph(*inputs)`` copies ``inputs`` into ``inputs`` and replays the graph on
    the caller's current stream; returns ``outputs`` (the graph's own arrays). :meth:`replay` replays
    without copying (write ``inputs`` yourself). :meth:`close` frees the graph and its memory."""

    def __init__(self, framework: str, graph: Any, inputs: list, outputs: Any, device: int, keep: Any) -> None:
        self.framework = framework
        self.inputs = inputs
        self.outputs = outputs
        self.device = device
        self._graph = graph
        self._keep = keep  # the memory pool (CuPy) whose blocks the graph uses

    @property
    def closed(self) -> bool:
        return self._graph is None

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"expected {len(self.inputs)} inputs (as captured), got {len(inputs)}")
        for i, (given, static) in enumerate(zip(inputs, self.inputs, strict=True)):
            if tuple(given.shape) != tuple(static.shape) or _arrays.dtype_of(given) != _arrays.dtype_of(static):
                raise ValueError(
                    f"inputs[{i}]: expected shape {tuple(static.shape)} and dtype {_arrays.dtype_of(static)} (as "
                    f"captured), got {tuple(given.shape)} {_arrays.dtype_of(given)}"
                )
        if self.framework == _arrays.TORCH:
            for given, static in zip(inputs, self.inputs, strict=True):
                static.copy_(given)
        else:
            cupy = gpu.cupy()

            with cupy.cuda.Device(self.device):
                for given, static in zip(inputs, self.inputs, strict=True):
                    cupy.copyto(static, _arrays.as_cupy(given))
        return self.replay()

    def replay(self) -> Any:
        """Replay the graph on the current stream (PyTorch's for tensors, CuPy's otherwise); returns
        ``outputs``."""
        if self._graph is None:
            from ..errors import ClosedError

            raise ClosedError("the captured graph was closed")
        if self.framework == _arrays.TORCH:
            self._graph.replay()
        else:
            cupy = gpu.cupy()

            with cupy.cuda.Device(self.device):
                self._graph.launch(cupy.cuda.get_current_stream())
        return self.outputs

    def close(self) -> None:
        """Free the graph and the memory its captured work used (the outputs stay valid while referenced)."""
        if self._graph is not None and self.framework == _arrays.TORCH:
            self._graph.reset()
        self._graph = None
        self._keep = None

    def __enter__(self) -> CapturedGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"device {self.device}"
        return f"<CapturedGraph ({self.framework}) of {len(self.inputs)} inputs, {state}>"


def capture(fn: Callable[..., Any], *example_inputs: Any, warmup: int = 2) -> CapturedGraph:
    """Run ``fn(*inputs)`` eagerly ``warmup`` times, then capture one call into a CUDA graph.

    Parameters
    ----------
    fn : callable
        A function of device arrays (all CuPy arrays, or all CUDA tensors, on one device) that returns an
        array or a structure of arrays; it must enqueue all its work on the current stream and not
        synchronise the host (pycusparselt's layers, plans' bound calls, and CuPy / PyTorch operations do so).
    *example_inputs : device arrays
        Inputs of the shapes and dtypes the graph will take; they are copied into the graph's input buffers.
    warmup : int
        Eager calls before capture (at least 1: the first call of a layer with a new input shape tunes).

    Returns
    -------
    CapturedGraph
    """
    if warmup < 1:
        raise ValueError(f"warmup: expected at least 1 (layers prepare on their first call), got {warmup}")
    if not example_inputs:
        raise ValueError("example_inputs: expected at least one device array")
    kinds = {_arrays.kind(x) for x in example_inputs}
    if kinds - {_arrays.CUPY, _arrays.TORCH} or len(kinds) > 1:
        raise TypeError(f"example_inputs: expected all CuPy arrays or all CUDA tensors, got {sorted(kinds)}")
    if kinds == {_arrays.TORCH}:
        return _capture_torch(fn, example_inputs, warmup)
    return _capture_cupy(fn, example_inputs, warmup)


def _device_of(inputs: Sequence[Any]) -> int:
    devices = {int(_arrays.as_cupy(x).device.id) for x in inputs}
    if len(devices) > 1:
        raise ValueError(f"example_inputs: expected arrays on one device, got devices {sorted(devices)}")
    return devices.pop()


def _capture_torch(fn: Callable[..., Any], example_inputs: Sequence[Any], warmup: int) -> CapturedGraph:
    import torch

    if not all(x.is_cuda for x in example_inputs):
        raise TypeError("example_inputs: expected CUDA tensors, got a CPU tensor")
    cupy = gpu.cupy()

    device = _device_of(example_inputs)
    # what the function allocates through CuPy (post-processing steps of some layers) comes from a pool of the
    # graph's own, as PyTorch's allocations come from its graph pool
    pool = cupy.cuda.MemoryPool()
    with torch.cuda.device(device), cupy.cuda.Device(device), cupy.cuda.using_allocator(pool.malloc):
        static = [x.detach().clone() for x in example_inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # warm-up and capture on one stream: the layers' per-stream preparation happens before capture
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outputs = fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
    return CapturedGraph(_arrays.TORCH, graph, static, outputs, device, pool)


def _capture_cupy(fn: Callable[..., Any], example_inputs: Sequence[Any], warmup: int) -> CapturedGraph:
    cupy = gpu.cupy()

    device = _device_of(example_inputs)
    with cupy.cuda.Device(device):
        pool = cupy.cuda.MemoryPool()  # the graph's own: what it uses is never handed to anything else
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        with cupy.cuda.using_allocator(pool.malloc), stream:
            static = [cupy.array(x, copy=True) for x in example_inputs]
            for _ in range(warmup):
                fn(*static)
            stream.synchronize()
            relaxed = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
            # relaxed: an allocation the warm-up did not leave in the pool may still call cudaMalloc
            stream.begin_capture(*(() if relaxed is None else (relaxed,)))
            try:
                outputs = fn(*static)
            finally:
                graph = stream.end_capture()
        cupy.cuda.get_current_stream().wait_event(stream.record())
    return CapturedGraph(_arrays.CUPY, graph, static, outputs, device, pool)

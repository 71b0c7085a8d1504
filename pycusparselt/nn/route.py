"""A layer's route: the prepared call of one input signature, from its input to the launch of the product.

:class:`~pycusparselt.SparseLinear` makes a :class:`Route` on the first call with an input of a given address,
shape, strides, dtype and stream (and re-aims it at inputs of the same signature at new addresses). A route is
the product's launcher (the plan's :class:`~pycusparselt.gemm.plan.Launcher`, or the decode kernel's
:class:`~pycusparselt.gemm.decode.DecodeLauncher` for inputs of 1 to 16 rows it serves) plus the input
staging: :func:`filler` writes the input into the staging buffer where it needs converting, padding or
permuting, and the route allocates the output in the input's framework (or checks and fills the caller's
``out``). After the first call a call does identity
checks only: nothing is checked or converted again, and nothing is synchronised.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from .._native import gpu
from .. import _arrays
from ..types import U8 as _U8
from . import quantization

__all__ = ["Route", "stage_buffer", "filler", "unowned", "copy_out", "cupy_ptr", "MAX_ROUTES"]

_to_cupy = _arrays.as_cupy

#: Input signatures (address, shape, strides, dtype, stream) whose checked path a layer keeps.
MAX_ROUTES = 64


def stage_buffer(stages: dict, x: Any, rows: int, in_features: int, storage: np.dtype, device: int, sp: int) -> Any:
    """The staging buffer (``rows`` x ``in_features``, of ``storage`` type) of the GEMM's dense operand, kept in
    the layer's ``stages``: one per shape, type and stream ``sp``, made in the caller's device and stream context
    (the layer's: its device, the call's stream). Inputs at new addresses reuse it (allocating nothing, so an
    eager loop's activations keep landing at the addresses its routes know). Rows past an input's stay zero.
    CuPy's memory, unless made during a capture of ``x``'s framework (PyTorch's allocator is legal there): a
    buffer kept from PyTorch's allocator while ``torch.compile``'s CUDA graphs warm up would be a live tensor
    of their memory pool, which they refuse."""
    cupy = gpu.cupy()

    key = (rows, storage.str, sp)
    stage = stages.get(key)
    if stage is None:
        if _arrays.is_torch(x) and cupy.cuda.runtime.streamIsCapturing(sp):
            stage = _to_cupy(_arrays.empty(x, (rows, in_features), storage, device))
            stage.fill(0)
        else:
            stage = cupy.zeros((rows, in_features), storage)
        stages[key] = stage
    return stage


def filler(view: Any, stage: Any, rows: int, perm: Any, inv_scale: Any, fmt: str | None, cstream: Any,
           sp: int) -> Callable[[], Any]:
    """The per-call step that writes the input ``view`` (a CuPy view of it) into the GEMM's staging buffer
    ``stage`` (rows ``:rows``): one quantization kernel, a gather for the permutation, or a plain copy; on the
    call's stream (``cstream``, whose pointer is ``sp``).

    ``perm`` is the layer's input permutation on its device (or None); ``inv_scale`` the float32 inverse of its
    input scale where the input is quantized here, in format ``fmt`` (else None)."""
    cupy = gpu.cupy()

    src = unowned(view)  # the input's memory, without holding the array: valid while the caller's is
    target = stage[:rows]
    steps = []
    quantize = inv_scale is not None
    if perm is not None:
        gathered = cupy.empty(src.shape, dtype=src.dtype) if quantize else target
        steps.append(functools.partial(cupy.take, src, perm, 1, gathered))
        src = gathered
    if quantize:
        steps.append(functools.partial(quantization.quantize_into, src, inv_scale, fmt, target))
    elif perm is None:
        if src.flags.c_contiguous:
            # one cudaMemcpyAsync on the call's stream, called directly: CuPy's copyto dispatch and the
            # stream context cost 8 us a call more (measured at 1 x 4096 x 11008), more than the copy
            runtime = cupy.cuda.runtime
            return functools.partial(runtime.memcpyAsync, target.data.ptr, src.data.ptr, src.nbytes,
                                     runtime.memcpyDeviceToDevice, sp)
        steps.append(functools.partial(cupy.copyto, target, src.view(target.dtype)))  # a copy kernel

    def fill() -> None:
        with cstream:
            for step in steps:
                step()

    return fill


def unowned(view: Any) -> Any:
    """A CuPy array over ``view``'s memory that does not keep it alive (a route must not hold its caller's
    array: it is used only while a caller's array of the same address, shape and strides is passed in)."""
    cupy = gpu.cupy()

    span = sum((n - 1) * st for n, st in zip(view.shape, view.strides, strict=True)) + view.itemsize if view.size else 0
    memory = cupy.cuda.UnownedMemory(view.data.ptr, span, None, view.device.id)
    return cupy.ndarray(view.shape, view.dtype, cupy.cuda.MemoryPointer(memory, 0), strides=view.strides)


def copy_out(y: Any, out: Any) -> None:
    """Copy a CuPy result into the caller's ``out`` (any framework), checking its shape and dtype."""
    target = _to_cupy(out)
    want = np.dtype(y.dtype)
    if tuple(target.shape) != tuple(y.shape) or np.dtype(target.dtype) not in (want, _U8 if want.itemsize == 1
                                                                              else want):
        raise ValueError(f"out: expected shape {tuple(y.shape)} and dtype {want}, got {tuple(out.shape)} {out.dtype}")
    target[...] = y.view(target.dtype) if target.dtype != y.dtype else y


class Route:
    """One input signature's calls (address, shape, strides and dtype of ``x``, and the stream ``sp``): the
    checked, prepared product. A call fills the staging buffer where the input needs converting, padding or
    permuting (``fill``, made by :func:`filler`), allocates the output in the input's framework (unless ``out``
    is given), and launches the GEMM (``launch``: the plan's :class:`~pycusparselt.gemm.plan.Launcher` or a
    :class:`~pycusparselt.gemm.decode.DecodeLauncher`).

    Made by :class:`~pycusparselt.SparseLinear` on an input's first call, with what its calls need: ``view``
    (the input's CuPy view, 2-D), ``stage`` (the staging buffer of ``padded_rows`` rows, or None where the GEMM
    reads the input itself), ``vector`` (a 1-D input), ``device``, ``out_features``, ``gemm_out`` (the product's
    dtype) and ``out_dtype`` (the layer's output dtype), ``post`` (None, or the layer's float32 step after the
    product, called as ``post(y, cupy)``), and the :func:`filler` arguments ``perm``, ``inv_scale`` and ``fmt``
    (for :meth:`aimed_at`).
    """

    __slots__ = ("fill", "launch", "plan", "rows", "padded_rows", "vector", "sp", "cstream", "x_ptr",
                 "alloc", "alloc_ctx", "ptr_of", "framework", "scratch", "outs", "device", "get_device", "stage",
                 "perm", "inv_scale", "fmt", "out_nbytes", "out_features", "gemm_out", "out_dtype", "post")

    def __init__(self, x: Any, view: Any, stage: Any, fill: Any, launch: Any, plan: Any, rows: int,
                 padded_rows: int, vector: bool, sp: int, cstream: Any, *, device: int, out_features: int,
                 gemm_out: np.dtype, out_dtype: np.dtype, post: Callable[[Any, Any], Any] | None, perm: Any,
                 inv_scale: Any, fmt: str | None) -> None:
        cupy = gpu.cupy()

        self.fill, self.launch, self.plan = fill, launch, plan
        self.stage, self.perm, self.inv_scale, self.fmt = stage, perm, inv_scale, fmt
        self.rows, self.padded_rows, self.vector, self.sp, self.cstream = rows, padded_rows, vector, sp, cstream
        self.out_features, self.gemm_out, self.out_dtype, self.post = out_features, gemm_out, out_dtype, post
        self.x_ptr = view.data.ptr if stage is None else stage.data.ptr
        self.device = device
        self.get_device = cupy.cuda.runtime.getDevice
        shape = (padded_rows, out_features)
        self.out_nbytes = rows * out_features * np.dtype(gemm_out).itemsize  # of `out`, where it is given
        # nothing here refers to x: a route must not keep its caller's array alive
        self.alloc_ctx = None
        if _arrays.is_torch(x):
            import torch

            self.framework = _arrays.TORCH
            self.alloc = functools.partial(torch.empty, shape, dtype=_arrays.torch_dtype(gemm_out), device=x.device)
            self.ptr_of = torch.Tensor.data_ptr
        else:
            self.framework = _arrays.CUPY
            self.alloc = functools.partial(cupy.empty, shape, gemm_out)
            self.ptr_of = cupy_ptr
            if sp != cupy.cuda.get_current_stream().ptr:  # an explicit stream: CuPy's pool is told which
                self.alloc_ctx = cstream
        # [(padded_rows, out) buffer] for padded or post-processed results written to `out`, made on first
        # use; a list so that routes aimed at other addresses share it (they run on the same stream)
        self.scratch: list = [None]
        self.outs: set = set()  # `out` arrays already checked (shared by aimed routes: same output shape)

    def aimed_at(self, x: Any) -> Route:
        """This route for ``x``, an array of the same signature (:func:`_arrays.signature`) at another address:
        the prepared plan, buffers and checks are shared; only the input's address (or the filler reading it)
        changes."""
        twin = object.__new__(Route)
        for name in Route.__slots__:
            setattr(twin, name, getattr(self, name))
        view = _to_cupy(x)
        if self.vector:
            view = view[None]
        if self.stage is None:
            twin.x_ptr = view.data.ptr
        else:
            twin.fill = filler(view, self.stage, self.rows, self.perm, self.inv_scale, self.fmt, self.cstream, self.sp)
        return twin

    def __call__(self, x: Any, out: Any) -> Any:
        """The layer's product on ``x`` (the array this route was made or aimed for): staged, launched and
        returned, or written to ``out``."""
        if self.get_device() != self.device:
            cupy = gpu.cupy()

            with cupy.cuda.Device(self.device):
                return self(x, out)  # once more, with the layer's device current
        if self.fill is not None:
            self.fill()
        if out is None and self.post is None:
            y = self.alloc() if self.alloc_ctx is None else self._alloc_on_stream()
            self.launch(self.x_ptr, self.ptr_of(y), self.sp)
            if self.vector:
                return y[0]
            return y if self.rows == self.padded_rows else y[: self.rows]
        if out is not None and self.post is None and not self.vector:
            key = _arrays.array_key(out)
            if key is None or key not in self.outs:
                self._check_out(out, key)
            if self.rows == self.padded_rows:
                self.launch(self.x_ptr, key[0], self.sp)
                return out
            # a padded batch: the product's first rows, one cudaMemcpyAsync into `out` (C-contiguous, checked)
            scratch = self._scratch()
            self.launch(self.x_ptr, scratch.data.ptr, self.sp)
            runtime = gpu.cupy().cuda.runtime
            runtime.memcpyAsync(key[0], scratch.data.ptr, self.out_nbytes, runtime.memcpyDeviceToDevice, self.sp)
            return out
        cupy = gpu.cupy()

        with self.cstream:
            scratch = self._scratch()
            self.launch(self.x_ptr, scratch.data.ptr, self.sp)
            y = scratch[: self.rows]
            if self.post is not None:
                y = self.post(y, cupy)
            if self.vector:
                y = y[0]
            if out is not None:
                copy_out(y, out)
                return out
            return _arrays.as_framework(y, self.framework, self.out_dtype)  # post-processing made a new array

    def _scratch(self) -> Any:
        """The (padded_rows, out_features) buffer of results that are copied or post-processed, made once."""
        scratch = self.scratch[0]
        if scratch is None:
            cupy = gpu.cupy()

            with self.cstream:
                scratch = self.scratch[0] = cupy.empty((self.padded_rows, self.out_features), self.gemm_out)
        return scratch

    def _alloc_on_stream(self) -> Any:
        with self.alloc_ctx:
            return self.alloc()

    def _check_out(self, out: Any, key: tuple | None) -> None:
        if key is None:
            raise TypeError(f"out: expected a CuPy array or a CUDA tensor, got {type(out).__name__}")
        view = _to_cupy(out)
        want, given = (self.rows, self.out_features), _arrays.dtype_of(out)
        # one-byte results (int8, FP8) may also land in a uint8 array (how CuPy holds FP8)
        dtypes_ok = (self.out_dtype, _U8) if self.out_dtype.itemsize == 1 else (self.out_dtype,)
        if (tuple(view.shape) != want or given not in dtypes_ok or not view.flags.c_contiguous
                or view.device.id != self.device or view.data.ptr % 16):
            raise ValueError(
                f"out: expected a C-contiguous {want} {self.out_dtype} array on device {self.device}, 16-byte "
                f"aligned; got {tuple(view.shape)} {given} on device {view.device.id}"
            )
        if len(self.outs) >= MAX_ROUTES:
            self.outs.clear()
        self.outs.add(key)


def cupy_ptr(a: Any) -> int:
    """The device address of a CuPy array (what a route asks of the arrays it allocates)."""
    return a.data.ptr

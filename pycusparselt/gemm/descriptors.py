"""The cuSPARSELt descriptors of one problem: the sparse, dense and output matrices' descriptors and the matmul
descriptor with its epilogue (:func:`make`).

A plan runs on descriptors of its own, and each algorithm selection is made from descriptors of its own too,
which no plan runs (``pycusparselt.gemm.selections``). Measured on an H100 with cuSPARSELt 0.8.0 (1024 x 1024
FP16 weight, 384 rows, configurations 34 to 47 of 48): a plan running the descriptors its selection had been
made from computed a wrong product (relative error 1.1) once another plan was initialised over that selection,
where the other plans were right.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from .._native import gpu
from .. import bindings
from ..enums import MatDescAttribute, MatmulDescAttribute, Operation, Order
from .operands import ROW
from .problem import ALIGN_BYTES, Matrix

__all__ = ["Descriptors", "Epilogue", "make", "release_descriptors"]

_N = Operation.NON_TRANSPOSE


class Descriptors:
    """Descriptors of one problem, in the order they are destroyed (the matrix descriptors, then the matmul
    descriptor, :attr:`matmul`), with the device buffers they point at (:attr:`keep`: the bias buffer);
    destroyed by the last holder's :func:`release_descriptors`."""

    __slots__ = ("objects", "device", "holders", "keep")

    def __init__(self, objects: list, device: int, keep: tuple = ()) -> None:
        self.objects, self.device, self.holders, self.keep = objects, device, 1, keep

    @property
    def matmul(self) -> bindings.RawMatmulDescriptor:
        return self.objects[-1]


_lock = threading.RLock()  # a finalizer run by the garbage collector may release descriptors inside


def release_descriptors(descriptors: Descriptors) -> None:
    """One holder gives ``descriptors`` back; the last destroys them (its device current)."""
    with _lock:
        descriptors.holders -= 1
        if descriptors.holders > 0:
            return
    cupy = gpu.cupy()

    with cupy.cuda.Device(descriptors.device):
        for obj in descriptors.objects:
            if not obj.initialized:
                continue
            if isinstance(obj, bindings.RawMatDescriptor):
                bindings.mat_descriptor_destroy(obj)
            else:
                obj.release()
    descriptors.keep = ()


class Epilogue(NamedTuple):
    """What the matmul descriptor sets besides the matrices."""

    activation: str | None
    relu_upper_bound: float
    relu_threshold: float
    gelu_scaling: float
    bias_dtype: Any  # None: no bias
    alpha_vector: bool


def _order(mat: Matrix) -> Order:
    return Order.ROW if mat.order == ROW else Order.COL


def make(handle: Any, device: int, mats: tuple, batch: int, in_type: Any, out_type: Any, compute_type: Any,
         epilogue: Epilogue) -> Descriptors:
    """New descriptors of the problem ``mats`` (the sparse, dense and output :class:`Matrix`), ``batch``
    products, with ``epilogue``: a bias buffer of zeros of their own where there is a bias. ``handle`` is the
    raw handle; ``device`` current or not."""
    cupy = gpu.cupy()

    s, x, y = (bindings.RawMatDescriptor() for _ in range(3))
    matmul = bindings.RawMatmulDescriptor()
    made = Descriptors([s, x, y, matmul], device)
    try:
        with cupy.cuda.Device(device):
            for raw, mat, dt in ((s, mats[0], in_type), (x, mats[1], in_type), (y, mats[2], out_type)):
                init = bindings.structured_descriptor_init if raw is s else bindings.dense_descriptor_init
                init(handle, raw, mat.rows, mat.cols, mat.ld, ALIGN_BYTES, dt, _order(mat))
                if batch > 1:
                    bindings.mat_desc_set_attribute(handle, raw, MatDescAttribute.NUM_BATCHES, batch)
                    bindings.mat_desc_set_attribute(handle, raw, MatDescAttribute.BATCH_STRIDE, mat.batch_stride)
            bindings.matmul_descriptor_init(handle, matmul, _N, _N, s, x, y, y, compute_type)
            made.keep = _set_epilogue(handle, matmul, epilogue, mats[0].rows, batch)
    except BaseException:
        release_descriptors(made)
        raise
    return made


def _set_epilogue(handle: Any, matmul: Any, epilogue: Epilogue, rows: int, batch: int) -> tuple:
    cupy = gpu.cupy()

    attr = MatmulDescAttribute
    if epilogue.activation == "relu":
        bindings.matmul_desc_set_attribute(handle, matmul, attr.ACTIVATION_RELU, 1)
        if epilogue.relu_upper_bound != float("inf"):
            bindings.matmul_desc_set_attribute(handle, matmul, attr.ACTIVATION_RELU_UPPERBOUND,
                                               float(epilogue.relu_upper_bound))
        if epilogue.relu_threshold != 0.0:
            bindings.matmul_desc_set_attribute(handle, matmul, attr.ACTIVATION_RELU_THRESHOLD,
                                               float(epilogue.relu_threshold))
    elif epilogue.activation == "gelu":
        bindings.matmul_desc_set_attribute(handle, matmul, attr.ACTIVATION_GELU, 1)
        if epilogue.gelu_scaling != 1.0:
            bindings.matmul_desc_set_attribute(handle, matmul, attr.ACTIVATION_GELU_SCALING,
                                               float(epilogue.gelu_scaling))
    keep: tuple = ()
    if epilogue.bias_dtype is not None:
        # the descriptors' own bias buffer: a plan's calls copy the caller's bias into it (the padding stays 0)
        buf = cupy.zeros((batch, rows), dtype=epilogue.bias_dtype)
        keep = (buf,)
        bindings.matmul_desc_set_attribute(handle, matmul, attr.BIAS_POINTER, buf.data.ptr)
        if batch > 1:
            bindings.matmul_desc_set_attribute(handle, matmul, attr.BIAS_STRIDE, rows)
    if epilogue.alpha_vector:
        bindings.matmul_desc_set_attribute(handle, matmul, attr.ALPHA_VECTOR_SCALING, 1)
    return keep

"""One benchmark case's inputs on the GPU: random x and 2:4-pruned W in their storage types, the typed views the
plan and PyTorch take, and the float64 product every column is checked against."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import types
from .cases import DTYPES, Shape

__all__ = ["Inputs", "poison"]


class Inputs:
    """One case's device data: x (M, K) and the pruned W (N, K), C-contiguous, in their storage types (uint16
    for bf16, uint8 for e4m3), with the typed views the plan and PyTorch take, and the float64 reference."""

    def __init__(self, cp: Any, shape: Shape, dtype: str, seed: int) -> None:
        self.cp, self.shape, self.dtype, self.out = cp, shape, dtype, DTYPES[dtype]
        cp.random.seed(seed)
        m, n, k = shape.m, shape.n, shape.k
        self.x_store, self.w_store = self._random((m, k)), self._random((n, k))
        self.plan_kwargs: dict[str, Any] = {"sparse": "b"}
        if dtype == "bf16":
            self.np_dtype = types.BF16
        elif dtype == "e4m3":
            self.np_dtype = types.E4M3
            self.plan_kwargs.update(input_dtype=self.np_dtype, out_dtype=types.BF16)
        elif dtype == "int8":
            self.np_dtype = types.I8
            self.plan_kwargs.update(out_dtype=types.I32)
        else:
            self.np_dtype = types.F16
        self.out_np = {"fp16": types.F16, "bf16": types.BF16, "int32": types.I32}[self.out]
        self.reference = None

    def _random(self, shape: tuple[int, int]) -> Any:
        cp = self.cp
        if self.dtype == "fp16":
            return cp.random.standard_normal(shape, dtype=cp.float32).astype(cp.float16)
        if self.dtype == "bf16":  # the top half of a float32 is a bfloat16 (truncation: exact values)
            bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32) >> 16
            return bits.astype(cp.uint16)
        if self.dtype == "int8":  # the whole range, so products and sums are non-trivial
            return cp.random.randint(-128, 128, shape, dtype=cp.int32).astype(cp.int8)
        # e4m3 bit patterns: random sign and mantissa, exponent field 4..10 (magnitudes 1/8 .. 15): no NaN
        sign = cp.random.randint(0, 2, shape, dtype=cp.int32) << 7
        exponent = cp.random.randint(4, 11, shape, dtype=cp.int32) << 3
        mantissa = cp.random.randint(0, 8, shape, dtype=cp.int32)
        return (sign | exponent | mantissa).astype(cp.uint8)

    def typed(self, store: Any) -> Any:
        """The view a plan takes (e4m3 stays uint8: the plan reads it with ``input_dtype``)."""
        return store.view(self.np_dtype) if self.dtype == "bf16" else store

    def to_f64(self, arr: Any) -> Any:
        """A float64 CuPy copy of an input or output (CuPy array of any storage type, or a PyTorch tensor)."""
        cp = self.cp
        if type(arr).__module__.startswith("torch"):
            return cp.from_dlpack(arr.double().contiguous())  # double: int32 results stay exact
        if arr.dtype in (types.BF16, types.U16):  # bf16 data or its bit patterns
            bits = arr.view(cp.uint16).astype(cp.uint32) << 16
            return bits.view(cp.float32).astype(cp.float64)
        if arr.dtype == types.U8:  # e4m3 bit patterns
            table = np.arange(256, dtype=types.U8).view(types.E4M3).astype(np.float64)
            return cp.asarray(table)[arr]
        return arr.astype(cp.float64)

    def build_reference(self) -> None:
        # float64 products of the rounded, pruned inputs: exact for int8, far below output rounding otherwise
        x64, w64 = self.to_f64(self.x_store), self.to_f64(self.w_store)
        self.reference = x64 @ w64.T
        self.reference_norm = float(self.cp.linalg.norm(self.reference))

    def rel_err(self, result: Any) -> float:
        y = self.to_f64(result)
        if tuple(y.shape) != tuple(self.reference.shape):
            raise ValueError(f"result has shape {tuple(y.shape)}, expected {tuple(self.reference.shape)}")
        diff = float(self.cp.linalg.norm(y - self.reference))
        return diff / self.reference_norm if self.reference_norm else diff


def poison(cp: Any, arr: Any) -> None:
    """Fill an output with all-ones bytes (NaN for floats, -1 for integers), so a result that was not written
    cannot pass the check."""
    arr.view(cp.uint8).fill(0xFF)

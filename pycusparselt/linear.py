"""SparseLinear: an inference layer ``y = activation(x @ W.T + b)`` with W pruned 2:4 along its inputs.

The weight is pruned (optionally after an input-channel permutation) and compressed once; the layer keeps
one tuned :class:`~pycusparselt.plan.SparseMatmulPlan` per input shape and runs the product with the bias
and activation fused. On CuPy (or any device) arrays it runs through cuSPARSELt; on NumPy arrays it runs
on :mod:`pycusparselt.reference`, so the same layer can be checked on the CPU.

Internally ``y = x @ W.T`` is the plan's ``D = A @ B`` with A = x (batch, in), C-contiguous, and the sparse
B = W.T (in, out), the transposed view of the C-contiguous weight: K runs along memory in both operands,
the "TN" form every type accepts, and D = y comes out C-contiguous. No operand is copied to get there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import reference
from .plan import SparseMatmulPlan

__all__ = ["SparseLinear"]


def _on_device(array: Any) -> bool:
    return not isinstance(array, np.ndarray) and (
        hasattr(array, "__cuda_array_interface__") or hasattr(array, "__dlpack__")
    )


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "__cuda_array_interface__"):
        import cupy

        return cupy.asnumpy(cupy.asarray(array))
    return np.from_dlpack(array)


class SparseLinear:
    """``y = activation(x @ W.T + b)`` with a 2:4 sparse weight, for inference.

    Parameters
    ----------
    weight : array, shape (out_features, in_features)
        The dense weight: NumPy (the layer then runs on the reference), CuPy, or any array with
        ``__cuda_array_interface__`` / ``__dlpack__``. float16, bfloat16 or float32.
    bias : array, shape (out_features,), optional
        In the weight's dtype.
    prune : {"strip", "tile", None}
        How to make the weight 2:4 along ``in_features``: pruned by magnitude ("strip": 2 of every 4
        consecutive inputs; "tile": 4x4 tiles 2:4 along both axes), or None when it already is 2:4.
    permutation : array of int, optional
        Input-channel permutation found by :func:`pycusparselt.permutation.find_permutation`: the weight's
        columns are permuted before pruning and every input's features are gathered in the same order, a copy
        per call. Folding the permutation into the producing layer instead
        (:func:`pycusparselt.permutation.permute_pair`) avoids that copy.
    activation : {None, "relu", "gelu"}
        Fused activation; ReLU takes ``relu_upper_bound`` and ``relu_threshold``.
    autotune : bool
        Tune each new plan on its first input (``cusparseLtMatmulSearch``).

    Attributes
    ----------
    weight : array
        The pruned (and permuted) weight that the layer multiplies by, on the weight's device. On a device
        layer the library prunes it when the layer first runs (pruning needs a plan); until then it holds
        the weight as given.
    """

    def __init__(
        self,
        weight: Any,
        bias: Any = None,
        *,
        prune: str | None = "strip",
        permutation: Any = None,
        activation: str | None = None,
        relu_upper_bound: float = math.inf,
        relu_threshold: float = 0.0,
        autotune: bool = True,
    ) -> None:
        shape = tuple(weight.shape)
        if len(shape) != 2:
            raise ValueError(f"weight: expected (out_features, in_features), got shape {shape}")
        self.out_features, self.in_features = shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {activation!r}")
        self.activation = activation
        self._relu = (
            dict(relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold) if activation == "relu" else {}
        )
        self._autotune = autotune
        self.on_device = _on_device(weight)
        self.permutation = None if permutation is None else np.asarray(_to_numpy(permutation), dtype=np.int64)
        if self.permutation is not None and sorted(self.permutation.tolist()) != list(range(self.in_features)):
            raise ValueError(f"permutation: expected a permutation of range({self.in_features})")
        if self.on_device:
            import cupy

            w = cupy.asarray(weight) if hasattr(weight, "__cuda_array_interface__") else cupy.from_dlpack(weight)
            if self.permutation is not None:
                w = w[:, cupy.asarray(self.permutation)]
            w = cupy.ascontiguousarray(w)
            self.bias = (
                None
                if bias is None
                else cupy.ascontiguousarray(
                    cupy.asarray(bias) if hasattr(bias, "__cuda_array_interface__") else cupy.from_dlpack(bias)
                )
            )
        else:
            w = np.asarray(weight)
            if self.permutation is not None:
                w = w[:, self.permutation]
            self.bias = None if bias is None else np.asarray(bias)
        if self.bias is not None and self.bias.dtype != w.dtype:
            raise TypeError(f"bias: expected the weight's dtype {w.dtype}, got {self.bias.dtype}")
        self.dtype = w.dtype
        self._prune = prune
        if self.on_device:
            self.weight = w  # pruned by the library when the first plan exists (it owns the descriptor)
            self._pruned = prune is None
        else:
            if prune is not None:
                w = reference.prune_2to4(w, axis=-1, method=prune)
            elif not reference.is_2to4(w, axis=-1):
                raise ValueError("weight: not 2:4 along in_features; pass prune='strip' or 'tile'")
            self.weight = w
        self._plans: dict[tuple, SparseMatmulPlan] = {}
        self._compressed: dict[tuple, Any] = {}  # per sparse-operand layout (padded plans differ)
        self._tuned: set[tuple] = set()

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, linear: Any, **kwargs: Any) -> SparseLinear:
        """A layer from a PyTorch ``nn.Linear`` (its weight and bias, shared without copying where they
        live on the GPU; CPU tensors give a layer on the reference)."""
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if not weight.is_cuda:
            weight = weight.numpy()
            bias = None if bias is None else bias.numpy()
        return cls(weight, bias, **kwargs)

    # -- execution -----------------------------------------------------------------------------------

    def __call__(self, x: Any, *, out: Any = None, stream: Any = None) -> Any:
        """``activation(x @ W.T + b)`` for ``x`` of shape (batch, in_features) (or (in_features,))."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected (..., {self.in_features}) features, got shape {tuple(x.shape)}")
        if self.on_device != _on_device(x):
            where = "device" if self.on_device else "NumPy (reference)"
            raise TypeError(f"x: this layer's weight is a {where} array; pass x of the same kind")
        vector = len(x.shape) == 1
        if self.on_device:
            y = self._device_call(x[None] if vector else x, out, stream)
        else:
            y = self._reference_call(x[None] if vector else x)
        return y[0] if vector else y

    def _reference_call(self, x: np.ndarray) -> np.ndarray:
        if self.permutation is not None:
            x = x[..., self.permutation]
        # y^T = W @ x^T: the reference's bias is one value per row of D, here per output feature
        y_t = reference.matmul(
            self.weight,
            np.swapaxes(x, -1, -2),
            bias=self.bias,
            activation=self.activation,
            out_dtype=self.dtype,
            **self._relu,
        )
        return np.ascontiguousarray(np.swapaxes(y_t, -1, -2))

    def _device_call(self, x: Any, out: Any, stream: Any) -> Any:
        import cupy

        x = cupy.asarray(x) if hasattr(x, "__cuda_array_interface__") else cupy.from_dlpack(x)
        if self.permutation is not None:
            x = x[..., cupy.asarray(self.permutation)]
        x = cupy.ascontiguousarray(x)
        key = (x.shape, x.dtype.str, x.device.id)
        plan = self._plans.get(key)
        wt = self.weight.T  # (in, out), F-contiguous: the sparse B in the TN form
        if plan is None:
            plan = SparseMatmulPlan(
                x, wt, sparse="b", bias=self.bias is not None, activation=self.activation, **self._relu
            )
            self._plans[key] = plan
            if not self._pruned:
                self.weight = plan.prune(wt, self._prune, stream=stream).T  # once, by the library
                wt = self.weight.T
                self._pruned = True
        compressed = self._compressed.get(plan._sparse_key)
        if compressed is None:
            compressed = self._compressed[plan._sparse_key] = plan.compress(wt, stream=stream)
        if self._autotune and key not in self._tuned:
            plan.autotune(x, compressed, bias=self.bias, stream=stream)
            self._tuned.add(key)
        return plan.matmul(x, compressed, bias=self.bias, out=out, stream=stream)

    def close(self) -> None:
        """Release the plans and compressed weights (the layer can still be called: they are rebuilt)."""
        for plan in self._plans.values():
            plan.close()
        for compressed in self._compressed.values():
            compressed.close()
        self._plans.clear()
        self._compressed.clear()
        self._tuned.clear()

    def __enter__(self) -> SparseLinear:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "device" if self.on_device else "reference"
        act = f", activation={self.activation!r}" if self.activation else ""
        return (
            f"SparseLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.dtype}, bias={self.bias is not None}{act}, {where})"
        )

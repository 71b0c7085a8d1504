"""SparseLinear: an inference layer ``y = activation(x @ W.T + b)`` with W pruned 2:4 along its inputs.

The weight is pruned (optionally after an input-channel permutation) when the layer is made, quantized in
the INT8 and FP8 modes, and compressed once per plan; the layer keeps one tuned
:class:`~pycusparselt.gemm.plan.SparseMatmulPlan` per input shape and runs the product with the scaling, bias and
activation fused where cuSPARSELt can. On CuPy (or any device) arrays it runs through cuSPARSELt; on NumPy
arrays it runs the same arithmetic on :mod:`pycusparselt.reference`, so a layer can be checked on the CPU.

Internally ``y = x @ W.T`` is the plan's ``D = A @ B`` with A = x (batch, in), C-contiguous, and the sparse
B = W.T (in, out), the transposed view of the C-contiguous weight: K runs along memory in both operands,
the "TN" form every type accepts (INT8 and FP8 accept no other), and D = y comes out C-contiguous. The plan
computes it as ``D^T = W @ x^T``, so its per-row bias and alpha vector are per **output feature**: INT8
per-channel weight scales fuse into the alpha vector of this form.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

from .._native import gpu
from .. import _arrays, reference
from ..gemm import dtypes
from ..types import BF16 as _BF16, F16 as _F16, F32 as _F32, I8 as _I8, U8 as _U8
from . import layer_files, layer_plans, layer_values, quantization, small_batch
from .layer_files import config_entry as _config_entry
from .layer_files import config_key as _config_key
from .layer_files import entry_ident as _entry_ident
from .layer_files import layer_fields as _loaded_fields
from .layer_values import MODES
from .layer_values import MODE_DTYPE as _MODE_DTYPE
from .layer_values import OUT_DTYPES as _OUT_DTYPES
from .layer_values import is_sparse_host as _is_sparse_host
from .quantization import calibrate_chain
from .quantization import gelu32 as _gelu32
from .quantization import relu32 as _relu32
from .route import MAX_ROUTES, Route, copy_out, filler, stage_buffer
from ..gemm.options import PlanOptions
from ..gemm.plan import SparseMatmulPlan
from .._native.streams import on_stream, stream_ptr
from .._native.streams import stream_context as _stream_context

__all__ = ["SparseLinear", "calibrate_chain", "MODES"]

_FLOATS = (_F16, _BF16, _F32)

_on_device = _arrays.is_device
_to_numpy = _arrays.to_numpy
_to_cupy = _arrays.as_cupy

#: Inputs of up to this many rows run on the decode kernel or on one cuSPARSELt plan of this many rows (a decode
#: step's batch of 1 to 16 tokens costs what 16 cost: the GEMM reads the weight), chosen by nn.small_batch.
SMALL_BATCH_ROWS = 16


def _xp(on_device: bool) -> Any:
    if on_device:
        cupy = gpu.cupy()

        return cupy
    return np


class SparseLinear:
    """``y = activation(x @ W.T + b)`` with a 2:4 sparse weight, for inference, in FP16, BF16, INT8 or FP8.

    Parameters
    ----------
    weight : array, shape (out_features, in_features)
        The dense weight: NumPy (the layer then runs on the reference), CuPy, or any array with
        ``__cuda_array_interface__`` / ``__dlpack__``. float16, bfloat16 or float32.
    bias : array, shape (out_features,), optional
        With ``mode=None`` in the weight's dtype; otherwise any float dtype (converted).
    mode : {None, "fp16", "bf16", "int8", "fp8"}
        The type the GEMM reads. None: the weight's dtype (float32 weights run on TF32 Tensor Cores and are
        pruned 1:2, the library's FP32 sparsity). "fp16"/"bf16": the weight and bias are converted after
        pruning. "int8": the pruned weight is quantized per output channel (symmetric, scale
        ``max|row| / 127``); inputs are quantized with ``input_scale``; the dequantization (weight scale x
        input scale, an alpha vector), the bias and ReLU run in cuSPARSELt's epilogue. "fp8": E4M3 (or
        ``fp8_format="e5m2"``) weight and inputs with per-tensor scales folded into alpha, bias and ReLU
        fused (``weight_granularity="channel"`` scales each output channel after the product instead).
    prune : {"strip", "tile", None}
        How to make the weight 2:4 along ``in_features``, when the layer is made: by magnitude ("strip": 2
        of every 4 consecutive inputs; "tile": 4x4 tiles 2:4 along both axes), exactly as
        :func:`pycusparselt.reference.prune_2to4` on every backend; or None when it already is 2:4.
    permutation : array of int, optional
        Input-channel permutation found by :func:`pycusparselt.nn.permutation.find_permutation`: the weight's
        columns are permuted before pruning and every input's features are gathered in the same order, a copy
        per call. Folding the permutation into the producing layer instead
        (:func:`pycusparselt.nn.permutation.permute_pair`) avoids that copy.
    activation : {None, "relu", "gelu"}
        ReLU (with ``relu_upper_bound`` and ``relu_threshold``, in the output's real units) is fused.
        GELU (tanh form) runs as a separate float32 step after the product: cuSPARSELt's GELU exists only
        for INT8 -> INT8 and acts on the accumulator's units (``alpha * gelu(x / alpha)``), not on the
        dequantized values.
    out_dtype : dtype, optional
        The output type of the quantized modes: float16 (default), bfloat16, or int8 for "int8" (with
        ``output_scale``: quantized layers then chain without a round trip); float16, bfloat16 or float32
        for "fp8" (cuSPARSELt 0.8 refuses FP8 output). The float modes output their own type.
    input_scale, output_scale : float, optional
        Quantization scales of the input and of an int8 output; :meth:`calibrate` sets them from data.
    weight_granularity : {None, "channel", "tensor"}
        Weight scales per output channel or per tensor; default "channel" for "int8", "tensor" for "fp8".
    fp8_format : {"e4m3", "e5m2"}
    allow_zero_channels : bool
        Give all-zero output channels scale 1 instead of raising (see
        :func:`pycusparselt.nn.quantization.weight_scales`).
    autotune : bool or mapping
        Tune each new plan on its first input (:meth:`~pycusparselt.gemm.plan.SparseMatmulPlan.autotune`, before
        compressing the weight for it), unless a configuration stored for this GPU, library version and input
        shape is known (:meth:`load`, :attr:`tuned_configs`). A mapping is passed to ``autotune`` as keyword
        arguments, e.g. ``{"budget_s": 2.0}`` or ``{"method": "search"}``.

    Attributes
    ----------
    weight : array
        The pruned (and permuted) weight, on the weight's device: what the float modes multiply by, and what
        the quantized modes quantized (after :meth:`load`, their dequantized weight, float32).
    weight_q, weight_scale : array
        Quantized modes: the quantized weight (int8; FP8 as ml_dtypes values on the CPU, bytes on the GPU)
        and its float32 scales (NumPy, shape (out_features,) or ()).
    bias : array or None
        The bias as given (quantized modes: float32).
    """

    def __init__(
        self,
        weight: Any,
        bias: Any = None,
        *,
        mode: str | None = None,
        prune: str | None = "strip",
        permutation: Any = None,
        activation: str | None = None,
        relu_upper_bound: float = math.inf,
        relu_threshold: float = 0.0,
        out_dtype: Any = None,
        input_scale: float | None = None,
        output_scale: float | None = None,
        weight_granularity: str | None = None,
        fp8_format: str = "e4m3",
        allow_zero_channels: bool = False,
        autotune: bool | Mapping[str, Any] = True,
    ) -> None:
        if isinstance(weight, (list, tuple)):  # nested Python lists: host data
            weight = np.asarray(weight)
        if isinstance(bias, (list, tuple)):
            bias = np.asarray(bias)
        if not hasattr(weight, "shape"):
            raise TypeError(f"weight: expected an array (NumPy, CuPy, PyTorch, or nested lists), got "
                            f"{type(weight).__name__}")
        shape = tuple(weight.shape)
        if len(shape) != 2:
            raise ValueError(f"weight: expected (out_features, in_features), got shape {shape}")
        out_features, in_features = shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode: expected None or one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if prune not in ("strip", "tile", None):
            raise ValueError(f"prune: expected 'strip', 'tile' or None, got {prune!r}")
        if fp8_format not in ("e4m3", "e5m2"):
            raise ValueError(f"fp8_format: expected 'e4m3' or 'e5m2', got {fp8_format!r}")
        if weight_granularity not in (None, "channel", "tensor"):
            raise ValueError(f"weight_granularity: expected None, 'channel' or 'tensor', got {weight_granularity!r}")
        on_device = _on_device(weight)
        perm = None if permutation is None else np.asarray(_to_numpy(permutation), dtype=np.int64)
        if perm is not None and sorted(perm.tolist()) != list(range(in_features)):
            raise ValueError(f"permutation: expected a permutation of range({in_features})")

        # The weight is pruned on the host, with the reference's rule, whatever the backend: .weight is the
        # pruned weight at once, and a device layer prunes exactly as its CPU twin. A device weight given 2:4
        # in a float mode is checked and copied where it is (no round trip through the host).
        given = _arrays.dtype_of(weight) if hasattr(weight, "dtype") else None
        stays = (on_device and prune is None and perm is None and mode not in ("int8", "fp8")
                 and given in _FLOATS and _MODE_DTYPE.get(mode, given) == given)  # no conversion
        w_host = _to_cupy(weight) if stays else _to_numpy(weight)
        if w_host.dtype not in _FLOATS:
            raise TypeError(
                f"weight: expected float16, bfloat16 or float32, got {w_host.dtype} (quantized weights are made "
                f"by the layer: pass the float weight with mode='int8' or 'fp8')"
            )
        if perm is not None:
            w_host = w_host[:, perm]
        dtype = w_host.dtype if mode is None else _MODE_DTYPE.get(mode, w_host.dtype)
        pairs = mode is None and dtype == _F32
        if prune is not None:
            w_host = layer_values.prune_host(w_host, prune, pairs)
        elif not (layer_values.is_sparse_device if stays else _is_sparse_host)(w_host, pairs):
            rule = "1:2 (float32 weights run as TF32)" if pairs else "2:4"
            raise ValueError(f"weight: not {rule} along in_features; pass prune='strip' or 'tile'")
        w_host = layer_values.device_copy(w_host) if stays else np.ascontiguousarray(w_host.astype(dtype, copy=False))

        b_host = None if bias is None else _to_numpy(bias)
        if b_host is not None and mode is None and b_host.dtype != dtype:
            raise TypeError(f"bias: expected the weight's dtype {dtype}, got {b_host.dtype}")
        if b_host is not None and b_host.dtype not in _FLOATS:
            raise TypeError(f"bias: expected a float dtype, got {b_host.dtype}")

        quantized = mode in ("int8", "fp8")
        fmt = "int8" if mode == "int8" else fp8_format
        granularity = weight_granularity or ("channel" if mode == "int8" else "tensor")
        w_q = w_scale = None
        if quantized:
            w_q, w_scale = quantization.quantize_weight(
                w_host, fmt, granularity=granularity, allow_zero_channels=allow_zero_channels
            )
            b_host = None if b_host is None else b_host.astype(np.float32)
        elif b_host is not None:
            b_host = b_host.astype(dtype)
        device = None
        if on_device:
            device = int(_to_cupy(weight).device.id)
        self._setup(
            mode=mode, dtype=dtype, fmt=fmt if quantized else None, granularity=granularity if quantized else None,
            weight=w_host, weight_q=w_q, weight_scale=w_scale, bias=b_host, permutation=perm,
            activation=activation, relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold,
            out_dtype=out_dtype, input_scale=input_scale, output_scale=output_scale, on_device=on_device,
            device=device, autotune=autotune, configs={},
        )
        self._prune = prune

    def _setup(self, *, mode, dtype, fmt, granularity, weight, weight_q, weight_scale, bias, permutation,
               activation, relu_upper_bound, relu_threshold, out_dtype, input_scale, output_scale, on_device,
               device, autotune, configs) -> None:
        """Everything but pruning and quantizing (shared with :meth:`load`); host arrays in, device copies made."""
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {activation!r}")
        relu_upper_bound = layer_values.relu_upper_bound(relu_upper_bound)
        relu_threshold = layer_values.relu_threshold(relu_threshold)
        if activation != "relu" and (relu_upper_bound != math.inf or relu_threshold != 0.0):
            raise ValueError("relu_upper_bound and relu_threshold need activation='relu'")
        self.mode = mode
        self.dtype = np.dtype(dtype)
        self.format = fmt
        self.weight_granularity = granularity
        self.out_features, self.in_features = weight.shape if weight_q is None else weight_q.shape
        self.activation = activation
        self.relu_upper_bound = relu_upper_bound
        self.relu_threshold = relu_threshold
        self.permutation = permutation
        self.on_device = on_device
        self._autotune = autotune
        quantized = fmt is not None
        if quantized:
            allowed = _OUT_DTYPES[mode]
            out = allowed[0] if out_dtype is None else np.dtype(out_dtype)
            if out not in allowed:
                names = ", ".join(d.name for d in allowed)
                raise ValueError(f"out_dtype: a {mode!r} layer outputs one of {names}, got {out}")
        else:
            out = self.dtype
            if out_dtype is not None and np.dtype(out_dtype) != out:
                raise ValueError(
                    f"out_dtype: a {self.dtype.name} layer outputs {self.dtype.name}, got {np.dtype(out_dtype)}"
                )
        self.out_dtype = out
        self._input_scale = layer_values.activation_scale(input_scale, "input_scale")
        self._output_scale = layer_values.activation_scale(output_scale, "output_scale")
        # what the GEMM does, and what runs after it (GELU; per-channel FP8 scales)
        self._channel_fp8 = mode == "fp8" and granularity == "channel"
        self._fused_activation = activation if activation == "relu" and not self._channel_fp8 else None
        if self._channel_fp8:
            self._gemm_out = _F32
        elif activation == "gelu" and out == _I8:
            self._gemm_out = _F16
        else:
            self._gemm_out = out
        self._fused_bias = bias is not None and not self._channel_fp8
        self._post = self._channel_fp8 or activation == "gelu"

        self.weight_scale = None if weight_scale is None else layer_values.weight_scales(weight_scale)
        self._bias_host = bias
        xp = _xp(on_device)
        ctx = contextlib.nullcontext()
        if on_device:
            cupy = gpu.cupy()

            ctx = cupy.cuda.Device(device)
        with ctx:
            self.weight = xp.asarray(weight)
            self.bias = None if bias is None else xp.asarray(bias)
            if weight_q is None:
                self.weight_q = None
            elif on_device and fmt != "int8":
                self.weight_q = xp.asarray(np.ascontiguousarray(weight_q).view(np.uint8))  # FP8 bytes
            else:
                self.weight_q = xp.asarray(weight_q)
        self._device = device
        self._configs: dict[tuple, dict] = dict(configs)
        self._plans: dict[tuple, SparseMatmulPlan] = {}
        # the compressed weight by the plans' compressed key: one per configuration, shared across input shapes
        self._compressed: dict[tuple, Any] = {}
        # per input shape: (plan, launcher), or None where the plan pads; per input signature and stream: a route
        self._shapes: dict[tuple, tuple | None] = {}
        self._routes: dict[tuple, Route] = {}
        # per signature (address left out) and stream: a route to re-aim at new addresses without the checks
        self._prototypes: dict[tuple, Route] = {}
        self._stages: dict[tuple, Any] = {}
        self._decoder: small_batch.LayerDecoder | None | bool = None  # False: the decode kernel cannot serve
        self._tuned: set[tuple] = set()
        self._epilogue_cache: dict[str, Any] | None = None
        self._perm_device: Any = None

    # -- scales ----------------------------------------------------------------------------------------

    @property
    def input_scale(self) -> float | None:
        """The input's quantization scale (quantized modes); set it, or :meth:`calibrate`."""
        return self._input_scale

    @input_scale.setter
    def input_scale(self, value: float | None) -> None:
        self._input_scale = layer_values.activation_scale(value, "input_scale")
        self._invalidate()

    @property
    def output_scale(self) -> float | None:
        """The quantization scale of an int8 output."""
        return self._output_scale

    @output_scale.setter
    def output_scale(self, value: float | None) -> None:
        self._output_scale = layer_values.activation_scale(value, "output_scale")
        self._invalidate()

    @property
    def quantized(self) -> bool:
        """Whether the layer runs INT8 or FP8."""
        return self.format is not None

    def _invalidate(self) -> None:
        # routes and launchers hold the old alpha and quantization scale
        self._routes.clear()
        self._prototypes.clear()
        self._shapes.clear()
        # int8 outputs scale the ReLU bounds, which plans fix at creation
        self._epilogue_cache = None
        if self.out_dtype == _I8 and self._fused_activation is not None:
            self.close()

    def _epilogue(self) -> dict[str, Any]:
        """The GEMM's alpha, bias and ReLU parameters, computed on the host (so every backend uses the same
        float32 values) and copied to the device once."""
        if self._epilogue_cache is not None:
            return self._epilogue_cache
        relu = (
            {"relu_upper_bound": self.relu_upper_bound, "relu_threshold": self.relu_threshold}
            if self._fused_activation == "relu" else {}
        )
        alpha, bias, relu = quantization.epilogue_values(
            self.mode, self.weight_scale, self._input_scale, self._output_scale, self._bias_host, relu,
            quantized=self.quantized, gemm_out=self._gemm_out, out_dtype=self.out_dtype,
            channel_fp8=self._channel_fp8, fused_bias=self._fused_bias)
        cache: dict[str, Any] = {"alpha": alpha, "bias": bias, "relu": relu}
        if self.on_device:
            cupy = gpu.cupy()

            # the options of every plan the layer makes (one per input shape)
            input_dtype = quantization.FORMATS[self.format][0] if self.mode == "fp8" else None
            cache["options"] = PlanOptions(
                sparse="b", out_dtype=self._gemm_out, bias=self._fused_bias, activation=self._fused_activation,
                alpha_vector=self.mode == "int8", input_dtype=input_dtype, **relu)
            with cupy.cuda.Device(self._device):
                cache["alpha_device"] = cupy.asarray(alpha) if np.ndim(alpha) else alpha
                cache["bias_device"] = None if cache["bias"] is None else cupy.asarray(cache["bias"])
                if self._channel_fp8:
                    cache["scale_device"] = cupy.asarray(self.weight_scale)
                    cache["bias32_device"] = None if self._bias_host is None else cupy.asarray(self._bias_host)
        self._epilogue_cache = cache
        return cache

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

    @classmethod
    def from_quantized(
        cls,
        weight_q: Any,
        weight_scale: Any,
        bias: Any = None,
        *,
        mode: str,
        fp8_format: str = "e4m3",
        activation: str | None = None,
        relu_upper_bound: float = math.inf,
        relu_threshold: float = 0.0,
        out_dtype: Any = None,
        input_scale: float | None = None,
        output_scale: float | None = None,
        on_device: bool = False,
        device: int | None = None,
        autotune: bool | Mapping[str, Any] = True,
    ) -> SparseLinear:
        """A quantized layer from its parts, as a quantized layer holds them (``weight_q``,
        ``weight_scale``): nothing is quantized again, so the layer computes exactly what the one they came
        from did.

        ``weight_q`` is 2:4 along ``in_features``: int8 for ``mode="int8"``; for ``"fp8"`` ml_dtypes FP8 values or
        their bytes (uint8, read as ``fp8_format``). ``weight_scale``: float32, one per output feature or one for
        the tensor. ``bias``: float. ``on_device`` / ``device``: where the layer runs (the GPU through CuPy, or
        the NumPy reference). The other arguments are the constructor's.
        """
        if mode not in ("int8", "fp8"):
            raise ValueError(f"mode: expected 'int8' or 'fp8', got {mode!r}")
        if fp8_format not in ("e4m3", "e5m2"):
            raise ValueError(f"fp8_format: expected 'e4m3' or 'e5m2', got {fp8_format!r}")
        fmt = "int8" if mode == "int8" else fp8_format
        wq = np.ascontiguousarray(_to_numpy(weight_q))
        want = quantization.FORMATS[fmt][0]
        if wq.dtype == _U8 and mode == "fp8":
            wq = wq.view(want)
        if wq.ndim != 2 or wq.dtype != want:
            raise TypeError(f"weight_q: expected a 2-D {want} array, got {wq.dtype} of shape {wq.shape}")
        scale = layer_values.weight_scales(_to_numpy(weight_scale))
        if scale.shape not in ((), (wq.shape[0],)):
            raise ValueError(f"weight_scale: expected shape () or ({wq.shape[0]},), got {scale.shape}")
        weight = quantization.dequantize(wq, scale[:, None] if scale.ndim else scale)
        if not _is_sparse_host(weight, False):
            raise ValueError("weight_q: not 2:4 along in_features")
        b_host = None if bias is None else np.asarray(_to_numpy(bias), dtype=np.float32)
        if b_host is not None and b_host.shape != (wq.shape[0],):
            raise ValueError(f"bias: expected shape ({wq.shape[0]},), got {b_host.shape}")
        if on_device and device is None:
            device = gpu.cupy().cuda.Device().id
        layer = cls.__new__(cls)
        layer._setup(
            mode=mode, dtype=_F16, fmt=fmt, granularity="channel" if scale.ndim else "tensor", weight=weight,
            weight_q=wq, weight_scale=scale, bias=b_host, permutation=None, activation=activation,
            relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold, out_dtype=out_dtype,
            input_scale=input_scale, output_scale=output_scale, on_device=on_device,
            device=device if on_device else None, autotune=autotune, configs={},
        )
        layer._prune = None
        return layer

    # -- execution -----------------------------------------------------------------------------------

    def __call__(self, x: Any, *, out: Any = None, stream: Any = None) -> Any:
        """``activation(x @ W.T + b)`` for ``x`` of shape (batch, in_features) (or (in_features,)).

        ``x`` is of the layer's dtype for the float modes; float16, bfloat16 or float32 (quantized here with
        ``input_scale``) or already quantized (int8; FP8 bytes on the GPU, ml_dtypes FP8 on the CPU) for the
        quantized modes. ``out`` (device layers) receives the result: a C-contiguous, 16-byte aligned array of
        the result's shape and type (uint8 bytes also for one-byte results) on the layer's device. Device
        layers return the result in the input's framework (a PyTorch tensor for a tensor) and run on
        ``stream``, by default the input framework's current stream.

        After the first call with an input of a given address, shape, strides and dtype, a call with the same
        checks nothing again and, with ``out`` given, allocates nothing: it launches the product (and the
        input's quantization or padding copy, where needed) on the prepared buffers.
        """
        if self.on_device:
            key = _arrays.array_key(x)
            if key is not None:
                sp = stream_ptr(stream) if stream is not None else _arrays.current_stream(x, self._device)
                route = self._routes.get((key, sp))
                if route is not None:
                    return route(x, out)
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) not in (1, 2) or shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (batch, {self.in_features}) or ({self.in_features},), got {shape}")
        if self.on_device != _on_device(x):
            where = "device" if self.on_device else "NumPy (reference)"
            raise TypeError(f"x: this layer's weight is a {where} array; pass x of the same kind")
        vector = len(shape) == 1
        if self.on_device:
            return self._device_call(x, out, stream)
        y = self._reference_call(x[None] if vector else x)
        y = y[0] if vector else y
        if out is None:
            return y
        if not isinstance(out, np.ndarray) or out.shape != y.shape or out.dtype != y.dtype:
            got = f"{type(out).__name__} {getattr(out, 'shape', '')} {getattr(out, 'dtype', '')}".strip()
            raise ValueError(f"out: expected a NumPy array of shape {y.shape} and dtype {y.dtype}, got {got}")
        out[...] = y
        return out

    def _gemm_input(self, x: Any, xp: Any) -> Any:
        """The GEMM's dense operand: x in the layer's type (quantized here if given as floats)."""
        return quantization.gemm_operand(x, xp, mode=self.mode, dtype=self.dtype, fmt=self.format,
                                         input_scale=self._input_scale)

    def _finish(self, y: Any, xp: Any) -> Any:
        """Post-GEMM steps in float32 (GELU, per-channel FP8 scales), then the output type."""
        if not self._post:
            return y
        z = quantization.as_float32(y, xp)
        if self._channel_fp8:
            cache = self._epilogue()
            scale = cache["scale_device"] if xp is not np else self.weight_scale
            z = z * scale
            if self._bias_host is not None:
                z = z + (cache["bias32_device"] if xp is not np else self._bias_host)
            if self.activation == "relu":
                z = _relu32(z, self.relu_threshold, self.relu_upper_bound, xp)
        if self.activation == "gelu":
            z = _gelu32(z, xp)
        if self.out_dtype == _I8:
            inv = np.float32(1.0) / np.float32(self._output_scale)
            return quantization.quantize_on_host(z, inv, "int8") if xp is np else quantization.quantize_on_device(
                z, inv, "int8")
        return quantization.round_from_float32(z, self.out_dtype, xp)

    def _reference_call(self, x: np.ndarray) -> np.ndarray:
        if self.permutation is not None:
            x = x[..., self.permutation]
        xq = self._gemm_input(np.asarray(x), np)
        e = self._epilogue()
        w = self.weight if self.weight_q is None else self.weight_q
        # y^T = W @ x^T: the reference's bias and alpha vector are one value per row of D, here per output
        y_t = reference.matmul(
            w, np.swapaxes(xq, -1, -2), alpha=e["alpha"], bias=e["bias"], activation=self._fused_activation,
            out_dtype=self._gemm_out, **e["relu"],
        )
        return self._finish(np.ascontiguousarray(np.swapaxes(y_t, -1, -2)), np)

    def _device_call(self, x: Any, out: Any, stream: Any) -> Any:
        """A device call: through the input signature's route (made here on its first call), or, for layers
        whose weight cuSPARSELt cannot take unpadded, through the plan's checked path."""
        cupy = gpu.cupy()

        with cupy.cuda.Device(self._device):
            sp = stream_ptr(stream) if stream is not None else _arrays.current_stream(x, self._device)
            signature = _arrays.signature(x)
            prototype = self._prototypes.get((signature, sp))
            if prototype is not None:
                # an array like one seen before at a new address (an eager loop's fresh activations)
                route = prototype.aimed_at(x)
            else:
                route = self._make_route(x, sp)
                if route is not None and signature is not None:
                    if len(self._prototypes) >= MAX_ROUTES:
                        self._prototypes.clear()
                    self._prototypes[(signature, sp)] = route
        if route is None:
            vector = len(x.shape) == 1
            y = self._general_call(x[None] if vector else x, out, stream)
            return y[0] if vector else y
        key = _arrays.array_key(x)
        if key is not None:
            if len(self._routes) >= MAX_ROUTES:  # bounded: a loop over fresh arrays must not grow it
                self._routes.clear()
            self._routes[(key, sp)] = route
        return route(x, out)

    def _gemm_dtype(self) -> np.dtype:
        """The dtype of the GEMM's dense operand: the layer's type, int8, or the FP8 type."""
        if self.mode == "int8":
            return _I8
        if self.mode == "fp8":
            return quantization.FORMATS[self.format][0]
        return self.dtype

    def _make_route(self, x: Any, sp: int) -> Route | None:
        """Check ``x`` once and prepare everything its calls need; None where the weight needs padding."""
        cupy = gpu.cupy()

        vector = len(x.shape) == 1
        view = _to_cupy(x)  # zero-copy
        if vector:
            view = view[None]
        if view.device.id != self._device:
            raise ValueError(f"x: array is on device {view.device.id}, the layer on device {self._device}")
        rows = view.shape[0]
        given = _arrays.dtype_of(x)
        fp8 = quantization.FORMATS[self.format][0] if self.mode == "fp8" else None
        needs_quant = False
        if not self.quantized:
            if given != self.dtype:
                raise TypeError(f"x: expected {self.dtype.name} (the layer's type), got {given}")
        elif (self.mode == "int8" and given == _I8) or (self.mode == "fp8" and given in (fp8, _U8)):
            pass  # already quantized with this layer's input scale
        elif given in _FLOATS:
            needs_quant = True
            self._epilogue()  # raises without an input scale
        else:
            raise TypeError(f"x: expected float16, bfloat16 or float32 values (or {self.format} values already "
                            f"quantized), got {given}")
        storage = _U8 if self.mode == "fp8" else self._gemm_dtype()
        if any(st < 0 for st in view.strides) or rows == 0:
            return None
        with cupy.cuda.Device(self._device), on_stream(sp) as cstream:
            launch = self._decode_launcher(rows, sp)
            plan = None
            padded_rows = rows if launch is not None else self._padded_rows(rows)  # the decode kernel: as given
            contiguous = view.flags.c_contiguous and view.data.ptr % 16 == 0
            direct = not needs_quant and self.permutation is None and rows == padded_rows and contiguous
            stage_c = None if direct else stage_buffer(self._stages, x, padded_rows, self.in_features, storage,
                                                       self._device, sp)
            if launch is None:
                state = self._shape_state(view.view(storage) if direct else stage_c, sp)
                if state is None:
                    return None
                plan, launch = state
            perm = None if self.permutation is None else self._permutation_device()
            inv = np.float32(np.float32(1.0) / np.float32(self._input_scale)) if needs_quant else None
            fmt = self.format if needs_quant else None
            fill = None if direct else filler(view, stage_c, rows, perm, inv, fmt, cstream, sp)
            if fill is not None:
                fill()  # compiles its kernels now, outside any graph capture
        return Route(x, view, stage_c, fill, launch, plan, rows, padded_rows, vector, sp, cstream,
                     device=self._device, out_features=self.out_features, gemm_out=self._gemm_out,
                     out_dtype=self.out_dtype, post=self._finish if self._post else None, perm=perm, inv_scale=inv,
                     fmt=fmt)

    def _permutation_device(self) -> Any:
        """The input permutation on the layer's device, copied there once."""
        cupy = gpu.cupy()

        if self._perm_device is None:
            with cupy.cuda.Device(self._device):
                self._perm_device = cupy.asarray(self.permutation)
        return self._perm_device

    def _padded_rows(self, rows: int) -> int:
        """The rows of the product that serves inputs of ``rows`` rows: 16 for small batches (one plan for 1 to
        16 rows), else ``rows`` rounded up to the GEMM type's multiple."""
        multiple = dtypes.rules_for(self._gemm_dtype()).dense_multiple
        return SMALL_BATCH_ROWS if rows <= SMALL_BATCH_ROWS else -(-rows // multiple) * multiple

    def _shape_key(self, shape: tuple) -> tuple:
        """How the prepared products are keyed (``_shapes``): the GEMM input's shape, type and device."""
        return (shape, self._gemm_dtype().str, self._device)

    def direct_launcher(self, rows: int, stream: int) -> tuple[Any, int] | None:
        """The prepared product for inputs of ``rows`` rows on stream ``stream`` (a pointer), for callers that
        stage their own input: ``(launcher, padded_rows)``, where ``launcher(x_ptr, d_ptr, stream_ptr)``
        (a :class:`~pycusparselt.gemm.plan.Launcher`, or the decode kernel's
        :class:`~pycusparselt.gemm.decode.DecodeLauncher` where it serves ``rows``: then ``padded_rows`` is
        ``rows``) reads a C-contiguous, 16-byte aligned (padded_rows, in_features) input of the layer's dtype
        and writes the (padded_rows, out_features) result; rows past ``rows`` are the caller's (zeros, or any
        values: their results are discarded).

        None where a call needs more than the product: quantized modes (the input is quantized first), a
        permutation, post-processing (GELU, per-channel FP8 scales), a weight cuSPARSELt takes only padded, a
        layer on the NumPy reference. Made (and tuned) on the first call for that number of rows, like a call.
        """
        if not self.on_device or self.quantized or self.permutation is not None or self._post or rows <= 0:
            return None
        cupy = gpu.cupy()

        with cupy.cuda.Device(self._device), on_stream(stream):
            launch = self._decode_launcher(rows, stream)
            if launch is not None:
                return launch, rows
            padded_rows = self._padded_rows(rows)
            launch = self._prepared_launcher(padded_rows, stream)
        return None if launch is None else (launch, padded_rows)

    def _prepared_launcher(self, padded_rows: int, sp: int) -> Any:
        """The cuSPARSELt launcher for inputs of ``padded_rows`` rows, made (and tuned) on a random example input
        if not yet made; None where the plan pads. In the layer's device and stream context."""
        cupy = gpu.cupy()

        state = self._shapes.get(self._shape_key((padded_rows, self.in_features)), False)
        if state is False:  # not made yet: an example input of that shape (the tuner times on its values)
            example = cupy.random.standard_normal((padded_rows, self.in_features), dtype=np.float32)
            state = self._shape_state(example.astype(self.dtype), sp)
        return None if state is None else state[1]

    def _decode_launcher(self, rows: int, sp: int) -> Any:
        """The decode kernel's launcher for inputs of ``rows`` rows where it serves this layer's small batches
        (:mod:`pycusparselt.nn.small_batch` chooses), else None. In the layer's device and stream context."""
        if self._decoder is None:
            self._decoder = small_batch.unsupported_reason(
                on_device=self.on_device, quantized=self.quantized, dtype=self.dtype, post=self._post,
                device=self._device) is None and small_batch.LayerDecoder(
                self.weight, self.bias, activation=self._fused_activation, relu_threshold=self.relu_threshold,
                relu_upper_bound=self.relu_upper_bound, device=self._device, tune=self._autotune is not False)
        if rows > SMALL_BATCH_ROWS or not self._decoder:
            return None
        return self._decoder.launcher(rows, sp, lambda: self._prepared_launcher(SMALL_BATCH_ROWS, sp))

    def _shape_state(self, example: Any, sp: int) -> tuple | None:
        """(plan, launcher) for inputs of ``example``'s shape: made, tuned and given the compressed weight on
        the first call with that shape. None where the plan must pad (the weight's sizes)."""
        cupy = gpu.cupy()

        key = self._shape_key(tuple(example.shape))
        if key in self._shapes:
            return self._shapes[key]
        if cupy.cuda.runtime.streamIsCapturing(sp):
            raise RuntimeError(
                f"x: the first call with {example.shape[0]} input rows builds and tunes a plan, which cannot happen "
                f"during CUDA graph capture; call the layer once with such an input before capturing"
            )
        e = self._epilogue()
        w = self.weight if self.weight_q is None else self.weight_q
        wt = w.T  # (in, out), F-contiguous: the sparse B in the TN form
        args = dict(alpha=e["alpha_device"], bias=e["bias_device"], stream=sp)
        plan = self._plans.get(key)
        if plan is None or plan.closed:
            plan = SparseMatmulPlan(example, wt, options=e["options"])
            if plan.padded:
                plan.close()
                self._shapes[key] = None
                return None
            self._plans[key] = plan
            self._tuned.discard(key)
        if key not in self._tuned:
            layer_plans.tune_plan(plan, key, self._configs, self._autotune, example, wt, args)
            self._tuned.add(key)
        compressed = layer_plans.compressed_for(self._compressed, plan, wt, sp)
        state = self._shapes[key] = (plan, plan.launcher(compressed, alpha=e["alpha_device"], bias=e["bias_device"],
                                                         stream=sp))
        return state

    def _general_call(self, x: Any, out: Any, stream: Any) -> Any:
        """The plan's checked path (padding copies per call), for weights whose sizes cuSPARSELt cannot take."""
        cupy = gpu.cupy()

        template = x
        x = _to_cupy(x)
        with cupy.cuda.Device(self._device), _stream_context(stream):
            if self.permutation is not None:
                x = x[..., cupy.asarray(self.permutation)]
            xq = cupy.ascontiguousarray(self._gemm_input(x, cupy))
            if xq.shape[0] == 0:  # cuSPARSELt takes no empty operand, and there is nothing to compute
                y = cupy.empty((0, self.out_features), self._gemm_out)
            else:
                e = self._epilogue()
                key = (xq.shape, xq.dtype.str, int(xq.device.id), "padded")
                plan = self._plans.get(key)
                wt = (self.weight if self.weight_q is None else self.weight_q).T  # (in, out) F-contiguous: B in TN
                if plan is None:
                    plan = self._plans[key] = SparseMatmulPlan(xq, wt, options=e["options"])
                args = dict(alpha=e["alpha_device"], bias=e["bias_device"], stream=stream)
                if key not in self._tuned:
                    # before compressing: the compressed form depends on the configuration
                    layer_plans.tune_plan(plan, key, self._configs, self._autotune, xq, wt, args)
                    self._tuned.add(key)
                compressed = layer_plans.compressed_for(self._compressed, plan, wt, stream)
                y = plan.matmul(xq, compressed, out=out if not self._post else None, **args)
                if not self._post:
                    return _arrays.like(y, template)
            y = self._finish(y, cupy)
            if out is not None:
                copy_out(y, out)
                return out
            return _arrays.like(y, template)

    @property
    def plan_shapes(self) -> list[tuple[int, int]]:
        """The GEMM input shapes the layer has plans for: ``(rows, in_features)``, rows rounded up to
        ``pycusparselt.nn.linear.SMALL_BATCH_ROWS`` for small batches and to the dtype's multiple otherwise."""
        return sorted({key[0] for key, plan in self._plans.items() if not plan.closed})

    @property
    def compressed_nbytes(self) -> int:
        """Bytes of the compressed weights the layer holds on the GPU (0 before its first call): one per plan
        (inputs of 1 to 16 rows share one) and configuration it ran; each 0.5625 of the dense FP16/BF16
        weight's bytes (0.625 for 8-bit types). The decode kernel's packed weight, where it serves small
        batches, is not counted (another 0.5625: ``pycusparselt.nn.small_batch``)."""
        return sum(c.nbytes for c in self._compressed.values() if not c.closed)

    @property
    def tuned_configs(self) -> list[dict]:
        """The tuned configurations, one per (GPU, cuSPARSELt version, input shape): what :meth:`save` stores.

        Settable (entries as returned, e.g. from another layer of the same shapes): input shapes with an entry
        for this GPU and library version then run that configuration without tuning.
        """
        return [_config_entry(k, v) for k, v in self._configs.items()]

    @tuned_configs.setter
    def tuned_configs(self, entries: Iterable[dict]) -> None:
        try:
            configs = {_config_key(_entry_ident(e)): dict(e["config"]) for e in entries}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tuned_configs: expected entries as tuned_configs returns them ({exc!r})") from None
        self._configs = configs
        self._tuned.clear()
        # prepared calls run the old configurations: the next call of each shape takes the new one
        self._routes.clear()
        self._prototypes.clear()
        self._shapes.clear()

    # -- calibration ---------------------------------------------------------------------------------

    def calibrate(
        self, batches: Iterable[Any], *, method: str = "max", percentile: float = 99.99, bins: int = 2048
    ) -> SparseLinear:
        """Choose ``input_scale`` (and ``output_scale`` for an int8 output) from example inputs.

        Parameters
        ----------
        batches : iterable of arrays
            Float inputs of shape (batch, in_features), on the layer's backend; consumed once.
        method, percentile, bins
            As :class:`pycusparselt.nn.quantization.Calibrator`: "max", "percentile" or "mse". The output scale
            is chosen from the layer's float32 outputs (pruned float weight) the same way.

        Returns
        -------
        SparseLinear
            The layer itself.
        """
        quantization.calibrate_layer(self, batches, method=method, percentile=percentile, bins=bins)
        return self

    # -- saving --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, container: str | None = None) -> None:
        """Write the prepared layer to ``path``: the pruned (and permuted) weight, or the quantized weight and
        its scales, the bias, the permutation, the scales, the options and the tuned configurations (keyed by
        GPU, compute capability, cuSPARSELt version and input shape). Nothing is pickled.

        ``container``: "npz" (NumPy) or "safetensors" (needs the safetensors package); by default
        "safetensors" for a path ending in ``.safetensors``, else "npz". See :mod:`pycusparselt.nn.layer_files`.
        """
        layer_files.write(path, *layer_files.layer_contents(self, bias=self._bias_host), container)

    @classmethod
    def load(cls, path: str | os.PathLike, *, on_device: bool | None = None, device: int | None = None,
             autotune: bool | Mapping[str, Any] = True, container: str | None = None) -> SparseLinear:
        """A layer saved by :meth:`save`, ready to run: no pruning, calibration or (on the same GPU and
        library version) tuning again.

        The file is untrusted input: its structure is checked before any array is read
        (:func:`pycusparselt.nn.layer_files.read`) and its content as the constructor checks its arguments (2:4
        structure, a valid permutation, finite positive scales, known options). Anything else raises
        :class:`~pycusparselt.errors.LayerFileError` naming the file and the field.

        Parameters
        ----------
        path : path
        on_device : bool, optional
            True: onto the GPU (CuPy); False: onto the NumPy reference. None (default): the GPU where one is
            usable, else the reference, with a :class:`RuntimeWarning` saying why (``layer.on_device`` tells).
        device : int, optional
            The CUDA device (default: CuPy's current device).
        autotune : bool or mapping
            Tune input shapes without a stored configuration for this GPU and library version (a layer
            loaded on another GPU or library version re-tunes instead of failing); as for the constructor.
        container : {"npz", "safetensors"}, optional
            Default: by the path's suffix (see :meth:`save`).
        """
        meta, arrays = layer_files.read(path, container)
        fields = _loaded_fields(meta, arrays, path)
        on_device, device = layer_files.load_target(on_device, device)
        layer = cls.__new__(cls)
        try:
            layer._setup(**fields, on_device=on_device, device=device, autotune=autotune)
        except (TypeError, ValueError) as exc:
            raise layer_files.LayerFileError(f"{os.fspath(path)!r}: {exc}") from None
        layer._prune = None
        return layer

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the plans and compressed weights (the layer can still be called: they are rebuilt)."""
        self._routes.clear()
        self._prototypes.clear()
        self._shapes.clear()
        self._stages.clear()
        self._perm_device = None
        if self._decoder:
            self._decoder.close()  # its choices stay, like the tuned configurations
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
        mode = f"mode={self.mode!r}, " if self.mode else ""
        return (
            f"SparseLinear(in_features={self.in_features}, out_features={self.out_features}, {mode}"
            f"dtype={self.dtype}, out_dtype={self.out_dtype}, bias={self.bias is not None}{act}, {where})"
        )

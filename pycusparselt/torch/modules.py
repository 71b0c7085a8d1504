"""A PyTorch model run sparse: :class:`SparseLinear`, an ``nn.Module`` whose 2:4 weight lives in buffers PyTorch
knows, and :func:`sparsify`, which puts it in place of a model's ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers.

The module's state is its compact weight (:mod:`pycusparselt.torch.compact`: the kept values and their positions),
its bias and, for INT8 and FP8, its scales: ``state_dict``, ``load_state_dict``, ``torch.save`` of the model,
``copy.deepcopy``, ``.to()`` / ``.cuda()`` / ``.cpu()`` and ``safetensors.torch.save_model`` all work on it. The
product runs through a :class:`pycusparselt.SparseLinear` (cuSPARSELt on the GPU, the NumPy reference on the
CPU) made from that state on the first call and again after the state moves or changes; it is a cache, never
saved. Eager calls go straight to it; under ``torch.compile``, ``torch.export`` and ``torch.fx`` tracing the
product is the custom operator ``torch.ops.pycusparselt.linear``.
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import _arrays
from .._native import gpu
from ..errors import ClosedError
from ..nn import layer_values
from ..nn.linear import MODES
from ..nn.linear import SparseLinear as NativeLinear
from ..reference import is_2to4
from . import compact
from .channels import shared_weights
from .pruning import MASK_NAME
from .siblings import SiblingProjection, find_sibling_groups, merged_name

__all__ = ["SparseLinear", "SparseLinearModule", "SparsifyReport", "sparsify"]

_live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # layer_id -> SparseLinear, for the operator
_ids = itertools.count(1)

#: The dtype each mode keeps its values in (FP8 as its bytes: ``.half()`` must not convert them).
_VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.uint8}
_QUANTIZED = ("int8", "fp8")
_STATE = ("values", "indices", "bias", "weight_scale", "input_scale", "output_scale")  # the buffers
#: Prepared entries a module keeps (one per number of rows, stream and device) before it starts again, as the
#: layer's routes do: a model fed inputs of many lengths keeps a bounded number of stages.
_MAX_DIRECT = 64
_current_device = torch.cuda.current_device


_version = operator.attrgetter("_version")  # a tensor's count of in-place changes


def _versions(buffers: tuple) -> tuple:
    """The buffers' counts of in-place changes; None for inference tensors (made under
    ``torch.inference_mode``), which count none: their in-place edits are not seen."""
    try:
        return tuple(map(_version, buffers))
    except RuntimeError:
        return tuple(None if buf.is_inference() else buf._version for buf in buffers)


def _module_for(layer_id: int) -> SparseLinear:
    module = _live.get(layer_id)
    if module is None:
        raise ValueError(f"layer_id: no live pycusparselt.torch.SparseLinear has id {layer_id} (ids come from "
                         f"SparseLinear.layer_id; the module may have been deleted)")
    return module


@torch.library.custom_op("pycusparselt::linear", mutates_args=(), schema="(Tensor x, int layer_id) -> Tensor")
def _linear_op(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    return _module_for(layer_id).product(x)


@_linear_op.register_fake
def _(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    module = _module_for(layer_id)
    return x.new_empty((x.shape[0], module.out_features), dtype=module.output_dtype)


def _tracing(x: Any) -> bool:
    """Whether the call is being traced (dynamo, fx, TorchScript, or a dispatch mode such as make_fx's): then the
    product must be the operator, not an eager call whose result a trace would keep as a constant."""
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _in_dispatch_mode())


_in_dispatch_mode = getattr(torch.utils._python_dispatch, "is_in_torch_dispatch_mode", lambda: False)


class SparseLinear(torch.nn.Module):
    """``y = activation(x @ W.T + b)`` with a 2:4 sparse weight ``W`` of shape (out_features, in_features), for
    inputs of shape (..., in_features); with ``conv=True`` a 1x1 convolution on (N, C, H, W).

    Made empty (zero weight) like ``nn.Linear``, to be filled by ``load_state_dict``; or from a dense layer
    with :meth:`from_dense`, as :func:`sparsify` does.

    Parameters
    ----------
    in_features, out_features : int
        ``in_features`` a positive multiple of 4.
    bias : bool
    mode : {"fp16", "bf16", "int8", "fp8"}
        The type the product reads (:class:`pycusparselt.SparseLinear`'s ``mode``). The float modes take
        inputs of their type; "int8" and "fp8" quantize float inputs with ``input_scale``.
    activation : {None, "relu", "gelu"}
        Applied to the product (ReLU fused into cuSPARSELt's epilogue; GELU, tanh form, after it).
    relu_upper_bound, relu_threshold, out_dtype, fp8_format, autotune
        As :class:`pycusparselt.SparseLinear`.
    conv : bool
        The layer is a 1x1 convolution (stride 1, no padding, ungrouped).
    device : torch.device, optional
        Where the buffers are made.

    Notes
    -----
    Buffers (the whole state): ``values`` and ``indices`` (the compact weight, see
    ``pycusparselt.torch.compact``; FP8 values as their bytes), ``bias`` (the mode's float type; float32 for
    "int8" and "fp8"), and for "int8" / "fp8" ``weight_scale`` (float32, per output feature for "int8", one for
    "fp8"), ``input_scale`` and ``output_scale`` (float32 scalars, 0 where unset). The buffers keep their dtypes
    under ``.half()`` / ``.to(dtype)`` (a sparse layer computes in its mode); ``.to(device)``, ``.cuda()`` and
    ``.cpu()`` move them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: str = "fp16",
        activation: str | None = None,
        relu_upper_bound: float = math.inf,
        relu_threshold: float = 0.0,
        out_dtype: Any = None,
        fp8_format: str = "e4m3",
        conv: bool = False,
        autotune: bool | Mapping[str, Any] = True,
        device: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if in_features % 4:
            raise ValueError(f"in_features: 2:4 sparsity needs a multiple of 4, got {in_features}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {activation!r}")
        if fp8_format not in ("e4m3", "e5m2"):
            raise ValueError(f"fp8_format: expected 'e4m3' or 'e5m2', got {fp8_format!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.mode, self.activation, self.fp8_format, self.conv = mode, activation, fp8_format, bool(conv)
        self.relu_upper_bound, self.relu_threshold = float(relu_upper_bound), float(relu_threshold)
        if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
            out_dtype = _arrays.torch_dtype(np.dtype(out_dtype))
        self.out_dtype = out_dtype
        self.autotune = autotune
        quantized = mode in _QUANTIZED
        self.register_buffer("values", torch.zeros((out_features, in_features // 2), dtype=_VALUE_DTYPES[mode],
                                                   device=device))
        # all-zero groups keep positions 0 and 1 (nibble 0x4); a last odd group leaves its byte's high nibble 0
        indices = torch.full((out_features, -(-in_features // 8)), 0x44, dtype=torch.uint8, device=device)
        if in_features % 8:
            indices[:, -1] = 0x04
        self.register_buffer("indices", indices)
        bias_dtype = torch.float32 if quantized else _VALUE_DTYPES[mode]
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        if quantized:
            scales = (out_features,) if mode == "int8" else ()
            self.register_buffer("weight_scale", torch.ones(scales, dtype=torch.float32, device=device))
            self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device))
            self.register_buffer("output_scale", torch.zeros((), dtype=torch.float32, device=device))
        self._native: NativeLinear | None = None
        self._direct: dict = {}
        self._stages: dict = {}  # (padded rows, stream, device) -> the stage of prepared calls
        self._dtype = torch.float16 if quantized else _VALUE_DTYPES[mode]  # what the product reads
        self._row_bytes = in_features * self._dtype.itemsize
        self._watched: tuple = ()  # the buffers the product was made from, and their versions then
        self._built_from: tuple = ()
        self._shared: _Shared | None = None  # the last product forward_shared made, and what it was made from
        self._register()
        # the output dtype, known without building the product (the fake operator needs it)
        self.output_dtype = self._output_dtype()

    # -- making --------------------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        mode: str = "fp16",
        prune: str | None = "strip",
        calibration: Iterable[torch.Tensor] | None = None,
        **options: Any,
    ) -> SparseLinear:
        """A layer from a dense weight (out_features, in_features) and bias, on the weight's device.

        ``prune``: "strip" or "tile" (magnitude, as :func:`pycusparselt.reference.prune_2to4`), or None for a
        weight already 2:4. "int8" and "fp8" quantize the pruned weight and need ``calibration`` (float inputs
        of shape (..., in_features)) for the input scale. ``options``: the constructor's keywords.
        """
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight.shape)}")
        if mode in _QUANTIZED and calibration is None:
            raise ValueError(f"calibration: a {mode} layer needs example inputs to choose its input scale")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, mode=mode, device=weight.device, **options)
        native = NativeLinear(_arrays.to_numpy(weight), None if bias is None else _arrays.to_numpy(bias.detach()),
                              mode=mode, prune=prune, autotune=False, activation=module.activation,
                              relu_upper_bound=module.relu_upper_bound, relu_threshold=module.relu_threshold,
                              out_dtype=module._numpy_out_dtype(), fp8_format=module.fp8_format)
        if calibration is not None and mode in _QUANTIZED:
            native.calibrate([_arrays.to_numpy(x.detach().reshape(-1, in_features).float()) for x in calibration])
        module._fill_from(native)
        return module

    def _fill_from(self, native: NativeLinear) -> None:
        """The state of a host (reference) layer's pruned, or quantized, weight."""
        with torch.no_grad():
            if self.mode in _QUANTIZED:
                wq = np.ascontiguousarray(native.weight_q)
                if wq.dtype != np.int8:  # FP8 bytes; a pruned -0.0 (0x80) is a zero of the 2:4 pattern
                    wq = np.where((wq.view(np.uint8) & 0x7F) == 0, np.uint8(0), wq.view(np.uint8))
                wq = torch.from_numpy(wq)
                self.weight_scale.copy_(torch.from_numpy(np.asarray(native.weight_scale, np.float32)))
                self.input_scale.fill_(native.input_scale or 0.0)
                self.output_scale.fill_(native.output_scale or 0.0)
                dense = wq
            else:
                dense = _arrays.host_tensor(np.ascontiguousarray(native.weight))
            values, indices = compact.pack(dense)
            self.values.copy_(values)
            self.indices.copy_(indices)
            if self.bias is not None:
                self.bias.copy_(_arrays.host_tensor(np.asarray(native.bias)).to(self.bias.dtype))
        self._native = None

    # -- state ---------------------------------------------------------------------------------------

    def _register(self) -> None:
        self.layer_id = next(_ids)
        _live[self.layer_id] = self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_native"] = None  # a cache of the GPU's plans: never copied or pickled
        state["_watched"], state["_built_from"], state["_direct"], state["_stages"] = (), (), {}, {}
        state["_shared"] = None  # a product of one input of this process (and a weak reference): not state
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._native = None
        self._direct, self._stages = {}, {}
        self._shared = None
        self._register()  # a copy is a module of its own

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _STATE and "_native" in self.__dict__:  # a buffer replaced, not edited: made again
            self.__dict__["_native"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        # a sparse layer computes in its mode: dtype conversions of the model (.half(), .to(dtype)) leave its
        # buffers' dtypes as they were; device moves apply
        before = dict(self.named_buffers(recurse=False))
        result = super()._apply(fn, recurse)
        for name, new in self.named_buffers(recurse=False):
            old = before[name]
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        self._native = None
        self._shared = None
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            if self.values.dtype != _VALUE_DTYPES[self.mode]:
                raise ValueError(f"{prefix}values: a {self.mode!r} layer keeps {_VALUE_DTYPES[self.mode]}, got "
                                 f"{self.values.dtype}")
            compact.check_pair(self.values, self.indices, self.out_features, self.in_features, prefix.rstrip("."))
            if self.mode in _QUANTIZED:
                _check_scales(self, prefix.rstrip("."))
        except ValueError as exc:
            error_msgs.append(str(exc))
        self._native = None

    def _numpy_out_dtype(self) -> Any:
        return None if self.out_dtype is None else _arrays.dtype_of(torch.empty(0, dtype=self.out_dtype))

    def _output_dtype(self) -> torch.dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        return torch.float16 if self.mode in _QUANTIZED else _VALUE_DTYPES[self.mode]

    @property
    def weight(self) -> torch.Tensor:
        """The dense 2:4 weight (out_features, in_features), made from the compact state (a new tensor; the
        quantized modes give their quantized values, FP8 as bytes)."""
        return compact.unpack(self.values, self.indices, self.in_features)

    # -- running -------------------------------------------------------------------------------------

    def native(self) -> NativeLinear:
        """The :class:`pycusparselt.SparseLinear` that runs the product on the buffers' device, made on first use
        and again after ``.to()``, ``load_state_dict`` or an in-place edit of the buffers."""
        if self._native is None or self._built_from != _versions(self._watched):
            self._watched = tuple(buf for _, buf in self.named_buffers(recurse=False))
            self._direct = {}  # (rows, stream, device) -> what product() launches directly, or False
            self._stages = {}
            self._native = self._build_native()
            self._built_from = _versions(self._watched)
        return self._native

    def _build_native(self) -> NativeLinear:
        on_device = self.values.is_cuda
        dense = compact.unpack(self.values, self.indices, self.in_features)
        options = dict(activation=self.activation, relu_upper_bound=self.relu_upper_bound,
                       relu_threshold=self.relu_threshold, autotune=self.autotune, out_dtype=self._numpy_out_dtype())
        if self.mode in _QUANTIZED:
            scale = lambda t: float(t) or None  # noqa: E731 - 0 means unset
            return NativeLinear.from_quantized(
                dense, self.weight_scale, self.bias, mode=self.mode, fp8_format=self.fp8_format,
                input_scale=scale(self.input_scale), output_scale=scale(self.output_scale), on_device=on_device,
                device=self.values.device.index if on_device else None, **options)
        if not on_device:
            bias = None if self.bias is None else _arrays.to_numpy(self.bias)
            return NativeLinear(_arrays.to_numpy(dense), bias, prune=None, **options)
        with torch.cuda.device(dense.device):
            return NativeLinear(dense, self.bias, prune=None, **options)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The product on a 2-D input, eagerly: what the custom operator runs.

        Parameters
        ----------
        x : torch.Tensor
            (rows, in_features), on the module's device (a CPU module runs the NumPy reference).

        Returns
        -------
        torch.Tensor
            (rows, out_features), of the type ``output_dtype`` names.

        The first call with a number of rows on a stream is checked in full by the
        :class:`pycusparselt.SparseLinear` beneath; later ones (C-contiguous, 16-byte aligned, of the layer's
        dtype, with the input's device current) launch the prepared product directly.
        """
        native = self.native()
        if not x.is_cuda:
            return _arrays.host_tensor(native(_arrays.to_numpy(x)))
        if not x.is_contiguous():
            x = x.contiguous()
        device = x.get_device()
        sp = _arrays.current_stream(x, device)
        rows = x.shape[0]
        key = (rows, sp, device)  # stream 0 is every device's default stream
        direct = self._direct.get(key)
        if (direct and x.dtype is self._dtype and x.shape[1] == self.in_features and x.data_ptr() % 16 == 0
                and _current_device() == device):  # the copy is issued on the current device's stream
            # the prepared product alone: what a call checks was checked when this entry was made
            launch, stage, shape, copy, kind = direct
            y = torch.empty(shape, dtype=self.output_dtype, device=x.device)
            try:
                if stage is None:
                    launch(x.data_ptr(), y.data_ptr(), sp)
                    return y
                copy(stage, x.data_ptr(), rows * self._row_bytes, kind, sp)
                launch(stage, y.data_ptr(), sp)
                return y[:rows]
            except ClosedError:  # the product's plans were closed (native().close()): made again below
                self._direct.clear()
                self._stages.clear()
                direct = None
        y = native(x)  # checks x in full; makes (and tunes) the product for this shape
        if direct is None and x.dtype is self._dtype and not torch.cuda.is_current_stream_capturing():
            # made outside graph capture only: its stage is then zeroed now, not at each replay
            if len(self._direct) >= _MAX_DIRECT:  # many sizes (prompts of every length): start again
                self._direct.clear()
                self._stages.clear()
            self._direct[key] = self._direct_entry(native, rows, sp, x.device)
        return y

    def _direct_entry(self, native: NativeLinear, rows: int, sp: int, device: torch.device) -> tuple | bool:
        """What :meth:`product` needs to launch the prepared product for ``rows`` rows on stream ``sp``
        directly, or False where a call needs more (:meth:`pycusparselt.SparseLinear.direct_launcher`)."""
        found = native.direct_launcher(rows, sp)
        if found is None:
            return False
        launch, padded = found
        if padded == rows:
            return launch, None, (padded, self.out_features), None, None
        # inputs of fewer rows than the product reads are copied (one cudaMemcpyAsync on the stream) into a
        # stage of the product's rows, one per padded size and stream: rows past an input's hold zeros or an
        # earlier input's values, whose results are not returned
        stage = self._stages.get((padded, sp, device.index))
        if stage is None:
            stage = self._stages[(padded, sp, device.index)] = torch.zeros(
                (padded, self.in_features), dtype=self._dtype, device=device)
        runtime = gpu.cupy().cuda.runtime
        return launch, stage.data_ptr(), (padded, self.out_features), runtime.memcpyAsync, \
            runtime.memcpyDeviceToDevice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``activation(x @ W.T + b)`` over the last dimension of ``x`` (a 1x1 convolution: over dimension 1)."""
        if _tracing(x):
            # under tracing the product is the operator, and x may be a torch.fx Proxy: shapes indexed, not
            # unpacked
            if self.conv:  # (N, C, H, W) -> (N*H*W, C): the GEMM of a 1x1 convolution
                y = _linear_op(x.permute(0, 2, 3, 1).reshape(-1, self.in_features), self.layer_id)
                return y.reshape(x.shape[0], x.shape[2], x.shape[3], self.out_features).permute(0, 3, 1, 2)
            y = _linear_op(x.reshape(-1, self.in_features), self.layer_id)
            return y.reshape(x.shape[:-1] + (self.out_features,))
        # eager calls go straight to the product: the operator's dispatch costs more than the product's launch
        if self.conv:
            y = self.product(x.permute(0, 2, 3, 1).reshape(-1, self.in_features))
            return y.view(x.shape[0], x.shape[2], x.shape[3], self.out_features).permute(0, 3, 1, 2)
        if x.dim() == 2:
            return self.product(x)
        return self.product(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def forward_shared(self, x: torch.Tensor, reader: Any) -> torch.Tensor:
        """:meth:`forward` of ``x``, shared by the readers of one input: the product a reader asked for is
        returned to the next reader that asks for it with the same tensor, unchanged since, without a new GEMM
        (what merged sibling projections call, each asking for its slice).

        Parameters
        ----------
        x : torch.Tensor
            As :meth:`forward`.
        reader : hashable
            Who asks. A reader that asks again with the same tensor gets a new product: a model calling a
            projection twice on one input, or capturing a CUDA graph after a warm-up call on the capture's
            input, computes (and records) the product again.

        Returns
        -------
        torch.Tensor
            The product; the same tensor for every reader it is shared with (readers must not edit it in
            place; an edit makes the next reader compute its own).

        Notes
        -----
        One product is kept, with a weak reference to its input: it is reused only for the very tensor it was
        made from (``is``), with the same version counter (no in-place edit since), shape, strides, dtype and
        device, on the same stream, inside or outside CUDA graph capture alike, while the module's state is
        unchanged and the product itself unedited. Inference tensors (``torch.inference_mode``) count no
        edits, so their products are never reused: each reader computes the whole product. Under tracing
        (``torch.compile``, ``torch.export``, ``torch.fx``) this is :meth:`forward`, the operator, and nothing
        is kept.
        """
        if _tracing(x):
            return self.forward(x)
        native = self.native()
        key = _input_key(x)
        last = self._shared
        if (key is not None and last is not None and last.source() is x and last.key == key
                and last.native is native and _version(last.product) == last.product_version
                and reader not in last.readers):
            last.readers.add(reader)
            return last.product
        y = self.forward(x)
        self._shared = None if key is None or y.is_inference() else \
            _Shared(weakref.ref(x), key, native, y, _version(y), {reader})
        return y

    def warm_up(self, rows: Iterable[int]) -> None:
        """Prepare (and tune, where ``autotune``) the product for inputs of these numbers of rows, so that the
        first call with them costs what any call does. Rows of 1 to 16 share one prepared product."""
        device = self.values.device
        dtype = torch.float16 if self.mode in _QUANTIZED else _VALUE_DTYPES[self.mode]
        for n in dict.fromkeys(int(r) for r in rows):
            if n <= 0:
                raise ValueError(f"rows: expected positive numbers of rows, got {n}")
            self.product(torch.zeros((n, self.in_features), dtype=dtype, device=device))

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}{act}{', conv 1x1' if self.conv else ''}")


@dataclass
class _Shared:
    """A product :meth:`SparseLinear.forward_shared` keeps for the input's other readers."""

    source: Any  # weakref.ref to the input: the cache keeps no input alive
    key: tuple
    native: Any  # the product's maker: a new one (new state) makes the product stale
    product: torch.Tensor
    product_version: int
    readers: set


def _input_key(x: torch.Tensor) -> tuple | None:
    """What must be the same for a kept product to be ``x``'s: None where ``x`` counts no in-place edits."""
    if x.is_inference():
        return None
    if x.is_cuda:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        # a product made outside capture is not in the graph, and one made in capture holds no values yet
        capturing = torch.cuda.is_current_stream_capturing()
    else:
        stream = capturing = None
    return (_version(x), tuple(x.shape), x.stride(), x.dtype, x.device, stream, capturing)


#: The name this class had before it was public.
SparseLinearModule = SparseLinear


def _check_scales(module: SparseLinear, where: str) -> None:
    """Scales read from a state dict, checked by the validators every layer's scales go through (input and
    output scales: 0 means unset)."""
    layer_values.weight_scales(module.weight_scale.detach().cpu().numpy(), f"{where}.weight_scale")
    for name in ("input_scale", "output_scale"):
        layer_values.activation_scale(float(getattr(module, name)) or None, f"{where}.{name}")


@dataclass
class SparsifyReport:
    """What :func:`sparsify` replaced, what it fused and merged, and what it left dense (each with the reason).

    ``merged`` maps each merged module's name to its siblings' names (``merge_siblings=True``);
    ``not_merged`` maps each sibling group found but not merged (``attn.{q_proj,k_proj,v_proj}``) to the reason.
    """

    replaced: list = field(default_factory=list)
    dense: dict = field(default_factory=dict)
    fused: list = field(default_factory=list)  # "linear + activation" names
    not_fused: dict = field(default_factory=dict)  # activation name -> why it runs on its own
    merged: dict = field(default_factory=dict)  # merged module name -> its siblings' names
    not_merged: dict = field(default_factory=dict)  # group label -> why its members run on their own

    def __str__(self) -> str:
        lines = [f"sparse: {', '.join(self.replaced) or 'nothing'}"]
        lines += [f"fused: {pair}" for pair in self.fused]
        lines += [f"not fused: {name} ({why})" for name, why in self.not_fused.items()]
        lines += [f"merged: {' + '.join(members)} -> {name}" for name, members in self.merged.items()]
        lines += [f"not merged: {label} ({why})" for label, why in self.not_merged.items()]
        return "\n".join(lines + [f"dense: {name} ({why})" for name, why in self.dense.items()])


def _why_dense(mod: Any) -> str | None:
    if isinstance(mod, torch.nn.Conv2d):
        if mod.kernel_size != (1, 1) or mod.stride != (1, 1) or mod.padding not in ((0, 0), "valid") \
                or mod.dilation != (1, 1) or mod.groups != 1:
            return "a convolution other than 1x1 (stride 1, no padding, ungrouped) is not a single GEMM"
    out_features, inputs = mod.weight.shape[:2]
    if inputs == 0 or out_features == 0:
        return f"an empty layer ({out_features} x {inputs}): nothing to multiply"
    if inputs % 4:
        return f"{inputs} input features: not a multiple of 4"
    return None


def _activations(model: Any, targets: dict, names: dict) -> dict:
    """Which targets can take the activation that follows them into their product: in an ``nn.Sequential``, a
    Linear followed by ``nn.ReLU``, both registered once. Returns {linear name: (activation name, kind)}."""
    found: dict = {}
    for parent_name, parent in model.named_modules():
        if type(parent) is not torch.nn.Sequential:  # a subclass may have a forward of its own
            continue
        children = list(parent.named_children())
        for (name, mod), (act_name, act) in zip(children, children[1:], strict=False):
            full = f"{parent_name}.{name}" if parent_name else name
            act_full = f"{parent_name}.{act_name}" if parent_name else act_name
            if id(mod) not in targets or isinstance(mod, torch.nn.Conv2d):
                continue
            if isinstance(act, torch.nn.ReLU):
                if len(names[id(mod)]) == 1 and len(names.get(id(act), [])) == 1:
                    found[full] = (act_full, "relu")
            elif isinstance(act, torch.nn.GELU):
                found[full] = (act_full, None)
    return found


def sparsify(
    model: Any,
    mode: str = "fp16",
    *,
    calibration: Iterable[Any] | None = None,
    prune: str = "strip",
    autotune: bool | dict = True,
    fuse: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    warm_up: Sequence[int] = (),
    merge_siblings: bool = False,
    **layer_options: Any,
) -> SparsifyReport:
    """Replace ``model``'s ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers by :class:`SparseLinear` in place.

    Parameters
    ----------
    model : torch.nn.Module
        On the GPU for cuSPARSELt (CPU models run the NumPy reference: for checking, not speed).
    mode : {"fp16", "bf16", "int8", "fp8"}
        The type the products read. "fp16"/"bf16" layers take inputs of that type (convert the model first,
        e.g. ``model.half()``); "int8"/"fp8" layers quantize float inputs with the scales calibrated on
        ``calibration``.
    calibration : iterable of inputs, optional
        Example inputs of ``model`` (each passed as ``model(x)``), needed by "int8" and "fp8" (unless
        ``state_dict`` gives the scales): every replaced layer's scales come from what it receives on them.
    prune : {"strip", "tile"}
        How to prune weights that are not already 2:4 along their inputs (layers pruned by
        :func:`prune_trained_model` are used as they are).
    autotune : bool or dict
        Passed to every layer (:class:`pycusparselt.SparseLinear`). Layers with the same problem share one
        tuning: the tuner's cache remembers the winner, on disk and across processes.
    fuse : bool
        Fuse an ``nn.ReLU`` that follows a Linear in an ``nn.Sequential`` (and only there) into the product's
        epilogue; the ReLU becomes ``nn.Identity``. The report lists each fusion and each refusal.
    state_dict : mapping, optional
        The state of a model sparsified before (``model.state_dict()`` after ``sparsify``, or a file of it):
        ``model`` is a freshly built dense model of the same class; its layers are made from the state (no
        pruning, quantization or calibration), after which the rest of the state is loaded too
        (``load_state_dict(strict=True)``). Use the same ``mode`` and ``fuse`` as the first time.
    warm_up : sequence of int
        Numbers of input rows (batch x tokens) to prepare and tune every layer for now, on the GPU, so that
        the first forward with them costs what any forward does.
    merge_siblings : bool
        Run sibling ``nn.Linear`` layers that read one input (Q, K and V; gate and up of a gated MLP) as one
        product over their concatenated weights: "fp16" and "bf16" only. Siblings are the Linear children of
        one parent named by a group of :data:`pycusparselt.torch.siblings.SIBLING_GROUPS`, with the same
        in_features, dtype, device and bias presence, none fused with an activation, registered under two
        names or sharing a parameter. The parent gets a :class:`SparseLinear` child
        ``merged_<names joined by _>`` (``merged_q_proj_k_proj_v_proj``: the state dict's entries for the
        group) and each sibling becomes a :class:`pycusparselt.torch.siblings.SiblingProjection`, a view of
        its output features of the merged product, with no state of its own. Siblings called on the same
        tensor share one product; a sibling called on another tensor computes the merged product of that one.
        The report lists every merge and every group refused, with the reason. Off by default: not yet
        measured on a GPU. Use the same value to load a ``state_dict`` (a group whose merged entry the state
        lacks is not merged).
    **layer_options
        Passed to every :class:`SparseLinear` (``relu_upper_bound``, ``out_dtype``, ``fp8_format``, ...).

    Returns
    -------
    SparsifyReport

    Notes
    -----
    A module registered under several names is replaced under all of them by one sparse module. A layer whose
    weight is also used by a module that is not replaced (a weight tied to an embedding, say) stays dense:
    pruning it would change that module too, or untie the two. Empty layers and layers whose inputs are not
    a multiple of 4 stay dense. The report says why for each.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    quantized = mode in _QUANTIZED
    if quantized and calibration is None and state_dict is None:
        raise ValueError(f"calibration: a {mode} model needs example inputs to choose its scales")
    report = SparsifyReport()
    names: dict = {}  # id(module) -> every name it is registered under
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    candidates = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(mod, SparseLinear):
            why = _why_dense(mod)
            if why is None:
                candidates[id(mod)] = (name, mod)
            else:
                report.dense[name] = why
    # weights shared with modules that stay dense
    for users in shared_weights(model).values():
        outside = [n for n, m in users if id(m) not in candidates]
        if outside:
            for n, m in users:
                if id(m) in candidates:
                    del candidates[id(m)]
                    report.dense[n] = f"its weight is also used by {', '.join(outside)}, which stays dense"
    fusions = _activations(model, candidates, names) if fuse else {}
    groups: list = []
    if merge_siblings:
        fused = {name for name, (_, kind) in fusions.items() if kind is not None}
        groups, report.not_merged = find_sibling_groups(model, candidates, names, fused)
        if quantized:  # per-layer input and output scales (FP8: one weight scale) have no merged form
            report.not_merged.update((group.label, f"{mode} layers keep scales of their own: merged in 'fp16' "
                                      f"and 'bf16' only") for group in groups)
            groups = []
        if state_dict is not None:
            for group in [g for g in groups if f"{g.merged}.values" not in state_dict]:
                report.not_merged[group.label] = (f"the state dict has no {group.merged}.values: saved without "
                                                  f"merge_siblings, it holds the members one by one")
                groups.remove(group)
    members = {id(mod): group for group in groups for mod in group.modules}
    for act_name, kind in fusions.values():
        if kind is None:
            report.not_fused[act_name] = ("GELU runs as a separate float32 step after the product here, slower than "
                                          "PyTorch's own GELU kernel: left to PyTorch")
    inputs: dict = {key: [] for key in candidates}
    if quantized and state_dict is None:
        hooks = [mod.register_forward_pre_hook(lambda m, args, key=key: inputs[key].append(args[0].detach()))
                 for key, (_, mod) in candidates.items()]
        try:
            with torch.no_grad():
                for x in calibration:
                    model(x)
        finally:
            for hook in hooks:
                hook.remove()
    for key, (name, mod) in candidates.items():
        conv = isinstance(mod, torch.nn.Conv2d)
        activation = None
        fused = fusions.get(name)
        if fused is not None and fused[1] is not None:
            activation = fused[1]
        options = dict(layer_options, activation=activation, conv=conv, autotune=autotune)
        if activation != "relu":  # ReLU bounds are options of fused ReLUs only
            options.pop("relu_upper_bound", None)
            options.pop("relu_threshold", None)
        if state_dict is not None and key in members:
            # an empty layer of the member's shape, to be concatenated into the merged one the state fills
            new = SparseLinear(mod.in_features, mod.out_features, mod.bias is not None, mode=mode,
                               device=mod.weight.device, **options)
        elif state_dict is not None:
            new = _from_state(mod, name, mode, state_dict, options)
            if new is None:
                report.dense[name] = "dense in the state dict (left dense when it was sparsified)"
                continue
        else:
            weight = mod.weight.detach()
            weight = weight.reshape(weight.shape[0], weight.shape[1]) if conv else weight
            already = hasattr(mod, MASK_NAME) or is_2to4(_arrays.to_numpy(weight.float()), axis=-1)
            batches = None
            if quantized:
                batches = [x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if conv else x.reshape(-1, x.shape[-1])
                           for x in inputs.pop(key)]
                if not batches:
                    report.dense[name] = "not called on the calibration inputs: no scale for its input"
                    continue
            new = SparseLinear.from_dense(weight, mod.bias, mode=mode, prune=None if already else prune,
                                          calibration=batches, **options)
        for full in names[key]:
            parent_name, _, child = full.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
        if activation is not None:
            act_name = fused[0]
            parent_name, _, child = act_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, torch.nn.Identity())
            report.fused.append(f"{name} + {act_name}")
        report.replaced.append(name)
    for group in groups:
        _merge(group, layer_options, autotune)
        report.merged[group.merged] = group.names
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    if warm_up:
        for mod in model.modules():  # each module once, however often it is registered
            if isinstance(mod, SparseLinear):
                mod.warm_up(warm_up)
    return report


def _merge(group: Any, layer_options: dict, autotune: Any) -> None:
    """Put in place of the group's (sparse, already made) members one :class:`SparseLinear` of their concatenated
    state, registered as the parent's ``merged_...`` child, and a :class:`SiblingProjection` of it for each."""
    parts = [getattr(group.parent, child) for child in group.children]
    first = parts[0]
    options = dict(layer_options, autotune=autotune)
    options.pop("relu_upper_bound", None)  # options of fused ReLUs only, and no member has one
    options.pop("relu_threshold", None)
    merged = SparseLinear(first.in_features, sum(p.out_features for p in parts), first.bias is not None,
                          mode=first.mode, device=first.values.device, **options)
    with torch.no_grad():  # the compact form is per output feature: rows concatenate as they are
        merged.values.copy_(torch.cat([p.values for p in parts]))
        merged.indices.copy_(torch.cat([p.indices for p in parts]))
        if merged.bias is not None:
            merged.bias.copy_(torch.cat([p.bias for p in parts]))
    setattr(group.parent, merged_name(group.children), merged)
    start = 0
    for child, part in zip(group.children, parts, strict=True):
        setattr(group.parent, child, SiblingProjection(merged, start, start + part.out_features))
        start += part.out_features


def _from_state(mod: Any, name: str, mode: str, state_dict: Mapping[str, torch.Tensor],
                options: dict) -> SparseLinear | None:
    """An empty sparse layer shaped as ``mod`` (filled by the final ``load_state_dict``), checked against the
    state's entries for ``name``; None where the state holds the layer dense."""
    out_features, in_features = mod.weight.shape[:2]
    prefix = f"{name}." if name else ""
    if prefix + "values" not in state_dict and prefix + "weight" in state_dict:
        return None
    if prefix + "values" not in state_dict:
        raise KeyError(f"state_dict: no '{prefix}values' for layer {name!r} (a state dict saved after sparsify "
                       f"holds values and indices for every sparse layer)")
    values = state_dict[prefix + "values"]
    if values.dtype != _VALUE_DTYPES[mode]:
        raise ValueError(f"state_dict: '{prefix}values' is {values.dtype}, a {mode!r} layer keeps "
                         f"{_VALUE_DTYPES[mode]}: sparsify with the mode the state was saved with")
    has_bias = prefix + "bias" in state_dict
    return SparseLinear(in_features, out_features, has_bias, mode=mode, device=mod.weight.device, **options)

"""A PyTorch model run sparse: :class:`SparseLinear`, an ``nn.Module`` whose 2:4 weight lives in buffers PyTorch
knows (``pycusparselt.torch.conversion``'s ``sparsify`` puts it in place of a model's layers).

The module's state is its compact weight (:mod:`pycusparselt.torch.compact`: the kept values and their positions),
its bias and, for INT8 and FP8, its scales: ``state_dict``, ``load_state_dict``, ``torch.save`` of the model,
``copy.deepcopy``, ``.to()`` / ``.cuda()`` / ``.cpu()`` and ``safetensors.torch.save_model`` all work on it. The
product runs through a :class:`pycusparselt.SparseLinear` (cuSPARSELt on the GPU, the NumPy reference on the
CPU) made from that state on the first call and again after the state moves or changes; it is a cache, never
saved. Inputs of 1 to 16 rows run on the decode kernel reading the state where it is, where that kernel serves
the layer (``pycusparselt.nn.small_batch`` chooses): then the state is the weight's only copy. Eager calls go
straight to the product; under ``torch.compile``, ``torch.export`` and ``torch.fx`` tracing the product is the
custom operator ``torch.ops.pycusparselt.linear``.
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from .. import _arrays
from .._native import gpu
from ..errors import ClosedError
from ..gemm import decode
from ..nn import layer_values, small_batch
from ..nn.linear import MODES
from ..nn.linear import SparseLinear as NativeLinear
from . import compact

__all__ = ["SparseLinear", "SparseLinearModule", "VALUE_DTYPES", "QUANTIZED_MODES"]

_live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # layer_id -> SparseLinear, for the operator
_ids = itertools.count(1)

#: The dtype each mode keeps its values in (FP8 as its bytes: ``.half()`` must not convert them).
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.uint8}
QUANTIZED_MODES = ("int8", "fp8")
_STATE = ("values", "indices", "bias", "weight_scale", "input_scale", "output_scale")  # the buffers
#: Prepared entries a module keeps (one per input shape, stream and device) before it starts again, as the
#: layer's routes do: a model fed inputs of many lengths keeps a bounded number of stages.
_MAX_DIRECT = 64
_current_device = torch.cuda.current_device


class _Prepared(NamedTuple):
    """What a repeated eager call with one input shape launches (:meth:`SparseLinear.product`)."""

    launch: Any  # launch(x_ptr, y_ptr, stream_ptr)
    stage: int | None  # where inputs are copied first (fewer rows than the product reads), or None
    copy: Any  # cudaMemcpyAsync, where there is a stage
    kind: Any  # its direction
    nbytes: int  # bytes copied
    shape: tuple  # the output as allocated
    rows: int  # the input's rows (the output's leading rows, where there is a stage)
    view: tuple | None  # the shape returned, where not ``shape``
    stage_buffer: Any = None  # the stage's memory, alive while an entry uses it


_version = operator.attrgetter("_version")  # a tensor's count of in-place changes
_address = torch.Tensor.data_ptr


def _versions(buffers: tuple) -> tuple:
    """The buffers' counts of in-place changes, then their addresses (``buf.data = other`` changes the memory
    without counting a change); None for inference tensors (made under ``torch.inference_mode``), which count
    none: their in-place edits are not seen."""
    try:
        return tuple(map(_version, buffers)) + tuple(map(_address, buffers))
    except RuntimeError:
        return tuple(None if buf.is_inference() else buf._version for buf in buffers) + tuple(
            map(_address, buffers))


def _module_for(layer_id: int) -> SparseLinear:
    module = _live.get(layer_id)
    if module is None:
        raise ValueError(f"layer_id: no live pycusparselt.torch.SparseLinear has id {layer_id} (ids come from "
                         f"SparseLinear.layer_id; the module may have been deleted)")
    return module


def _product(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    return _module_for(layer_id).product(x)


def _fake_product(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    module = _module_for(layer_id)
    return x.new_empty((x.shape[0], module.out_features), dtype=module.output_dtype)


# The operator compiled and exported graphs call: registered with the dispatcher directly, as a kernel per
# backend (torch.library.custom_op's wrapper costs about 6 us more per call, which a compiled model pays at
# every layer). Inference only, as the eager call: autograd falls through, so its result carries no gradient
# (and no autograd fallback warns of a backward that would silently give none).
_LIBRARY = torch.library.Library("pycusparselt", "FRAGMENT")
_LIBRARY.define("linear(Tensor x, int layer_id) -> Tensor")
for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("linear", _product, _key)
_LIBRARY.impl("linear", torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("pycusparselt::linear", _fake_product, lib=_LIBRARY)
_linear_op = torch.ops.pycusparselt.linear.default


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
        quantized = mode in QUANTIZED_MODES
        self.register_buffer("values", torch.zeros((out_features, in_features // 2), dtype=VALUE_DTYPES[mode],
                                                   device=device))
        # all-zero groups keep positions 0 and 1 (nibble 0x4); a last odd group leaves its byte's high nibble 0
        indices = torch.full((out_features, -(-in_features // 8)), 0x44, dtype=torch.uint8, device=device)
        if in_features % 8:
            indices[:, -1] = 0x04
        self.register_buffer("indices", indices)
        bias_dtype = torch.float32 if quantized else VALUE_DTYPES[mode]
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        if quantized:
            scales = (out_features,) if mode == "int8" else ()
            self.register_buffer("weight_scale", torch.ones(scales, dtype=torch.float32, device=device))
            self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device))
            self.register_buffer("output_scale", torch.zeros((), dtype=torch.float32, device=device))
        self._native: NativeLinear | None = None
        self._small: small_batch.LayerDecoder | bool | None = None  # 1-16 rows on the compact form; False: not
        self._generation: object | None = None  # what the caches were made from; None: make them again
        self._direct: dict = {}
        self._stages: dict = {}  # (padded rows, stream, device) -> the stage of prepared calls
        self._dtype = torch.float16 if quantized else VALUE_DTYPES[mode]  # what the product reads
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
        if mode in QUANTIZED_MODES and calibration is None:
            raise ValueError(f"calibration: a {mode} layer needs example inputs to choose its input scale")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, mode=mode, device=weight.device, **options)
        native = NativeLinear(_arrays.to_numpy(weight), None if bias is None else _arrays.to_numpy(bias.detach()),
                              mode=mode, prune=prune, autotune=False, activation=module.activation,
                              relu_upper_bound=module.relu_upper_bound, relu_threshold=module.relu_threshold,
                              out_dtype=module._numpy_out_dtype(), fp8_format=module.fp8_format)
        if calibration is not None and mode in QUANTIZED_MODES:
            native.calibrate([_arrays.to_numpy(x.detach().reshape(-1, in_features).float()) for x in calibration])
        module._fill_from(native)
        return module

    def _fill_from(self, native: NativeLinear) -> None:
        """The state of a host (reference) layer's pruned, or quantized, weight."""
        with torch.no_grad():
            if self.mode in QUANTIZED_MODES:
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
        self._forget()

    # -- state ---------------------------------------------------------------------------------------

    def _register(self) -> None:
        self.layer_id = next(_ids)
        _live[self.layer_id] = self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_native"] = state["_small"] = state["_generation"] = None  # the GPU's caches: never copied
        state["_watched"], state["_built_from"], state["_direct"], state["_stages"] = (), (), {}, {}
        state["_shared"] = None  # a product of one input of this process (and a weak reference): not state
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._forget()
        self._shared = None
        self._register()  # a copy is a module of its own

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _STATE and "_generation" in self.__dict__:  # a buffer replaced, not edited: made again
            self._forget()

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        # a sparse layer computes in its mode: dtype conversions of the model (.half(), .to(dtype)) leave its
        # buffers' dtypes as they were; device moves apply
        before = dict(self.named_buffers(recurse=False))
        result = super()._apply(fn, recurse)
        for name, new in self.named_buffers(recurse=False):
            old = before[name]
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        self._forget()
        self._shared = None
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            if self.values.dtype != VALUE_DTYPES[self.mode]:
                raise ValueError(f"{prefix}values: a {self.mode!r} layer keeps {VALUE_DTYPES[self.mode]}, got "
                                 f"{self.values.dtype}")
            compact.check_pair(self.values, self.indices, self.out_features, self.in_features, prefix.rstrip("."))
            if self.mode in QUANTIZED_MODES:
                _check_scales(self, prefix.rstrip("."))
        except ValueError as exc:
            error_msgs.append(str(exc))
        self._forget()

    def _numpy_out_dtype(self) -> Any:
        return None if self.out_dtype is None else _arrays.dtype_of(torch.empty(0, dtype=self.out_dtype))

    def _output_dtype(self) -> torch.dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        return torch.float16 if self.mode in QUANTIZED_MODES else VALUE_DTYPES[self.mode]

    @property
    def weight(self) -> torch.Tensor:
        """The dense 2:4 weight (out_features, in_features), made from the compact state (a new tensor; the
        quantized modes give their quantized values, FP8 as bytes)."""
        return compact.unpack(self.values, self.indices, self.in_features)

    # -- running -------------------------------------------------------------------------------------

    def _forget(self) -> None:
        """Drop what was made from the state (the state was replaced, moved or loaded), and what it holds."""
        self._native = self._small = self._generation = None
        # (input shape, stream, device) -> a _Prepared, or False: the checked call; the stages of prepared calls
        self._direct, self._stages = {}, {}

    def _current(self) -> object:
        """The caches' generation: the caches made from the state are dropped first where the state was
        replaced, moved, loaded or edited in place since."""
        if self._generation is None or self._built_from != _versions(self._watched):
            self._forget()
            self._watched = tuple(buf for _, buf in self.named_buffers(recurse=False))
            self._generation = object()
            self._built_from = _versions(self._watched)
        return self._generation

    def native(self) -> NativeLinear:
        """The :class:`pycusparselt.SparseLinear` that runs the product on the buffers' device, made on first use
        and again after ``.to()``, ``load_state_dict`` or an in-place edit of the buffers. Inputs of 1 to 16 rows
        may not need it (:meth:`product`)."""
        self._current()
        if self._native is None:
            self._native = self._build_native()
        return self._native

    @property
    def product_nbytes(self) -> int:
        """GPU bytes held beside the state by what runs the product: the :class:`pycusparselt.SparseLinear`'s
        dense weight (and quantized copy) and its compressed weights, once it is made (an input of more than 16
        rows, or a layer the decode kernel does not serve). 0 while the decode kernel on the compact state has
        served every input (its split-K workspace, a few FP32 partial sums per output, is not counted)."""
        native = self._native
        if native is None or not native.on_device:
            return 0
        copies = [native.weight] + ([] if native.weight_q is None else [native.weight_q])
        return sum(int(c.nbytes) for c in copies) + native.compressed_nbytes

    @property
    def small_batch_choices(self) -> dict[tuple[int, int], small_batch.Choice]:
        """What serves inputs of 1 to 16 rows, per bucket of rows (``(1, 8)``, ``(9, 16)``): the decode kernel
        on the compact state or cuSPARSELt (:class:`pycusparselt.nn.small_batch.Choice`), once a small input has
        chosen; empty before, and for layers the kernel does not serve."""
        if not self._small:
            return {}
        return {small_batch.BUCKETS[b]: choice for b, choice in sorted(self._small.choices.items())}

    @property
    def prepared_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes whose calls launch a prepared product directly, in the order first prepared (on any
        stream): a repeated call with one of them makes only identity checks."""
        return list(dict.fromkeys(tuple(key[0]) for key, entry in self._direct.items() if entry))

    @property
    def stage_nbytes(self) -> int:
        """Bytes of the stages the prepared products hold: an input of fewer rows than its product reads is
        copied into one (one per padded size and stream)."""
        return sum(stage.nbytes for stage in self._stages.values())

    def _small_reason(self) -> str | None:
        """None where inputs of 1 to 16 rows can run on the decode kernel reading the compact state where it is
        (no other copy of the weight); else why not."""
        reason = small_batch.unsupported_reason(
            on_device=self.values.is_cuda, quantized=self.mode in QUANTIZED_MODES,
            dtype=_arrays.dtype_of(self.values), post=self.activation == "gelu", device=self.values.device.index)
        if reason is not None:
            return reason
        if self.out_dtype not in (None, self._dtype):
            return f"out_dtype {self.out_dtype}"
        if self.in_features % decode.COMPACT_K_MULTIPLE:
            return f"in_features {self.in_features} is not a multiple of {decode.COMPACT_K_MULTIPLE}"
        want = (self.out_features, self.in_features // 2), (self.out_features, self.in_features // 8)
        if (tuple(self.values.shape), tuple(self.indices.shape)) != want:  # buffers replaced by others
            return f"values and indices have shapes {tuple(self.values.shape)} and {tuple(self.indices.shape)}"
        if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (self.values, self.indices)):
            return "values or indices are not contiguous and 16-byte aligned"
        return None

    def _small_launcher(self, rows: int, sp: int) -> Any:
        """The decode kernel's launcher on the compact state for ``rows`` (1..16) rows on stream ``sp`` where it
        serves them (:class:`pycusparselt.nn.small_batch.LayerDecoder`: memory first, the split of K timed),
        else None."""
        if self._small is None:
            self._small = self._small_reason() is None and small_batch.LayerDecoder.for_compact(
                self.values, self.indices, self.bias, in_features=self.in_features, activation=self.activation,
                relu_threshold=self.relu_threshold, relu_upper_bound=self.relu_upper_bound,
                device=self.values.device.index, tune=self.autotune is not False)
        if not self._small:
            return None
        with torch.cuda.device(self.values.device):
            return self._small.launcher(rows, sp, lambda: None)  # never timed against cuSPARSELt

    def _build_native(self) -> NativeLinear:
        on_device = self.values.is_cuda
        dense = compact.unpack(self.values, self.indices, self.in_features)
        options = dict(activation=self.activation, relu_upper_bound=self.relu_upper_bound,
                       relu_threshold=self.relu_threshold, autotune=self.autotune, out_dtype=self._numpy_out_dtype())
        if self.mode in QUANTIZED_MODES:
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

        The first call with an input shape on a stream is checked in full by the
        :class:`pycusparselt.SparseLinear` beneath; later ones (C-contiguous, 16-byte aligned, of the layer's
        dtype, with the input's device current) launch the prepared product directly. Another number of
        dimensions raises ValueError (:meth:`forward` takes any). Inputs of 1 to 16 rows
        of the layer's dtype run on the decode kernel reading the compact state where it is, when the kernel
        can serve the layer and is chosen (:mod:`pycusparselt.nn.small_batch`); then nothing else holds the
        weight.
        """
        if x.dim() != 2:
            raise ValueError(f"x: expected (rows, {self.in_features}), got shape {tuple(x.shape)}")
        if x.is_cuda:
            device = x.get_device()
            sp = _arrays.current_stream(x, device)
            y = self._prepared(x, sp, device)
            if y is not None:
                return y
        self._current()
        if not x.is_cuda:
            return _arrays.host_tensor(self.native()(_arrays.to_numpy(x)))
        if not x.is_contiguous():
            x = x.contiguous()
            y = self._prepared(x, sp, device)
            if y is not None:
                return y
        rows = x.shape[0]
        key = (x.shape, sp, device)  # stream 0 is every device's default stream
        known = key in self._direct  # prepared, or found to need more than the product: nothing to make
        keep = not known and x.dtype is self._dtype and not torch.cuda.is_current_stream_capturing()
        if (0 < rows <= small_batch.BUCKETS[-1][1] and x.dtype is self._dtype and x.shape[1] == self.in_features
                and device == self.values.get_device()):
            launch = self._small_launcher(rows, sp)
            if launch is not None:  # the decode kernel on the compact state: no other copy of the weight
                shape = (rows, self.out_features)
                y = torch.empty(shape, dtype=self.output_dtype, device=x.device)
                launch(x.data_ptr(), y.data_ptr(), sp)
                if keep:
                    self._keep_direct(key, _Prepared(launch, None, None, None, 0, shape, rows, None))
                return y
        native = self.native()
        y = native(x)  # checks x in full; makes (and tunes) the product for this shape
        if keep:  # made outside graph capture only: its stage is then zeroed now, not at each replay
            self._keep_direct(key, self._direct_entry(native, rows, sp, x.device))
        return y

    def _prepared(self, x: torch.Tensor, sp: int, device: int) -> torch.Tensor | None:
        """``x``'s result from the product prepared by a checked call with an input of ``x``'s shape on stream
        ``sp``, launched directly where ``x`` is as that input was (the product's dtype, C-contiguous, 16-byte
        aligned, its device current) and the state is unchanged since; else None (the checked path decides).
        The identity checks are all a repeated call makes."""
        entry = self._direct.get((x.shape, sp, device))
        if (not entry or x.dtype is not self._dtype or not x.is_contiguous() or x.data_ptr() % 16
                or _current_device() != device or self._built_from != _versions(self._watched)):
            return None
        launch, stage, copy, kind, nbytes, shape, rows, view, _ = entry
        y = x.new_empty(shape, dtype=self.output_dtype)
        try:
            if stage is None:
                launch(x.data_ptr(), y.data_ptr(), sp)
            else:  # the copy is issued on the current device's stream
                copy(stage, x.data_ptr(), nbytes, kind, sp)
                launch(stage, y.data_ptr(), sp)
                y = y[:rows]
        except ClosedError:  # the product's plans were closed (native().close()): made again by the checked path
            self._direct.clear()
            self._stages.clear()
            return None
        return y if view is None else y.view(view)

    def _keep_direct(self, key: tuple, entry: _Prepared | bool) -> None:
        if len(self._direct) >= _MAX_DIRECT:  # many sizes (prompts of every length): start again
            self._direct.clear()
            self._stages.clear()
        self._direct[key] = entry

    def _direct_entry(self, native: NativeLinear, rows: int, sp: int, device: torch.device) -> _Prepared | bool:
        """What :meth:`product` needs to launch the prepared product for ``rows`` rows on stream ``sp``
        directly, or False where a call needs more (:meth:`pycusparselt.SparseLinear.direct_launcher`)."""
        found = native.direct_launcher(rows, sp)
        if found is None:
            return False
        launch, padded = found
        if padded == rows:
            return _Prepared(launch, None, None, None, 0, (padded, self.out_features), rows, None)
        # inputs of fewer rows than the product reads are copied (one cudaMemcpyAsync on the stream) into a
        # stage of the product's rows, one per padded size and stream: rows past an input's hold zeros or an
        # earlier input's values, whose results are not returned. CuPy's memory, not PyTorch's: a stage made
        # while torch.compile's CUDA graphs warm up must not be a live tensor of their memory pool
        cupy = gpu.cupy()
        stage = self._stages.get((padded, sp, device.index))
        if stage is None:
            with cupy.cuda.Device(device.index):
                stage = self._stages[(padded, sp, device.index)] = cupy.empty(padded * self._row_bytes, np.uint8)
                cupy.cuda.runtime.memsetAsync(stage.data.ptr, 0, stage.nbytes, sp)
        runtime = cupy.cuda.runtime
        # the entry holds the stage too: clearing _stages (at _MAX_DIRECT entries) must not free what it uses
        return _Prepared(launch, stage.data.ptr, runtime.memcpyAsync, runtime.memcpyDeviceToDevice,
                         rows * self._row_bytes, (padded, self.out_features), rows, None, stage)

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
        if not x.is_cuda:
            return self.product(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        device = x.get_device()
        sp = _arrays.current_stream(x, device)
        y = self._prepared(x, sp, device)  # any shape (..., in_features): no reshape, no view, a repeated call
        if y is not None or x.dim() == 2:
            return self.product(x) if y is None else y
        flat = x.reshape(-1, self.in_features)
        y = self.product(flat).view(*x.shape[:-1], self.out_features)
        entry = self._direct.get((flat.shape, sp, device))
        if entry and (x.shape, sp, device) not in self._direct:  # the 2-D shape's product serves x's shape too
            # allocated in x's shape where the product writes the output itself, viewed where a stage pads it
            self._keep_direct((x.shape, sp, device), entry._replace(shape=y.shape) if entry.stage is None
                              else entry._replace(view=y.shape))
        return y

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
        generation = self._current()
        key = _input_key(x)
        last = self._shared
        if (key is not None and last is not None and last.source() is x and last.key == key
                and last.generation is generation and _version(last.product) == last.product_version
                and reader not in last.readers):
            last.readers.add(reader)
            return last.product
        y = self.forward(x)
        self._shared = None if key is None or y.is_inference() else \
            _Shared(weakref.ref(x), key, generation, y, _version(y), {reader})
        return y

    def warm_up(self, rows: Iterable[int]) -> None:
        """Prepare (and tune, where ``autotune``) the product for inputs of these numbers of rows, so that the
        first call with them costs what any call does. Rows of 1 to 16 share one prepared product."""
        device = self.values.device
        dtype = torch.float16 if self.mode in QUANTIZED_MODES else VALUE_DTYPES[self.mode]
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
    generation: object  # the caches' generation it was made in: a new one (new state) makes it stale
    product: torch.Tensor
    product_version: int
    readers: set


def _input_key(x: torch.Tensor) -> tuple | None:
    """What must be the same for a kept product to be ``x``'s: None where ``x`` counts no in-place edits."""
    if x.is_inference():
        return None
    if x.is_cuda:
        stream = _arrays.current_stream(x, x.get_device())
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

"""A PyTorch model run sparse: ``nn.Linear`` (and 1x1 ``nn.Conv2d``) layers replaced by modules backed by
:class:`pycusparselt.SparseLinear`, callable from eager code, ``torch.cuda.graph`` capture and
``torch.compile(fullgraph=True)`` (the product is the custom operator ``torch.ops.pycusparselt.linear``)."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import _arrays
from ..nn.linear import MODES, SparseLinear
from ..reference import is_2to4
from .pruning import MASK_NAME

__all__ = ["SparsifyReport", "sparsify"]  # and SparseLinearModule, made on first use (see __getattr__)

_layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> SparseLinear, for the operator
_ids = itertools.count(1)
_operator: list = []  # [the registered custom operator], made on first use


def _op() -> Any:
    """``torch.ops.pycusparselt.linear(x, layer_id)``: registered once, with a shape-only (fake) version for
    ``torch.compile``."""
    if _operator:
        return _operator[0]
    import torch

    # the schema is spelled out: annotations are strings here (from __future__ import annotations)
    @torch.library.custom_op("pycusparselt::linear", mutates_args=(), schema="(Tensor x, int layer_id) -> Tensor")
    def linear(x: torch.Tensor, layer_id: int) -> torch.Tensor:
        layer = _layers[layer_id]
        if x.is_cuda:
            return layer(x.contiguous())  # a tensor allocated by PyTorch on its current stream
        return _arrays.host_tensor(layer(_arrays.to_numpy(x.contiguous())))

    @linear.register_fake
    def _(x: torch.Tensor, layer_id: int) -> torch.Tensor:
        layer = _layers[layer_id]
        return x.new_empty((x.shape[0], layer.out_features), dtype=_arrays.torch_dtype(layer.out_dtype))

    _operator.append(linear)
    return linear


def _module_class() -> type:
    import torch

    class _SparseLinearModule(torch.nn.Module):
        """``y = activation(x @ W.T + b)`` through a :class:`~pycusparselt.SparseLinear` (2:4 weight) on inputs
        of shape (..., in_features); for a 1x1 convolution (``conv=True``) on (N, C, H, W)."""

        def __init__(self, layer: SparseLinear, conv: bool = False) -> None:
            super().__init__()
            self.layer = layer
            self.in_features, self.out_features, self.conv = layer.in_features, layer.out_features, conv
            self.layer_id = next(_ids)
            _layers[self.layer_id] = layer
            _op()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.conv:  # (N, C, H, W) -> (N*H*W, C): the GEMM of a 1x1 convolution
                n, _, h, w = x.shape
                y = torch.ops.pycusparselt.linear(x.permute(0, 2, 3, 1).reshape(-1, self.in_features),
                                                  self.layer_id)
                return y.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2)
            lead = x.shape[:-1]
            y = torch.ops.pycusparselt.linear(x.reshape(-1, self.in_features), self.layer_id)
            return y.reshape(*lead, self.out_features)

        def extra_repr(self) -> str:
            return f"{self.layer!r}{', conv 1x1' if self.conv else ''}"

    return _SparseLinearModule


_classes: list = []


def _cls() -> type:
    if not _classes:
        _classes.append(_module_class())
    return _classes[0]


@dataclass
class SparsifyReport:
    """What :func:`sparsify` replaced, and what it left dense (with the reason)."""

    replaced: list = field(default_factory=list)
    dense: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"sparse: {', '.join(self.replaced) or 'nothing'}"]
        return "\n".join(lines + [f"dense: {name} ({why})" for name, why in self.dense.items()])


def _why_dense(mod: Any) -> str | None:
    import torch

    if isinstance(mod, torch.nn.Conv2d):
        if mod.kernel_size != (1, 1) or mod.stride != (1, 1) or mod.padding not in ((0, 0), "valid") \
                or mod.dilation != (1, 1) or mod.groups != 1:
            return "a convolution other than 1x1 (stride 1, no padding, ungrouped) is not a single GEMM"
    inputs = mod.weight.shape[1]
    if inputs % 4:
        return f"{inputs} input features: not a multiple of 4"
    return None


def sparsify(
    model: Any,
    mode: str = "fp16",
    *,
    calibration: Iterable[Any] | None = None,
    prune: str = "strip",
    autotune: bool | dict = True,
    **layer_options: Any,
) -> SparsifyReport:
    """Replace ``model``'s ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers by ``SparseLinearModule`` in place.

    Parameters
    ----------
    model : torch.nn.Module
        On the GPU for cuSPARSELt (CPU models run the NumPy reference: for checking, not speed).
    mode : {"fp16", "bf16", "int8", "fp8"}
        The type the products read (:class:`~pycusparselt.SparseLinear`'s ``mode``). "fp16"/"bf16" layers take
        inputs of that type (convert the model first, e.g. ``model.half()``); "int8"/"fp8" layers quantize float
        inputs with the scales calibrated on ``calibration``.
    calibration : iterable of inputs, optional
        Example inputs of ``model`` (each passed as ``model(x)``), needed by "int8" and "fp8": every replaced
        layer's scales come from what it receives on them.
    prune : {"strip", "tile"}
        How to prune weights that are not already 2:4 along their inputs (layers pruned by
        :func:`prune_trained_model` are used as they are).
    autotune, **layer_options
        Passed to every :class:`~pycusparselt.SparseLinear`.

    Returns
    -------
    SparsifyReport
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    quantized = mode in ("int8", "fp8")
    if quantized and calibration is None:
        raise ValueError(f"calibration: a {mode} model needs example inputs to choose its scales")
    report = SparsifyReport()
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            why = _why_dense(mod)
            if why is None:
                targets.append((name, mod))
            else:
                report.dense[name] = why
    inputs: dict = {name: [] for name, _ in targets}
    if quantized:
        hooks = [mod.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
                 for name, mod in targets]
        try:
            with torch.no_grad():
                for x in calibration:
                    model(x)
        finally:
            for hook in hooks:
                hook.remove()
    for name, mod in targets:
        conv = isinstance(mod, torch.nn.Conv2d)
        weight = mod.weight.detach()
        weight = weight.reshape(weight.shape[0], weight.shape[1]) if conv else weight
        bias = None if mod.bias is None else mod.bias.detach()
        host = weight.to("cpu", torch.float32).numpy()
        already = hasattr(mod, MASK_NAME) or is_2to4(host, axis=-1)
        if not weight.is_cuda:
            weight, bias = _arrays.to_numpy(weight), None if bias is None else _arrays.to_numpy(bias)
        layer = SparseLinear(weight, bias, mode=mode, prune=None if already else prune, autotune=autotune,
                             **layer_options)
        if quantized:
            batches = [x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if conv else x.reshape(-1, x.shape[-1])
                       for x in inputs.pop(name)]
            layer.calibrate([b if b.is_cuda else _arrays.to_numpy(b) for b in batches])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _cls()(layer, conv=conv))
        report.replaced.append(name)
    return report


def __getattr__(name: str) -> Any:
    """``SparseLinearModule``: a ``torch.nn.Module`` subclass, so it is made when first asked for (this module
    imports PyTorch only then)."""
    if name == "SparseLinearModule":
        return _cls()
    raise AttributeError(name)


"""Putting :class:`pycusparselt.torch.SparseLinear` in place of a model's layers: :func:`sparsify` (pruning,
fusing the activation that only a layer feeds, merging sibling projections, or loading a sparse state dict) and
the :class:`SparsifyReport` of what it did and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import _arrays
from ..nn.linear import MODES
from ..reference import is_2to4
from .channels import shared_weights
from .modules import QUANTIZED_MODES, VALUE_DTYPES, SparseLinear
from .pruning import MASK_NAME
from .siblings import SiblingProjection, find_sibling_groups, merged_name

__all__ = ["SparsifyReport", "sparsify"]


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
    quantized = mode in QUANTIZED_MODES
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
    if values.dtype != VALUE_DTYPES[mode]:
        raise ValueError(f"state_dict: '{prefix}values' is {values.dtype}, a {mode!r} layer keeps "
                         f"{VALUE_DTYPES[mode]}: sparsify with the mode the state was saved with")
    has_bias = prefix + "bias" in state_dict
    return SparseLinear(in_features, out_features, has_bias, mode=mode, device=mod.weight.device, **options)

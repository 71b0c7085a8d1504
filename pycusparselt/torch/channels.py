"""Channel permutations applied to a whole PyTorch network, proven function-preserving on its torch.fx graph.

A permutation of a hidden channel space changes nothing the network computes when every layer that writes
those channels permutes its outputs (weight rows, bias, and the parameters of a BatchNorm or LayerNorm on the
way) and every layer that reads them permutes its inputs (weight columns) the same way. This module finds
such spaces on the graph :func:`torch.fx.symbolic_trace` gives:

- a space starts at the outputs of ``nn.Linear`` / ``nn.Conv2d`` layers (its *producers*);
- it flows through channel-wise operations: elementwise activations and dropout (modules, functions or tensor
  methods), ``nn.BatchNorm1d/2d``, ``nn.LayerNorm`` over the channel dimension, additions and
  multiplications with scalars, and additions and products of two tensors (a residual add, or the gate of a
  gated MLP, joins the two spaces: both get one permutation);
- it ends at the inputs of ``nn.Linear`` / ``nn.Conv2d`` layers (its *consumers*: weights pruned 2:4 along
  these channels, so the permutation is searched on them).

A space is permuted only if all of it is proven: anything else that touches it (a reshape, a matmul, a module
or function not listed above, the network's input or output, a layer shared between two places, grouped
convolutions, producers and consumers that disagree on the channel dimension) makes it *skipped*, with the
reason in the report.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..nn.permutation import PermutationReport, find_permutation

__all__ = ["ChannelSpace", "PermutationPlan", "find_channel_spaces", "permute_network", "shared_weights"]


@dataclass
class ChannelSpace:
    """One hidden channel space of a network: the layers that write it and read it."""

    channels: int
    producers: list = field(default_factory=list)  # qualified names of Linear/Conv2d writing it
    norms: list = field(default_factory=list)  # BatchNorm / LayerNorm names on the way
    consumers: list = field(default_factory=list)  # Linear/Conv2d names reading it
    skipped: str | None = None  # why it cannot be permuted, or None
    permutation: np.ndarray | None = None
    report: PermutationReport | None = None

    @property
    def name(self) -> str:
        return " + ".join(self.producers) or "<input>"


@dataclass
class PermutationPlan:
    """What :func:`permute_network` found and did: every channel space, permuted or skipped, and the parts of
    the model torch.fx could not trace (``untraced``: name -> the tracer's error; "" is the whole model), whose
    spaces were looked for in their submodules instead."""

    spaces: list
    untraced: dict = field(default_factory=dict)

    @property
    def permuted(self) -> list:
        return [s for s in self.spaces if s.skipped is None and s.permutation is not None]

    @property
    def skipped(self) -> list:
        return [s for s in self.spaces if s.skipped is not None]

    def __str__(self) -> str:
        lines = [f"not traced: {name or '<model>'} ({why})" for name, why in self.untraced.items()]
        for s in self.spaces:
            if s.skipped is not None:
                lines.append(f"skipped {s.name} -> {', '.join(s.consumers) or '?'}: {s.skipped}")
            elif s.report is not None:
                lines.append(f"permuted {s.name} -> {', '.join(s.consumers)}: kept magnitude "
                             f"{s.report.kept_before:.4g} -> {s.report.kept_after:.4g}")
        return "\n".join(lines)


def _torch() -> Any:
    import torch

    return torch


def _unary_functions() -> set:
    torch = _torch()
    F = torch.nn.functional
    return {F.relu, torch.relu, F.gelu, F.silu, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.leaky_relu,
            F.relu6, F.dropout, F.elu, F.hardswish, F.mish}


_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to"}


def _unary_modules() -> tuple:
    nn = _torch().nn
    return (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ReLU6, nn.Dropout, nn.Identity,
            nn.ELU, nn.Hardswish, nn.Mish)


class _Union:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)


def shared_weights(model: Any) -> dict:
    """Parameters used by more than one module of ``model`` (tied weights): ``{id(parameter): [(name, module),
    ...]}``, each module once, under the first name it is registered by."""
    users: dict = {}
    for name, mod in model.named_modules():
        for _, param in mod.named_parameters(recurse=False):
            users.setdefault(id(param), []).append((name, mod))
    return {key: mods for key, mods in users.items() if len(mods) > 1}


def _sharing(model: Any) -> tuple[dict, dict]:
    """How often each module of ``model`` is registered (by id), and the names of the modules using each tied
    parameter (:func:`shared_weights`)."""
    registered: dict = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        registered[id(mod)] = registered.get(id(mod), 0) + 1
    users = {key: [name for name, _ in mods] for key, mods in shared_weights(model).items()}
    return registered, users


def find_channel_spaces(model: Any) -> tuple[Any, list[ChannelSpace]]:
    """The traced graph module and the hidden channel spaces of ``model`` (see the module docstring)."""
    return _find(model, "", *_sharing(model))


def _find(model: Any, prefix: str, registered: dict, users: dict) -> tuple[Any, list[ChannelSpace]]:
    """:func:`find_channel_spaces` of a part of a larger model (``prefix``: its name there), whose module
    registrations and parameter users (:func:`_sharing`) count the whole model's."""
    torch = _torch()
    from torch import fx

    nn = torch.nn
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    unary_fn, unary_mod = _unary_functions(), _unary_modules()
    union = _Union()
    # per node producing a channel-space tensor: (space key, channel dim kind "last" or "1")
    info: dict = {}
    notes: dict = {}  # space root -> reason it is skipped
    members: dict = {}  # node -> list of (role, module name)
    uses: dict = {}
    for node in traced.graph.nodes:
        for arg in node.all_input_nodes:
            uses.setdefault(arg, []).append(node)

    def spoil(key: Any, why: str) -> None:
        notes.setdefault(union.find(key), why)

    def module_of(node: Any) -> Any:
        return modules.get(node.target) if node.op == "call_module" else None

    def is_layer(mod: Any) -> bool:
        return isinstance(mod, (nn.Linear, nn.Conv2d))

    def dim_kind(mod: Any) -> str:
        return "1" if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)) else "last"

    # Pass 1: what every node outputs (a space of its own when it is a producer, else its input's space)
    for node in traced.graph.nodes:
        mod = module_of(node)
        ins = [a for a in node.all_input_nodes if a in info]
        if node.op == "placeholder":
            continue
        if is_layer(mod):
            info[node] = (node, dim_kind(mod))
            union.find(node)
            members.setdefault(node, []).append(("producer", node.target))
            continue
        if not ins:
            continue
        key, kind = info[ins[0]]
        channelwise = (
            (mod is not None and isinstance(mod, unary_mod))
            or (node.op == "call_function" and node.target in unary_fn)
            or (node.op == "call_method" and node.target in _UNARY_METHODS)
        )
        if mod is not None and isinstance(mod, nn.BatchNorm2d):
            channelwise = True
            members.setdefault(node, []).append(("norm", node.target))
            if kind != "1":
                spoil(key, f"{node.target}: a BatchNorm2d on channels that are not dimension 1")
        elif mod is not None and isinstance(mod, nn.BatchNorm1d):
            # its channel dimension (1) is the last one only for 2-D inputs, which the graph does not show
            spoil(key, f"{node.target}: a BatchNorm1d (its channel dimension depends on the input's rank)")
        elif mod is not None and isinstance(mod, nn.LayerNorm):
            channelwise = True
            members.setdefault(node, []).append(("norm", node.target))
            if kind != "last" or len(mod.normalized_shape) != 1:
                spoil(key, f"{node.target}: a LayerNorm over more than the channel dimension")
        binary = node.op == "call_function" and node.target in (operator.add, torch.add, operator.mul, torch.mul,
                                                                operator.sub, torch.sub)
        if binary:
            tensors = [a for a in node.args if hasattr(a, "op")]
            for a in tensors:
                if a not in info:  # the network's input, or something not a channel space
                    for b in tensors:
                        if b in info:
                            spoil(info[b][0], f"{node.name}: added to the network's input or an untracked tensor")
                else:
                    union.join(info[a][0], key)
                    if info[a][1] != kind:
                        spoil(key, f"{node.name}: operands with the channel dimension in different places")
            channelwise = True
        if channelwise:
            info[node] = (key, kind)
    # Pass 2: how every space-carrying tensor is used
    for node, (key, kind) in info.items():
        for user in uses.get(node, []):
            mod = module_of(user)
            if is_layer(mod):
                if len(user.args) == 1 and not user.kwargs and user.args[0] is node:
                    members.setdefault(user, []).append(("consumer", user.target, key))
                    if dim_kind(mod) != kind:
                        spoil(key, f"{user.target}: reads the channels in another dimension")
                else:
                    spoil(key, f"{user.target}: reads the space other than as its only input")
            elif user in info:
                if mod is not None and user.args[0] is not node:  # a norm layer given it as a parameter
                    spoil(key, f"{user.target}: reads the space other than as its input")
            elif user.op == "output":
                spoil(key, "reaches the network's output")
            else:
                spoil(key, f"used by {user.op} {getattr(user.target, '__name__', user.target)}")
    spaces: dict = {}
    calls: dict = {}  # how often the graph calls each module
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node, roles in members.items():
        for role in roles:
            if role[0] == "producer":
                root = union.find(node)
            elif role[0] == "consumer":
                root = union.find(role[2])
            else:
                root = union.find(info[node][0])
            space = spaces.setdefault(root, ChannelSpace(0))
            getattr(space, role[0] + "s").append(role[1])
    for root, space in spaces.items():
        space.skipped = notes.get(root)
        sizes = {modules[p].out_features if isinstance(modules[p], nn.Linear) else modules[p].out_channels
                 for p in space.producers}
        space.channels = sizes.pop() if len(sizes) == 1 else 0
        if space.skipped is None and len(sizes) > 0:
            space.skipped = "producers of different widths"
        for name in space.producers + space.consumers + space.norms:
            mod = modules[name]
            if calls.get(name, 0) > 1 and space.skipped is None:
                space.skipped = f"{name} is used in more than one place"
            if registered.get(id(mod), 1) > 1 and space.skipped is None:
                space.skipped = f"{prefix}{name} is registered under more than one name"
            for _, param in mod.named_parameters(recurse=False):
                shared = [u for u in users.get(id(param), []) if u != prefix + name]
                if shared and space.skipped is None:
                    space.skipped = f"{prefix}{name} shares a parameter with {', '.join(shared)} (tied weights)"
            if isinstance(mod, nn.Conv2d) and mod.groups != 1 and space.skipped is None:
                space.skipped = f"{name}: a grouped convolution"
        if space.skipped is None and not space.consumers:
            space.skipped = "no layer reads it"
        if space.skipped is None and space.channels % 4:
            space.skipped = f"{space.channels} channels: not a multiple of 4"
        if prefix:
            for role in ("producers", "consumers", "norms"):
                setattr(space, role, [prefix + n for n in getattr(space, role)])
    return traced, list(spaces.values())


def _spaces(model: Any) -> tuple[list[ChannelSpace], dict]:
    """The channel spaces of ``model``; where torch.fx cannot trace a module (a Hugging Face model's control
    flow, say), those of each of its children instead, recursively. Returns (spaces, {untraced name: error})."""
    torch = _torch()
    registered, users = _sharing(model)
    spaces: list = []
    untraced: dict = {}
    pending = [("", model)]
    while pending:
        name, mod = pending.pop(0)
        try:
            spaces.extend(_find(mod, f"{name}." if name else "", registered, users)[1])
        except Exception as exc:  # noqa: BLE001 - any tracing failure: look inside instead
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            untraced[name] = f"{type(exc).__name__}: {message[:120]}"
            children = list(mod.named_children())
            while children:  # containers have no forward of their own: their members are traced
                child, sub = children.pop(0)
                full = f"{name}.{child}" if name else child
                if isinstance(sub, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                    children[:0] = [(f"{child}.{c}", m) for c, m in sub.named_children()]
                else:
                    pending.append((full, sub))
    return spaces, untraced


def _consumer_matrix(mod: Any) -> np.ndarray:
    """The consumer's weight as (rows, channels) in float64: what 2:4 pruning along the channels sees."""
    w = mod.weight.detach().to("cpu", _torch().float64).numpy()
    if w.ndim == 4:  # (out, in, kh, kw) -> (out * kh * kw, in)
        w = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
    return w


def permute_network(model: Any, *, optimizer: Any = None, time_budget: float | None = 1.0,
                    seed: int = 0) -> PermutationPlan:
    """Find the network's permutable channel spaces, search a permutation for each (on its consumers'
    weights, with :func:`~pycusparselt.nn.permutation.find_permutation`) and apply it to ``model`` in place.

    ``optimizer``: its per-parameter state (momentum, Adam's moments: every state tensor of a parameter's
    shape) is permuted with the parameter, so training continues as if the channels had always been in the
    new order.

    Returns the :class:`PermutationPlan`: what was permuted (with the kept magnitude before and after) and
    what was skipped, and why. The network computes the same function afterwards (up to floating-point
    rounding of reordered sums).
    """
    torch = _torch()
    spaces, untraced = _spaces(model)
    named = dict(model.named_modules())
    state = optimizer.state if optimizer is not None else {}

    def permute(tensor: Any, index: Any, dim: int) -> None:
        """``tensor`` and the optimizer state that belongs to it, reordered along ``dim``."""
        index = index.to(tensor.device)
        tensor.copy_(tensor.index_select(dim, index))
        for value in state.get(tensor, {}).values():
            if torch.is_tensor(value) and value.shape == tensor.shape:
                value.copy_(value.index_select(dim, index.to(value.device)))

    for space in spaces:
        if space.skipped is not None:
            continue
        stacked = np.concatenate([_consumer_matrix(named[c]) for c in space.consumers], axis=0)
        perm, report = find_permutation(stacked, time_budget=time_budget, seed=seed)
        space.report = report
        if report.kept_after <= report.kept_before:
            continue  # the identity is as good: nothing to change
        space.permutation = perm
        index = torch.as_tensor(perm, dtype=torch.long)
        with torch.no_grad():
            for name in space.producers:
                mod = named[name]
                permute(mod.weight, index, 0)
                if mod.bias is not None:
                    permute(mod.bias, index, 0)
            for name in space.norms:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(named[name], attr, None)
                    if tensor is not None:
                        permute(tensor, index, 0)
            for name in space.consumers:
                permute(named[name].weight, index, 1)
    return PermutationPlan(spaces, untraced)

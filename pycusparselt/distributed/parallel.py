"""Tensor-parallel SparseLinear layers (Megatron-LM style) over a :class:`~pycusparselt.distributed.Group`.

- :class:`ColumnParallelSparseLinear` splits the output features: rank ``r`` holds rows ``o0:o1`` of the
  weight and computes ``y[:, o0:o1]`` from the whole input. Its outputs are all-gathered into ``y``, or kept
  sharded for a row-parallel layer that follows.
- :class:`RowParallelSparseLinear` splits the input features (K): rank ``r`` holds columns ``k0:k1`` and
  computes a partial ``x[:, k0:k1] @ W[:, k0:k1].T``; an all-reduce sums the partials. The bias is fused into
  rank 0's product, so it is added once; an activation cannot be fused (it acts on the sum).
- :class:`ParallelSparseMLP` chains the two (``fc2(act(fc1(x)))``): the hidden features stay sharded between
  them, so the block needs one all-reduce.

Each shard is a :class:`~pycusparselt.nn.linear.SparseLinear` built from its slice of the full weight with the
layer's keyword arguments (activation, pruning, autotuning, and whatever modes SparseLinear offers), on its
rank's device; with a host group it runs on the NumPy reference.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import types
from .._native import gpu
from .. import _arrays
from ..nn.linear import SparseLinear
from . import sharding
from .._native.streams import on_device, on_given_stream
from .groups import Group, as_list

__all__ = ["ColumnParallelSparseLinear", "RowParallelSparseLinear", "ParallelSparseMLP"]

# SparseLinear keywords that leave the GEMM's input type as the weight's; any other keyword may select a
# quantized mode, so shards then fall on boundaries aligned for every input type.
_FLOAT_KEYWORDS = frozenset({"activation", "relu_upper_bound", "relu_threshold", "prune", "permutation", "autotune"})
# Output types whose partial sums the all-reduce adds (8-bit outputs would overflow).
_SUMMABLE = frozenset((types.F16, types.BF16, types.F32, types.F64, types.I32, types.I64))


def _as_array(array: Any, what: str) -> Any:
    """NumPy stays NumPy; CuPy stays CuPy; other device arrays become CuPy views (zero-copy), other host
    arrays (PyTorch CPU tensors, DLPack) NumPy arrays (:func:`pycusparselt._arrays.namespace`)."""
    if not hasattr(array, "shape"):
        raise TypeError(f"{what}: expected a NumPy or device array, got {type(array).__name__}")
    return _arrays.namespace(array)[0]


def _to_device(array: Any, device: int | None) -> Any:
    """``array`` where a rank computes: NumPy for a host rank, else a CuPy array on ``device``."""
    if array is None:
        return None
    if device is None:
        if isinstance(array, np.ndarray):
            return array
        cupy = gpu.cupy()

        return cupy.asnumpy(array)
    cupy = gpu.cupy()

    if isinstance(array, cupy.ndarray) and array.device.id == device:
        return array
    host = array if isinstance(array, np.ndarray) else cupy.asnumpy(array)  # once, at construction
    with cupy.cuda.Device(device):
        return cupy.asarray(host)


def _default_multiple(dtype: Any, dim: str, layer_kwargs: dict) -> int:
    if set(layer_kwargs) - _FLOAT_KEYWORDS:
        return sharding.ALIGNED_MULTIPLE
    try:
        return sharding.aligned_multiple(dtype, dim)
    except TypeError:
        return sharding.ALIGNED_MULTIPLE


def _bounds(total: int, group: Group, bounds: Any, multiple: int | None, default: int, minimum: int,
            what: str) -> tuple[tuple[int, int], ...]:
    """Caller's bounds (checked), else an even split on ``multiple`` (or ``default``, falling back to the
    smallest valid multiple for dimensions too small to align every shard)."""
    if bounds is not None:
        if multiple is not None:
            raise ValueError(f"{what}: pass bounds or multiple, not both")
        pairs = sharding.check_bounds(bounds, total, minimum, f"{what} bounds")
        if len(pairs) != group.world_size:
            raise ValueError(f"{what} bounds: expected {group.world_size} shards (one per rank), got {len(pairs)}")
        return pairs
    if multiple is not None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1 or multiple % minimum:
            raise ValueError(f"multiple: expected a positive multiple of {minimum} for {what}, got {multiple!r}")
        return sharding.shard_bounds(total, group.world_size, multiple)
    try:
        return sharding.shard_bounds(total, group.world_size, default)
    except ValueError:
        return sharding.shard_bounds(total, group.world_size, minimum)


class _ParallelLinear:
    """What the two layers share: the shards, their devices, inputs per local rank, closing."""

    def __init__(self, weight: Any, bias: Any, group: Group) -> None:
        if not isinstance(group, Group):
            raise TypeError(f"group: expected a pycusparselt.distributed.Group, got {type(group).__name__}")
        group.check_open()
        weight = _as_array(weight, "weight")
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if bias is not None:
            bias = _as_array(bias, "bias")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.group = group
        self.dtype = np.dtype(weight.dtype)
        self.shards: dict[int, SparseLinear] = {}

    def _build(self, rank: int, weight: Any, bias: Any, layer_kwargs: dict) -> None:
        device = self.group.device_of(rank)
        with on_device(device):
            self.shards[rank] = SparseLinear(_to_device(weight, device), _to_device(bias, device), **layer_kwargs)

    @property
    def shard(self) -> SparseLinear:
        """This process's shard (when it holds one rank)."""
        return self.shards[self.group.rank]

    @property
    def sizes(self) -> tuple[int, ...]:
        """The size of each rank's shard of the sharded dimension."""
        return sharding.shard_sizes(self.bounds)

    def _inputs(self, x: Any, stream: Any) -> list:
        self.group.check_open()
        if stream is not None and len(self.group.ranks) > 1:
            raise ValueError("stream: a group of several local ranks runs on each device's current stream")
        items = as_list(x, len(self.group.ranks), "x")
        inputs = []
        for rank, item in zip(self.group.ranks, items, strict=True):
            device = self.group.device_of(rank)
            if device is None:
                if not isinstance(item, np.ndarray):
                    raise TypeError(f"x: a host group's layers run on NumPy arrays, got {type(item).__name__}")
            else:
                if isinstance(item, np.ndarray):
                    raise TypeError(f"x: rank {rank} runs on device {device}; pass a device array, not a NumPy array")
                item = _as_array(item, "x")
                if item.device.id != device:
                    raise ValueError(
                        f"x: rank {rank}'s input is on device {item.device.id}, its shard on device {device}"
                    )
            inputs.append(item)
        return inputs

    def _outputs(self, x: Any, results: list) -> Any:
        return results if isinstance(x, (list, tuple)) else results[0]

    def close(self) -> None:
        """Release every shard's plans and compressed weights (the layer can still be called)."""
        for rank, layer in self.shards.items():
            with on_device(self.group.device_of(rank)):
                layer.close()

    def __enter__(self) -> _ParallelLinear:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ColumnParallelSparseLinear(_ParallelLinear):
    """``y = activation(x @ W.T + b)`` with the output features sharded across the group's ranks.

    Parameters
    ----------
    weight : array, shape (out_features, in_features)
        The full weight (NumPy, CuPy or any device array), the same on every rank: each rank keeps rows
        ``bounds[rank]`` on its device (or on the host for a host group).
    bias : array, shape (out_features,), optional
    group : Group
        The ranks to shard across.
    gather_output : bool
        All-gather the shards' outputs into ``y`` (batch, out_features) on every rank; False returns each
        rank's shard (batch, out_shard), the input a :class:`RowParallelSparseLinear` expects.
    bounds : sequence of (start, stop), optional
        Each rank's output features. Default: an even split on :func:`~.sharding.aligned_multiple` for the
        weight's type (``multiple=`` overrides the granularity).
    multiple : int, optional
    **layer_kwargs
        Passed to every shard's :class:`~pycusparselt.nn.linear.SparseLinear`: ``activation``, ``prune``,
        ``permutation``, ``autotune``, ``relu_*``, ``mode`` and its options. With a mode, shards fall on
        multiples of :data:`~.sharding.ALIGNED_MULTIPLE` (aligned for 8-bit types too). Per-channel weight
        scales (the INT8 default, ``weight_granularity="channel"`` for FP8) are per output row, so each shard
        has exactly the full layer's; a per-tensor scale (the FP8 default) comes from the shard's rows.

    Attributes
    ----------
    bounds : tuple of (start, stop)
        Every rank's output features.
    shards : dict
        The :class:`~pycusparselt.nn.linear.SparseLinear` of each local rank.
    """

    def __init__(
        self,
        weight: Any,
        bias: Any = None,
        *,
        group: Group,
        gather_output: bool = True,
        bounds: Sequence[tuple[int, int]] | None = None,
        multiple: int | None = None,
        **layer_kwargs: Any,
    ) -> None:
        super().__init__(weight, bias, group)
        weight, bias = _as_array(weight, "weight"), None if bias is None else _as_array(bias, "bias")
        # 4x4 tiles are pruned 2:4 along the output features too: a boundary must not cut one
        minimum = sharding.GROUP if layer_kwargs.get("prune", "strip") == "tile" else 1
        default = _default_multiple(self.dtype, "out", layer_kwargs)
        self.bounds = _bounds(self.out_features, group, bounds, multiple, default, minimum, "output features")
        self.gather_output = bool(gather_output)
        for rank in group.ranks:
            o0, o1 = self.bounds[rank]
            self._build(rank, weight[o0:o1], None if bias is None else bias[o0:o1], layer_kwargs)

    def __call__(self, x: Any, *, stream: Any = None) -> Any:
        """The layer's output for ``x`` (batch, in_features) or (in_features,): one per local rank (a list
        when the process holds several ranks)."""
        inputs = self._inputs(x, stream)
        outputs = []
        for rank, item in zip(self.group.ranks, inputs, strict=True):
            with on_device(self.group.device_of(rank)):
                outputs.append(self.shards[rank](item, stream=stream))
        if self.gather_output:
            outputs = self._gather(outputs, stream)
        return self._outputs(x, outputs)

    def _gather(self, outputs: list, stream: Any) -> list:
        sizes, width = self.sizes, max(self.sizes)
        sends = []
        for rank, y in zip(self.group.ranks, outputs, strict=True):
            device = self.group.device_of(rank)
            with on_device(device), on_given_stream(stream, device):
                xp = _namespace(y)
                y2 = y[None] if y.ndim == 1 else y
                if y2.shape[-1] != width:  # uneven shards travel padded to the widest
                    padded = xp.zeros((*y2.shape[:-1], width), dtype=y2.dtype)
                    padded[..., : y2.shape[-1]] = y2
                    y2 = padded
                sends.append(xp.ascontiguousarray(y2))
        gathered = self.group.all_gather(sends, stream=stream)
        results = []
        for rank, g, y in zip(self.group.ranks, gathered, outputs, strict=True):
            device = self.group.device_of(rank)
            with on_device(device), on_given_stream(stream, device):
                xp = _namespace(g)
                full = xp.concatenate([g[r, ..., : sizes[r]] for r in range(self.group.world_size)], axis=-1)
                results.append(full[0] if y.ndim == 1 else full)
        return results

    def __repr__(self) -> str:
        return (
            f"ColumnParallelSparseLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"shards={self.sizes}, gather_output={self.gather_output}, {self.group.backend})"
        )


class RowParallelSparseLinear(_ParallelLinear):
    """``y = x @ W.T + b`` with the input features (K) sharded across the group's ranks; partials all-reduced.

    Parameters
    ----------
    weight : array, shape (out_features, in_features)
        The full weight, the same on every rank: each rank keeps columns ``bounds[rank]``.
    bias : array, shape (out_features,), optional
        Fused into rank 0's product (added once).
    group : Group
    input_is_parallel : bool
        True: each rank's ``x`` is its shard of the input features (batch, in_shard), as a
        :class:`ColumnParallelSparseLinear` with ``gather_output=False`` returns it. False: ``x`` is the whole
        input and each rank takes its columns (a copy).
    bounds : sequence of (start, stop), optional
        Each rank's input features; every start a multiple of 4, so no 2:4 group is cut. Default: an even
        split on :func:`~.sharding.aligned_multiple` (``multiple=`` overrides it; a multiple of 4).
    multiple : int, optional
    **layer_kwargs
        Passed to every shard's :class:`~pycusparselt.nn.linear.SparseLinear` (``prune``, ``autotune``, modes).
        ``activation`` is refused (it acts on the sum; apply it after the layer), and so is ``permutation``
        (it would move features across shards; fold it into the producing layer with
        :func:`pycusparselt.nn.permutation.permute_pair`).

    Notes
    -----
    Each rank's partial is rounded to the output type before the sum, so the result can differ from the
    single-GPU layer by rounding (:func:`~.sharding.row_parallel_bounds` says how much). The output type must
    be one the all-reduce adds: float16, bfloat16 or float32 (an int8 output of the INT8 mode is refused: the
    partial sums would overflow it). In the quantized modes each shard quantizes its own columns of the
    weight: per-channel (and per-tensor) weight scales come from the shard's slice, not the whole row, so the
    result is an equally accurate quantized product but not the single-GPU layer's bits.
    """

    def __init__(
        self,
        weight: Any,
        bias: Any = None,
        *,
        group: Group,
        input_is_parallel: bool = True,
        bounds: Sequence[tuple[int, int]] | None = None,
        multiple: int | None = None,
        **layer_kwargs: Any,
    ) -> None:
        if layer_kwargs.get("activation") is not None:
            raise ValueError(
                "activation: a row-parallel layer cannot fuse an activation (it must act on the sum of the ranks' "
                "partial products); apply it to the layer's output"
            )
        if layer_kwargs.get("permutation") is not None:
            raise ValueError(
                "permutation: an input-channel permutation moves features across shards; fold it into the producing "
                "layer with pycusparselt.nn.permutation.permute_pair and pass the permuted weight"
            )
        layer_kwargs = {k: v for k, v in layer_kwargs.items() if k not in ("activation", "permutation")}
        super().__init__(weight, bias, group)
        weight, bias = _as_array(weight, "weight"), None if bias is None else _as_array(bias, "bias")
        default = _default_multiple(self.dtype, "in", layer_kwargs)
        self.bounds = _bounds(self.in_features, group, bounds, multiple, default, sharding.GROUP, "input features")
        self.input_is_parallel = bool(input_is_parallel)
        for rank in group.ranks:
            k0, k1 = self.bounds[rank]
            self._build(rank, weight[:, k0:k1], bias if rank == 0 else None, layer_kwargs)

    def __call__(self, x: Any, *, stream: Any = None) -> Any:
        """The summed output (batch, out_features) on every rank, for each local rank's ``x``."""
        inputs = self._inputs(x, stream)
        partials = []
        for rank, item in zip(self.group.ranks, inputs, strict=True):
            device = self.group.device_of(rank)
            k0, k1 = self.bounds[rank]
            want = k1 - k0 if self.input_is_parallel else self.in_features
            if item.shape[-1] != want:
                kind = f"rank {rank}'s shard of the input features" if self.input_is_parallel else "the input features"
                raise ValueError(f"x: expected (..., {want}) features ({kind}), got shape {tuple(item.shape)}")
            with on_device(device):
                if not self.input_is_parallel:
                    with on_given_stream(stream, device):
                        item = _namespace(item).ascontiguousarray(item[..., k0:k1])
                partials.append(self.shards[rank](item, stream=stream))
        dtype = np.dtype(partials[0].dtype)
        if dtype not in _SUMMABLE:
            raise TypeError(
                f"the shards produce {dtype}, which the all-reduce cannot add without overflow; choose an output "
                f"type of float16, bfloat16, float32 or int32 for a row-parallel layer"
            )
        self.group.all_reduce(partials, stream=stream)
        return self._outputs(x, partials)

    def __repr__(self) -> str:
        return (
            f"RowParallelSparseLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"shards={self.sizes}, input_is_parallel={self.input_is_parallel}, {self.group.backend})"
        )


def _namespace(array: Any) -> Any:
    if isinstance(array, np.ndarray):
        return np
    cupy = gpu.cupy()

    return cupy


class ParallelSparseMLP:
    """A tensor-parallel feed-forward block ``y = act(x @ W1.T + b1) @ W2.T + b2`` with one all-reduce.

    ``fc1`` is a :class:`ColumnParallelSparseLinear` (activation fused, output kept sharded), ``fc2`` a
    :class:`RowParallelSparseLinear` reading those shards; both split the hidden features at the same
    ``bounds``, on multiples that suit both (the 2:4 groups of ``fc2`` and each shard's alignment).

    Parameters
    ----------
    w1 : array, shape (hidden, in_features)
    b1 : array, shape (hidden,), optional
    w2 : array, shape (out_features, hidden)
    b2 : array, shape (out_features,), optional
    group : Group
    activation : {"relu", "gelu", None}
        Fused into ``fc1``.
    bounds, multiple
        The hidden features' split (as for the layers).
    fc1_kwargs, fc2_kwargs : dict, optional
        Keywords for one layer's shards only, over ``layer_kwargs`` (a quantized mode's ``input_scale``
        differs between the two layers).
    **layer_kwargs
        Passed to both layers' shards (``prune``, ``autotune``, ``mode``, ...).
    """

    def __init__(
        self,
        w1: Any,
        b1: Any,
        w2: Any,
        b2: Any,
        *,
        group: Group,
        activation: str | None = "relu",
        bounds: Sequence[tuple[int, int]] | None = None,
        multiple: int | None = None,
        fc1_kwargs: dict | None = None,
        fc2_kwargs: dict | None = None,
        **layer_kwargs: Any,
    ) -> None:
        for name, extra in (("layer_kwargs", layer_kwargs), ("fc1_kwargs", fc1_kwargs or {}),
                            ("fc2_kwargs", fc2_kwargs or {})):
            if "activation" in extra or "permutation" in extra:
                raise ValueError(
                    f"{name}: pass the activation as activation=; an input permutation cannot be applied across the "
                    f"hidden shards (fold it into the weights with pycusparselt.nn.permutation.permute_pair)"
                )
        kwargs1 = {**layer_kwargs, **(fc1_kwargs or {})}
        kwargs2 = {**layer_kwargs, **(fc2_kwargs or {})}
        hidden = int(w1.shape[0])
        if len(w2.shape) != 2 or int(w2.shape[1]) != hidden:
            raise ValueError(
                f"w2: expected (out_features, {hidden}) to follow w1 {tuple(w1.shape)}, got {tuple(w2.shape)}"
            )
        if bounds is None:
            if multiple is None:
                default = math.lcm(
                    _default_multiple(np.dtype(w1.dtype), "out", kwargs1),
                    _default_multiple(np.dtype(w2.dtype), "in", kwargs2),
                )
                try:
                    bounds = sharding.shard_bounds(hidden, group.world_size, default)
                except ValueError:
                    bounds = sharding.shard_bounds(hidden, group.world_size, sharding.GROUP)
            else:
                if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1 or multiple % 4:
                    raise ValueError(f"multiple: expected a positive multiple of {sharding.GROUP}, got {multiple!r}")
                bounds = sharding.shard_bounds(hidden, group.world_size, multiple)
        self.fc1 = ColumnParallelSparseLinear(
            w1, b1, group=group, gather_output=False, bounds=bounds, activation=activation, **kwargs1
        )
        self.fc2 = RowParallelSparseLinear(w2, b2, group=group, input_is_parallel=True, bounds=bounds, **kwargs2)
        self.group = group
        self.bounds = self.fc2.bounds

    def __call__(self, x: Any, *, stream: Any = None) -> Any:
        """The block's output (batch, out_features) on every rank."""
        return self.fc2(self.fc1(x, stream=stream), stream=stream)

    def close(self) -> None:
        """Release both layers' plans and compressed weights."""
        self.fc1.close()
        self.fc2.close()

    def __enter__(self) -> ParallelSparseMLP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ParallelSparseMLP(fc1={self.fc1!r}, fc2={self.fc2!r})"

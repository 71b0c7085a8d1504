"""Tensor-parallel SparseLinear layers (Megatron-LM style) over a :class:`~pycusparselt.distributed.Group`.

- :class:`ColumnParallelSparseLinear` splits the output features: rank ``r`` holds rows ``o0:o1`` of the
  weight and computes ``y[:, o0:o1]`` from the whole input. Its outputs are all-gathered into ``y``, or kept
  sharded for a row-parallel layer that follows.
- :class:`RowParallelSparseLinear` splits the input features (K): rank ``r`` holds columns ``k0:k1`` and
  computes a partial ``x[:, k0:k1] @ W[:, k0:k1].T``; an all-reduce sums the partials. The bias is fused into
  rank 0's product, so it is added once; an activation cannot be fused (it acts on the sum).
- :class:`ParallelSparseMLP` chains the two (``fc2(act(fc1(x)))``): the hidden features stay sharded between
  them, so the block needs one all-reduce (``form="allreduce"``), or, in the sequence-parallel form
  (``form="sequence"``, as Megatron-LM's sequence parallelism), an all-gather of the token rows in and a
  reduce-scatter of them out, chunk by chunk so that one chunk's communication can run beside the next
  chunk's products.

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
from .._native.streams import on_device, on_given_stream, on_stream, stream_ptr
from .groups import Group, as_list

__all__ = ["ColumnParallelSparseLinear", "RowParallelSparseLinear", "ParallelSparseMLP", "FORMS"]

#: The forms of :class:`ParallelSparseMLP`: every rank holds every token ("allreduce"), or its share of them
#: ("sequence").
FORMS = ("allreduce", "sequence")

# SparseLinear keywords that leave the GEMM's input type as the weight's; any other keyword may select a
# quantized mode, so shards then fall on boundaries aligned for every input type.
_FLOAT_KEYWORDS = frozenset({"activation", "relu_upper_bound", "relu_threshold", "prune", "permutation", "autotune"})
# Output types whose partial sums the all-reduce adds (8-bit outputs would overflow).
_SUMMABLE = frozenset((types.F16, types.BF16, types.F32, types.F64, types.I32, types.I64))
#: A stream priority below every device's range: CUDA clamps it to the greatest priority there is.
_HIGHEST_PRIORITY = -(1 << 20)


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

    def local_inputs(self, x: Any, stream: Any = None) -> list:
        """Each local rank's input ``x`` (one array, or one per local rank), checked: NumPy for a host rank, a
        device array on the rank's device otherwise (other device arrays viewed as CuPy, zero-copy)."""
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
        inputs = self.local_inputs(x, stream)
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
        inputs = self.local_inputs(x, stream)
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
    """A tensor-parallel feed-forward block ``y = act(x @ W1.T + b1) @ W2.T + b2``.

    ``fc1`` is a :class:`ColumnParallelSparseLinear` (activation fused, output kept sharded), ``fc2`` a
    :class:`RowParallelSparseLinear` reading those shards; both split the hidden features at the same
    ``bounds``, on multiples that suit both (the 2:4 groups of ``fc2`` and each shard's alignment).

    Two forms move the activations (:data:`~pycusparselt.distributed.FORMS`):

    - ``"allreduce"`` (the default): every rank passes every token row and gets the whole output; one
      all-reduce after ``fc2``.
    - ``"sequence"`` (Megatron-LM's sequence parallelism): each rank passes its share of the token rows
      (:func:`~.sharding.sequence_bounds`) and gets the output of those rows. The rows are all-gathered before
      ``fc1`` and the partial products of ``fc2`` reduce-scattered back, in ``chunks`` pieces along the token
      rows: with one GPU per process (an NCCL group of one local rank) the collectives run on a second stream
      of the block's, so that chunk ``i``'s reduce-scatter and chunk ``i + 1``'s all-gather run beside the
      products of the chunk between; elsewhere (host groups, one process driving several GPUs) the chunks run
      in order on the current stream. The same products and sums as the all-reduce form, row by row.

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
    form : {"allreduce", "sequence"}
        How the block's activations travel (above).
    chunks : int
        The sequence form's pieces along each rank's token rows (1: no overlap). A rank holding fewer rows than
        ``chunks`` uses one piece per row.
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
        form: str = "allreduce",
        chunks: int = 1,
        fc1_kwargs: dict | None = None,
        fc2_kwargs: dict | None = None,
        **layer_kwargs: Any,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form: expected one of {', '.join(repr(f) for f in FORMS)}, got {form!r}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks: expected a positive int, got {chunks!r}")
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
        self.form = form
        self.chunks = chunks
        self._comm_stream: Any = None  # the sequence form's collectives' stream (one GPU per process)
        # buffers a captured sequence-form call uses: its graph reads and writes them at every replay
        self._graph_buffers: list = []

    def __call__(self, x: Any, *, stream: Any = None, tokens: int | None = None) -> Any:
        """The block's output for each local rank's ``x``.

        All-reduce form: ``x`` is every token row, (batch, in_features), and so is the output (batch,
        out_features), on every rank. Sequence form: ``x`` is the rank's share of the token rows, (rows,
        in_features), and the output is those rows' (rows, out_features). ``tokens`` (sequence form) is the
        job's token count: the ranks' shares are then :func:`~.sharding.sequence_bounds` ``(tokens,
        world_size)`` (uneven shares allowed, each checked); without it every rank must pass the same number of
        rows (the host group checks; NCCL cannot).
        """
        if self.form == "allreduce":
            if tokens is not None:
                raise ValueError("tokens: only the sequence form (form='sequence') takes a token count")
            return self.fc2(self.fc1(x, stream=stream), stream=stream)
        return self._sequence(x, stream, tokens)

    def _sequence(self, x: Any, stream: Any, tokens: int | None) -> Any:
        group = self.group
        inputs = self.fc1.local_inputs(x, stream)
        for item in inputs:
            if item.ndim != 2 or item.shape[-1] != self.fc1.in_features:
                raise ValueError(
                    f"x: expected (rows, {self.fc1.in_features}) token rows, got shape {tuple(item.shape)}"
                )
        if tokens is None:
            rows = {int(item.shape[0]) for item in inputs}
            if len(rows) != 1 or 0 in rows:
                raise ValueError(
                    f"x: without tokens= every rank passes one non-zero number of rows, got {sorted(rows)}"
                )
            share = rows.pop()
        else:
            shares = sharding.shard_sizes(sharding.sequence_bounds(tokens, group.world_size))
            for rank, item in zip(group.ranks, inputs, strict=True):
                if item.shape[0] != shares[rank]:
                    raise ValueError(
                        f"x: rank {rank}'s share of {tokens} tokens is {shares[rank]} rows "
                        f"(sequence_bounds({tokens}, {group.world_size})), got {item.shape[0]}"
                    )
            share = max(shares)
        pieces = sharding.shard_bounds(share, min(self.chunks, share))
        padded, outputs = [], []
        for rank, item in zip(group.ranks, inputs, strict=True):
            device = group.device_of(rank)
            with on_device(device), on_given_stream(stream, device):
                xp = _namespace(item)
                if item.shape[0] != share or not item.flags.c_contiguous:  # shorter shares travel padded
                    full = xp.zeros((share, item.shape[1]), dtype=item.dtype)
                    full[: item.shape[0]] = item
                    item = full
                padded.append(item)
        if group.backend == "nccl" and len(group.ranks) == 1:
            outputs = [self._sequence_overlapped(padded[0], pieces, stream)]
        else:
            outputs = self._sequence_in_order(padded, pieces, stream)
        results = [y[: item.shape[0]] for y, item in zip(outputs, inputs, strict=True)]
        return results if isinstance(x, (list, tuple)) else results[0]

    def _chunk(self, rank: int, gathered: Any, stream: Any) -> Any:
        """One chunk of the block on one rank: every rank's rows of it in, this rank's partial sums out, as
        (world_size, rows, out_features) blocks for the reduce-scatter."""
        world, rows = gathered.shape[0], gathered.shape[1]
        hidden = self.fc1.shards[rank](gathered.reshape(world * rows, gathered.shape[2]), stream=stream)
        partial = self.fc2.shards[rank](hidden, stream=stream)
        dtype = np.dtype(partial.dtype)
        if dtype not in _SUMMABLE:
            names = ", ".join(sorted(d.name for d in _SUMMABLE))
            raise TypeError(
                f"fc2's out_dtype: the shards produce {dtype}, which the reduce-scatter cannot add without "
                f"overflow; expected one of {names}"
            )
        return _namespace(partial).ascontiguousarray(partial).reshape(world, rows, partial.shape[-1])

    def _sequence_in_order(self, padded: list, pieces: tuple, stream: Any) -> list:
        group = self.group
        outputs = []
        for rank, item in zip(group.ranks, padded, strict=True):
            device = group.device_of(rank)
            with on_device(device), on_given_stream(stream, device):
                outputs.append(_namespace(item).empty((item.shape[0], self.fc2.out_features),
                                                      dtype=self.fc2.shards[rank].out_dtype))
        several = len(group.ranks) > 1
        for c0, c1 in pieces:
            gathered = group.all_gather([item[c0:c1] for item in padded] if several else padded[0][c0:c1],
                                        stream=stream)
            partials = []
            for rank, g in zip(group.ranks, gathered if several else [gathered], strict=True):
                with on_device(group.device_of(rank)):
                    partials.append(self._chunk(rank, g, stream))
            mine = group.reduce_scatter(partials if several else partials[0], stream=stream)
            for rank, y, piece in zip(group.ranks, outputs, mine if several else [mine], strict=True):
                device = group.device_of(rank)
                with on_device(device), on_given_stream(stream, device):
                    y[c0:c1] = piece
        return outputs

    def _sequence_overlapped(self, item: Any, pieces: tuple, stream: Any) -> Any:
        """The chunks on one GPU: products on the block's stream, collectives on a second one, ordered by
        events. Every buffer lives until the block's stream has waited for the last collective, so CuPy's pool
        cannot hand one to other work while a stream still reads it."""
        cupy = gpu.cupy()

        group, rank = self.group, self.group.rank
        device = group.device_of(rank)
        with cupy.cuda.Device(device):
            compute = on_stream(stream_ptr(stream, device))
            if self._comm_stream is None:
                # CUDA clamps a priority past the device's range to its greatest (CuPy 14 does not expose the range)
                self._comm_stream = cupy.cuda.Stream(non_blocking=True, priority=_HIGHEST_PRIORITY)
            comm = self._comm_stream
            with compute:
                y = cupy.empty((item.shape[0], self.fc2.out_features), dtype=self.fc2.shards[rank].out_dtype)
            comm.wait_event(compute.record())  # the input and output exist before the collectives touch them
            gathered, kept = [], []

            def gather(index: int) -> Any:
                c0, c1 = pieces[index]
                gathered.append(group.all_gather(item[c0:c1], stream=comm))
                return comm.record()

            ready = [gather(0)]
            for index, (c0, c1) in enumerate(pieces):
                if index + 1 < len(pieces):
                    ready.append(gather(index + 1))  # the next chunk's rows travel while this one computes
                compute.wait_event(ready[index])
                with compute:
                    partial = self._chunk(rank, gathered[index], compute)
                comm.wait_event(compute.record())
                piece = group.reduce_scatter(partial, stream=comm)
                with comm:
                    y[c0:c1] = piece
                kept.append((partial, piece))
            compute.wait_event(comm.record())
            if cupy.cuda.runtime.streamIsCapturing(compute.ptr):
                # a graph keeps the addresses: the buffers must outlive it (until close()), not return to the pool
                self._graph_buffers.append((item, list(gathered), list(kept)))
            gathered.clear()  # freed only now: later work on either stream follows every use
            kept.clear()
        return y

    def close(self) -> None:
        """Release both layers' plans and compressed weights, and the buffers of captured sequence-form calls
        (graphs captured from this block must not be replayed after it)."""
        self.fc1.close()
        self.fc2.close()
        self._graph_buffers.clear()

    def __enter__(self) -> ParallelSparseMLP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ParallelSparseMLP(fc1={self.fc1!r}, fc2={self.fc2!r}, form={self.form!r}, chunks={self.chunks})"

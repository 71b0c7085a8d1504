"""Where tensor-parallel shards begin and end, and what a correct sharded result is: NumPy only.

A column-parallel layer splits the output features (the rows of the weight ``W``, shape (out, in)); a
row-parallel layer splits the input features, the reduction dimension K along which 2:4 groups run. A K
boundary inside a group of four would change which two values each group keeps, so K shards start on
multiples of 4 at least; by default on multiples that also keep every shard's plan free of padding (16 for
16-bit types, 8 for FP32, 32 for 8-bit types: :mod:`pycusparselt.gemm.dtypes`), so no shard copies its operands
per call. With boundaries on multiples of 4, pruning commutes with sharding: the shards of the pruned weight
are the pruned shards, and the concatenated (column) or summed (row) shard products are the full product.

Rounding is where the two differ: a column shard computes exactly the elements the full layer computes,
while row shards round their partial sums to the output type before the all-reduce adds them (as in
Megatron-LM). :func:`row_parallel_bounds` gives the limits a correct row-parallel result lies in.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from ..gemm import dtypes
from .. import reference

__all__ = [
    "GROUP",
    "ALIGNED_MULTIPLE",
    "aligned_multiple",
    "shard_bounds",
    "check_bounds",
    "shard_sizes",
    "sequence_bounds",
    "row_parallel_bounds",
]

#: Values per 2:4 group: a K boundary must be a multiple of this.
GROUP = 4


def _type_multiples(rules: dtypes.TypeRules) -> tuple[int, int]:
    # K is the sparse operand's columns and the dense operand's rows; out features are the sparse rows
    return math.lcm(GROUP, rules.sparse_multiple, rules.dense_multiple), rules.sparse_multiple


#: A multiple that keeps shards free of padding for every input type (8-bit included), so that layers
#: whose keyword arguments select a quantized mode shard on aligned boundaries too.
ALIGNED_MULTIPLE = math.lcm(*(m for dt in dtypes.SUPPORTED_INPUTS for m in _type_multiples(dtypes.rules_for(dt))))


def aligned_multiple(dtype: Any, dim: str) -> int:
    """The shard granularity that keeps each shard's plan unpadded for inputs of ``dtype``.

    Parameters
    ----------
    dtype : dtype-like
        The GEMM's input type (the weight's, or the quantized type a layer mode computes in).
    dim : {"in", "out"}
        "in": input features (K, row-parallel), a multiple of 4 and of the sparse and dense multiples;
        "out": output features (column-parallel), the sparse operand's row multiple.

    Raises
    ------
    TypeError
        ``dtype`` is not a supported input type.
    ValueError
        ``dim`` is neither "in" nor "out".
    """
    k_multiple, rows_multiple = _type_multiples(dtypes.rules_for(dtype, "dtype"))
    if dim == "in":
        return k_multiple
    if dim == "out":
        return rows_multiple
    raise ValueError(f"dim: expected 'in' or 'out', got {dim!r}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def shard_bounds(total: int, parts: int, multiple: int = 1) -> tuple[tuple[int, int], ...]:
    """Split ``range(total)`` into ``parts`` contiguous, non-empty shards starting on multiples of ``multiple``.

    Whole units of ``multiple`` are dealt out as evenly as possible (the first shards get one more unit when
    they do not divide evenly); the remainder of ``total`` below a multiple goes to the last shard.

    Returns
    -------
    tuple of (start, stop)
        One half-open interval per part, in rank order.

    Raises
    ------
    TypeError, ValueError
        Arguments that are not positive ints, or too few units to give every part one.
    """
    total = _positive_int(total, "total")
    parts = _positive_int(parts, "parts")
    multiple = _positive_int(multiple, "multiple")
    units, rest = divmod(total, multiple)
    if units < parts - (1 if rest else 0):
        raise ValueError(
            f"cannot split {total} features into {parts} non-empty shards on multiples of {multiple}: "
            f"only {units} whole units{f' and a remainder of {rest}' if rest else ''}; use fewer shards or a "
            f"smaller multiple (a multiple of {GROUP} for input features)"
        )
    base, extra = divmod(units, parts) if units >= parts else (0, units)
    bounds, start = [], 0
    for rank in range(parts):
        size = (base + (1 if rank < extra else 0)) * multiple
        if rank == parts - 1:
            size += rest
        bounds.append((start, start + size))
        start += size
    return tuple(bounds)


def check_bounds(bounds: Sequence[Sequence[int]], total: int, multiple: int, what: str) -> tuple[tuple[int, int], ...]:
    """Validate shard bounds given by a caller: contiguous from 0 to ``total``, non-empty, every start a
    multiple of ``multiple``. Returns them as a tuple of int pairs; raises ValueError naming ``what``."""
    try:
        pairs = tuple((int(start), int(stop)) for start, stop in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a sequence of (start, stop) pairs, got {bounds!r}") from None
    if not pairs:
        raise ValueError(f"{what}: expected one (start, stop) pair per rank, got none")
    expected_start = 0
    for rank, (start, stop) in enumerate(pairs):
        if start != expected_start:
            raise ValueError(
                f"{what}: shard {rank} starts at {start}, expected {expected_start} (shards must be contiguous)"
            )
        if stop <= start:
            raise ValueError(f"{what}: shard {rank} is empty or reversed: ({start}, {stop})")
        if start % multiple:
            raise ValueError(f"{what}: shard {rank} starts at {start}, not a multiple of {multiple}")
        expected_start = stop
    if expected_start != total:
        raise ValueError(f"{what}: the shards end at {expected_start}, expected {total}")
    return pairs


def shard_sizes(bounds: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The size of each shard."""
    return tuple(stop - start for start, stop in bounds)


def sequence_bounds(tokens: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """Each rank's token rows in the sequence-parallel form (and in data parallelism, each rank's batch rows).

    ``tokens`` rows split into ``world_size`` contiguous shares whose sizes differ by at most one, the first
    ranks taking one more row where they do not divide evenly (:func:`shard_bounds` on multiples of 1). Every
    rank gets at least one row.

    Raises
    ------
    TypeError, ValueError
        Arguments that are not positive ints, or fewer tokens than ranks.
    """
    tokens = _positive_int(tokens, "tokens")
    world_size = _positive_int(world_size, "world_size")
    if tokens < world_size:
        raise ValueError(f"tokens: expected at least one row per rank ({world_size}), got {tokens}")
    return shard_bounds(tokens, world_size, 1)


def row_parallel_bounds(
    x: Any,
    weight: Any,
    bias: Any = None,
    *,
    bounds: Sequence[tuple[int, int]],
    out_dtype: Any = None,
    compute: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Limits ``lo <= y <= hi`` (float64) for a correct row-parallel ``y = x @ W.T + b``.

    Rank ``r`` computes ``x[:, k0:k1] @ W[:, k0:k1].T`` (plus the bias on rank 0 only), rounded to the output
    type; the all-reduce adds the ``n`` partials in the output type, in an order NCCL chooses. Each partial's
    limits are :func:`pycusparselt.reference.matmul_bounds` of its shard; the sum's are the sums of those,
    widened by one ulp of the output type per addition (``2 * u * sum(|partial|)`` each, ``n - 1`` of them).
    Integer outputs add exactly, so they get no widening.

    Parameters
    ----------
    x : array_like, shape (batch, in_features)
        The input, as the layer received it.
    weight : array_like, shape (out_features, in_features)
        The weight as the layer multiplies by it (already pruned).
    bias : array_like, shape (out_features,), optional
    bounds : sequence of (start, stop)
        The input-feature shards, one per rank.
    out_dtype, compute
        As for :func:`pycusparselt.reference.matmul`.

    Returns
    -------
    lo, hi : numpy.ndarray, shape (batch, out_features), float64
    """
    x, weight = np.asarray(x), np.asarray(weight)
    if weight.ndim != 2 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (batch, in) and weight (out, in) do not match: {x.shape} and {weight.shape}")
    pairs = check_bounds(bounds, weight.shape[1], 1, "bounds")
    lo = hi = magnitude = None
    out_dt = None
    for rank, (k0, k1) in enumerate(pairs):
        # y^T = W @ x^T: the reference's bias is per row of D, here per output feature
        l_r, h_r = reference.matmul_bounds(
            weight[:, k0:k1], x[:, k0:k1].T, bias=bias if rank == 0 else None, out_dtype=out_dtype, compute=compute
        )
        out_dt = l_r.dtype
        l64, h64 = l_r.astype(np.float64).T, h_r.astype(np.float64).T
        size = np.maximum(np.abs(l64), np.abs(h64))
        lo, hi = (l64, h64) if lo is None else (lo + l64, hi + h64)
        magnitude = size if magnitude is None else magnitude + size
    if np.issubdtype(out_dt, np.integer):
        return lo, hi
    info = ml_dtypes.finfo(out_dt)
    # one ulp relative to the value (eps = 2 * unit round-off) per addition, and the smallest step near 0
    widen = (len(pairs) - 1) * (float(info.eps) * magnitude + float(info.smallest_subnormal))
    return lo - widen, hi + widen

"""The NumPy reference: 2:4 pruning, compression and cuSPARSELt's GEMM semantics, on the CPU.

This module imports only NumPy, ml_dtypes (through :mod:`pycusparselt.types`, the type table it shares
with the GPU layers) and the standard library. It is the oracle the GPU tests compare cuSPARSELt against,
and a way to prepare and inspect 2:4 data without a GPU.

The 2:4 format
--------------
A matrix is *2:4 sparse* along an axis when every group of four consecutive elements along that axis
(elements ``4g .. 4g+3``) holds at most two non-zeros. cuSPARSELt needs this along the reduction
dimension ``K`` of the sparse operand: for ``D = A @ B`` with a sparse ``A`` of shape ``(M, K)``,
along each row of ``A``. Sparse Tensor Cores then skip the zeros and do twice the math per
instruction.

The sparse operand is stored *compressed*: for each group, its two kept values (in index order) and
the 2-bit positions (0..3) of those values inside the group. Values take half the dense storage;
the metadata adds 2 bits per kept value, i.e. 2/16 = 12.5 % of the values for 16-bit types and
2/8 = 25 % for 8-bit types (compressed / dense = 0.5625 and 0.625). :func:`compress` and
:func:`decompress` implement that *logical* format; cuSPARSELt's own buffer interleaves values and
metadata in a private layout and pads them (ask ``cusparseLtSpMMACompressedSize`` for its size).

Pruning makes a dense matrix 2:4 by zeroing the two smallest-magnitude elements of every group
(``method="strip"``, cuSPARSELt's ``CUSPARSELT_PRUNE_SPMMA_STRIP``), or by choosing, for every 4x4
tile, the pattern with two non-zeros in each row and each column that keeps the most magnitude
(``method="tile"``, ``CUSPARSELT_PRUNE_SPMMA_TILE``; the result is 2:4 along *both* matrix axes, so
the same pruned matrix serves its transpose).

For ``float32`` cuSPARSELt's documentation specifies 1:2 sparsity (one non-zero in every *pair*),
which is stricter than 2:4; this module checks and produces 2:4 for every type.

GEMM semantics
--------------
:func:`matmul` computes ``D = activation(alpha * (A @ B) + beta * C + bias)`` the way cuSPARSELt
defines it, in float64 (int64 for int8 inputs), then converts to D's type. Every rule that is not
plain arithmetic lives in one small private function and is listed in :data:`SEMANTICS`, with how it
was established. :func:`matmul_bounds` and :func:`assert_close` give, per element, the interval a
correct GPU result must lie in, derived from the data types, ``K`` and ``|A| @ |B|``
(see :class:`Tolerance`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from . import types
from .types import BF16 as _BF16
from .types import COMPUTE_TYPES, FLOAT_FORMATS, SUPPORTED_INPUTS, UINT_OF_WIDTH
from .types import E4M3 as _E4M3
from .types import E5M2 as _E5M2
from .types import F16 as _F16
from .types import F32 as _F32
from .types import I8 as _I8
from .types import I32 as _I32
from .types import VALID_COMBINATIONS as _VALID_COMBINATIONS

__all__ = [
    "SUPPORTED_DTYPES",
    "VALID_COMBINATIONS",
    "DEFAULT_COMPUTE",
    "SEMANTICS",
    "TILE_PATTERNS",
    "Rule",
    "Tolerance",
    "prune_2to4",
    "mask_2to4",
    "mask_from_scores",
    "is_2to4",
    "compress",
    "decompress",
    "compressed_nbytes",
    "matmul",
    "matmul_tolerance",
    "matmul_bounds",
    "assert_close",
]

# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------

#: The element types of the sparse and dense operands A and B (:data:`pycusparselt.types.SUPPORTED_INPUTS`).
SUPPORTED_DTYPES: tuple[np.dtype, ...] = SUPPORTED_INPUTS

#: A/B type -> the C/D types cuSPARSELt accepts with it; the first is the default of :func:`matmul` when
#: neither ``out_dtype`` nor ``c`` says otherwise (:data:`pycusparselt.types.VALID_COMBINATIONS`).
VALID_COMBINATIONS: Mapping[np.dtype, tuple[np.dtype, ...]] = _VALID_COMBINATIONS

#: A/B type -> the compute types cuSPARSELt accepts with it; the first is the default. "32F" for float32
#: inputs runs on TF32 Tensor Cores (there is no sparse FP32 math), so it is treated like "TF32"
#: (:data:`pycusparselt.types.COMPUTE_TYPES`).
DEFAULT_COMPUTE: Mapping[np.dtype, tuple[str, ...]] = COMPUTE_TYPES

_FLOAT_INFO = FLOAT_FORMATS
_UINT_OF_WIDTH = UINT_OF_WIDTH


def _dtype_name(dt: np.dtype) -> str:
    return np.dtype(dt).name


def _supported_list() -> str:
    return ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)


def _as_array(a: Any, what: str = "a") -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what}: unsupported dtype {arr.dtype}; supported: {_supported_list()}"
        )
    return arr


def _normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for an array of {ndim} dimension(s)")
    return int(axis) % ndim


def _check_multiple_of_4(shape: tuple[int, ...], ax: int) -> None:
    if shape[ax] % 4:
        raise ValueError(
            f"axis {ax} has size {shape[ax]}, which is not a multiple of 4 "
            f"(2:4 groups of four run along that axis)"
        )


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of ``a`` as unsigned integers of the same width (a view)."""
    return a.view(_UINT_OF_WIDTH[a.dtype.itemsize * 8])


_E4M3_TABLE = np.arange(256, dtype=np.uint8).view(_E4M3).astype(np.float64)
_E5M2_TABLE = np.arange(256, dtype=np.uint8).view(_E5M2).astype(np.float64)


def _to_float64(a: np.ndarray) -> np.ndarray:
    """Exact conversion of any supported (or int32/float64) array to float64, fast for ml_dtypes."""
    dt = a.dtype
    if dt == _BF16:
        with np.errstate(invalid="ignore"):  # signalling NaNs warn; they convert to quiet NaNs
            return (_bits(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dt == _E4M3:
        return _E4M3_TABLE[_bits(a)]
    if dt == _E5M2:
        return _E5M2_TABLE[_bits(a)]
    with np.errstate(invalid="ignore"):  # signalling NaNs warn; they convert to quiet NaNs
        return a.astype(np.float64)


def _magnitude64(a: np.ndarray) -> np.ndarray:
    """|a| in float64 (exact; int8's -128 becomes 128, NaN stays NaN)."""
    return np.abs(_to_float64(a))


def _magnitude_key(a: np.ndarray) -> np.ndarray:
    """An unsigned integer per element that orders like |a|, with every NaN above +inf.

    Sign-magnitude floats order like their sign-cleared bit patterns; all NaNs are mapped to one
    value above +inf so that NaN payloads do not rank among themselves. Exact, and much faster than
    comparing float64 magnitudes.
    """
    if a.dtype == _I8:
        return np.abs(a.astype(np.int16)).astype(np.uint16)
    info = _FLOAT_INFO[a.dtype]
    key = _bits(a) & np.array((1 << (info.bits - 1)) - 1, dtype=_UINT_OF_WIDTH[info.bits])
    if info.inf_bits is not None:  # e4m3fn's only NaN (0x7F) is already the largest key
        key = np.where(key > info.inf_bits, np.array(info.inf_bits + 1, key.dtype), key)
    return key


def _is_nonzero(a: np.ndarray) -> np.ndarray:
    """True where the value is non-zero (-0.0 counts as zero, NaN as non-zero)."""
    if a.dtype == _I8:
        return a != 0
    info = _FLOAT_INFO[a.dtype]
    return (_bits(a) & np.array((1 << (info.bits - 1)) - 1, dtype=_UINT_OF_WIDTH[info.bits])) != 0


# --------------------------------------------------------------------------------------------------
# Grouping helpers
# --------------------------------------------------------------------------------------------------


def _groups(a: np.ndarray, ax: int) -> np.ndarray:
    """``a`` with axis ``ax`` moved last and split into groups: shape (..., K // 4, 4)."""
    moved = np.moveaxis(a, ax, -1)
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // 4, 4))


def _ungroup(g: np.ndarray, ax: int) -> np.ndarray:
    """Inverse of :func:`_groups`."""
    flat = g.reshape(g.shape[:-2] + (g.shape[-2] * g.shape[-1],))
    return np.moveaxis(flat, -1, ax)


def _top2_mask(key: np.ndarray) -> np.ndarray:
    """Keep-mask (..., 4) of the two largest keys per group; on equal keys the lower index wins.

    rank[i] = number of elements that beat element i, where j beats i if key[j] > key[i], or
    key[j] == key[i] and j < i. The six pairwise comparisons each add one to exactly one rank.
    """
    k = [key[..., i] for i in range(4)]
    rank = [np.zeros(k[0].shape, dtype=np.uint8) for _ in range(4)]
    for i, j in itertools.combinations(range(4), 2):  # i < j
        i_wins = k[i] >= k[j]
        rank[j] += i_wins
        rank[i] += ~i_wins
    return np.stack(rank, axis=-1) < 2


def _format_value(v: Any) -> str:
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return repr(float(v))


def _group_location(lead_index: tuple[int, ...], g: int, ax: int) -> str:
    """``a[i, j, 4g:4g+4]`` with the slice in the original axis position."""
    parts = [str(i) for i in lead_index]
    parts.insert(ax, f"{4 * g}:{4 * g + 4}")
    return "[" + ", ".join(parts) + "]"


def _describe_first_bad_group(
    grouped: np.ndarray, bad: np.ndarray, ax: int, name: str, rule: str
) -> str:
    where = np.argwhere(bad)
    first = tuple(int(i) for i in where[0])
    lead, g = first[:-1], first[-1]
    values = ", ".join(_format_value(v) for v in grouped[first])
    return (
        f"{name} is not 2:4 along axis {ax}: {len(where)} group(s) of 4 {rule}; "
        f"first offending group: {name}{_group_location(lead, g, ax)} = [{values}]"
    )


# --------------------------------------------------------------------------------------------------
# Tile patterns
# --------------------------------------------------------------------------------------------------

_PAIRS = tuple(itertools.combinations(range(4), 2))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def _build_tile_patterns() -> np.ndarray:
    """The 90 4x4 0/1 matrices with exactly two ones in every row and column.

    Row r (a position along the non-reduction axis) keeps the reduction-axis positions
    ``_PAIRS[p_r]``; patterns are listed in lexicographic order of (p_0, p_1, p_2, p_3). Pruning
    ties go to the lowest pattern index in this order.
    """
    patterns = []
    for choice in itertools.product(range(len(_PAIRS)), repeat=4):
        m = np.zeros((4, 4), dtype=bool)
        for r, p in enumerate(choice):
            m[r, list(_PAIRS[p])] = True
        if (m.sum(axis=0) == 2).all():
            patterns.append(m)
    out = np.stack(patterns)
    out.setflags(write=False)
    return out


#: The 90 tile patterns, shape (90, 4, 4): ``[p, r, c]`` with r along the non-reduction axis and c
#: along the reduction axis; in the tie-break order of ``method="tile"`` (read-only).
#:
#: :meta hide-value:
TILE_PATTERNS: np.ndarray = _build_tile_patterns()
_TILE_PATTERNS_F64 = TILE_PATTERNS.reshape(90, 16).T.astype(np.float64)  # (16, 90)
_TILE_CHUNK = 1 << 15  # tiles per matmul: (32768 x 90) float64 scores = 24 MB


def _tile_choice(mag: np.ndarray) -> np.ndarray:
    """Index of the best pattern for each tile of ``mag`` (T, 16), float64 magnitudes.

    Objective, lexicographic: most NaNs kept, then most infinities kept, then the largest sum of
    the finite magnitudes kept; ties: lowest pattern index (``argmax`` returns the first maximum).
    """
    finite = np.isfinite(mag)
    if finite.all():
        return np.argmax(mag @ _TILE_PATTERNS_F64, axis=1)
    nan_count = np.isnan(mag).astype(np.float64) @ _TILE_PATTERNS_F64
    inf_count = np.isinf(mag).astype(np.float64) @ _TILE_PATTERNS_F64
    count_key = nan_count * 17 + inf_count
    best = count_key.max(axis=1, keepdims=True)
    score = np.where(finite, mag, 0.0) @ _TILE_PATTERNS_F64
    return np.argmax(np.where(count_key == best, score, -1.0), axis=1)


def _tile_mask(a: np.ndarray, ax: int) -> np.ndarray:
    nd = a.ndim
    if nd < 2:
        raise ValueError("method='tile' needs a matrix (at least 2 dimensions)")
    if ax not in (nd - 1, nd - 2):
        raise ValueError(
            f"method='tile' prunes 4x4 tiles of the last two axes; axis must be one of them "
            f"({nd - 2} or {nd - 1}, or -2 or -1), got axis {ax}"
        )
    other = nd - 2 if ax == nd - 1 else nd - 1
    _check_multiple_of_4(a.shape, ax)
    _check_multiple_of_4(a.shape, other)
    mag = _magnitude64(a)
    if ax == nd - 2:  # make the reduction axis the last one
        mag = np.swapaxes(mag, -1, -2)
    lead, (R, C) = mag.shape[:-2], mag.shape[-2:]
    tiles = mag.reshape(lead + (R // 4, 4, C // 4, 4)).swapaxes(-3, -2).reshape(-1, 16)
    choice = np.empty(tiles.shape[0], dtype=np.intp)
    for start in range(0, tiles.shape[0], _TILE_CHUNK):
        choice[start:start + _TILE_CHUNK] = _tile_choice(tiles[start:start + _TILE_CHUNK])
    mask = TILE_PATTERNS.reshape(90, 16)[choice]
    mask = mask.reshape(lead + (R // 4, C // 4, 4, 4)).swapaxes(-3, -2).reshape(lead + (R, C))
    if ax == nd - 2:
        mask = np.swapaxes(mask, -1, -2)
    return np.ascontiguousarray(mask)


# --------------------------------------------------------------------------------------------------
# Pruning and checking
# --------------------------------------------------------------------------------------------------


def mask_2to4(a: Any, *, axis: int = -1, method: str = "strip") -> np.ndarray:
    """The boolean keep-mask that :func:`prune_2to4` applies.

    Parameters
    ----------
    a : array_like
        Dense array of a supported dtype (:data:`SUPPORTED_DTYPES`), 1-D or more; batched arrays
        prune every matrix independently.
    axis : int, optional
        The reduction axis (K of the sparse operand): groups of four run along it. Default -1.
    method : {"strip", "tile"}
        ``"strip"`` (1x4 groups along ``axis``): keep the two elements of largest magnitude in
        every group. ``"tile"`` (4x4 tiles of the last two axes, ``axis`` being one of them): keep,
        in every tile, the pattern from :data:`TILE_PATTERNS` (two per row and two per column) with
        the largest kept magnitude.

    Returns
    -------
    numpy.ndarray of bool
        Same shape as ``a``; True where the element is kept. Exactly two True per group of four
        along ``axis`` (``"tile"``: also along the other matrix axis).

    Raises
    ------
    TypeError
        If ``a``'s dtype is not supported.
    ValueError
        If the size of ``axis`` (``"tile"``: of either matrix axis) is not a multiple of 4, or
        ``method`` is unknown.

    Notes
    -----
    Magnitudes are compared exactly (int8: in a wider type, so -128 ranks as 128).

    - Ties (``"strip"``): on equal magnitude the lower index is kept.
    - NaN counts as the largest magnitude, above +-inf, so pruning never removes a NaN while a
      finite value could go instead; NaNs tie with each other (lower index kept).
    - ``-0.0`` and ``+0.0`` have equal magnitude.
    - Ties (``"tile"``): the first pattern in :data:`TILE_PATTERNS` order among those keeping the
      most magnitude. The objective is lexicographic: most NaNs kept, then most infinities, then
      the largest float64 sum of the finite magnitudes kept. The sums are exact for float16, int8
      and the float8 types; for bfloat16 and float32 they are rounded to float64, so two patterns
      whose kept magnitudes differ by less than about 2**-50 relative may be ranked either way.
    - ``"tile"`` chooses among patterns with *exactly* two per row and column (cuSPARSELt's
      documented constraint). Some masks with *at most* two per row and column are in no such
      pattern (e.g. a 6-cycle in a 3x3 block plus the opposite corner: 7 elements) and can keep
      more magnitude; they are not considered.
    """
    arr = _as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = _normalize_axis(axis, arr.ndim)
    if method == "strip":
        _check_multiple_of_4(arr.shape, ax)
        return np.ascontiguousarray(_ungroup(_top2_mask(_groups(_magnitude_key(arr), ax)), ax))
    if method == "tile":
        return _tile_mask(arr, ax)
    raise ValueError(f"method must be 'strip' or 'tile', got {method!r}")


def mask_from_scores(scores: Any, *, axis: int = -1, method: str = "strip") -> np.ndarray:
    """The 2:4 keep-mask that keeps the largest ``scores``: :func:`mask_2to4`'s selection on any ranking.

    Parameters
    ----------
    scores : array_like
        Real, non-negative ranking keys of any width (for instance exact magnitudes of a dtype this
        module does not prune, or importance scores); larger is kept. ``"strip"`` compares them exactly;
        ``"tile"`` sums them as float64.
    axis, method
        As :func:`mask_2to4`.

    Returns
    -------
    numpy.ndarray of bool
        As :func:`mask_2to4`; ties go to the lower index (``"strip"``) or to the first pattern
        (``"tile"``).
    """
    keys = np.asarray(scores)
    if keys.dtype.kind not in "fiub":
        raise TypeError(f"scores must be real (float, integer or bool), got dtype {keys.dtype}")
    if keys.ndim == 0:
        raise ValueError("scores must have at least one dimension")
    ax = _normalize_axis(axis, keys.ndim)
    if method == "strip":
        _check_multiple_of_4(keys.shape, ax)
        return np.ascontiguousarray(_ungroup(_top2_mask(_groups(keys, ax)), ax))
    if method == "tile":
        return _tile_mask(keys.astype(np.float64), ax)
    raise ValueError(f"method must be 'strip' or 'tile', got {method!r}")


def prune_2to4(a: Any, *, axis: int = -1, method: str = "strip") -> np.ndarray:
    """Magnitude pruning to 2:4 along ``axis``: a new array of the same dtype and shape.

    Parameters
    ----------
    a : array_like
        Dense array of a supported dtype (:data:`SUPPORTED_DTYPES`).
    axis : int, optional
        The reduction axis; groups of four run along it. Default -1.
    method : {"strip", "tile"}
        See :func:`mask_2to4`, which documents the selection and tie-break rules.

    Returns
    -------
    numpy.ndarray
        ``a`` where :func:`mask_2to4` is True, ``+0`` elsewhere. Kept elements keep their exact bit
        patterns (``-0.0`` and NaN payloads included).

    Raises
    ------
    TypeError
        Unsupported dtype.
    ValueError
        An axis whose size is not a multiple of 4 (the message names the axis and its size), or an
        unknown ``method``.

    Examples
    --------
    >>> import numpy as np
    >>> prune_2to4(np.array([100, 90, 80, 10, 20, 40, 30, 70], dtype=np.float16))
    array([100.,  90.,   0.,   0.,   0.,  40.,   0.,  70.], dtype=float16)
    """
    arr = _as_array(a)
    mask = mask_2to4(arr, axis=axis, method=method)
    return np.where(mask, arr, np.zeros((), dtype=arr.dtype))


def is_2to4(a: Any, *, axis: int = -1) -> bool:
    """Whether every group of four consecutive elements along ``axis`` has at most two non-zeros.

    Parameters
    ----------
    a : array_like
        Array of a supported dtype.
    axis : int, optional
        The reduction axis. Default -1.

    Returns
    -------
    bool

    Raises
    ------
    TypeError
        Unsupported dtype.
    ValueError
        The size of ``axis`` is not a multiple of 4.

    Notes
    -----
    ``-0.0`` counts as zero; NaN counts as non-zero. A matrix is valid for ``method="tile"``'s
    guarantee (two per row and column of every 4x4 tile) exactly when ``is_2to4`` holds along both
    of its last two axes.
    """
    arr = _as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = _normalize_axis(axis, arr.ndim)
    _check_multiple_of_4(arr.shape, ax)
    counts = _groups(_is_nonzero(arr), ax).sum(axis=-1)
    return bool((counts <= 2).all())


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------


def compress(a: Any, *, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Compress a 2:4 array into its logical format: kept values and their 2-bit positions.

    Parameters
    ----------
    a : array_like
        A 2:4 array (at most two non-zeros per group of four along ``axis``) of a supported dtype.
    axis : int, optional
        The reduction axis. Default -1.

    Returns
    -------
    values : numpy.ndarray
        Same dtype as ``a``, same shape except ``axis`` is halved: group ``g``'s two stored values
        are at positions ``2g`` and ``2g + 1`` along ``axis``, in index order.
    indices : numpy.ndarray of uint8
        Same shape as ``values``: each stored value's position (0..3) inside its group; strictly
        increasing within each group.

    Raises
    ------
    TypeError
        Unsupported dtype.
    ValueError
        The size of ``axis`` is not a multiple of 4, or ``a`` is not 2:4; the message gives the
        number of offending groups and the index and values of the first one (C order).

    Notes
    -----
    Every group stores two slots. Its non-zeros always get slots; a group with fewer than two
    non-zeros fills the spare slot(s) with its zero elements, preferring ``-0.0`` over ``+0.0`` and
    then the lowest index. Consequently ``decompress(*compress(a))`` reproduces ``a`` bit for bit
    (NaN payloads and ``-0.0`` included) whenever no group holds more than two elements whose bit
    pattern is non-zero; otherwise the surplus ``-0.0`` become ``+0.0`` (equal in value).
    """
    arr = _as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = _normalize_axis(axis, arr.ndim)
    _check_multiple_of_4(arr.shape, ax)
    nonzero = _groups(_is_nonzero(arr), ax)
    bad = nonzero.sum(axis=-1) > 2
    if bad.any():
        raise ValueError(
            _describe_first_bad_group(_groups(arr, ax), bad, ax, "a", "have more than 2 non-zeros")
        )
    bits = _groups(_bits(arr), ax)
    # slot priority: real non-zeros (2), then -0.0 (1: non-zero bits), then +0.0 (0)
    priority = nonzero.astype(np.uint8) + (bits != 0)
    keep = _top2_mask(priority)
    first = np.argmax(keep, axis=-1)
    second = 3 - np.argmax(keep[..., ::-1], axis=-1)
    idx = np.stack([first, second], axis=-1)
    values_bits = np.take_along_axis(bits, idx, axis=-1)
    values = _ungroup(values_bits, ax).view(arr.dtype)
    indices = _ungroup(idx.astype(np.uint8), ax)
    return np.ascontiguousarray(values), np.ascontiguousarray(indices)


def decompress(values: Any, indices: Any, *, axis: int = -1) -> np.ndarray:
    """Rebuild the dense 2:4 array from :func:`compress`'s output, bit for bit.

    Parameters
    ----------
    values : array_like
        Kept values, a supported dtype; ``axis`` has even size (two slots per group).
    indices : array_like of integers
        Same shape as ``values``: positions 0..3, strictly increasing within each group.
    axis : int, optional
        The axis along which the groups run. Default -1.

    Returns
    -------
    numpy.ndarray
        Dtype of ``values``; ``axis`` doubled. Every slot's bits land at ``4g + index``; the other
        elements are ``+0``.

    Raises
    ------
    TypeError
        Unsupported dtype of ``values``, or non-integer ``indices``.
    ValueError
        Shapes differ, ``axis`` has odd size, or an index pair is out of range or not increasing
        (the message names the first offending group).
    """
    vals = _as_array(values, "values")
    idx = np.asarray(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.shape != vals.shape:
        raise ValueError(f"indices shape {idx.shape} differs from values shape {vals.shape}")
    if vals.ndim == 0:
        raise ValueError("values must have at least one dimension")
    ax = _normalize_axis(axis, vals.ndim)
    if vals.shape[ax] % 2:
        raise ValueError(
            f"axis {ax} of values has size {vals.shape[ax]}, which is not even "
            f"(two slots per group of four)"
        )
    moved_idx = np.moveaxis(idx, ax, -1)
    pairs = moved_idx.reshape(moved_idx.shape[:-1] + (moved_idx.shape[-1] // 2, 2)).astype(np.int64)
    bad = (pairs[..., 0] < 0) | (pairs[..., 1] > 3) | (pairs[..., 0] >= pairs[..., 1])
    if bad.any():
        where = np.argwhere(bad)
        first = tuple(int(i) for i in where[0])
        lead, g = first[:-1], first[-1]
        parts = [str(i) for i in lead]
        parts.insert(ax, f"{2 * g}:{2 * g + 2}")
        raise ValueError(
            f"indices must be strictly increasing pairs in 0..3; {len(where)} group(s) are not; "
            f"first: indices[{', '.join(parts)}] = {[int(i) for i in pairs[first]]}"
        )
    vbits = np.moveaxis(_bits(vals), ax, -1)
    vbits = vbits.reshape(vbits.shape[:-1] + (vbits.shape[-1] // 2, 2))
    out = np.zeros(vbits.shape[:-1] + (4,), dtype=vbits.dtype)
    np.put_along_axis(out, pairs, vbits, axis=-1)
    return np.ascontiguousarray(_ungroup(out, ax).view(vals.dtype))


def compressed_nbytes(shape: tuple[int, ...], dtype: Any, *, axis: int = -1) -> int:
    """Bytes of the logical compressed format: the kept values plus 2 bits of metadata each.

    Parameters
    ----------
    shape : tuple of int
        Dense shape of the sparse operand.
    dtype : dtype-like
        Its element type (:data:`SUPPORTED_DTYPES`).
    axis : int, optional
        The reduction axis; its size must be a multiple of 4. Default -1.

    Returns
    -------
    int
        ``n/2 * itemsize + ceil(n/2 * 2 / 8)`` for ``n`` dense elements. Compressed / dense is
        0.5625 for 16-bit types (metadata = 12.5 % of the values), 0.625 for 8-bit types (25 %),
        0.53125 for float32. cuSPARSELt's real buffer (``cusparseLtSpMMACompressedSize``) adds
        layout padding.

    Raises
    ------
    TypeError
        Unsupported dtype.
    ValueError
        Negative sizes, or the size of ``axis`` is not a multiple of 4.
    """
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dt}; supported: {_supported_list()}")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative size")
    ax = _normalize_axis(axis, len(shape))
    _check_multiple_of_4(shape, ax)
    kept = math.prod(shape) // 2
    return kept * dt.itemsize + (kept * 2 + 7) // 8


# --------------------------------------------------------------------------------------------------
# GEMM semantics: one small function per rule (SEMANTICS lists them)
# --------------------------------------------------------------------------------------------------


class Rule(NamedTuple):
    """One semantic rule of :func:`matmul` (or of pruning), as quoted in the documentation."""

    rule: str
    function: str
    established: str


_DOCS = "cuSPARSELt documentation; to be confirmed on the H100"
_ASSUMED = "assumption (unconfirmed); to be confirmed on the H100"
_GPU = "experiment on an H100 with cuSPARSELt 0.8.0 (docs/semantics.rst, case {})"
_OURS = "our choice (cuSPARSELt's own choice not known; compare on the H100)"

#: Every non-arithmetic rule of the reference, with the private function that implements it and how
#: it was established. The documentation page quotes this table; change a rule here and there.
#:
#: :meta hide-value:
SEMANTICS: Mapping[str, Rule] = {
    "epilogue_order": Rule(
        "x = alpha * (A @ B) + beta * C + bias, in real arithmetic (float64 here, float32 on the "
        "GPU); then the activation; then the conversion to D's type",
        "_epilogue",
        _GPU.format("order_fp16, relu_int8_int8_bias_beta")),
    "scalar_precision": Rule(
        "alpha, beta, the ReLU bound and threshold and the GELU scaling are host float32: the "
        "reference rounds them to float32 first",
        "_as_f32_scalar", _DOCS),
    "alpha_vector": Rule(
        "alpha may be a float32 vector of length M: alpha[i] scales row i of A @ B",
        "_epilogue",
        _GPU.format("int8_alpha_vector") + " (INT8 inputs with compute 32I)"),
    "beta_vector": Rule(
        "beta may be a float32 vector of length M (row i of C), only together with a vector alpha",
        "_epilogue", _DOCS + " (INT8 with compute 32I only)"),
    "beta_zero": Rule(
        "beta = 0: C is not read, so NaN or Inf in C do not reach D (the BLAS convention)",
        "_compute_product", _ASSUMED),
    "bias": Rule(
        "bias has one value per row of D (length M), added to every column; float32 for integer D "
        "(int8, int32), else D's type (int8 -> float16/bfloat16 and fp8 -> float16 included); batches "
        "share one (M,) vector or have one per batch (batch, M)",
        "_bias_dtype",
        _GPU.format("bias_len_m_fp16, int8_bias_len, int8_to_fp16, e4m3_to_fp16_bias")),
    "relu": Rule(
        "y = 0 where x <= threshold, else x; then y = min(y, upper_bound) (defaults: threshold 0, "
        "upper bound +inf); NaN passes through. The threshold and the bound act only with ReLU on",
        "_relu",
        _GPU.format("relu_threshold_upper_fp16, relu_threshold_only_fp16")),
    "gelu": Rule(
        "y = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) (tanh approximation; "
        "evaluated as x / (1 + exp(-2 * sqrt(2/pi) * (x + 0.044715 * x**3))) to avoid "
        "cancellation)",
        "_gelu",
        "tanh form assumed (cuBLASLt's GELU epilogue); on the H100 the only GELU the library accepts "
        "has int8 output, where the tanh and erf forms round alike on every experiment value"),
    "gelu_alpha": Rule(
        "with GELU, D = alpha * gelu(x / alpha) * scaling where x = alpha * (A @ B) + beta * C + bias, "
        "i.e. gelu(A @ B + (beta * C + bias) / alpha) scaled by alpha; alpha must be non-zero. GELU is "
        "an int8 -> int8 epilogue (the library refuses it for every other type combination)",
        "_activation", _GPU.format("gelu_int8_int8, gelu_int8_int8_bias_beta")),
    "gelu_scaling": Rule(
        "the GELU scaling multiplies the output: y = gelu(x) * scaling",
        "_gelu",
        _GPU.format("gelu_scaling_int8_int8") + "; the GPU's tanh approximation can move a value "
        "across an int8 rounding boundary (exactly 13.5 came out as 13 on all 118 such outputs)"),
    "float_output": Rule(
        "float16/bfloat16/float32 D: round to nearest, ties to even, from the exact value (one "
        "rounding); overflow gives +-inf; NaN stays NaN",
        "_convert_output",
        _GPU.format("e4m3_to_bf16, bf16_alpha_beta, e4m3_to_fp32") + "; overflow and NaN from the documentation"),
    "fp8_output": Rule(
        "float8 D: round to nearest even, then saturate to the largest finite value (+-448 for "
        "e4m3, +-57344 for e5m2; +-inf saturates too); NaN stays NaN",
        "_convert_output",
        _ASSUMED + "; not a combination matmul offers: e4m3 -> e4m3 with C and D of one type was "
        "refused (NOT_SUPPORTED) on the H100, case e4m3_to_e4m3_saturate"),
    "int8_output": Rule(
        "int8 D: round half to even, then saturate to [-128, 127]; NaN becomes 0",
        "_convert_output",
        _GPU.format("int8_round_half, int8_saturate") + "; NaN -> 0 assumed"),
    "int32_output": Rule(
        "int32 D: with alpha = 1, beta = 0 (or no C), no bias and no activation, the integer "
        "accumulator itself; otherwise round half to even and saturate to the int32 range; NaN "
        "becomes 0",
        "_convert_output",
        _GPU.format("int8_to_int32, int8_to_int32_alpha_half") + "; saturation and NaN -> 0 assumed"),
    "int32_accumulator": Rule(
        "int8 products are summed in a 32-bit integer that wraps modulo 2**32 (only reachable "
        "for K >= 2**17)",
        "_wrap_int32", _ASSUMED),
    "default_out_dtype": Rule(
        "D's type when neither out_dtype nor c gives it: the input type for float16, bfloat16 and "
        "float32, int32 for int8 (exact), float16 for fp8 (pycusparselt.types, shared with the GPU layer)",
        "_resolve_out_dtype",
        "our choice (cuSPARSELt has no default: the caller picks C/D's type)"),
    "prune_strip_ties": Rule(
        "strip pruning keeps the two largest magnitudes per group; equal magnitudes: lower index "
        "kept; NaN ranks above +-inf",
        "_top2_mask", _OURS),
    "prune_tile_ties": Rule(
        "tile pruning keeps the pattern (2 per row and column of each 4x4 tile) with the most "
        "NaNs, then infinities, then finite magnitude kept; ties: lowest index in TILE_PATTERNS",
        "_tile_choice", _OURS),
    "compress_spare_slots": Rule(
        "a group with fewer than 2 non-zeros stores zeros in its spare slots, preferring -0.0 "
        "elements, then the lowest index; indices increase within each group",
        "compress", _OURS),
}


def _as_f32_scalar(name: str, value: Any) -> float:
    """A host float parameter as the GPU receives it (float32), returned as float64."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    return float(np.float32(v)) if math.isfinite(v) else v


def _as_f32_vector(name: str, value: Any, m: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise ValueError(
            f"{name} must be a scalar or a vector of length M={m}, got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == _BF16):
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return _to_float64(arr).astype(np.float32).astype(np.float64)


def _bias_dtype(out_dt: np.dtype) -> np.dtype:
    """The bias element type (SEMANTICS["bias"]): float32 for integer D, else D's type."""
    return types.bias_dtype(out_dt)


def _relu(x: np.ndarray, threshold: float, upper_bound: float) -> np.ndarray:
    """ReLU with threshold and upper bound (SEMANTICS["relu"])."""
    y = np.where(x <= threshold, 0.0, x)
    return np.minimum(y, upper_bound)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x: np.ndarray, scaling: float) -> np.ndarray:
    """tanh-approximated GELU, output times ``scaling`` (SEMANTICS["gelu"], ["gelu_scaling"]).

    0.5 * x * (1 + tanh(u)) is evaluated as x / (1 + exp(-2u)), the same function without the
    cancellation of 1 + tanh(u) for large negative x.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        u = _GELU_C * (x + 0.044715 * x * x * x)
        y = x / (1.0 + np.exp(-2.0 * u))
        y = np.where(np.isneginf(x), -0.0, y)  # -inf / inf
        return y * scaling


def _wrap_int32(acc: np.ndarray) -> np.ndarray:
    """The int64 accumulator as a wrapping 32-bit accumulator sees it
    (SEMANTICS["int32_accumulator"])."""
    return ((acc + 2**31) % 2**32 - 2**31).astype(np.int64)


def _round_float(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Round float64 ``x`` to the nearest value of float type ``dt`` (ties to even), in float64.

    One correct rounding from float64 (ml_dtypes' astype rounds through float32, which can round
    twice). Values beyond the range come back unrounded-but-huge for the caller to overflow or
    saturate; subnormals of ``dt`` are honoured.
    """
    info = _FLOAT_INFO[dt]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _, e = np.frexp(x)  # |x| = m * 2**e, m in [0.5, 1)
        quantum_exp = np.maximum(e - 1, info.emin) - info.mant
        scale = np.ldexp(1.0, -quantum_exp)
        scaled = x * scale
        rounded = np.where(np.isfinite(scaled), np.rint(scaled) / scale, x)
    return rounded


def _convert_output(y: np.ndarray, dt: np.dtype) -> np.ndarray:
    """float64 epilogue result -> D's type (SEMANTICS["float_output"], ["fp8_output"],
    ["int8_output"], ["int32_output"] for the non-exact path)."""
    if dt in (_I8, _I32):
        info = np.iinfo(dt)
        with np.errstate(invalid="ignore"):
            r = np.clip(np.rint(y), info.min, info.max)
            r = np.where(np.isnan(r), 0.0, r)
        return r.astype(dt)
    info = _FLOAT_INFO[dt]
    r = _round_float(np.asarray(y, dtype=np.float64), dt)
    if info.saturate:
        r = np.clip(r, -info.max, info.max)  # NaN stays NaN
    else:
        r = np.where(np.abs(r) > info.max, np.copysign(np.inf, r), r)
    if dt == _F32:
        return r.astype(np.float32)
    if dt == _F16:
        return r.astype(np.float16)  # exact: r is representable (or +-inf / NaN)
    with np.errstate(over="ignore", invalid="ignore"):
        return r.astype(np.float32).astype(dt)  # exact: r is representable in dt


def _resolve_out_dtype(in_dt: np.dtype, out_dtype: Any, c: np.ndarray | None) -> np.ndarray:
    """D's type (SEMANTICS["default_out_dtype"]) and the type-combination check."""
    if out_dtype is not None:
        out = np.dtype(out_dtype)
        if c is not None and c.dtype != out:
            raise TypeError(f"c has dtype {c.dtype} but out_dtype is {out}; C and D share one type")
    elif c is not None:
        out = c.dtype
    else:
        out = types.default_out_dtype(in_dt)
    if out not in VALID_COMBINATIONS[in_dt]:
        raise TypeError(
            f"unsupported type combination: A/B {in_dt} with C/D {out}; cuSPARSELt supports "
            + _combinations_text()
        )
    return out


def _combinations_text() -> str:
    return types.combinations_text()


# --------------------------------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------------------------------


@dataclass
class _Product:
    """Everything matmul computes before the conversion to D's type."""

    a: np.ndarray
    b: np.ndarray
    in_dtype: np.dtype
    out_dtype: np.dtype
    k: int
    out_shape: tuple[int, ...]
    acc: np.ndarray  # float64, or int64 (already wrapped to 32 bits) for int8 inputs
    alpha: Any  # float or (M, 1) float64
    beta: Any
    c64: np.ndarray | None  # broadcast to out_shape
    bias64: np.ndarray | None  # broadcastable to out_shape, (..., M, 1)
    x: np.ndarray  # float64 epilogue input of the activation
    y: np.ndarray  # float64 after the activation
    activation: str | None
    relu_threshold: float
    relu_upper_bound: float
    gelu_scaling: float
    exact_int32: bool  # the plain int8 -> int32 path (D = the accumulator)


def _epilogue(acc64: np.ndarray, alpha: Any, beta: Any, c64: np.ndarray | None,
              bias64: np.ndarray | None) -> np.ndarray:
    """x = alpha * acc + beta * C + bias (SEMANTICS["epilogue_order"], alpha/beta/bias indexing)."""
    with np.errstate(invalid="ignore", over="ignore"):
        x = alpha * acc64
        if c64 is not None:
            x = x + beta * c64
        if bias64 is not None:
            x = x + bias64
    return x


def _activation(x: np.ndarray, activation: str | None, threshold: float, upper: float,
                scaling: float, alpha: Any) -> np.ndarray:
    if activation is None:
        return x
    if activation == "relu":
        return _relu(x, threshold, upper)
    # SEMANTICS["gelu_alpha"]: GELU acts on x / alpha and its output is scaled by alpha again
    with np.errstate(invalid="ignore", over="ignore"):
        return alpha * _gelu(x / alpha, scaling)


def _compute_product(
    a: Any, b: Any, c: Any, *, alpha: Any, beta: Any, bias: Any, activation: str | None,
    out_dtype: Any, relu_upper_bound: float, relu_threshold: float, gelu_scaling: float,
) -> _Product:
    a = _as_array(a, "a")
    b = _as_array(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    in_dt = a.dtype
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"a and b must be matrices (..., M, K) and (..., K, N); got shapes {a.shape} and "
            f"{b.shape}"
        )
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2:
        raise ValueError(
            f"inner dimensions differ: a is (..., M, K) = {a.shape}, b is (..., K, N) = {b.shape}"
        )
    c_arr = None if c is None else np.asarray(c)
    out_dt = _resolve_out_dtype(in_dt, out_dtype, c_arr)

    batch_shapes = [a.shape[:-2], b.shape[:-2]]
    if c_arr is not None:
        if c_arr.ndim < 2 or c_arr.shape[-2:] != (m, n):
            raise ValueError(f"c must have shape (..., M, N) = (..., {m}, {n}), got {c_arr.shape}")
        batch_shapes.append(c_arr.shape[:-2])

    # activation and its parameters
    if activation is not None:
        if not isinstance(activation, str) or activation.lower() not in ("relu", "gelu"):
            raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
        activation = activation.lower()
    threshold = _as_f32_scalar("relu_threshold", relu_threshold)
    upper = _as_f32_scalar("relu_upper_bound", relu_upper_bound)
    scaling = _as_f32_scalar("gelu_scaling", gelu_scaling)
    if activation != "relu" and (threshold != 0.0 or upper != math.inf):
        raise ValueError("relu_threshold and relu_upper_bound need activation='relu'")
    if activation != "gelu" and scaling != 1.0:
        raise ValueError("gelu_scaling needs activation='gelu'")

    # alpha and beta: float32 scalars, or float32 vectors of length M (per row of D)
    alpha_is_vec = np.ndim(alpha) > 0
    beta_is_vec = np.ndim(beta) > 0
    if alpha_is_vec:
        alpha_v = _as_f32_vector("alpha", alpha, m)[:, None]
    else:
        alpha_v = _as_f32_scalar("alpha", alpha)
    if beta_is_vec:
        if not alpha_is_vec:
            raise ValueError("a vector beta needs a vector alpha (cuSPARSELt's BETA_VECTOR_SCALING "
                             "requires ALPHA_VECTOR_SCALING)")
        beta_v = _as_f32_vector("beta", beta, m)[:, None]
    else:
        beta_v = _as_f32_scalar("beta", beta)
    beta_zero = (not beta_is_vec) and beta_v == 0.0
    if c_arr is None and not beta_zero:
        raise ValueError(
            "beta is non-zero but c is None; pass C (cuSPARSELt reads C when beta != 0)"
        )

    # bias: one value per row of D
    bias64 = None
    if bias is not None:
        bias_arr = np.asarray(bias)
        want = _bias_dtype(out_dt)
        if bias_arr.dtype != want:
            raise TypeError(f"bias must have dtype {want} for A/B {in_dt} and D {out_dt}, "
                            f"got {bias_arr.dtype}")
        if bias_arr.ndim < 1 or bias_arr.shape[-1] != m:
            raise ValueError(f"bias must have shape (M,) or (batch, M) with M={m} (one value per "
                             f"row of D), got {bias_arr.shape}")
        batch_shapes.append(bias_arr.shape[:-1])
        bias64 = _to_float64(bias_arr)[..., :, None]

    try:
        batch = np.broadcast_shapes(*batch_shapes)
    except ValueError:
        raise ValueError(
            "batch dimensions do not broadcast: a " + str(a.shape) + ", b " + str(b.shape)
            + ("" if c_arr is None else f", c {c_arr.shape}")
            + ("" if bias is None else f", bias {np.shape(bias)}")
        ) from None
    out_shape = tuple(batch) + (m, n)

    a64, b64 = _to_float64(a), _to_float64(b)
    with np.errstate(invalid="ignore", over="ignore"):
        acc = np.broadcast_to(np.matmul(a64, b64), out_shape)
    if in_dt == _I8:
        # exact: every partial sum is an integer below K * 2**14, far under 2**53 (BLAS speed)
        acc = _wrap_int32(acc.astype(np.int64))
        acc64 = acc.astype(np.float64)
    else:
        acc64 = acc
    c64 = None
    if c_arr is not None:
        c64 = np.broadcast_to(_to_float64(c_arr), out_shape)
        if beta_zero:
            c64 = None  # beta == 0: C does not contribute (and NaN in C does not propagate)
    if activation == "gelu" and np.any(np.asarray(alpha_v) == 0):
        raise ValueError("alpha must be non-zero with activation='gelu' (cuSPARSELt applies GELU to x / alpha)")
    x = np.broadcast_to(_epilogue(acc64, alpha_v, beta_v, c64, bias64), out_shape)
    y = _activation(x, activation, threshold, upper, scaling, alpha_v)
    exact = (in_dt == _I8 and out_dt == _I32 and not alpha_is_vec and alpha_v == 1.0
             and c64 is None and bias64 is None and activation is None)
    return _Product(a, b, in_dt, out_dt, k, out_shape, acc, alpha_v, beta_v, c64, bias64, x, y,
                    activation, threshold, upper, scaling, exact)


def matmul(
    a: Any,
    b: Any,
    c: Any = None,
    *,
    alpha: float | Any = 1.0,
    beta: float | Any = 0.0,
    bias: Any = None,
    activation: str | None = None,
    out_dtype: Any = None,
    relu_upper_bound: float = math.inf,
    relu_threshold: float = 0.0,
    gelu_scaling: float = 1.0,
) -> np.ndarray:
    """``D = activation(alpha * (A @ B) + beta * C + bias)`` with cuSPARSELt's semantics.

    Parameters
    ----------
    a : array_like, shape (..., M, K)
        The sparse operand, exactly as the GPU sees it (already pruned and in its dtype; the
        reference does not require it to be 2:4).
    b : array_like, shape (..., K, N)
        The dense operand; same dtype as ``a``.
    c : array_like, shape (..., M, N), optional
        C, of D's type. Needed when ``beta`` is non-zero.
    alpha : float or array_like of shape (M,)
        Scale of ``A @ B``: a scalar, or one value per row of D ("alpha vector scaling",
        ``alpha[i]`` scales row ``i``). Rounded to float32, as the GPU receives it.
    beta : float or array_like of shape (M,)
        Scale of C; a vector (one per row) only together with a vector ``alpha``, as in cuSPARSELt.
    bias : array_like, shape (M,) or (batch..., M), optional
        One value per **row** of D (``bias[i]`` is added to every element of row ``i``). float32
        for an integer D (int8, int32), else D's type (as measured on the H100: an int8 -> float16
        GEMM reads its bias as float16). A batch shares an ``(M,)`` bias or has one row per batch.
    activation : {None, "relu", "gelu"}
        See ``relu_threshold``, ``relu_upper_bound``, ``gelu_scaling`` and :data:`SEMANTICS`.
    out_dtype : dtype-like, optional
        D's type. Default: ``c``'s dtype if given, else the input type for float inputs and int32
        for int8 inputs. Valid combinations: :data:`VALID_COMBINATIONS`.
    relu_upper_bound : float
        ReLU clips at this value (default +inf).
    relu_threshold : float
        ReLU zeroes ``x <= relu_threshold`` (default 0).
    gelu_scaling : float
        GELU's output is multiplied by this (default 1). With GELU, alpha must be non-zero: the GPU
        computes ``alpha * gelu(x / alpha) * gelu_scaling`` (:data:`SEMANTICS` ``gelu_alpha``).

    Returns
    -------
    numpy.ndarray, shape (batch..., M, N), D's dtype
        Batch dimensions broadcast like :func:`numpy.matmul` (a batch of one broadcasts).

    Raises
    ------
    TypeError
        Unsupported dtype, ``a``/``b`` of different dtypes, an invalid A/B -> C/D combination
        (the message lists the valid ones), or a bias of the wrong dtype.
    ValueError
        Shape mismatches (inner dimension, C, bias, alpha/beta vectors, batches), an unknown
        activation, activation parameters without their activation, or a non-zero ``beta`` without
        ``c``.

    Notes
    -----
    Products accumulate in float64 (exact for every input type: products are exact and the sums'
    rounding, at most ``K * 2**-53`` relative to ``|A| @ |B|``, is far below any GPU tolerance);
    int8 inputs accumulate exactly as integers, wrapped to 32 bits. The epilogue runs in float64
    and the result is converted with one correct rounding. The rules not fixed by arithmetic are
    in :data:`SEMANTICS`.
    """
    p = _compute_product(
        a, b, c, alpha=alpha, beta=beta, bias=bias, activation=activation, out_dtype=out_dtype,
        relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold, gelu_scaling=gelu_scaling,
    )
    if p.exact_int32:
        return np.ascontiguousarray(p.acc.astype(np.int32))
    return np.ascontiguousarray(_convert_output(p.y, p.out_dtype))


# --------------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------------

# unit round-off (half an ulp at 1) of each floating type
_UNIT_ROUNDOFF = {_F16: 2.0**-11, _BF16: 2.0**-8, _F32: 2.0**-24, _E4M3: 2.0**-4, _E5M2: 2.0**-3}

# accumulator significand bits (p, including the implicit bit) per (input type, compute)
_ACC_BITS = {
    (_F16, "32F"): 24, (_BF16, "32F"): 24, (_F32, "32F"): 24, (_F32, "TF32"): 24,
    (_F16, "16F"): 11,
    # FP8 Tensor Core accumulation on Hopper keeps about 14 bits (DeepSeek-V3 report): assumed
    (_E4M3, "32F"): 14, (_E5M2, "32F"): 14,
}
# smallest exponent at which accumulation is certainly exact (normal range: flush-to-zero safe)
_ACC_MIN_EXP = {24: -126, 14: -126, 11: -14}
_ACC_MAX = {24: float(np.finfo(np.float32).max), 14: float(np.finfo(np.float32).max), 11: 65504.0}
# per-operation absolute allowance for underflow (flush-to-zero of float32; fp16 subnormal half-ulp)
_ACC_TINY = {24: 2.0**-126, 14: 2.0**-126, 11: 2.0**-24}
# TF32 input rounding per operand: truncation-safe (2**-11 if the hardware rounds to nearest)
_TF32_INPUT_REL = 2.0**-10
_GELU_ALLOWANCE = 2.0**-10  # the GPU's tanh approximation: |tanh error| <= 2**-11, doubled


@dataclass(frozen=True)
class Tolerance:
    """How far a correct cuSPARSELt result may be from :func:`matmul`, and where that comes from.

    The GPU's value before the conversion to D's type, ``x_gpu``, is bounded element-wise by::

        |x_gpu - x| <= |alpha| * E_acc
                       + epilogue_ops * epilogue_unit * (|alpha*AB| + |beta*C| + |bias|)
        E_acc = (acc_rel + input_rel) * S + k * acc_tiny,      S = |A| @ |B|

    ``E_acc`` is 0 for an element whose accumulation is certainly exact: integer inputs, or all
    products and partial sums representable in the accumulator (``S <= 2**acc_bits * q`` where
    ``q`` is the smallest power of two dividing every product of that row of A and column of B).
    The activation maps the interval ``[x - E, x + E]`` (GELU widened by ``gelu_rel * |x| / 2``),
    and D's rounding maps its ends: :func:`matmul_bounds` returns those per-element limits. A
    correct result is within one ulp of D's type (``rtol``) plus the propagated error; a wrong one
    (a lost or extra product, a wrong row) is caught whenever its error exceeds that, which exact
    (e.g. small-integer) test data makes certain.

    Attributes
    ----------
    in_dtype, out_dtype : numpy.dtype
        Types of A/B and C/D.
    compute : str
        Compute type: "32F", "16F", "TF32" or "32I".
    k : int
        Reduction size.
    acc_bits : int or None
        Significand bits of the accumulator (None for integer accumulation).
    acc_rel : float
        ``k * 2**(1 - acc_bits)``: worst-case accumulation error relative to ``|A| @ |B|``, for
        additions that truncate (Tensor Cores align and add with round-toward-zero: Fasi, Higham,
        Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021).
    acc_tiny : float
        Absolute allowance per addition for underflow / flush-to-zero.
    input_rel : float
        Rounding of the inputs inside the Tensor Cores relative to ``|A| @ |B|`` (TF32: two
        operands of ``2**-10`` each, truncation-safe; else 0).
    epilogue_unit : float
        Unit round-off of the epilogue arithmetic (float32: ``2**-24``; compute 16F: ``2**-11``).
    gelu_rel : float
        Allowance for the GPU's tanh approximation in GELU, relative to ``|x| / 2``.
    out_roundoff : float
        Unit round-off of D's type (0 for integer D, which rounds to integers).
    """

    in_dtype: np.dtype
    out_dtype: np.dtype
    compute: str
    k: int
    acc_bits: int | None
    acc_rel: float
    acc_tiny: float
    input_rel: float
    epilogue_unit: float
    gelu_rel: float
    out_roundoff: float

    @property
    def rtol(self) -> float:
        """One ulp of D's type relative to ``|D|`` (two unit round-offs); 0 for integer D."""
        return 2.0 * self.out_roundoff

    @property
    def atol_scale(self) -> float:
        """Coefficient of ``|alpha| * (|A| @ |B|)`` in the worst-case bound
        (``acc_rel + input_rel``)."""
        return self.acc_rel + self.input_rel

    @property
    def exact(self) -> bool:
        """True when the accumulation is exact (int8 inputs, compute 32I)."""
        return self.acc_bits is None


def matmul_tolerance(
    in_dtype: Any, out_dtype: Any, k: int, *, compute: str | None = None
) -> Tolerance:
    """The error model of a cuSPARSELt GEMM for these types, reduction size and compute type.

    Parameters
    ----------
    in_dtype, out_dtype : dtype-like
        A/B and C/D types (a combination from :data:`VALID_COMBINATIONS`).
    k : int
        The reduction dimension K.
    compute : {"32F", "16F", "TF32", "32I"}, optional
        Compute type; default the first of :data:`DEFAULT_COMPUTE` for ``in_dtype``.

    Returns
    -------
    Tolerance
        See its docstring for the bound and every constant's origin.

    Raises
    ------
    TypeError
        Invalid type combination or compute type for ``in_dtype``.
    ValueError
        Negative ``k``.
    """
    in_dt, out_dt = np.dtype(in_dtype), np.dtype(out_dtype)
    if in_dt not in VALID_COMBINATIONS or out_dt not in VALID_COMBINATIONS[in_dt]:
        raise TypeError(
            f"unsupported type combination: A/B {in_dt} with C/D {out_dt}; cuSPARSELt supports "
            + _combinations_text()
        )
    if compute is None:
        compute = DEFAULT_COMPUTE[in_dt][0]
    if compute not in DEFAULT_COMPUTE[in_dt]:
        raise TypeError(f"compute type {compute!r} is not valid for A/B {in_dt}; valid: "
                        f"{', '.join(DEFAULT_COMPUTE[in_dt])}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if in_dt == _I8:
        acc_bits, acc_rel, acc_tiny = None, 0.0, 0.0
    else:
        acc_bits = _ACC_BITS[(in_dt, compute)]
        # truncation-safe: Tensor Cores align and add with round-toward-zero (Fasi et al., 2021),
        # so each addition may lose up to one ulp (2 unit round-offs) rather than half of one
        acc_rel, acc_tiny = k * 2.0 ** (1 - acc_bits), _ACC_TINY[acc_bits]
    input_rel = 2 * _TF32_INPUT_REL + _TF32_INPUT_REL**2 if in_dt == _F32 else 0.0
    epilogue_unit = 2.0**-11 if compute == "16F" else 2.0**-24
    out_roundoff = _UNIT_ROUNDOFF.get(out_dt, 0.0)
    return Tolerance(in_dt, out_dt, compute, k, acc_bits, acc_rel, acc_tiny, input_rel,
                     epilogue_unit, _GELU_ALLOWANCE, out_roundoff)


def _lowbit_exponent(x64: np.ndarray) -> np.ndarray:
    """Exponent of the least significant set bit of each value (+inf for 0 and non-finite)."""
    finite = np.isfinite(x64) & (x64 != 0)
    safe = np.where(finite, np.abs(x64), 1.0)
    m, e = np.frexp(safe)
    mant = np.ldexp(m, 53).astype(np.int64)  # exact integer in [2**52, 2**53)
    low = mant & -mant
    tz = np.frexp(low.astype(np.float64))[1] - 1
    return np.where(finite, (e - 53 + tz).astype(np.float64), np.inf)


def _tf32_representable(x64: np.ndarray) -> np.ndarray:
    """True where the value has at most 11 significant bits (TF32 inputs are used unchanged)."""
    finite = np.isfinite(x64) & (x64 != 0)
    top = np.frexp(np.where(finite, x64, 1.0))[1] - 1
    return ~finite | (top - _lowbit_exponent(x64) <= 10)


def _accumulation_error(p: _Product, tol: Tolerance) -> np.ndarray:
    """Per-element bound E_acc on |acc_gpu - acc| (see :class:`Tolerance`)."""
    if tol.acc_bits is None:
        return np.zeros(p.out_shape)
    a64, b64 = _to_float64(p.a), _to_float64(p.b)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.broadcast_to(np.matmul(np.abs(a64), np.abs(b64)), p.out_shape)
        qa = _lowbit_exponent(a64).min(axis=-1, initial=np.inf)  # (..., M)
        qb = _lowbit_exponent(b64).min(axis=-2, initial=np.inf)  # (..., N)
        q = np.broadcast_to(qa[..., :, None] + qb[..., None, :], p.out_shape)
        s_in = s * (1.0 + tol.input_rel)
        exact_acc = (s == 0) | (
            (s_in <= np.ldexp(1.0, np.minimum(tol.acc_bits + q, 2000).astype(np.int32)))
            & (q >= _ACC_MIN_EXP[tol.acc_bits])
            & (s_in <= _ACC_MAX[tol.acc_bits])
        )
        err = np.where(exact_acc, 0.0, tol.acc_rel * s_in + tol.k * tol.acc_tiny)
        if tol.input_rel:
            ra = _tf32_representable(a64).all(axis=-1)
            rb = _tf32_representable(b64).all(axis=-2)
            inputs_exact = np.broadcast_to(ra[..., :, None] & rb[..., None, :], p.out_shape)
            err = err + np.where(inputs_exact, 0.0, tol.input_rel * s)
    return err


def _fits_f32(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float32).astype(np.float64) == v


def _epilogue_exact(p: _Product, e_acc: np.ndarray) -> np.ndarray:
    """Where the float32 epilogue cannot round: the accumulator is exact and float32, and the
    terms alpha*acc, beta*C and bias are float32 values whose every partial sum is too (all are
    multiples of 2**q and their magnitudes add up to at most 2**(24 + q))."""
    acc64 = p.acc.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        terms = [p.alpha * acc64]
        ok = (e_acc == 0) & _fits_f32(acc64)
        if p.c64 is not None:
            ok &= _fits_f32(p.c64)
            terms.append(p.beta * p.c64)
        if p.bias64 is not None:
            terms.append(p.bias64)
        terms = [np.broadcast_to(t, p.out_shape) for t in terms]
        total = np.zeros(p.out_shape)
        q = np.full(p.out_shape, np.inf)
        for t in terms:
            ok &= _fits_f32(t)  # products of float32 values are exact in float64
            total = total + np.abs(t)
            q = np.minimum(q, _lowbit_exponent(t))
        limit = np.ldexp(1.0, np.clip(24 + q, -1074, 1000).astype(np.int32))
        return ok & ((total == 0) | ((total <= limit) & (q >= -149)))


def _relu_image(
    lo: np.ndarray, hi: np.ndarray, t: float, u: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ReLU(x) for x in [lo, hi]: monotone on each side of the threshold jump."""
    ylo, yhi = _relu(lo, t, u), _relu(hi, t, u)
    spans = (lo <= t) & (hi > t)
    jump = min(t, u)  # limit of ReLU just above the threshold
    return (np.where(spans, np.minimum(np.minimum(ylo, yhi), min(0.0, jump)), np.minimum(ylo, yhi)),
            np.where(spans, np.maximum(np.maximum(ylo, yhi), max(0.0, jump)), np.maximum(ylo, yhi)))


def _gelu_argmin() -> float:
    """The minimiser of the tanh-approximated GELU (about -0.7518), by golden-section search."""
    lo, hi = -1.5, 0.0
    f = lambda v: 0.5 * v * (1 + math.tanh(_GELU_C * (v + 0.044715 * v**3)))  # noqa: E731
    for _ in range(200):
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if f(m1) < f(m2):
            hi = m2
        else:
            lo = m1
    return 0.5 * (lo + hi)


_GELU_XMIN = _gelu_argmin()


def _gelu_image(lo: np.ndarray, hi: np.ndarray, scaling: float, rel: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of gelu(x) * scaling for x in [lo, hi], widened for the GPU's tanh approximation."""
    g_lo, g_hi = _gelu(lo, 1.0), _gelu(hi, 1.0)
    gmin = np.minimum(g_lo, g_hi)
    gmin = np.where((lo <= _GELU_XMIN) & (hi >= _GELU_XMIN), _gelu(np.array(_GELU_XMIN), 1.0), gmin)
    gmax = np.maximum(g_lo, g_hi)
    with np.errstate(invalid="ignore", over="ignore"):
        slack = 0.5 * rel * np.maximum(np.abs(lo), np.abs(hi)) + 4 * 2.0**-24 * np.maximum(
            np.abs(gmin), np.abs(gmax))
        gmin, gmax = gmin - slack, gmax + slack
        if scaling >= 0:
            return gmin * scaling, gmax * scaling
        return gmax * scaling, gmin * scaling


def matmul_bounds(
    a: Any,
    b: Any,
    c: Any = None,
    *,
    compute: str | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element limits ``lo <= D_gpu <= hi`` for a correct cuSPARSELt result.

    Parameters
    ----------
    a, b, c
        As for :func:`matmul`.
    compute : {"32F", "16F", "TF32", "32I"}, optional
        The compute type the GPU used (default: :data:`DEFAULT_COMPUTE`).
    **kwargs
        The other keyword arguments of :func:`matmul` (alpha, beta, bias, activation, out_dtype,
        relu_upper_bound, relu_threshold, gelu_scaling).

    Returns
    -------
    lo, hi : numpy.ndarray
        D's shape and dtype. Where the reference is NaN both are NaN (the GPU must give NaN; for
        integer D, NaN converts to 0). The plain int8 -> int32 path gives ``lo == hi`` (exact).

    Notes
    -----
    The pre-conversion value ``x`` gets the radius of :class:`Tolerance`; the activation's image of
    ``[x - E, x + E]`` is taken exactly (ReLU's jump at the threshold and GELU's minimum included);
    the conversion to D's type is monotone, so the limits are the converted ends. Elements whose
    reference is not finite are not widened.
    """
    p = _compute_product(a, b, c, **_matmul_kwargs(kwargs))
    if p.exact_int32:
        d = p.acc.astype(np.int32)
        return d, d.copy()
    tol = matmul_tolerance(p.in_dtype, p.out_dtype, p.k, compute=compute)
    e_acc = _accumulation_error(p, tol)
    alpha_abs = np.abs(p.alpha)
    acc64 = p.acc.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ops = np.zeros(p.out_shape)
        magnitude = np.abs(p.alpha * acc64)
        if np.ndim(p.alpha) or p.alpha != 1.0:
            ops = ops + 1
        if p.in_dtype == _I8:  # int32 accumulator -> float32
            ops = ops + (np.abs(acc64) > 2.0**24)
        if p.c64 is not None:
            magnitude = magnitude + np.abs(p.beta * p.c64)
            ops = ops + 2 + (np.abs(p.c64) > 2.0**24)  # beta*C, the add, int32 C -> float32
        if p.bias64 is not None:
            magnitude = magnitude + np.abs(p.bias64)
            ops = ops + 1
        if tol.compute == "16F":
            ops = ops + 1  # alpha/beta possibly rounded to half
        else:  # no rounding at all where every step is exact in float32, in any order
            ops = np.where(_epilogue_exact(p, e_acc), 0, ops)
        radius = alpha_abs * e_acc + ops * tol.epilogue_unit * magnitude
        radius = np.where(ops > 0, radius + _ACC_TINY[24], radius)
        finite = np.isfinite(p.x) & np.isfinite(radius)
        x_lo = np.where(finite, p.x - radius, p.x)
        x_hi = np.where(finite, p.x + radius, p.x)
    if p.activation == "relu":
        y_lo, y_hi = _relu_image(x_lo, x_hi, p.relu_threshold, p.relu_upper_bound)
    elif p.activation == "gelu":
        # y = alpha * gelu(x / alpha) (SEMANTICS["gelu_alpha"]): map the interval through each step
        with np.errstate(invalid="ignore", over="ignore"):
            z1, z2 = x_lo / p.alpha, x_hi / p.alpha
            g_lo, g_hi = _gelu_image(np.minimum(z1, z2), np.maximum(z1, z2), p.gelu_scaling, tol.gelu_rel)
            y1, y2 = p.alpha * g_lo, p.alpha * g_hi
        y_lo, y_hi = np.minimum(y1, y2), np.maximum(y1, y2)
        y_lo = np.where(finite, y_lo, p.y)
        y_hi = np.where(finite, y_hi, p.y)
    else:
        y_lo, y_hi = x_lo, x_hi
    return _convert_output(y_lo, p.out_dtype), _convert_output(y_hi, p.out_dtype)


_MATMUL_KWARGS = ("alpha", "beta", "bias", "activation", "out_dtype", "relu_upper_bound",
                  "relu_threshold", "gelu_scaling")


def _matmul_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_MATMUL_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    full = {"alpha": 1.0, "beta": 0.0, "bias": None, "activation": None, "out_dtype": None,
            "relu_upper_bound": math.inf, "relu_threshold": 0.0, "gelu_scaling": 1.0}
    full.update(kwargs)
    return full


def assert_close(
    actual: Any,
    desired: Any,
    *,
    a: Any,
    b: Any,
    c: Any = None,
    compute: str | None = None,
    max_report: int = 5,
    **kwargs: Any,
) -> None:
    """Assert that a GPU result ``actual`` is a correct cuSPARSELt result for these operands.

    Parameters
    ----------
    actual : array_like
        The GPU's D (host copy), of D's shape and dtype.
    desired : array_like
        :func:`matmul` of the same operands and keywords (checked to be consistent with them, so a
        mismatch between the test's reference and its GPU call cannot go unnoticed).
    a, b, c : array_like
        The operands exactly as given to the GPU (A already pruned). The types come from these and
        ``desired``: A/B from ``a``, C/D from ``desired``.
    compute : str, optional
        Compute type used on the GPU (default: :data:`DEFAULT_COMPUTE`).
    max_report : int
        How many offending elements the message lists.
    **kwargs
        The keyword arguments given to :func:`matmul` (alpha, beta, bias, activation, ...).

    Raises
    ------
    AssertionError
        Shape or dtype mismatch, or elements outside :func:`matmul_bounds`; the message gives the
        count and the worst elements with actual, desired and the limits.
    ValueError
        ``desired`` is not :func:`matmul`'s result for these arguments.

    Notes
    -----
    The check is ``lo <= actual <= hi`` element-wise (NaN must match NaN), the tightest bound the
    error model of :class:`Tolerance` allows: about one ulp of D plus the float32 accumulation error
    ``K * 2**-23 * (|A| @ |B|)`` where the accumulation can round at all, nothing where it cannot
    (and nothing at all for int8 -> int32 without an epilogue). With random data the worst-case
    accumulation term can hide a single lost product for large K; GPU tests that must catch such
    errors should use data whose accumulation is exact (small integers or dyadic values), where
    the allowed range shrinks to D's own rounding.
    """
    kw = _matmul_kwargs(kwargs)
    desired = np.asarray(desired)
    if kw["out_dtype"] is None:
        kw["out_dtype"] = desired.dtype
    lo, hi = matmul_bounds(a, b, c, compute=compute, **kw)
    ref = matmul(a, b, c, **kw)
    if desired.shape != ref.shape or desired.dtype != ref.dtype or not np.array_equal(
            _bits(desired), _bits(ref)):
        raise ValueError("desired is not reference.matmul(a, b, c, ...) for these arguments")
    actual = np.asarray(actual)
    if actual.shape != ref.shape:
        raise AssertionError(f"shape mismatch: actual {actual.shape}, desired {ref.shape}")
    if actual.dtype != ref.dtype:
        raise AssertionError(f"dtype mismatch: actual {actual.dtype}, desired {ref.dtype}")
    act64, lo64, hi64 = _to_float64(actual), _to_float64(lo), _to_float64(hi)
    ref_nan = np.isnan(lo64)
    with np.errstate(invalid="ignore"):
        ok = np.where(ref_nan, np.isnan(act64), (lo64 <= act64) & (act64 <= hi64))
    if ok.all():
        return
    bad = np.argwhere(~ok)
    with np.errstate(invalid="ignore", over="ignore"):
        excess = np.where(ref_nan | np.isnan(act64), np.inf,
                          np.maximum(lo64 - act64, act64 - hi64))
    worst = sorted(bad.tolist(), key=lambda i: -excess[tuple(i)])[:max_report]
    lines = [
        f"  D{tuple(i)}: actual {_format_value(act64[tuple(i)])}, desired "
        f"{_format_value(_to_float64(ref)[tuple(i)])}, allowed [{_format_value(lo64[tuple(i)])}, "
        f"{_format_value(hi64[tuple(i)])}]"
        for i in worst
    ]
    tol = matmul_tolerance(np.asarray(a).dtype, ref.dtype, np.shape(a)[-1], compute=compute)
    raise AssertionError(
        f"{len(bad)} of {ok.size} elements outside the allowed range ({np.asarray(a).dtype} -> "
        f"{ref.dtype}, compute {tol.compute}, K={tol.k}); worst:\n" + "\n".join(lines)
    )

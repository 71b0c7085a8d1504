"""2:4 pruning, the 2:4 check and the logical compressed format, in NumPy (the rules are quoted in
:data:`pycusparselt.reference.SEMANTICS`: ``prune_strip_ties``, ``prune_tile_ties``, ``compress_spare_slots``)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from ..types import SUPPORTED_INPUTS
from .elements import (
    as_array,
    check_multiple_of_4,
    bit_patterns,
    format_value,
    is_nonzero,
    magnitude64,
    magnitude_key,
    normalize_axis,
    supported_list,
)

__all__ = ["TILE_PATTERNS", "mask_2to4", "mask_from_scores", "prune_2to4", "is_2to4", "compress", "decompress",
           "compressed_nbytes"]


# -- grouping -----------------------------------------------------------------------------------------------


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
    values = ", ".join(format_value(v) for v in grouped[first])
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


#: The 90 tile patterns (exported as :data:`pycusparselt.reference.TILE_PATTERNS`).
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
    check_multiple_of_4(a.shape, ax)
    check_multiple_of_4(a.shape, other)
    mag = magnitude64(a)
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
        Dense array of a supported dtype (:data:`~pycusparselt.reference.SUPPORTED_DTYPES`), 1-D or more; batched arrays
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
    arr = as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = normalize_axis(axis, arr.ndim)
    if method == "strip":
        check_multiple_of_4(arr.shape, ax)
        return np.ascontiguousarray(_ungroup(_top2_mask(_groups(magnitude_key(arr), ax)), ax))
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
    ax = normalize_axis(axis, keys.ndim)
    if method == "strip":
        check_multiple_of_4(keys.shape, ax)
        return np.ascontiguousarray(_ungroup(_top2_mask(_groups(keys, ax)), ax))
    if method == "tile":
        return _tile_mask(keys.astype(np.float64), ax)
    raise ValueError(f"method must be 'strip' or 'tile', got {method!r}")


def prune_2to4(a: Any, *, axis: int = -1, method: str = "strip") -> np.ndarray:
    """Magnitude pruning to 2:4 along ``axis``: a new array of the same dtype and shape.

    Parameters
    ----------
    a : array_like
        Dense array of a supported dtype (:data:`~pycusparselt.reference.SUPPORTED_DTYPES`).
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
    arr = as_array(a)
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
    arr = as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = normalize_axis(axis, arr.ndim)
    check_multiple_of_4(arr.shape, ax)
    counts = _groups(is_nonzero(arr), ax).sum(axis=-1)
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
    arr = as_array(a)
    if arr.ndim == 0:
        raise ValueError("a must have at least one dimension")
    ax = normalize_axis(axis, arr.ndim)
    check_multiple_of_4(arr.shape, ax)
    nonzero = _groups(is_nonzero(arr), ax)
    bad = nonzero.sum(axis=-1) > 2
    if bad.any():
        raise ValueError(
            _describe_first_bad_group(_groups(arr, ax), bad, ax, "a", "have more than 2 non-zeros")
        )
    bits = _groups(bit_patterns(arr), ax)
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
    vals = as_array(values, "values")
    idx = np.asarray(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.shape != vals.shape:
        raise ValueError(f"indices shape {idx.shape} differs from values shape {vals.shape}")
    if vals.ndim == 0:
        raise ValueError("values must have at least one dimension")
    ax = normalize_axis(axis, vals.ndim)
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
    vbits = np.moveaxis(bit_patterns(vals), ax, -1)
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
        Its element type (:data:`~pycusparselt.reference.SUPPORTED_DTYPES`).
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
    if dt not in SUPPORTED_INPUTS:
        raise TypeError(f"unsupported dtype {dt}; supported: {supported_list()}")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative size")
    ax = normalize_axis(axis, len(shape))
    check_multiple_of_4(shape, ax)
    kept = math.prod(shape) // 2
    return kept * dt.itemsize + (kept * 2 + 7) // 8


"""The NumPy reference: pruning, 2:4 checking, compression (CPU only).

Brute-force oracles here are deliberately naive Python loops over small inputs, independent of the
vectorised code under test.
"""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pycusparselt import reference as ref

F16, BF16, F32, I8 = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
                      np.dtype(np.int8))
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
ALL = [F16, BF16, F32, I8, E4M3, E5M2]
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}
SIGN = {F16: 0x8000, BF16: 0x8000, F32: 0x80000000, E4M3: 0x80, E5M2: 0x80}

FAST = settings(max_examples=400, deadline=None)
SLOW = settings(max_examples=150, deadline=None)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------

def _special_bits(dt: np.dtype) -> list[int]:
    """Bit patterns that stress magnitude ordering: zeros, ties, extremes, inf, NaN payloads."""
    if dt == I8:
        return [0, 1, 0xFF, 0x7F, 0x80, 0x81, 2, 0xFE]  # 0, 1, -1, 127, -128, -127, 2, -2
    values = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5], dtype=np.float32)
    conv = values.astype(dt) if dt != F32 else values
    bits = [int(v) for v in conv.view(UINT[dt.itemsize])]
    maxbits = {F16: 0x7BFF, BF16: 0x7F7F, F32: 0x7F7FFFFF, E4M3: 0x7E, E5M2: 0x7B}[dt]
    nans = {F16: [0x7E00, 0x7C01, 0xFE00], BF16: [0x7FC0, 0x7F81, 0xFFC0],
            F32: [0x7FC00000, 0x7F800001, 0xFFC00000], E4M3: [0x7F, 0xFF],
            E5M2: [0x7E, 0x7D, 0xFF]}[dt]
    infs = {F16: [0x7C00, 0xFC00], BF16: [0x7F80, 0xFF80], F32: [0x7F800000, 0xFF800000],
            E4M3: [], E5M2: [0x7C, 0xFC]}[dt]
    return bits + [maxbits, maxbits | SIGN[dt], 1, 1 | SIGN[dt]] + nans + infs


@st.composite
def arrays_of(draw, dt: np.dtype, shape, specials: bool = True) -> np.ndarray:
    """Arbitrary bit patterns of ``dt`` (every value incl. NaN payloads, -0.0, subnormals), with
    extra weight on special values and ties."""
    width = dt.itemsize
    elem = st.integers(0, 2 ** (8 * width) - 1)
    if specials:
        elem = st.one_of(elem, st.sampled_from(_special_bits(dt)))
    bits = draw(hnp.arrays(UINT[width], shape, elements=elem))
    return bits.view(dt)


@st.composite
def matrix_case(draw, dtypes=tuple(ALL), max_rows=3, max_groups=3, batched=True):
    dt = draw(st.sampled_from(dtypes))
    rows = draw(st.sampled_from([1, 2, 3, 4, 8][:max_rows + 2]))
    groups = draw(st.integers(1, max_groups))
    shape = (rows, 4 * groups)
    if batched and draw(st.booleans()):
        shape = (draw(st.integers(1, 2)),) + shape
    axis = draw(st.sampled_from([-1, len(shape) - 1]))
    a = draw(arrays_of(dt, shape))
    if draw(st.booleans()):  # along axis -2 instead: transpose the data
        a = np.swapaxes(a, -1, -2)
        axis = -2
    return a, axis


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(UINT[a.dtype.itemsize])


def _f64(v) -> float:
    with np.errstate(invalid="ignore"):  # signalling-NaN payloads warn on conversion
        return float(np.asarray(v).astype(np.float64))


def _mag(v) -> tuple[int, float]:
    """(is NaN, |v|) as plain Python values: the documented ordering key."""
    f = _f64(v) if np.asarray(v).dtype != I8 else float(int(v))
    return (1, 0.0) if math.isnan(f) else (0, abs(f))


def _groups_py(a: np.ndarray, axis: int):
    """Yield (index tuple of each element, values) per group of 4 along axis: pure Python."""
    a_moved = np.moveaxis(a, axis, -1)
    for lead in itertools.product(*[range(s) for s in a_moved.shape[:-1]]):
        for g in range(a_moved.shape[-1] // 4):
            yield lead, g, [a_moved[lead + (4 * g + i,)] for i in range(4)]


# ------------------------------------------------------------------------------------------------
# the seed's examples
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, lost", [
    ([100, 90, 80, 10, 20, 40, 30, 70], 140),
    ([100, 90, 20, 10, 80, 40, 30, 70], 100),
])
@pytest.mark.parametrize("dt", [F16, BF16, F32, I8])
def test_seed_example_lost_magnitude(row, lost, dt):
    a = np.array(row, dtype=np.float32).astype(dt)
    pruned = ref.prune_2to4(a)
    kept = np.abs(pruned.astype(np.float64)).sum()
    assert np.abs(a.astype(np.float64)).sum() - kept == lost
    assert ref.is_2to4(pruned)


def test_seed_example_exact_result():
    a = np.array([100, 90, 80, 10, 20, 40, 30, 70], dtype=np.float16)
    np.testing.assert_array_equal(ref.prune_2to4(a), [100, 90, 0, 0, 0, 40, 0, 70])
    np.testing.assert_array_equal(ref.mask_2to4(a), [1, 1, 0, 0, 0, 1, 0, 1])


# ------------------------------------------------------------------------------------------------
# strip pruning
# ------------------------------------------------------------------------------------------------

@FAST
@given(matrix_case())
def test_strip_matches_brute_force_and_tie_break(case):
    """Each group keeps its two largest (NaN first; lower index on ties), element by element."""
    a, axis = case
    mask = ref.mask_2to4(a, axis=axis)
    pruned = ref.prune_2to4(a, axis=axis)
    assert pruned.dtype == a.dtype and pruned.shape == a.shape
    m_moved, p_moved = np.moveaxis(mask, axis, -1), np.moveaxis(_bits(pruned), axis, -1)
    a_bits = np.moveaxis(_bits(a), axis, -1)
    for lead, g, vals in _groups_py(a, axis):
        order = sorted(range(4), key=lambda i: (-_mag(vals[i])[0], -_mag(vals[i])[1], i))
        want = {order[0], order[1]}
        for i in range(4):
            idx = lead + (4 * g + i,)
            assert bool(m_moved[idx]) == (i in want)
            assert p_moved[idx] == (a_bits[idx] if i in want else 0)  # kept bits exact, pruned +0


@FAST
@given(matrix_case(dtypes=(F16, BF16, F32, I8, E4M3, E5M2)))
def test_strip_keeps_maximum_magnitude(case):
    """No choice of 2 out of 4 keeps more magnitude (finite groups; all C(4,2) choices)."""
    a, axis = case
    pruned = ref.prune_2to4(a, axis=axis)
    for (_, _, vals), (_, _, kept) in zip(_groups_py(a, axis), _groups_py(pruned, axis),
                                          strict=True):
        mags = [_mag(v) for v in vals]
        if any(m[0] for m in mags) or any(math.isinf(m[1]) for m in mags):
            continue
        best = max(mags[i][1] + mags[j][1] for i, j in itertools.combinations(range(4), 2))
        assert sum(_mag(v)[1] for v in kept) == best


@FAST
@given(matrix_case(), st.sampled_from(["strip", "tile"]))
def test_prune_is_2to4_and_idempotent(case, method):
    a, axis = case
    if method == "tile":
        assume(a.ndim >= 2 and a.shape[-1] % 4 == 0 and a.shape[-2] % 4 == 0)
    pruned = ref.prune_2to4(a, axis=axis, method=method)
    assert ref.is_2to4(pruned, axis=axis)
    again = ref.prune_2to4(pruned, axis=axis, method=method)
    np.testing.assert_array_equal(_bits(again), _bits(pruned))


def test_strip_nan_and_ties_examples():
    a = np.array([[np.nan, np.inf, 5, 5],   # NaN above inf
                  [5, 5, 5, 5],              # all tie: lowest two
                  [0, -0.0, 0, 0],           # zeros tie
                  [-7, 3, 7, 7]], dtype=np.float16)  # |-7| ties 7: lower index wins
    np.testing.assert_array_equal(ref.mask_2to4(a), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0],
                                                     [1, 0, 1, 0]])
    i8 = np.array([[-128, 127, 127, -127]], dtype=np.int8)  # -128 is the largest magnitude
    np.testing.assert_array_equal(ref.mask_2to4(i8), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(ref.mask_2to4(np.array([[1, -128, 2, -128]], np.int8)),
                                  [[0, 1, 0, 1]])


def test_prune_preserves_input():
    a = np.array([1, 2, 3, 4], dtype=np.float16)
    ref.prune_2to4(a)
    np.testing.assert_array_equal(a, [1, 2, 3, 4])


# ------------------------------------------------------------------------------------------------
# tile pruning
# ------------------------------------------------------------------------------------------------

def _patterns_independent() -> list[np.ndarray]:
    """All 4x4 0/1 matrices with 2 per row and column, ordered by the documented key: the tuple
    of each row's kept pair in lexicographic pair order."""
    pairs = list(itertools.combinations(range(4), 2))
    found = []
    for bits in range(1 << 16):
        m = np.array([(bits >> i) & 1 for i in range(16)], dtype=bool).reshape(4, 4)
        if (m.sum(0) == 2).all() and (m.sum(1) == 2).all():
            key = tuple(pairs.index(tuple(np.flatnonzero(row))) for row in m)
            found.append((key, m))
    return [m for _, m in sorted(found, key=lambda t: t[0])]


def test_tile_patterns_are_the_90_in_documented_order():
    pats = _patterns_independent()
    assert len(pats) == 90 == len(ref.TILE_PATTERNS)
    np.testing.assert_array_equal(ref.TILE_PATTERNS, np.stack(pats))
    assert not ref.TILE_PATTERNS.flags.writeable


def test_tile_constraint_is_exactly_two():
    """Tile pruning chooses among the 90 exactly-2 patterns (cuSPARSELt's documented constraint).
    That is not the same as "at most 2": 192 masks with at most 2 per row and column fit in no
    pattern, and one of them can keep more magnitude than any of the 90."""
    allm = ((np.arange(1 << 16)[:, None] >> np.arange(16)) & 1).astype(bool).reshape(-1, 4, 4)
    ok = (allm.sum(1) <= 2).all(1) & (allm.sum(2) <= 2).all(1)
    cand = allm[ok].reshape(-1, 16)
    pats = ref.TILE_PATTERNS.reshape(90, 16)
    covered = ~(cand[:, None, :] & ~pats[None, :, :]).any(-1)  # cand subset of pattern
    assert (~covered.any(1)).sum() == 192
    # a 6-cycle in the top-left 3x3 block plus the corner: 7 kept elements, no pattern holds them
    a = np.full((4, 4), 1, dtype=np.float16)
    for r, c in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 3)]:
        a[r, c] = 100
    tile = ref.prune_2to4(a, method="tile")
    assert np.abs(tile.astype(np.float64)).sum() == 6 * 100 + 2  # the best of the 90


def _tile_brute(tile_mag: list[list[float]], nan: list[list[bool]]) -> int:
    pats = ref.TILE_PATTERNS
    best, best_key = None, None
    for p in range(90):
        kept = [(r, c) for r in range(4) for c in range(4) if pats[p, r, c]]
        n_nan = sum(nan[r][c] for r, c in kept)
        n_inf = sum((not nan[r][c]) and math.isinf(tile_mag[r][c]) for r, c in kept)
        fin = math.fsum(tile_mag[r][c] for r, c in kept
                        if not nan[r][c] and not math.isinf(tile_mag[r][c]))
        key = (n_nan, n_inf, fin)
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


@st.composite
def tile_case(draw, dtypes=(F16, I8, E4M3, E5M2)):
    dt = draw(st.sampled_from(dtypes))
    r, c = 4 * draw(st.integers(1, 2)), 4 * draw(st.integers(1, 2))
    shape = (r, c) if draw(st.booleans()) else (draw(st.integers(1, 2)), r, c)
    a = draw(arrays_of(dt, shape))
    axis = draw(st.sampled_from([-1, -2, len(shape) - 1, len(shape) - 2]))
    return a, axis


@SLOW
@given(tile_case())
def test_tile_matches_brute_force(case):
    """Exact-sum dtypes: the chosen pattern is the first in documented order of those keeping the
    most (NaN count, inf count, finite magnitude); 2 per row and column of every tile."""
    a, axis = case
    mask = ref.mask_2to4(a, axis=axis, method="tile")
    ax = axis % a.ndim
    m, x = mask, a
    if ax == a.ndim - 2:  # brute force with the reduction axis last
        m, x = np.swapaxes(m, -1, -2), np.swapaxes(a, -1, -2)
    m3, x3 = m.reshape((-1,) + m.shape[-2:]), x.reshape((-1,) + x.shape[-2:])
    for bi in range(m3.shape[0]):
        for tr in range(m3.shape[1] // 4):
            for tc in range(m3.shape[2] // 4):
                tile = x3[bi, 4 * tr:4 * tr + 4, 4 * tc:4 * tc + 4]
                tm = m3[bi, 4 * tr:4 * tr + 4, 4 * tc:4 * tc + 4]
                mags = [[_mag(tile[r, c]) for c in range(4)] for r in range(4)]
                p = _tile_brute([[v[1] for v in row] for row in mags],
                                [[bool(v[0]) for v in row] for row in mags])
                np.testing.assert_array_equal(tm, ref.TILE_PATTERNS[p])
    assert ref.is_2to4(ref.prune_2to4(a, axis=axis, method="tile"), axis=-1)
    assert ref.is_2to4(ref.prune_2to4(a, axis=axis, method="tile"), axis=-2)


@SLOW
@given(st.sampled_from([BF16, F32]),
       hnp.arrays(np.int64, (8, 8), elements=st.integers(-1000, 1000)))
def test_tile_wide_types_optimal(dt, ints):
    """bfloat16/float32 with exact sums: no pattern keeps more; ties go to the first."""
    a = ints.astype(np.float32).astype(dt)
    mask = ref.mask_2to4(a, method="tile")
    mag = np.abs(a.astype(np.float64))
    for tr in range(2):
        for tc in range(2):
            tile = mag[4 * tr:4 * tr + 4, 4 * tc:4 * tc + 4]
            scores = [(tile * ref.TILE_PATTERNS[p]).sum() for p in range(90)]
            chosen = mask[4 * tr:4 * tr + 4, 4 * tc:4 * tc + 4]
            p = int(np.argmax(scores))
            np.testing.assert_array_equal(chosen, ref.TILE_PATTERNS[p])


def test_tile_keeps_more_than_strip_can_in_both_directions():
    # a tile whose strip pruning violates the column rule: tile must fix that
    a = np.array([[9, 8, 1, 1], [9, 8, 1, 1], [9, 8, 1, 1], [1, 1, 1, 1]], dtype=np.float16)
    strip = ref.prune_2to4(a)
    assert not ref.is_2to4(strip, axis=-2)
    tile = ref.prune_2to4(a, method="tile")
    assert ref.is_2to4(tile, axis=-1) and ref.is_2to4(tile, axis=-2)
    # best: two rows keep (9, 8), one row keeps 1+1 in columns 2, 3, last row 1+1
    assert np.abs(tile.astype(np.float64)).sum() == 9 + 8 + 9 + 8 + 1 + 1 + 1 + 1


def test_tile_axis_orientation_tie_break():
    """Ties are broken in the orientation of the reduction axis: axis=-2 equals pruning the
    transpose along -1, and here that differs from axis=-1 (both are optimal)."""
    a = np.array([[1, 2, 2, 1], [2, 1, 2, 2], [2, 2, 2, 2], [2, 1, 2, 2]], dtype=np.float16)
    m_last = ref.mask_2to4(a, method="tile")
    m_first = ref.mask_2to4(a, method="tile", axis=-2)
    np.testing.assert_array_equal(m_first, ref.mask_2to4(a.T.copy(), method="tile").T)
    np.testing.assert_array_equal(m_last, [[0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(m_first, [[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    mag = np.abs(a.astype(np.float64))
    assert mag[m_last].sum() == mag[m_first].sum() == 16  # every kept value is a 2
    np.testing.assert_array_equal(ref.mask_2to4(np.ones((4, 4), np.float16), method="tile"),
                                  ref.TILE_PATTERNS[0])


# ------------------------------------------------------------------------------------------------
# is_2to4
# ------------------------------------------------------------------------------------------------

@FAST
@given(matrix_case())
def test_is_2to4_matches_count(case):
    a, axis = case
    want = True
    for _, _, vals in _groups_py(a, axis):
        nz = 0
        for v in vals:
            if a.dtype == I8:
                nz += int(v) != 0
            else:
                f = _f64(v)
                nz += math.isnan(f) or f != 0.0  # -0.0 is zero
        want = want and nz <= 2
    assert ref.is_2to4(a, axis=axis) is want


def test_is_2to4_examples():
    assert ref.is_2to4(np.array([1, 0, 0, 2, -0.0, -0.0, 5, 0], dtype=np.float16))
    assert not ref.is_2to4(np.array([1, 0, 3, 2], dtype=np.float16))
    assert not ref.is_2to4(np.array([np.nan, 0, 3, 2], dtype=np.float32))
    assert ref.is_2to4(np.array([[1, 2], [0, 0], [0, 3], [0, 0]], dtype=np.int8), axis=0)
    assert not ref.is_2to4(np.array([[1, 2], [1, 0], [1, 3], [0, 0]], dtype=np.int8), axis=0)


# ------------------------------------------------------------------------------------------------
# compression
# ------------------------------------------------------------------------------------------------

@FAST
@given(matrix_case(), st.sampled_from(["strip", "tile", None]))
def test_compress_roundtrip_bit_exact(case, method):
    a, axis = case
    if method == "tile":
        assume(a.shape[-1] % 4 == 0 and a.shape[-2] % 4 == 0)
    sparse = a if method is None else ref.prune_2to4(a, axis=axis, method=method)
    nonzero_bits = (np.moveaxis(_bits(sparse), axis, -1).reshape(-1, 4) != 0).sum(-1)
    nonzero_vals = np.array([sum(_mag(v) != (0, 0.0) for v in vals)
                             for _, _, vals in _groups_py(sparse, axis)])
    if method is None:
        assume((nonzero_vals <= 2).all())
    values, indices = ref.compress(sparse, axis=axis)
    ax = axis % a.ndim
    want_shape = sparse.shape[:ax] + (sparse.shape[ax] // 2,) + sparse.shape[ax + 1:]
    assert values.shape == indices.shape == want_shape
    assert values.dtype == sparse.dtype and indices.dtype == np.uint8
    idx = np.moveaxis(indices, ax, -1).reshape(-1, 2)
    assert ((idx[:, 0] < idx[:, 1]) & (idx[:, 1] <= 3)).all()
    # every stored slot holds the bits of the element it points at
    dense_bits = np.moveaxis(_bits(sparse), ax, -1).reshape(-1, 4)
    vb = np.moveaxis(_bits(values), ax, -1).reshape(-1, 2)
    np.testing.assert_array_equal(np.take_along_axis(dense_bits, idx.astype(np.int64), 1), vb)
    back = ref.decompress(values, indices, axis=axis)
    assert back.dtype == sparse.dtype and back.shape == sparse.shape
    if (nonzero_bits <= 2).all():
        np.testing.assert_array_equal(_bits(back), _bits(sparse))
    else:  # surplus -0.0 become +0.0
        same = _bits(back) == _bits(sparse)
        neg_zero = _bits(sparse) == SIGN.get(sparse.dtype, -1)
        assert (same | (neg_zero & (_bits(back) == 0))).all()


@pytest.mark.parametrize("group, want_idx", [
    ([0, 0, 0, 0], [0, 1]),
    ([0, 0, 7, 0], [0, 2]),
    ([7, 0, 0, 0], [0, 1]),
    ([0, 0, 0, 7], [0, 3]),
    ([0, 7, 0, 8], [1, 3]),
    ([0, 7, 0, -0.0], [1, 3]),   # -0.0 preferred as spare slot
    ([-0.0, 0, -0.0, 0], [0, 2]),
    ([0, 0, 9, -0.0], [2, 3]),
])
def test_compress_spare_slot_rule(group, want_idx):
    a = np.array(group, dtype=np.float16)
    values, indices = ref.compress(a)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_array_equal(_bits(values), _bits(a)[want_idx])
    np.testing.assert_array_equal(_bits(ref.decompress(values, indices)), _bits(a))


def test_compress_layout_example():
    a = np.array([[0, 3, 0, -1, 5, 0, 0, 0],
                  [2, 0, 4, 0, 0, 0, 6, 7]], dtype=np.int8)
    values, indices = ref.compress(a)
    np.testing.assert_array_equal(values, [[3, -1, 5, 0], [2, 4, 6, 7]])
    np.testing.assert_array_equal(indices, [[1, 3, 0, 1], [0, 2, 2, 3]])
    v0, i0 = ref.compress(a.T.copy(), axis=0)
    np.testing.assert_array_equal(v0, values.T)
    np.testing.assert_array_equal(i0, indices.T)


def test_compress_non_2to4_names_first_group():
    a = np.zeros((2, 3, 8), dtype=np.float32)
    a[1, 2, 4:8] = [1.5, 2, 0, -3]
    a[1, 2, 0:4] = [1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"not 2:4 along axis 2: 1 group\(s\).*a\[1, 2, 4:8\] = "
                                         r"\[1\.5, 2\.0, 0\.0, -3\.0\]"):
        ref.compress(a)
    b = np.zeros((8, 3), dtype=np.int8)
    b[0:3, 1] = [5, -6, 7]
    b[4:8, 2] = [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"2 group\(s\).*a\[0:4, 1\] = \[5, -6, 7, 0\]"):
        ref.compress(b, axis=0)


@pytest.mark.parametrize("values, indices, pattern", [
    (np.ones(4, np.float16), np.array([0, 1, 2, 2], np.uint8), r"indices\[2:4\] = \[2, 2\]"),
    (np.ones(4, np.float16), np.array([1, 0, 0, 1], np.uint8), r"indices\[0:2\] = \[1, 0\]"),
    (np.ones(4, np.float16), np.array([0, 1, 0, 4], np.int32), r"indices\[2:4\] = \[0, 4\]"),
    (np.ones(4, np.float16), np.array([-1, 1, 0, 1], np.int32), r"indices\[0:2\] = \[-1, 1\]"),
])
def test_decompress_rejects_bad_indices(values, indices, pattern):
    with pytest.raises(ValueError, match="strictly increasing pairs in 0..3.*" + pattern):
        ref.decompress(values, indices)


def test_decompress_shape_errors():
    with pytest.raises(ValueError, match=r"indices shape \(2,\) differs from values shape \(4,\)"):
        ref.decompress(np.ones(4, np.float16), np.array([0, 1], np.uint8))
    with pytest.raises(ValueError, match="axis 0 of values has size 3, which is not even"):
        ref.decompress(np.ones(3, np.float16), np.array([0, 1, 2], np.uint8))
    with pytest.raises(TypeError, match="indices must be integers"):
        ref.decompress(np.ones(2, np.float16), np.array([0.0, 1.0]))


# ------------------------------------------------------------------------------------------------
# compressed size
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt, ratio", [(F16, 0.5625), (BF16, 0.5625), (I8, 0.625), (E4M3, 0.625),
                                       (E5M2, 0.625), (F32, 0.53125)])
@pytest.mark.parametrize("shape", [(64, 64), (4096, 4096), (3, 16, 32)])
def test_compressed_nbytes_ratio(dt, ratio, shape):
    dense = math.prod(shape) * dt.itemsize
    assert ref.compressed_nbytes(shape, dt) / dense == ratio


def test_compressed_nbytes_counts_bits():
    # 4 elements: 2 values of 2 bytes + 4 bits of metadata rounded up to a byte
    assert ref.compressed_nbytes((4,), np.float16) == 5
    assert ref.compressed_nbytes((8,), np.int8) == 4 + 1
    assert ref.compressed_nbytes((4, 12), np.float16, axis=-1) == 24 * 2 + 6
    with pytest.raises(ValueError, match="axis 0 has size 6, which is not a multiple of 4"):
        ref.compressed_nbytes((6, 4), np.float16, axis=0)
    with pytest.raises(TypeError, match="unsupported dtype float64"):
        ref.compressed_nbytes((4, 4), np.float64)


@FAST
@given(matrix_case())
def test_compressed_nbytes_matches_compress(case):
    a, axis = case
    values, indices = ref.compress(ref.prune_2to4(a, axis=axis), axis=axis)
    assert ref.compressed_nbytes(a.shape, a.dtype, axis=axis) == values.nbytes + math.ceil(
        indices.size * 2 / 8)


# ------------------------------------------------------------------------------------------------
# errors shared by the pruning functions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("func", [ref.prune_2to4, ref.mask_2to4, ref.is_2to4, ref.compress])
def test_not_multiple_of_4(func):
    with pytest.raises(ValueError, match="axis 1 has size 6, which is not a multiple of 4"):
        func(np.zeros((4, 6), np.float16))
    with pytest.raises(ValueError, match="axis 0 has size 10, which is not a multiple of 4"):
        func(np.zeros((10, 8), np.float16), axis=0)


@pytest.mark.parametrize("func", [ref.prune_2to4, ref.mask_2to4, ref.is_2to4, ref.compress])
@pytest.mark.parametrize("dt", [np.float64, np.int16, np.uint8, np.bool_, np.complex64])
def test_unsupported_dtype(func, dt):
    with pytest.raises(TypeError, match=r"unsupported dtype .*supported: float16, bfloat16, "
                                        r"float32, int8, float8_e4m3fn, float8_e5m2"):
        func(np.zeros((4, 4), dt))


def test_tile_errors():
    with pytest.raises(ValueError, match="axis 0 has size 6, which is not a multiple of 4"):
        ref.prune_2to4(np.zeros((6, 8), np.float16), method="tile")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ref.prune_2to4(np.zeros(8, np.float16), method="tile")
    with pytest.raises(ValueError, match="axis must be one of them"):
        ref.prune_2to4(np.zeros((4, 4, 4), np.float16), method="tile", axis=0)
    with pytest.raises(ValueError, match="method must be 'strip' or 'tile'"):
        ref.prune_2to4(np.zeros((4, 4), np.float16), method="random")


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ref.prune_2to4(np.zeros((4, 4), np.float16), axis=2)


@pytest.mark.parametrize("method", ["strip", "tile"])
@pytest.mark.parametrize("axis", [0, 1])
def test_mask_from_scores_is_mask_2to4_on_magnitudes(method, axis):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((8, 12)).astype(np.float16)
    scores = np.abs(a.astype(np.float64))
    mask = ref.mask_from_scores(scores, axis=axis, method=method)
    np.testing.assert_array_equal(mask, ref.mask_2to4(a, axis=axis, method=method))
    assert ref.is_2to4(np.where(mask, a, 0), axis=axis)


def test_mask_from_scores_wide_integer_keys_are_exact():
    # 2**53 + 1 and 2**53 are equal as float64: the strip selection must compare the integers themselves
    keys = np.array([[2**53, 2**53 + 1, 0, 2**53 + 1]], dtype=np.uint64)
    np.testing.assert_array_equal(ref.mask_from_scores(keys), [[False, True, False, True]])


def test_mask_from_scores_errors():
    with pytest.raises(TypeError, match="scores must be real"):
        ref.mask_from_scores(np.zeros(4, np.complex64))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        ref.mask_from_scores(np.zeros(6))
    with pytest.raises(ValueError, match="method must be 'strip' or 'tile'"):
        ref.mask_from_scores(np.zeros(4), method="random")

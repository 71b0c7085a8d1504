"""CPU tests of the decode kernel's weight layout (pycusparselt.gemm.decode_layout): packing is exact and
invertible, every lane's registers and metadata say what the module docstring says, and the product read
from the packed buffer the way the kernel reads it equals the reference's."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import reference
from pycusparselt.gemm import decode_layout as layout

F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)


def _pruned(rng: np.random.Generator, n: int, k: int, dtype: np.dtype) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    pad = -k % 4
    w = reference.prune_2to4(np.pad(w, ((0, 0), (0, pad))), axis=-1)[:, :k]
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(("n", "k"), [(16, 256), (37, 300), (1, 5), (48, 777), (64, 512)])
def test_pack_then_unpack_gives_the_weight_back(dtype, n, k):
    w = _pruned(np.random.default_rng(n * 1000 + k), n, k, dtype)
    packed = layout.pack_weight(w)
    assert packed.shape == layout.packed_shape(n, k) and packed.dtype == np.uint8
    back = layout.unpack_weight(packed, n, k, dtype)
    assert back.dtype == dtype and np.array_equal(back.view(np.uint16), w.view(np.uint16))


def test_groups_with_fewer_than_two_nonzeros_keep_their_lowest_free_positions():
    w = np.zeros((16, 256), np.float16)
    w[0, 3] = 1.0          # one non-zero at position 3: kept (0, 3)
    w[0, 4 + 1] = 2.0      # group 1: (1, 2)? no: the non-zero 1 and the lowest free 0 -> (0, 1)
    packed = layout.pack_weight(w)
    meta = packed[0, 0, :layout.META_BYTES].view(np.uint32).reshape(32, 4)
    # row 0, groups 0 and 1 of step 0: lane (g=0, t=0), word 0, bits 0..7
    assert meta[0, 0] & 0xF == (0 | 3 << 2)
    assert (meta[0, 0] >> 4) & 0xF == (0 | 1 << 2)
    # an all-zero group: positions (0, 1), never an invalid 0b0000
    assert (meta[0, 0] >> 8) & 0xF == 0b0100
    vals = packed[0, 0, layout.META_BYTES:].view(np.uint16).reshape(8, 32, 8)
    assert vals[0, 0, 0] == np.float16(0).view(np.uint16) and vals[0, 0, 1] == np.float16(1).view(np.uint16)


def test_a_lane_holds_the_registers_the_docstring_names():
    n, k = 16, 256
    w = np.zeros((n, k), np.float16)
    # distinct small integers at positions 1 and 2 of every group
    ids = np.arange(n * k // 4).reshape(n, k // 4)
    w[:, 1::4] = (ids % 1000 + 1).astype(np.float16)
    w[:, 2::4] = -(ids % 1000 + 1).astype(np.float16)
    vals = layout.pack_weight(w)[0, 0, layout.META_BYTES:].view(np.float16).reshape(8, 32, 8)
    for step in (0, 5):
        for lane in (0, 7, 30):
            g, t = divmod(lane, 4)
            for reg, (row, group) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]):
                col = step * 32 + group * 4
                assert vals[step, lane, 2 * reg] == w[row, col + 1]
                assert vals[step, lane, 2 * reg + 1] == w[row, col + 2]


def test_metadata_words_serve_two_steps_with_the_two_selectors():
    w = np.zeros((16, 256), np.float16)
    w[9, 32 * 3 + 4 * 6 + 2] = 1.0   # row 9 (g=1, upper half), step 3 (word 1, selector 1), group 6 (h=1, q=2)
    w[9, 32 * 3 + 4 * 6 + 3] = 1.0
    meta = layout.pack_weight(w)[0, 0, :layout.META_BYTES].view(np.uint32).reshape(32, 4)
    lane = 4 * 1 + 2 * 1 + 1
    assert (meta[lane, 1] >> (16 + 4 * 2)) & 0xF == (2 | 3 << 2)
    others = meta.copy()
    others[lane, 1] &= ~np.uint32(0xF << (16 + 8))
    others[lane, 1] |= np.uint32(0b0100 << (16 + 8))
    assert (others == np.uint32(0x44444444)).all()


def test_a_weight_that_is_not_2to4_is_refused_with_its_first_bad_group():
    w = np.ones((3, 8), np.float16)
    w[:, 2:4] = 0
    w[2, 4:8] = [1, 1, 1, 0]
    w[0, 4:8] = [1, 0, 0, 1]
    w[1, 4:8] = [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"row 2, columns 4\.\.7 hold 3 non-zeros"):
        layout.pack_weight(w)


def test_bad_dtypes_and_shapes_are_refused():
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        layout.pack_weight(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(N, K\) matrix"):
        layout.pack_weight(np.zeros(4, np.float16))


def test_packed_bytes_are_0_5625_of_dense_at_whole_chunks():
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]:
        assert layout.packed_nbytes(n, k) == n * k * 2 * 9 // 16


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 256), (5, 37, 300), (16, 33, 513), (9, 64, 1024)])
def test_the_product_read_from_the_packed_buffer_is_the_references(dtype, m, n, k):
    rng = np.random.default_rng(m + n + k)
    w = _pruned(rng, n, k, dtype)
    # small integers: every product and sum exact in float32 and float64 alike
    w = np.sign(w.astype(np.float32)) * rng.integers(1, 4, w.shape)
    w = w.astype(dtype)
    x = rng.integers(-3, 4, (m, k)).astype(dtype)
    got = layout.emulate(layout.pack_weight(w), x, n, k)
    np.testing.assert_array_equal(got, x.astype(np.float64) @ w.astype(np.float64).T)
    # rounded once to the output type, it is the reference's D^T = W @ x^T
    want = reference.matmul(w, x.T).T
    np.testing.assert_array_equal(got.astype(np.float32).astype(dtype).view(np.uint16), want.view(np.uint16))


def _compact(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compact form (pycusparselt.torch.compact) of a pruned weight, as NumPy arrays."""
    pytest.importorskip("torch")
    from pycusparselt._arrays import host_tensor, to_numpy
    from pycusparselt.torch import compact

    values, indices = compact.pack(host_tensor(w))
    return to_numpy(values), to_numpy(indices)


def test_compact_columns_are_an_order_of_each_block():
    cols = layout.compact_columns(512)
    assert sorted(cols.tolist()) == list(range(512))
    assert set(cols[:256].tolist()) == set(range(256))  # no column leaves its block
    # step 0 takes groups 0, 4, 8, 12 (slots 0-3) and 1, 5, 9, 13 (slots 4-7); step 1 groups 2, 6, ... and 3, 7, ...
    assert (cols[0:32:4] // 4).tolist() == [0, 4, 8, 12, 1, 5, 9, 13]
    assert (cols[32:64:4] // 4).tolist() == [2, 6, 10, 14, 3, 7, 11, 15]
    assert (cols[64:96:4] // 4).tolist() == [16, 20, 24, 28, 17, 21, 25, 29]
    with pytest.raises(ValueError, match="multiple of 256"):
        layout.compact_columns(300)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(("n", "k"), [(16, 256), (48, 768), (203, 512)])
def test_compact_reads_give_the_registers_of_the_packed_weight_in_compact_column_order(dtype, n, k):
    w = _pruned(np.random.default_rng(n + k), n, k, dtype)
    values, indices = _compact(w)
    frags, meta = layout.compact_fragments(values.view(np.uint16), indices)
    want_frags, want_meta = layout.fields(layout.pack_weight(w[:, layout.compact_columns(k)]))
    assert frags.shape == want_frags.shape and meta.shape == want_meta.shape
    # rows past N (the last tile's padding) read row N - 1 in the compact form and zeros in the packed one
    lane = np.arange(32)
    rows = np.arange(frags.shape[0])[:, None] * 16 + lane // 4  # (tile, lane): rows g; g + 8 is 8 more
    both = (rows + 8 < n)[:, None, None, :]
    assert np.array_equal(frags[np.broadcast_to(both, frags.shape[:4])],
                          want_frags[np.broadcast_to(both, frags.shape[:4])])
    lane_meta_ok = np.broadcast_to((rows + 8 < n)[:, None, :], meta.shape[:3])
    assert np.array_equal(meta[lane_meta_ok], want_meta[lane_meta_ok])
    if n % 16 == 0:
        assert np.array_equal(frags, want_frags) and np.array_equal(meta, want_meta)


def test_a_broken_compact_read_is_seen():
    # the comparison above can fail: the packed weight's own column order does not match
    w = _pruned(np.random.default_rng(9), 16, 256, F16)
    values, indices = _compact(w)
    frags, _ = layout.compact_fragments(values.view(np.uint16), indices)
    assert not np.array_equal(frags, layout.fields(layout.pack_weight(w))[0])


@pytest.mark.parametrize("m", [1, 9, 16])
def test_x_is_staged_in_the_compact_column_order(m):
    x = np.random.default_rng(m).standard_normal((m, 512)).astype(np.float16)
    staged = layout.staged_x(x, compact=True)
    assert np.array_equal(staged, layout.staged_x(x[:, layout.compact_columns(512)], compact=False))
    assert not np.array_equal(staged, layout.staged_x(x, compact=False))


def test_plain_staging_holds_the_b_fragment_the_docstring_names():
    x = np.arange(16 * 256, dtype=np.uint16).reshape(16, 256).view(np.float16)
    staged = layout.staged_x(x, compact=False)
    bits = x.view(np.uint16)
    # word j of lane (g, t) at step s, rows 8 mb + g: columns 32 s + 2 t + 8 j and the next
    s, mb, g, t, j = 3, 1, 5, 2, 3
    col = 32 * s + 2 * t + 8 * j
    word = int(staged[s, mb, 4 * g + t, j])
    assert word == int(bits[8 * mb + g, col]) | int(bits[8 * mb + g, col + 1]) << 16


@pytest.mark.parametrize("m", [1, 7, 16])
def test_the_product_read_from_the_compact_form_is_the_references(m):
    # the whole read, emulated: the compact registers and the staged x multiplied step by step
    n, k = 37, 512
    rng = np.random.default_rng(m)
    w = _pruned(rng, n, k, F16)
    x = rng.standard_normal((m, k)).astype(F16)
    values, indices = _compact(w)
    frags, meta = layout.compact_fragments(values.view(np.uint16), indices)
    staged = layout.staged_x(x, compact=True)
    got = np.zeros((16 * frags.shape[0], 16))
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for tile in range(frags.shape[0]):
        for blk in range(frags.shape[1]):
            for st in range(8):
                sel = st % 2
                # the dense 16 x 32 A of this step, from the lanes' registers and the selected lanes' metadata
                a = np.zeros((16, 32))
                for ln in range(32):
                    for reg in range(4):
                        rh, qh = reg % 2, reg // 2
                        row, slot = 8 * rh + g[ln], 4 * qh + t[ln]
                        h, q = slot // 4, slot % 4
                        word = meta[tile, blk, 4 * g[ln] + 2 * sel + h, st // 2]
                        nib = (int(word) >> (16 * rh + 4 * q)) & 0xF
                        pair = frags[tile, blk, st, ln, 2 * reg:2 * reg + 2].view(np.float16).astype(np.float64)
                        a[row, 4 * slot + (nib & 3)] = pair[0]
                        a[row, 4 * slot + (nib >> 2)] = pair[1]
                # B: 32 logical columns by 16 rows of x, from the staged words
                words = staged[blk * 8 + st]  # (mb, lane, word)
                b = np.zeros((32, 16))
                for mbi in range(2):
                    for ln in range(32):
                        for j in range(4):
                            lo_hi = np.array([words[mbi, ln, j]], np.uint32).view(np.float16).astype(np.float64)
                            col = 2 * t[ln] + 8 * j
                            b[col:col + 2, 8 * mbi + g[ln]] = lo_hi
                got[16 * tile:16 * tile + 16] += a @ b
    want = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(got[:n, :m].T, want, rtol=1e-12, atol=1e-12)

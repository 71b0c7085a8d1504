"""The weight layout of the decode kernel (:mod:`pycusparselt.gemm.decode`), in NumPy: packing, unpacking, and
the kernel's reads emulated on the CPU.

The kernel computes ``y[M, N] = act(x[M, K] @ W[N, K].T + b)`` for 1 to 16 rows with the Sparse Tensor Core
instruction ``mma.sp.m16n8k32`` (FP16 / BF16 in, FP32 accumulation): W is the sparse operand A (16 rows of W by
32 of K per instruction), x^T the dense operand B (32 of K by 8 rows of x). The layout hands every lane of a warp
exactly the registers the instruction wants, so the kernel streams W with 16-byte loads, each warp-wide load
512 contiguous bytes, and never rearranges it.

Layout
------
W (N x K, 2:4 along K) is padded with zeros to ``Np = ceil(N / 16) * 16`` rows and ``Kp = ceil(K / 256) * 256``
columns and cut into *chunks* of 16 rows (an n-tile) by 256 columns (a k-block, 8 *steps* of 32 columns, each
step 8 *groups* of 4 columns). The buffer is ``uint8[NT, KB, 4608]`` (``NT = Np / 16``, ``KB = Kp / 256``),
chunks in row-major order of (n-tile, k-block); each chunk is 512 bytes of metadata then 4096 bytes of values:

- values: ``[step 8][lane 32][8 elements]``. Lane ``l`` (``g = l // 4``, ``t = l % 4``) holds, as four 32-bit
  registers of two elements each, the two kept values (lower column first) of group ``t`` of row ``g``,
  group ``t`` of row ``g + 8``, group ``t + 4`` of row ``g`` and group ``t + 4`` of row ``g + 8``.
- metadata: ``[lane 32][word 4]`` of uint32. Word ``j`` serves steps ``2j`` (lanes with ``t`` in 0, 1,
  sparsity selector 0) and ``2j + 1`` (lanes with ``t`` in 2, 3, selector 1). In lane ``(g, t)``, with
  ``h = t % 2``: bits ``4q .. 4q+3`` hold group ``4h + q`` of row ``g``, bits ``16 + 4q ..`` the same group of
  row ``g + 8``; a group's 4 bits are ``i0 | i1 << 2``, the positions (0..3) of its two kept values,
  ``i0 < i1``. A group with fewer than two non-zeros keeps zeros at its lowest free positions (an all-zero
  group is ``0b0100``).

Compact form
------------
The kernel also reads a weight kept in the compact form of ``pycusparselt.torch.compact`` (``values`` (N, K/2),
``indices`` (N, K/8), row-major, K a multiple of 256) as it is: lane ``(g, t)`` loads the 16-byte pieces
``4q + t`` (q = 0..3, four groups each) of rows ``g`` and ``g + 8`` of a 256-column block's values; the four
lanes of ``g`` load the block's 32 bytes of positions of both rows, 16 bytes each, and hand them round by
shuffles. Step ``s`` takes the groups ``2 (s % 2)`` and ``2 (s % 2) + 1`` of
piece ``s // 2`` as its slots ``t`` and ``t + 4``, so the kernel multiplies the block's columns in the order
:func:`compact_columns` gives, and stages x in that order too. :func:`compact_fragments` and :func:`staged_x`
emulate those reads.

Bytes: ``Np * Kp * 9 / 16`` for 16-bit types, 0.5625 of the dense weight (exactly so when ``N % 16 == 0`` and
``K % 256 == 0``, as in the usual LLM shapes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import types

__all__ = [
    "ROWS_PER_TILE",
    "COLS_PER_BLOCK",
    "CHUNK_BYTES",
    "META_BYTES",
    "MAX_ROWS",
    "DTYPES",
    "padded_shape",
    "packed_shape",
    "packed_nbytes",
    "pack_weight",
    "pack_bits",
    "unpack_weight",
    "fields",
    "emulate",
    "compact_columns",
    "compact_fragments",
    "staged_x",
]

#: Rows of W per chunk (the instruction's M).
ROWS_PER_TILE = 16
#: Columns of W per chunk: 8 steps of the instruction's K = 32.
COLS_PER_BLOCK = 256
#: Bytes of metadata and of one whole chunk.
META_BYTES = 512
CHUNK_BYTES = META_BYTES + ROWS_PER_TILE * COLS_PER_BLOCK // 2 * 2
#: The most rows of x one call takes.
MAX_ROWS = 16
#: The element types the kernel takes (weight, x and output share one).
DTYPES = (types.F16, types.BF16)

_STEPS = COLS_PER_BLOCK // 32


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """``(Np, Kp)``: the weight's shape after padding to whole chunks."""
    return -(-n // ROWS_PER_TILE) * ROWS_PER_TILE, -(-k // COLS_PER_BLOCK) * COLS_PER_BLOCK


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    """``(NT, KB, CHUNK_BYTES)``: the shape of the packed uint8 buffer."""
    np_, kp = padded_shape(n, k)
    return np_ // ROWS_PER_TILE, kp // COLS_PER_BLOCK, CHUNK_BYTES


def packed_nbytes(n: int, k: int) -> int:
    """Bytes of the packed weight."""
    nt, kb, c = packed_shape(n, k)
    return nt * kb * c


def _check_weight(w: Any) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight: expected a non-empty (N, K) matrix, got shape {w.shape}")
    if w.dtype not in DTYPES:
        raise TypeError(f"weight: expected float16 or bfloat16, got {w.dtype}")
    return w


def pack_weight(w: Any) -> np.ndarray:
    """The packed buffer (see the module docstring) of a weight that is 2:4 along its rows.

    Parameters
    ----------
    w : array_like, shape (N, K), float16 or bfloat16
        The pruned weight: at most two non-zeros in every group of four consecutive elements of a row
        (``-0.0`` counts as zero).

    Returns
    -------
    numpy.ndarray
        ``uint8[NT, KB, CHUNK_BYTES]`` (:func:`packed_shape`).

    Raises
    ------
    ValueError
        A group with more than two non-zeros (the first one is named), or a bad shape.
    TypeError
        Another dtype.
    """
    w = _check_weight(w)
    return pack_bits(np.ascontiguousarray(w).view(np.uint16), np)


def pack_bits(bits: Any, xp: Any = np) -> Any:
    """:func:`pack_weight` on the weight's 16-bit patterns (uint16, shape (N, K)), with the array module
    ``xp`` (NumPy, or CuPy to pack on the GPU: the same operations, the same bytes)."""
    n, k = bits.shape
    np_, kp = padded_shape(n, k)
    padded = xp.zeros((np_, kp), dtype=xp.uint16)
    padded[:n, :k] = bits
    groups = padded.reshape(np_, kp // 4, 4)
    nonzero = (groups & 0x7FFF) != 0
    count = nonzero.sum(axis=-1)
    if bool((count > 2).any()):
        r, gi = (int(v) for v in xp.argwhere(count > 2)[0])
        raise ValueError(f"weight: not 2:4 along K: row {r}, columns {4 * gi}..{4 * gi + 3} hold "
                         f"{int(count[r, gi])} non-zeros")
    # keep the non-zeros, then the lowest free positions, until each group keeps exactly two
    free = ~nonzero
    keep = nonzero | (free & (xp.cumsum(free, axis=-1) <= (2 - count)[..., None]))
    i0 = xp.argmax(keep, axis=-1)
    i1 = 3 - xp.argmax(keep[..., ::-1], axis=-1)
    v0 = xp.take_along_axis(groups, i0[..., None], axis=-1)[..., 0]
    v1 = xp.take_along_axis(groups, i1[..., None], axis=-1)[..., 0]
    nibble = (i0 | (i1 << 2)).astype(xp.uint32)

    nt, kb = np_ // ROWS_PER_TILE, kp // COLS_PER_BLOCK
    # values: (nt, rh, g, kb, step, qh, t, 2) -> (nt, kb, step, g, t, qh, rh, 2); row = 8 rh + g, group = 4 qh + t
    vals = xp.stack([v0, v1], axis=-1).reshape(nt, 2, 8, kb, _STEPS, 2, 4, 2)
    vals = vals.transpose(0, 3, 4, 2, 6, 5, 1, 7).reshape(nt, kb, _STEPS * 32 * 8)
    # metadata: (nt, rh, g, kb, j, sel, h, q) with step = 2 j + sel, group = 4 h + q
    nib = nibble.reshape(nt, 2, 8, kb, _STEPS // 2, 2, 2, 4)
    shifts = (16 * xp.arange(2, dtype=xp.uint32))[:, None] + 4 * xp.arange(4, dtype=xp.uint32)[None, :]
    words = (nib << shifts.reshape(1, 2, 1, 1, 1, 1, 1, 4)).sum(axis=(1, 7), dtype=xp.uint32)
    # words: (nt, g, kb, j, sel, h) -> (nt, kb, g, sel, h, j): lane = 4 g + 2 sel + h
    words = words.transpose(0, 2, 1, 4, 5, 3).reshape(nt, kb, 32 * 4)
    out = xp.empty((nt, kb, CHUNK_BYTES), dtype=xp.uint8)
    out[..., :META_BYTES] = xp.ascontiguousarray(words).view(xp.uint8).reshape(nt, kb, META_BYTES)
    out[..., META_BYTES:] = xp.ascontiguousarray(vals).view(xp.uint8).reshape(nt, kb, -1)
    return out


def fields(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values uint16[nt, kb, step, lane, 8], metadata uint32[nt, kb, lane, 4])`` of a packed buffer: each
    lane's A fragments per step and its metadata words."""
    packed = np.ascontiguousarray(packed)
    if packed.ndim != 3 or packed.shape[2] != CHUNK_BYTES or packed.dtype != np.uint8:
        raise ValueError(f"packed: expected uint8[NT, KB, {CHUNK_BYTES}], got {packed.dtype}{list(packed.shape)}")
    nt, kb = packed.shape[:2]
    meta = packed[..., :META_BYTES].copy().view(np.uint32).reshape(nt, kb, 32, 4)
    vals = packed[..., META_BYTES:].copy().view(np.uint16).reshape(nt, kb, _STEPS, 32, 8)
    return vals, meta


def unpack_weight(packed: Any, n: int, k: int, dtype: Any) -> np.ndarray:
    """The dense weight (N, K) back from its packed buffer: the inverse of :func:`pack_weight`, read the way
    the kernel reads it (lane by lane, selector by selector)."""
    dtype = np.dtype(dtype)
    vals, meta = fields(np.asarray(packed))
    nt, kb = vals.shape[:2]
    if (nt, kb) != packed_shape(n, k)[:2]:
        raise ValueError(f"packed: shape {vals.shape[:2]} does not hold a {n} x {k} weight")
    dense = np.zeros((nt, 16, kb, _STEPS, 8, 4), dtype=np.uint16)  # (tile, row, block, step, group, position)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for step in range(_STEPS):
        sel = step % 2
        for reg in range(4):  # reg = 2 qh + rh
            rh, qh = reg % 2, reg // 2
            row, group = 8 * rh + g, 4 * qh + t
            # the metadata of (row, group) sits in the lane of the pair for this selector and this half of K
            h, q = group // 4, group % 4
            meta_lane = 4 * g + 2 * sel + h
            word = meta[:, :, meta_lane, step // 2]  # (nt, kb, 32)
            nib = (word >> (16 * rh + 4 * q)) & 0xF
            for half in range(2):
                pos = (nib >> (2 * half)) & 0x3
                v = vals[:, :, step, lane, 2 * reg + half]
                ti, bi, li = np.meshgrid(np.arange(nt), np.arange(kb), lane, indexing="ij")
                dense[ti, row[li], bi, step, group[li], pos] = v
    w = dense.reshape(nt * 16, kb * COLS_PER_BLOCK)
    return np.ascontiguousarray(w[:n, :k]).view(dtype)


def emulate(packed: Any, x: Any, n: int, k: int) -> np.ndarray:
    """The kernel's product ``x @ W.T`` before the epilogue, in float64, computed from the packed buffer as the
    kernel reads it: for CPU tests of the layout against :func:`pycusparselt.reference.matmul`.

    Parameters
    ----------
    packed : uint8[NT, KB, CHUNK_BYTES]
    x : array_like, shape (M, K), the weight's dtype
    n, k : int
        The weight's shape.
    """
    x = np.asarray(x)
    w = unpack_weight(packed, n, k, x.dtype)
    return x.astype(np.float64) @ w.astype(np.float64).T


def compact_columns(k: int) -> np.ndarray:
    """The order in which the kernel multiplies the columns of a compact-form weight of ``k`` columns (a
    multiple of 256): logical column ``c`` (step ``c // 32`` of its block, slot ``j = c % 32 // 4``, position
    ``c % 4``) is the weight's column ``256 b + 4 G + c % 4``, group ``G = 16 (s // 2) + 4 (j % 4) + 2 (s % 2) +
    j // 4`` of its block ``b`` (``s`` the step within the block)."""
    if k % COLS_PER_BLOCK:
        raise ValueError(f"k: expected a multiple of {COLS_PER_BLOCK}, got {k}")
    c = np.arange(k)
    block, s, j, p = c // COLS_PER_BLOCK, c % COLS_PER_BLOCK // 32, c % 32 // 4, c % 4
    group = 16 * (s // 2) + 4 * (j % 4) + 2 * (s % 2) + j // 4
    return block * COLS_PER_BLOCK + 4 * group + p


def _nibbles_of(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    s = (4 * t).astype(np.uint32)
    f = np.uint32(0xF)
    return ((a >> s) & f) | (((a >> (s + 16)) & f) << 4) | (((b >> s) & f) << 8) | (((b >> (s + 16)) & f) << 12)


def compact_fragments(values: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    """The registers the kernel gives each lane from a compact-form weight, computed as the kernel computes
    them: ``(A fragments uint16[NT, KB, step, lane, 8], metadata uint32[NT, KB, lane, 4])``, the shapes of a
    packed buffer's fields. Rows past N read row N - 1 (their results are never written).

    Parameters
    ----------
    values : uint16[N, K / 2]
        The kept values' bit patterns.
    indices : uint8[N, K / 8]
    """
    v = np.ascontiguousarray(values).view(np.uint16)
    ind = np.ascontiguousarray(indices, dtype=np.uint8)
    n, k = v.shape[0], 2 * v.shape[1]
    nt, kb = -(-n // ROWS_PER_TILE), k // COLS_PER_BLOCK
    # 16-byte pieces (8 values) and 32-bit words of positions, per row and block
    pieces = v.reshape(n, kb, 16, 8)
    words = ind.reshape(n, kb, 32).copy().view(np.uint32)  # (n, kb, 8)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    tiles = np.arange(nt)[:, None]
    r0 = np.minimum(tiles * 16 + g, n - 1)  # (nt, 32)
    r1 = np.minimum(tiles * 16 + g + 8, n - 1)
    frags = np.empty((nt, kb, _STEPS, 32, 8), np.uint16)
    for st in range(_STEPS):
        q, h = st // 2, 2 * (st % 2)
        a = pieces[r0, :, 4 * q + t]  # (nt, 32, kb, 8): lane's piece of row g
        b = pieces[r1, :, 4 * q + t]
        regs = [a[..., 2 * h:2 * h + 2], b[..., 2 * h:2 * h + 2], a[..., 2 * h + 2:2 * h + 4],
                b[..., 2 * h + 2:2 * h + 4]]
        frags[:, :, st] = np.concatenate(regs, axis=-1).transpose(0, 2, 1, 3)
    meta = np.empty((nt, kb, 32, 4), np.uint32)
    w0, w1 = words[r0].transpose(0, 2, 1, 3), words[r1].transpose(0, 2, 1, 3)  # (nt, kb, 32, 8)
    for j in range(4):
        meta[..., j] = _nibbles_of(w0[..., 2 * j], w0[..., 2 * j + 1], t) | (
            _nibbles_of(w1[..., 2 * j], w1[..., 2 * j + 1], t) << np.uint32(16))
    return frags, meta


def staged_x(x: Any, compact: bool) -> np.ndarray:
    """The kernel's shared-memory image of ``x`` (M <= 16 rows, K a multiple of 256 columns), written as the
    kernel's staging loop writes it: uint32[K / 32 steps, 2 (rows 0-7, 8-15), 32 lanes, 4 words], swizzle
    undone. Word ``j`` of lane ``(g, t)`` at step ``s`` holds the logical columns ``32 s + 2 t + 8 j`` and the next
    of row ``8 mb + g``: x's own columns, or with ``compact`` the columns :func:`compact_columns` names."""
    x = np.ascontiguousarray(x).view(np.uint16)
    m, k = x.shape
    padded = np.zeros((16, k), np.uint16)
    padded[:m] = x
    steps = k // 32
    out = np.zeros((steps, 2, 32, 4), np.uint32)
    segs = padded.reshape(16, k // 8, 4, 2).copy().view(np.uint32)[..., 0]  # (row, segment, 4 words)
    for row in range(16):
        mb, g = row // 8, row % 8
        for sg in range(k // 8):
            w = segs[row, sg]
            if compact:
                sgb, tp = sg % 32, (sg % 32 >> 1) & 3
                step = sg // 32 * 8 + 2 * (sgb >> 3) + (sgb & 1)
                lane, j = g * 4 + 2 * (tp & 1), tp >> 1
                for p in range(4):
                    out[step, mb, lane + (p & 1), j + 2 * (p >> 1)] = w[p]
            else:
                step, j = sg // 4, sg % 4
                for p in range(4):
                    out[step, mb, g * 4 + p, j] = w[p]
    return out

"""The NumPy reference: 2:4 pruning, compression and cuSPARSELt's GEMM semantics, on the CPU.

It imports only NumPy, ml_dtypes (through :mod:`pycusparselt.types`, the type table it shares with the GPU
layers) and the standard library. It is the oracle the GPU tests compare cuSPARSELt against, and a way to
prepare and inspect 2:4 data without a GPU. Its parts, one job each: ``pycusparselt.reference.sparsity``
(pruning, the 2:4 check, compression), ``pycusparselt.reference.semantics`` (the GEMM and its rules),
``pycusparselt.reference.tolerance`` (how close a GPU result must be) and ``pycusparselt.reference.elements``
(element checks and exact conversions they share); this module exports their public names.

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
plain arithmetic lives in one small function and is listed in :data:`SEMANTICS`, with how it
was established. :func:`matmul_bounds` and :func:`assert_close` give, per element, the interval a
correct GPU result must lie in, derived from the data types, ``K`` and ``|A| @ |B|``
(see :class:`Tolerance`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..types import COMPUTE_TYPES, SUPPORTED_INPUTS
from ..types import VALID_COMBINATIONS as _TABLE
from . import elements, semantics, sparsity, tolerance
from .semantics import Rule, matmul
from .sparsity import (
    compress,
    compressed_nbytes,
    decompress,
    is_2to4,
    mask_2to4,
    mask_from_scores,
    prune_2to4,
)
from .tolerance import Tolerance, assert_close, matmul_bounds, matmul_tolerance

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
    "elements",
    "semantics",
    "sparsity",
    "tolerance",
]

#: The element types of the sparse and dense operands A and B (:data:`pycusparselt.types.SUPPORTED_INPUTS`).
SUPPORTED_DTYPES: tuple[np.dtype, ...] = SUPPORTED_INPUTS

#: A/B type -> the C/D types cuSPARSELt accepts with it; the first is the default of :func:`matmul` when
#: neither ``out_dtype`` nor ``c`` says otherwise (:data:`pycusparselt.types.VALID_COMBINATIONS`).
VALID_COMBINATIONS: Mapping[np.dtype, tuple[np.dtype, ...]] = _TABLE

#: A/B type -> the compute types cuSPARSELt accepts with it; the first is the default. "32F" for float32
#: inputs runs on TF32 Tensor Cores (there is no sparse FP32 math), so it is treated like "TF32"
#: (:data:`pycusparselt.types.COMPUTE_TYPES`).
DEFAULT_COMPUTE: Mapping[np.dtype, tuple[str, ...]] = COMPUTE_TYPES

#: Every non-arithmetic rule of the reference, with the function that implements it (in
#: ``pycusparselt.reference.semantics`` or ``pycusparselt.reference.sparsity``) and how it was established. The
#: documentation page quotes this table; change a rule there and here.
#:
#: :meta hide-value:
SEMANTICS: Mapping[str, Rule] = semantics.SEMANTICS

#: The 90 tile patterns, shape (90, 4, 4): ``[p, r, c]`` with r along the non-reduction axis and c
#: along the reduction axis; in the tie-break order of ``method="tile"`` (read-only).
#:
#: :meta hide-value:
TILE_PATTERNS: np.ndarray = sparsity.TILE_PATTERNS

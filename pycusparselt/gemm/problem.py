"""The problem a plan solves, worked out from its example operands and options: pure, checked on the CPU.

cuSPARSELt is always asked for ``Y = S @ X``: S the sparse operand, X the dense one. For ``sparse="a"`` S is A,
X is B and Y is D; for ``sparse="b"`` the plan describes the transposed problem ``D.T = B.T @ A.T`` on the same
memory (a row-major array read column-major is its transpose), so S is B.T, X is A.T and Y is D.T. Where the
shapes or leading dimensions miss the multiples a type needs, the plan computes on padded buffers of its own
(S row-major, X column-major: valid for every type; Y row-major). :func:`plan_problem` decides all of this
and every rule that follows from the operands' types, shapes and layouts, before any device query or native
call; the plan (:mod:`pycusparselt.gemm.plan`) turns the result into descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes
from .operands import COL, ROW, Operand
from .options import PlanOptions

__all__ = ["Matrix", "Problem", "plan_problem", "round_up", "tn_message", "check_aligned", "ALIGN_BYTES",
           "ALPHA_VECTOR_NO_C"]

#: Every operand's address is a multiple of this many bytes (cuSPARSELt's alignment rule).
ALIGN_BYTES = 16
# Measured on the H100 with 0.8.0: with alpha vector scaling the library leaves beta * C out of D.
ALPHA_VECTOR_NO_C = (
    "alpha_vector: cuSPARSELt ignores C under alpha vector scaling (D = alpha * A @ B whatever beta is), so "
    "pycusparselt refuses c and beta with it; add C separately"
)


def check_aligned(op: Operand) -> None:
    """ValueError naming ``op`` unless its address is a multiple of :data:`ALIGN_BYTES`."""
    if op.ptr % ALIGN_BYTES:
        raise ValueError(f"{op.name}: device pointer 0x{op.ptr:x} is not {ALIGN_BYTES}-byte aligned")


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``value``."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Matrix:
    """One matrix of the canonical problem as its descriptor sees it (order: "row" or "col")."""

    rows: int
    cols: int
    ld: int
    order: str
    batch: int
    batch_stride: int


@dataclass(frozen=True)
class Problem:
    """What :func:`plan_problem` worked out. ``mats`` are S, X and Y as the descriptors see them (the caller's
    memory, or the plan's padded buffers when ``padded``); ``dims`` is (P, K, Q) of ``Y (P, Q) = S (P, K) @
    X (K, Q)`` before padding; ``layouts`` the examples' (dtype, shape, order, ld, batch stride) by name, with
    ``d_layout`` D's (C's, else compact) and ``d_spec`` D's (dtype, shape, order)."""

    options: PlanOptions
    dtype: np.dtype
    out_dtype: np.dtype
    compute_type: Any
    rules: dtypes.TypeRules
    storage: np.dtype
    shape: tuple
    batch: int
    transpose: bool
    dims: tuple[int, int, int]
    mats: tuple[Matrix, Matrix, Matrix]
    padded: bool
    layouts: dict
    d_spec: tuple
    d_layout: tuple
    sparse_layout: tuple

    @property
    def sparse(self) -> str:
        return self.options.sparse

    # -- a call's operands against the examples (the plan checks each array once, then remembers it) -------

    def check_sparse(self, op: Operand) -> None:
        """The sparse-side array given to compress: the example's layout."""
        want = self.layouts[op.name]
        if op.layout != want:
            raise ValueError(
                f"{op.name}: shape {op.shape}, dtype {op.dtype}, {op.order}-major with ld {op.ld} does not match the "
                f"plan's sparse operand (dtype, shape, order, ld, batch stride) = {want}"
            )

    def check_dense(self, X: Operand) -> None:
        """The call's dense operand (``X.name`` "a" or "b"): the example's layout, aligned."""
        want = self.layouts[X.name]
        if X.layout != want:
            raise ValueError(
                f"{X.name}: {X.shape} {X.dtype} {X.order}-major (ld {X.ld}) does not match the plan's "
                f"{X.name} (dtype, shape, order, ld, batch stride) = {want}"
            )
        check_aligned(X)

    def check_c(self, C: Operand) -> None:
        """The call's C: the example c's layout (a plan made without one takes none), aligned."""
        if self.layouts["c"] is None or C.layout != self.layouts["c"]:
            raise ValueError(
                f"c: {C.shape} {C.dtype} {C.order}-major does not match the plan's c "
                f"{self.layouts['c']}; make the plan with an example c of this layout"
            )
        check_aligned(C)

    def check_out(self, D: Operand) -> None:
        """The call's ``out``: D's layout (C's, else compact), aligned."""
        if D.layout != self.d_layout:
            out_dt, d_shape, d_order = self.d_spec
            raise ValueError(
                f"out: expected {d_shape} {out_dt} {d_order}-major (dtype, shape, order, ld, batch "
                f"stride) = {self.d_layout}, got {D.layout}"
            )
        check_aligned(D)

    def check_scalars(self, has_c: bool, beta: float) -> None:
        """beta needs C; alpha vectors take neither (``ALPHA_VECTOR_NO_C``)."""
        if not has_c and beta != 0:
            raise ValueError("beta is non-zero but c is None")
        if self.options.alpha_vector and (has_c or beta != 0):
            raise ValueError(ALPHA_VECTOR_NO_C)


def tn_message(dtype: np.dtype, sparse: str) -> str:
    """The error for a type that needs the TN layout, saying what to pass."""
    if sparse == "a":
        want = "a C-contiguous (M, K) and b F-contiguous (K, N), e.g. b = bt.T with bt C-contiguous (N, K)"
    else:
        want = "b F-contiguous (K, N) and a C-contiguous (M, K), e.g. b = bt.T with bt C-contiguous (N, K)"
    return (
        f"{dtype} inputs need the 'TN' layout: the sparse operand row-major along K and the dense one "
        f"column-major along K; pass {want}"
    )


def _check_activation(options: PlanOptions, in_dt: np.dtype, out_dt: np.dtype) -> None:
    if options.activation == "gelu" and not (in_dt == dtypes.I8 and out_dt == dtypes.I8):
        raise ValueError(
            f"activation='gelu': cuSPARSELt supports GELU only for int8 inputs with int8 output, "
            f"got {in_dt} -> {out_dt}"
        )


def plan_problem(A: Operand, B: Operand, C: Operand | None, options: PlanOptions) -> Problem:
    """The problem of a plan with examples A, B (and C) and ``options``; TypeError or ValueError naming the
    argument for anything cuSPARSELt would refuse or compute wrongly (types, shapes, batches, layouts,
    alignment, epilogue)."""
    if A.dtype != B.dtype:
        raise TypeError(f"a and b must have the same dtype, got {A.dtype} and {B.dtype}")
    sparse = options.sparse
    rules = dtypes.rules_for(A.dtype, "a")
    out_dt = dtypes.resolve_out_dtype(A.dtype, options.out_dtype, None if C is None else C.dtype)
    compute_type = dtypes.resolve_compute(A.dtype, options.compute)
    m, k = A.rows, A.cols
    if B.rows != k:
        raise ValueError(f"a is (..., M, K) = {A.shape} but b is (..., K, N) = {B.shape}: K differs")
    n = B.cols
    if C is not None and (C.rows, C.cols) != (m, n):
        raise ValueError(f"c: expected (..., M, N) = (..., {m}, {n}), got {C.shape}")
    batches = {op.batch for op in (A, B, C) if op is not None and op.batch > 1}
    if len(batches) > 1:
        raise ValueError(f"batch sizes differ: a {A.shape}, b {B.shape}" + (f", c {C.shape}" if C else ""))
    batch = batches.pop() if batches else 1
    if C is not None and C.batch != batch:
        raise ValueError(f"c: C and D share one layout, so c needs the full batch ({batch}), got {C.shape}")
    if C is not None and batch > 1 and C.batch_stride == 0:
        raise ValueError(
            "c: a broadcast batch (batch stride 0) cannot be C: C and D share one layout, so every batch of D "
            "would be written to one matrix; pass cupy.ascontiguousarray(c)"
        )
    for op in (A, B, C):
        compact = op.ld * (op.rows if op.order == ROW else op.cols) if op is not None else 0
        if op is not None and op.batch_stride not in (0, compact):
            raise ValueError(
                f"{op.name}: batch stride {op.batch_stride} elements; batches must be stacked "
                f"contiguously (stride {compact}) or broadcast (stride 0)"
            )
    _check_activation(options, A.dtype, out_dt)
    if options.alpha_vector and A.dtype != dtypes.I8:
        raise ValueError(f"alpha_vector: only int8 inputs support alpha vector scaling, got {A.dtype}")
    if options.alpha_vector and C is not None:
        raise ValueError(ALPHA_VECTOR_NO_C)
    for op in (A, B, C):
        if op is not None:
            check_aligned(op)

    # The canonical problem Y = S @ X (see the module docstring).
    transpose = sparse == "b"
    S = B.transposed() if transpose else A
    X = A.transposed() if transpose else B
    d_order = C.order if C is not None else ROW
    y_order = (COL if d_order == ROW else ROW) if transpose else d_order
    if rules.needs_tn and not (S.fits(ROW) and X.fits(COL)):
        raise ValueError(tn_message(A.dtype, sparse))
    p, kk, q = S.rows, S.cols, X.cols
    sm, dm = rules.sparse_multiple, rules.dense_multiple
    pp, kp, qp = round_up(p, sm), round_up(kk, sm), round_up(q, dm)
    y_ld = C.ld if C is not None else (q if y_order == ROW else p)
    aligned = (
        (pp, kp, qp) == (p, kk, q)
        and S.ld % sm == 0
        and X.ld % dm == 0
        and y_ld % dm == 0
        and all(op.batch_stride % dm == 0 for op in (S, X, C) if op is not None)
    )
    if aligned:
        s_mat = Matrix(p, kk, S.ld, S.order, batch, S.batch_stride)
        x_mat = Matrix(kk, q, X.ld, X.order, batch, X.batch_stride)
        y_stride = C.batch_stride if C is not None else (p * q if batch > 1 else 0)
        y_mat = Matrix(p, q, y_ld, y_order, batch, y_stride)
    else:  # internal buffers: S row-major, X column-major (valid for every type), Y row-major
        s_mat = Matrix(pp, kp, kp, ROW, batch, pp * kp if S.batch > 1 else 0)
        x_mat = Matrix(kp, qp, kp, COL, batch, kp * qp if batch > 1 else 0)
        y_mat = Matrix(pp, qp, qp, ROW, batch, pp * qp if batch > 1 else 0)

    d_shape = (batch, m, n) if max(A.ndim, B.ndim, C.ndim if C else 2) == 3 else (m, n)
    d_layout = (
        C.layout
        if C is not None
        else (out_dt, d_shape, d_order, n if d_order == ROW else m, m * n if len(d_shape) == 3 and batch > 1 else 0)
    )
    return Problem(
        options=options,
        dtype=A.dtype,
        out_dtype=out_dt,
        compute_type=compute_type,
        rules=rules,
        # CuPy cannot allocate float8: the plan's own buffers hold their bytes
        storage=np.dtype(np.uint8) if A.dtype in (dtypes.E4M3, dtypes.E5M2) else A.dtype,
        shape=(batch, m, k, n) if batch > 1 or A.ndim == 3 else (m, k, n),
        batch=batch,
        transpose=transpose,
        dims=(p, kk, q),
        mats=(s_mat, x_mat, y_mat),
        padded=not aligned,
        layouts={"a": A.layout, "b": B.layout, "c": None if C is None else C.layout},
        d_spec=(out_dt, d_shape, d_order),
        d_layout=d_layout,
        sparse_layout=(A if sparse == "a" else B).layout,
    )

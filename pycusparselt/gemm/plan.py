"""SparseMatmulPlan: a persistent cuSPARSELt GEMM on device arrays, and the compressed sparse operand.

``D = activation(alpha * op(A) @ op(B) + beta * C + bias)`` with A or B 2:4 sparse along K. A plan is built
once from example operands (their shapes, dtypes and layouts) and then runs any number of products on arrays
of that signature::

    plan = SparseMatmulPlan(a, b)            # a: (M, K) sparse, b: (K, N) dense
    ca = plan.compress(a, prune="strip")     # prune a copy to 2:4 and compress it, once
    d = plan.matmul(ca, b)                   # as often as needed

Internally every product is put in one canonical form, ``Y = S @ X`` with the sparse operand S first: for
``sparse="a"`` S is A, X is B and Y is D; for ``sparse="b"`` S is B^T, X is A^T and Y is D^T. Transposing is
free (only the memory order flips), so no operand is ever copied to change its layout. Dimensions cuSPARSELt
cannot take (not multiples of 16/32 for the sparse operand, 8/16 for the dense ones) are padded: the sparse
operand once when it is compressed, the dense operands and D per call through buffers the plan keeps.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Mapping

import numpy as np

from .._native import gpu
from .. import _arrays, bindings
from . import descriptors, dtypes, selections
from .handles import handle_for_device, release_plan_objects
from .launch import (COMPRESSED_SLACK, BoundMatmul, CompressedOperand, Launcher, MatmulArgs, TimedCall, TuningTarget,
                     autotune_plan, check_compressed)
from ..enums import MatmulAlgAttribute, PruneAlg
from ..errors import ClosedError
from .operands import ROW, Operand, as_operand
from .options import PlanOptions, plan_options
from .problem import Problem, plan_problem
from .._native.streams import on_stream as _on_stream
from .._native.streams import stream_ptr as _stream_ptr
from ..tuning import PlanConfig, TuningReport
from ..tuning.cache import TuningCache

# CompressedOperand, the launch objects, MatmulArgs and the tuner's target live in pycusparselt.gemm.launch; they are
# this module's public names too (and documented here)
__all__ = ["SparseMatmulPlan", "CompressedOperand", "PlanConfig", "BoundMatmul", "Launcher", "TuningReport",
           "MatmulArgs", "TuningTarget", "TimedCall"]

_PRUNE = {"strip": PruneAlg.SPMMA_STRIP, "tile": PruneAlg.SPMMA_TILE}


def _cupy_view(op: Operand) -> Any:
    """A CuPy array over the operand's memory (zero-copy)."""
    return _arrays.as_cupy(op.owner)


def _canonical(arr: Any, transpose: bool) -> Any:
    return arr.swapaxes(-1, -2) if transpose else arr


def _empty_like(op: Operand, dtype: Any) -> Any:
    """A new CuPy array with ``op``'s shape, order and leading dimension (compact batches)."""
    cupy = gpu.cupy()

    major, minor = (op.rows, op.cols) if op.order == ROW else (op.cols, op.rows)
    full = cupy.empty((op.batch, major, op.ld), dtype=dtype)[:, :, :minor]
    arr = full if op.order == ROW else full.swapaxes(-1, -2)
    return arr if op.ndim == 3 else arr[0]


class SparseMatmulPlan:
    """A cuSPARSELt GEMM ``D = activation(alpha * A @ B + beta * C + bias)`` with A or B 2:4 sparse.

    Parameters
    ----------
    options : PlanOptions or dict, optional
        The options below as one object (:class:`~pycusparselt.gemm.options.PlanOptions`, or a dict of its
        fields), instead of keyword arguments; a plan made with either has them as :attr:`options`, and the
        problem worked out from them and the examples as :attr:`problem`
        (:class:`~pycusparselt.gemm.problem.Problem`).
    a, b : device arrays
        Example operands, ``(M, K)`` and ``(K, N)``, or batches ``(batch, M, K)`` / ``(batch, K, N)`` (a
        batch of one broadcasts). CuPy arrays or any object with ``__cuda_array_interface__`` or
        ``__dlpack__``; only their shape, dtype and layout are kept.
    c : device array, optional
        Example C, ``(M, N)`` or batched. Its layout is D's; without it D is C-contiguous.
    sparse : {"a", "b"}
        Which operand is 2:4 sparse along K (the rows of A, or the columns of B).
    out_dtype : dtype, optional
        D's type: by default C's, else float16/bfloat16/float32 for those inputs, int32 for int8 and
        float16 for FP8. ``pycusparselt.gemm.dtypes.combinations_text()`` lists the valid combinations.
    compute : {"32F", "16F", "32I"}, optional
        Compute type; "16F" (FP16 inputs only) is faster on Hopper and accumulates in half precision.
    activation : {None, "relu", "gelu"}
        Fused activation. ReLU takes ``relu_upper_bound`` and ``relu_threshold`` (values ``<= threshold``
        become 0); GELU (int8 -> int8 only) takes ``gelu_scaling``.
    bias : bool
        Whether :meth:`matmul` takes a bias: one value per row of D for ``sparse="a"`` (length M), per column
        for ``sparse="b"`` (length N); float32 for integer D, else D's type.
    alpha_vector : bool
        Whether :meth:`matmul`'s alpha is a float32 vector of the bias's length (int8 inputs).
    input_dtype : dtype, optional
        Read one-byte A and B (uint8 or int8 arrays) as this type: CuPy has no float8 arrays, so FP8 data is
        passed as its bytes with ``input_dtype=ml_dtypes.float8_e4m3fn`` (or ``float8_e5m2``), here and to
        every later call.

    Raises
    ------
    TypeError, ValueError
        Host arrays, unsupported types, mismatched shapes, layouts the type does not allow, misaligned
        pointers, arrays on different devices: before any native call.
    pycusparselt.errors.CuSparseLtError
        What the library refuses.
    """

    def __init__(
        self,
        a: Any,
        b: Any,
        c: Any = None,
        *,
        options: PlanOptions | Mapping[str, Any] | None = None,
        sparse: str = "a",
        out_dtype: Any = None,
        compute: str | None = None,
        activation: str | None = None,
        relu_upper_bound: float = math.inf,
        relu_threshold: float = 0.0,
        gelu_scaling: float = 1.0,
        bias: bool = False,
        alpha_vector: bool = False,
        input_dtype: Any = None,
    ) -> None:
        self._closed = True  # until built
        opts = plan_options(
            options, sparse=sparse, out_dtype=out_dtype, compute=compute, activation=activation,
            relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold, gelu_scaling=gelu_scaling,
            bias=bias, alpha_vector=alpha_vector, input_dtype=input_dtype,
        )
        self.options = opts
        self._input_dtype = opts.input_dtype
        A, B = as_operand(a, "a", self._input_dtype), as_operand(b, "b", self._input_dtype)
        C = None if c is None else as_operand(c, "c")
        problem = plan_problem(A, B, C, opts)
        devices = {op.device() for op in (A, B, C) if op is not None}
        if len(devices) > 1:
            raise ValueError(f"a, b{', c' if C is not None else ''} are on different devices: {sorted(devices)}")
        device = devices.pop()
        self._check_arch(device, problem.rules, problem.dtype)

        self.problem = problem
        self.sparse = opts.sparse
        self.dtype = problem.dtype
        self._storage = problem.storage
        self.out_dtype = problem.out_dtype
        self.shape = problem.shape
        self.activation = opts.activation
        self.device = device
        self.padded = problem.padded
        self._transpose = problem.transpose
        self._dims = problem.dims
        self._batch = problem.batch
        self._layouts = problem.layouts
        self._d_spec = problem.d_spec
        self._d_layout = problem.d_layout
        self._mats = problem.mats
        s_mat, x_mat, y_mat = problem.mats
        # A compressed operand is read only by plans of the same sparse matrix, types, compute type, dense and
        # output geometry and configuration id (compressed_key): compressed under another dense shape or
        # configuration, or by the descriptor-only cusparseLtSpMMACompress2, it ended products with illegal
        # instructions on the H100 and the H200 (scripts/probe_shared_compression.py). Configuration ids are
        # numbered per problem. One plan also serves one compressed operand: re-made with a tuned
        # configuration, a plan shared by several gave every operand after the first the first one's product.
        self._format = 0  # the config id the plan was initialised with
        self._problem_key = (x_mat, y_mat)
        self.sparse_key = (device, problem.sparse_layout, s_mat, problem.dtype, problem.out_dtype,
                           int(problem.compute_type))
        # plans of one problem share their algorithm selection (gemm.selections): what the descriptors hold
        self.selection_key = (self.sparse_key, self._problem_key, self._batch, opts.activation, opts.relu_upper_bound,
                              opts.relu_threshold, opts.gelu_scaling, opts.bias, opts.alpha_vector)
        self._compressed_size = None  # bytes, for the current configuration
        self._has_bias, self._has_alpha_vector = opts.bias, opts.alpha_vector
        self._compute_type = problem.compute_type
        self._buffers: dict[str, Any] = {}
        self._checked: set[tuple] = set()  # (role, array key) of arrays already validated against the plan
        self.tuning_report: TuningReport | None = None
        self._build(problem.compute_type, problem.out_dtype, opts.activation, opts.relu_upper_bound,
                    opts.relu_threshold, opts.gelu_scaling)

    @staticmethod
    def _check_arch(device: int, rules: dtypes.TypeRules, dtype: np.dtype) -> None:
        cupy = gpu.cupy()

        cc = cupy.cuda.Device(device).compute_capability
        major, minor = int(cc[:-1]), int(cc[-1])
        if (major, minor) < rules.min_cc:
            need = ".".join(map(str, rules.min_cc))
            raise ValueError(
                f"{dtype} sparse GEMMs need a GPU of SM {need} or newer; device {device} is SM {major}.{minor}"
            )

    def _build(self, compute_type, out_dt, activation, upper, threshold, scaling) -> None:
        cupy = gpu.cupy()

        handle = handle_for_device(self.device)
        h = handle.raw
        self._handle = handle
        self._plan, self._selection = bindings.RawPlan(), None
        # plan, selection, descriptors: release_plan_objects releases in this order
        self._objects = [self._plan, None, None]
        self._finalizer = weakref.finalize(self, release_plan_objects, handle, self.device, self._objects)
        epilogue = descriptors.Epilogue(activation, upper, threshold, scaling,
                                        dtypes.bias_dtype(out_dt) if self._has_bias else None, self._has_alpha_vector)
        # the plan's own descriptors, and a maker of more for each selection made for its problem
        self._describe = functools.partial(descriptors.make, h, self.device, self._mats, self._batch,
                                           dtypes.data_type(self.dtype), dtypes.data_type(out_dt), compute_type,
                                           epilogue)
        with cupy.cuda.Device(self.device):
            try:
                self._descriptors = self._objects[2] = self._describe()
                self._desc = self._descriptors.matmul
                if self._has_bias:  # the plan's calls copy the caller's bias into its descriptors' buffer
                    self._buffers["bias"] = self._descriptors.keep[0]
                if self._has_alpha_vector:
                    self._buffers["alpha"] = cupy.zeros(self._mats[0].rows, dtype=np.float32)
                self._selection = self._objects[1] = selections.acquire(handle, self.device, self.selection_key,
                                                                        self._describe, None)
                bindings.matmul_plan_init(h, self._plan, self._desc, self._selection.raw)
                self._max_alg_id = bindings.matmul_alg_get_attribute(h, self._selection.raw,
                                                                     MatmulAlgAttribute.ALG_CONFIG_MAX_ID)
                self._allocate_workspace()
            except BaseException:
                self._finalizer()
                raise
        self._closed = False
        self.default_config = self.config

    def _allocate_workspace(self) -> None:
        self._set_workspace(*self._new_workspace(self._plan))

    def _new_workspace(self, plan: bindings.RawPlan) -> tuple[Any, int]:
        """``(buffer, size)``: the workspace ``plan`` asks for (at least one byte, so it has an address)."""
        size = bindings.matmul_get_workspace(self._handle.raw, plan)
        return gpu.cupy().empty(max(size, 1), dtype=np.uint8), size

    def _set_workspace(self, workspace: Any, size: int) -> None:
        self._workspace, self._workspace_size = workspace, size
        # the per-call path: arguments converted once, for this plan object and workspace
        self.matmul_call = bindings.MatmulCall(self._handle.raw, self._plan, self._workspace.data.ptr)

    def _live(self) -> bindings.RawHandle:
        if self._closed:
            raise ClosedError("the plan was closed")
        return self._handle.checked()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Release the plan's native objects and buffers now. Harmless when repeated."""
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self._buffers = {}
        self._workspace = None
        self.matmul_call = None  # what bound calls check: theirs is gone

    def __enter__(self) -> SparseMatmulPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"device {self.device}"
        return (
            f"<SparseMatmulPlan {self.shape} {self.dtype} -> {self.out_dtype}, sparse={self.sparse!r}, "
            f"{'padded, ' if self.padded else ''}{state}>"
        )

    #: The sparse matrix's identity for compression (set at construction): the device, the sparse operand's
    #: layout and its descriptor's geometry, the input and output types and the compute type.
    sparse_key: tuple
    #: The plan's :class:`~pycusparselt.bindings.MatmulCall` (``cusparseLtMatmul`` with the handle, the native plan
    #: and the workspace fixed) for its current configuration: a new one after each re-initialisation, None once
    #: closed. The launch objects (:class:`~pycusparselt.gemm.plan.Launcher`,
    #: :class:`~pycusparselt.gemm.plan.BoundMatmul`) take their fixed arguments from it and compare it by
    #: identity.
    matmul_call: Any
    #: The plan's options, checked (:class:`~pycusparselt.gemm.options.PlanOptions`), however they were given.
    options: PlanOptions
    #: The problem worked out from the examples and the options (:class:`~pycusparselt.gemm.problem.Problem`):
    #: the canonical ``Y = S @ X``, its matrices, whether the plan pads, and D's layout.
    problem: Problem

    @property
    def compressed_key(self) -> tuple:
        """What a :class:`~pycusparselt.CompressedOperand` must match to be read by this plan: :attr:`sparse_key`,
        the dense and output matrices' geometry and the configuration id the plan runs (the compressed form
        depends on the whole problem; see the constructor's notes)."""
        return self.sparse_key + (self._problem_key, self._format)

    def compressed_size(self) -> int:
        """Bytes of the compressed sparse operand under the current configuration
        (``cusparseLtSpMMACompressedSize``); a :class:`~pycusparselt.CompressedOperand` needs at least this many."""
        h = self._live()
        if self._compressed_size is None:
            cupy = gpu.cupy()

            with cupy.cuda.Device(self.device):
                self._compressed_size = bindings.spmma_compressed_size(h, self._plan)[0]
        return self._compressed_size

    @property
    def max_alg_id(self) -> int:
        """Number of algorithm configurations (``CONFIG_MAX_ID``); valid ids are ``0 .. max_alg_id - 1``."""
        self._live()
        return self._max_alg_id

    @property
    def workspace_size(self) -> int:
        """Bytes of workspace the current configuration needs (allocated once by the plan)."""
        self._live()
        return self._workspace_size

    @property
    def config(self) -> PlanConfig:
        """The configuration the plan runs (settable; :meth:`autotune` sets it too).

        Setting it re-initialises the plan with that configuration, which can change cuSPARSELt's compressed
        form: operands compressed before are then refused (compress again) unless the algorithm id is
        unchanged. :meth:`autotune` re-initialises the plan the same way (both methods), so tune first,
        then compress. Plans of one problem and configuration share one algorithm selection
        (``pycusparselt.gemm.selections``), so that only the first pays for making it.
        """
        h, raw = self._live(), self._selection.raw
        return PlanConfig(*(bindings.matmul_alg_get_attribute(h, raw, a) for a in selections.ATTRIBUTES))

    @config.setter
    def config(self, config: PlanConfig | int) -> None:
        config = self._checked_config(config)
        if selections.shareable(self._selection, self.selection_key, config):  # a tuner's own: set and shared
            self.try_config(config)
            selections.share(self._selection, self.selection_key, config)
            return
        sel = selections.acquire(self._handle, self.device, self.selection_key, self._describe, config)
        if sel is self._selection:  # runs it already: the plan holds it once
            selections.release(sel)
        self._use(sel, config)

    def try_config(self, config: PlanConfig | int) -> None:
        """Set :attr:`config` on a selection of the plan's own, changed in place where safe: a tuner's candidates
        (about 1 ms each, against 0.23 s for a new selection; see ``pycusparselt.gemm.selections``)."""
        config, sel = self._checked_config(config), self._selection
        previous = selections.reconfigure(sel, config)
        if previous is None:
            sel = selections.private(self._handle, self.device, self._describe, config)
        try:
            self._use(sel, config)
        except BaseException as failed:
            if previous is not None:  # the running plan's selection as it was
                try:
                    selections.reconfigure(sel, previous)
                except BaseException as restoring:
                    raise restoring from failed
            raise

    def _checked_config(self, config: PlanConfig | int) -> PlanConfig:
        self._live()
        config = PlanConfig(config) if isinstance(config, int) else PlanConfig(*config)
        if not 0 <= config.alg_id < self._max_alg_id:
            raise ValueError(f"config.alg_id: expected 0 .. {self._max_alg_id - 1}, got {config.alg_id}")
        return config

    def _use(self, sel: selections.Selection, config: PlanConfig) -> None:
        """Re-initialise the plan over ``sel`` (a new plan object) and give back the selection it had. The new
        plan and its workspace are made before anything is swapped: where either fails, the plan runs on as it
        was."""
        cupy = gpu.cupy()

        plan = bindings.RawPlan()
        with cupy.cuda.Device(self.device):
            try:
                bindings.matmul_plan_init(self._handle.raw, plan, self._desc, sel.raw)
            except BaseException:
                if sel is not self._selection:
                    selections.release(sel)
                raise
            try:
                workspace = self._new_workspace(plan)
            except BaseException:  # the new plan never ran: it goes with its selection, never before
                selections.retire(sel, plan) if sel is self._selection else selections.release(sel, plan)
                raise
            old_plan, old_sel = self._plan, self._selection
            self._objects[:2] = self._plan, self._selection = plan, sel  # what the finalizer releases
            self._compressed_size, self._format = None, config.alg_id
            selections.retire(sel, old_plan) if old_sel is sel else selections.release(old_sel, old_plan)
            self._set_workspace(*workspace)

    def _storage_view(self, arr: Any) -> Any:
        """``arr`` as the plan stores it (CuPy cannot copy float8: its bytes are copied instead)."""
        return arr if arr.dtype == self._storage else arr.view(self._storage)

    def _sparse_operand(self, x: Any) -> tuple[Operand, Any]:
        """The caller's sparse-side array, checked against the plan, as (operand, canonical CuPy view)."""
        op = as_operand(x, self.sparse, self._input_dtype)
        self.problem.check_sparse(op)
        self._check_device(op)
        return op, _canonical(self._storage_view(_cupy_view(op)), self._transpose)

    def _check_device(self, op: Operand) -> None:
        device = op.device()
        if device != self.device:
            raise ValueError(f"{op.name}: array is on device {device}, the plan on device {self.device}")

    def _dense_sparse_copy(self, view: Any, stream_ptr: int) -> Any:
        """A copy of the canonical sparse operand with the structured descriptor's geometry (zero padding)."""
        cupy = gpu.cupy()

        s_mat = self._mats[0]
        p, kk, _ = self._dims
        count = self._batch if s_mat.batch_stride else 1
        with _on_stream(stream_ptr):
            if s_mat.order == ROW:
                buf = cupy.zeros((count, s_mat.rows, s_mat.ld), dtype=self._storage)[:, :, : s_mat.cols]
            else:
                buf = cupy.zeros((count, s_mat.cols, s_mat.ld), dtype=self._storage).swapaxes(-1, -2)[:, : s_mat.rows]
            buf[:, :p, :kk] = view
        return buf

    def _flag_valid(self, h, src_ptr: int, stream_ptr: int) -> bool:
        cupy = gpu.cupy()

        flag = cupy.zeros(1, dtype=cupy.int32)  # written only when the matrix is not 2:4
        with _on_stream(stream_ptr) as stream:
            flag.fill(0)
            bindings.spmma_prune_check(h, self._desc, src_ptr, flag.data.ptr, stream_ptr)
            stream.synchronize()
        return int(flag.get()[0]) == 0

    def prune(self, x: Any, method: str = "strip", *, stream: Any = None) -> Any:
        """Prune the sparse-side operand to 2:4 with cuSPARSELt, into a new array (``x`` is unchanged).

        ``method`` is "strip" (the 2 largest magnitudes of every 4 along K) or "tile" (4x4 tiles 2:4 along
        both axes). Returns a CuPy array of ``x``'s shape and dtype (C-contiguous for a padded plan).
        """
        cupy = gpu.cupy()

        h = self._live()
        alg = self._prune_alg(method)
        op, view = self._sparse_operand(x)
        stream_ptr = _stream_ptr(stream, self.device)
        p, kk, _ = self._dims
        with cupy.cuda.Device(self.device):
            buf = self._dense_sparse_copy(view, stream_ptr)
            bindings.spmma_prune(h, self._desc, buf.data.ptr, buf.data.ptr, alg, stream_ptr)
            # the caller's layout (shape, order, leading dimension), so the result can go to compress()
            with _on_stream(stream_ptr):
                result = _empty_like(op, self._storage)
                target = _canonical(result, self._transpose)
                target[...] = buf[:, :p, :kk] if target.ndim == 3 else buf[0, :p, :kk]
            given = _cupy_view(op).dtype
            return _arrays.like(result if result.dtype == given else result.view(given), x, op.dtype)

    @staticmethod
    def _prune_alg(method: str) -> PruneAlg:
        try:
            return _PRUNE[method]
        except KeyError:
            raise ValueError(f"prune: expected 'strip' or 'tile', got {method!r}") from None

    def is_2to4(self, x: Any, *, stream: Any = None) -> bool:
        """Whether ``x`` (the sparse-side operand) is 2:4 along K, asked of cuSPARSELt (synchronises)."""
        cupy = gpu.cupy()

        h = self._live()
        _, view = self._sparse_operand(x)
        stream_ptr = _stream_ptr(stream, self.device)
        with cupy.cuda.Device(self.device):
            buf = self._dense_sparse_copy(view, stream_ptr) if self.padded else None
            return self._flag_valid(h, buf.data.ptr if buf is not None else view.data.ptr, stream_ptr)

    def compress(
        self, x: Any, *, prune: str | None = None, check: bool = True, stream: Any = None
    ) -> CompressedOperand:
        """Compress the sparse-side operand for this plan (and any plan with the same sparse operand).

        Once the plan runs a tuned configuration, multiply one compressed operand with it: a tuned plan gave
        every compressed operand after the first one it multiplied the first one's product (H100, cuSPARSELt
        0.8.0); make a plan per weight.

        Parameters
        ----------
        x : device array
            The sparse-side operand (A for ``sparse="a"``, B for ``"b"``), with the plan's shape, dtype and
            layout. It is never modified.
        prune : {None, "strip", "tile"}
            None: ``x`` must already be 2:4 along K. Otherwise a copy is pruned first by cuSPARSELt.
        check : bool
            With ``prune=None``, verify on the GPU that ``x`` is 2:4 (synchronises); a matrix that is not
            raises ValueError. Skipping the check on data that is not 2:4 gives wrong products.
        stream : optional
            Stream to work on (default: CuPy's current stream).
        """
        cupy = gpu.cupy()

        h = self._live()
        op, view = self._sparse_operand(x)
        stream_ptr = _stream_ptr(stream, self.device)
        with cupy.cuda.Device(self.device):
            copy = None
            if prune is not None or self.padded:
                copy = self._dense_sparse_copy(view, stream_ptr)
            src = copy.data.ptr if copy is not None else op.ptr
            if prune is not None:
                bindings.spmma_prune(h, self._desc, src, src, self._prune_alg(prune), stream_ptr)
            elif check and not self._flag_valid(h, src, stream_ptr):
                raise ValueError(
                    f"{self.sparse}: the matrix is not 2:4 sparse along K (some group of 4 has more than 2 "
                    f"non-zeros); prune it first: compress(..., prune='strip')"
                )
            size, scratch_size = bindings.spmma_compressed_size(h, self._plan)
            with _on_stream(stream_ptr):
                buffer = cupy.empty(size + COMPRESSED_SLACK, dtype=cupy.uint8)[:size]
                scratch = cupy.empty(max(scratch_size, 1), dtype=cupy.uint8)
            # plan-based (see compressed_key); the temporaries were allocated on this stream, so CuPy's pool reuses
            # them only after the stream is done with them
            bindings.spmma_compress(h, self._plan, src, buffer.data.ptr, scratch.data.ptr, stream_ptr)
        return CompressedOperand(buffer, self.compressed_key, op.shape, op.dtype, self.sparse)

    def _known(self, role: str, arr: Any) -> bool:
        """Whether ``arr`` (a CuPy array or CUDA tensor) already passed this role's checks: the per-call fast
        path."""
        key = _arrays.array_key(arr)
        return key is not None and (role, key) in self._checked

    def _remember(self, role: str, arr: Any) -> None:
        key = _arrays.array_key(arr)
        if key is not None:
            if len(self._checked) >= 64:  # bounded: a loop over fresh arrays must not grow it
                self._checked.clear()
            self._checked.add((role, key))

    def call_arguments(self, args: MatmulArgs, stream_ptr: int) -> tuple:
        """Check one call's operands against the plan and return what ``cusparseLtMatmul`` needs: ``(s_ptr, x_ptr,
        c_ptr, d_ptr, alpha_arg, out, y_buf)`` (the launch objects of ``pycusparselt.gemm.launch`` fix these).

        A bias or vector alpha is copied into the plan's buffers on ``stream_ptr``; ``out`` is allocated there
        when not given. A padded plan copies the dense operands (and C) into its buffers on the stream too, and
        ``y_buf`` is then its D buffer (None otherwise), whose result :meth:`matmul` copies into ``out``.
        Arrays seen before (same pointer, shape, strides and dtype; CuPy arrays and CUDA tensors) skip the
        checks; the padded path always reads the operands in full, since it copies them.
        """
        a, b, c, alpha, beta, bias, out, _ = args
        compressed, dense = (a, b) if self.sparse == "a" else (b, a)
        dense_name = "b" if self.sparse == "a" else "a"
        check_compressed(self, compressed)
        s_ptr = compressed.ptr
        problem = self.problem
        problem.check_scalars(c is not None, beta)
        X = C = None
        if self.padded or not self._known(dense_name, dense):
            X = as_operand(dense, dense_name, self._input_dtype)
            problem.check_dense(X)
            self._check_device(X)
            self._remember(dense_name, dense)
        if c is not None and (self.padded or not self._known("c", c)):
            C = as_operand(c, "c")
            problem.check_c(C)
            self._check_device(C)
            self._remember("c", c)
        out_dt, d_shape, d_order = self._d_spec
        if out is None:
            # in the caller's framework (a tensor for tensors), on the call's stream
            with _on_stream(stream_ptr):
                out = _arrays.empty(dense, d_shape, out_dt, self.device, order="C" if d_order == ROW else "F")
            d_ptr = _arrays.array_key(out)[0]
        elif self._known("out", out):
            d_ptr = _arrays.array_key(out)[0]
        else:
            D = as_operand(out, "out")
            problem.check_out(D)
            self._check_device(D)
            self._remember("out", out)
            d_ptr = D.ptr
        alpha_arg = self._epilogue_args(alpha, bias, stream_ptr)
        x_ptr = X.ptr if X is not None else _arrays.array_key(dense)[0]
        c_ptr = None if c is None else (C.ptr if C is not None else _arrays.array_key(c)[0])
        if not self.padded:
            return s_ptr, x_ptr, (d_ptr if c_ptr is None else c_ptr), d_ptr, alpha_arg, out, None
        with _on_stream(stream_ptr):
            x_buf, y_buf, c_buf = self._padded_buffers()
            p, kk, q = self._dims
            x_buf[:, :kk, :q] = _canonical(self._storage_view(_cupy_view(X)), self._transpose)
            if C is not None:
                c_buf[:, :p, :q] = _canonical(_cupy_view(C), self._transpose)
        return (
            s_ptr,
            x_buf.data.ptr,
            (c_buf if C is not None else y_buf).data.ptr,
            y_buf.data.ptr,
            alpha_arg,
            out,
            y_buf,
        )

    def _copy_vector(self, name: str, value: Any, length: int, stream_ptr: int) -> None:
        """Copy the call's bias or alpha vector into the plan's buffer (its padding stays zero)."""
        cupy = gpu.cupy()

        buf = self._buffers[name]
        want = np.dtype(np.float32) if name == "alpha" else buf.dtype
        key = _arrays.array_key(value)
        if key is not None and type(value) is not cupy.ndarray:
            value = _arrays.as_cupy(value)  # a CUDA tensor: its CuPy view
        if key is not None and value.data.device_id != self.device:
            raise ValueError(f"{name}: array is on device {value.data.device_id}, the plan on device {self.device}")
        if (
            key is not None
            and self._batch == 1
            and value.dtype == want
            and value.shape == (length,)
            and value.flags.c_contiguous
        ):
            # one asynchronous device-to-device copy (graph-capturable), read at run time
            cupy.cuda.runtime.memcpyAsync(
                buf.data.ptr, key[0], length * want.itemsize, cupy.cuda.runtime.memcpyDeviceToDevice, stream_ptr
            )
            return
        with _on_stream(stream_ptr):
            arr = _arrays.as_cupy(value) if _arrays.is_device(value) else cupy.asarray(value)
            if name == "alpha":
                if arr.shape != (length,):
                    raise ValueError(f"alpha: expected a vector of length {length}, got shape {arr.shape}")
                buf[:length] = arr.astype(cupy.float32)
                return
            if arr.dtype != want:
                raise TypeError(
                    f"bias: expected dtype {want} (float32 for integer D, else D's type), got {arr.dtype}"
                )
            if arr.shape not in ((length,), (self._batch, length)):
                raise ValueError(f"bias: expected shape ({length},) or ({self._batch}, {length}), got {arr.shape}")
            buf[:, :length] = arr

    def _padded_buffers(self) -> tuple:
        cupy = gpu.cupy()

        if "x" not in self._buffers:
            s_mat, x_mat, y_mat = self._mats
            batch = self._batch
            # zeros once: the padding must stay zero; the data regions are rewritten by every call
            self._buffers["x"] = cupy.zeros((batch, x_mat.cols, x_mat.rows), dtype=self._storage).swapaxes(-1, -2)
            self._buffers["y"] = cupy.zeros((batch, y_mat.rows, y_mat.cols), dtype=self.out_dtype)
            self._buffers["c"] = cupy.zeros((batch, y_mat.rows, y_mat.cols), dtype=self.out_dtype)
        return self._buffers["x"], self._buffers["y"], self._buffers["c"]

    def _finish(self, out: Any, y_buf: Any) -> Any:
        if y_buf is not None:
            p, _, q = self._dims
            target = _canonical(_arrays.as_cupy(out), self._transpose)
            target[...] = y_buf[:, :p, :q] if target.ndim == 3 else y_buf[0, :p, :q]
        return out

    def matmul(
        self,
        a: Any,
        b: Any,
        c: Any = None,
        *,
        alpha: Any = 1.0,
        beta: float = 0.0,
        bias: Any = None,
        out: Any = None,
        stream: Any = None,
    ) -> Any:
        """Compute ``D = activation(alpha * A @ B + beta * C + bias)``; the sparse side is a
        :class:`~pycusparselt.CompressedOperand`.

        Parameters
        ----------
        a, b : CompressedOperand or device array
            The compressed sparse operand on the plan's sparse side, a device array with the plan's
            layout on the other.
        c : device array, optional
            C, with the layout of the plan's example c; needed when ``beta != 0``.
        alpha : float or device vector
            Scalar, or with ``alpha_vector=True`` a float32 vector (one per row of D for ``sparse="a"``).
        beta : float
        bias : device vector, optional
            Required when the plan was made with ``bias=True``.
        out : device array, optional
            Where to write D (validated: shape, dtype, layout, device). Allocated when omitted.
        stream : optional
            Stream to run on: an object with ``__cuda_stream__``, a ``cupy.cuda.Stream``, an integer handle,
            or None for CuPy's current stream.

        Returns
        -------
        The D array (``out`` when given).
        """
        return self._run(None, MatmulArgs(a, b, c, alpha, beta, bias, out, stream))

    def _stream_for(self, stream: Any, a: Any, b: Any) -> int:
        """The call's stream: the one named, else the current stream of the dense operand's framework
        (PyTorch's for tensors, CuPy's otherwise) on the plan's device."""
        if stream is not None:
            return _stream_ptr(stream)
        return _arrays.current_stream(b if self.sparse == "a" else a, self.device)

    def run_search(self, args: MatmulArgs) -> Any:
        """One ``cusparseLtMatmulSearch`` on these operands, checked as :meth:`matmul` checks them; returns D. It
        changes the initialised plan's configuration in place, so it needs a selection of the plan's own, never
        searched: call :meth:`try_config` before compressing for it (re-initialising the plan here would leave
        the compressed operand behind). The tuner sets :attr:`config` afterwards."""
        if self._selection.key is not None or self._selection.searched:
            raise RuntimeError("run_search: the plan runs a shared or searched selection; call try_config first")
        self._selection.searched = True
        return self._run(bindings.matmul_search, args)

    def _run(self, function: Any, args: MatmulArgs) -> Any:
        """One product (``function`` None: ``cusparseLtMatmul``; else ``bindings.matmul_search``), checked."""
        cupy = gpu.cupy()

        if self._closed:
            raise ClosedError("the plan was closed")
        if cupy.cuda.runtime.getDevice() != self.device:
            with cupy.cuda.Device(self.device):
                return self._run(function, args)
        stream_ptr = self._stream_for(args.stream, args.a, args.b)
        h = self._live()
        s_ptr, x_ptr, c_ptr, d_ptr, alpha_arg, out, y_buf = self.call_arguments(args, stream_ptr)
        beta = float(args.beta)
        if function is None:
            self.matmul_call(alpha_arg, s_ptr, x_ptr, beta, c_ptr, d_ptr, stream_ptr)
        else:
            function(h, self._plan, alpha_arg, s_ptr, x_ptr, beta, c_ptr, d_ptr, self._workspace.data.ptr,
                     [stream_ptr])  # device 0 only: see tuning.TUNING_OFF_DEVICE_0
        if y_buf is None:
            return out
        with _on_stream(stream_ptr):
            return self._finish(out, y_buf)

    def bind(
        self,
        a: Any,
        b: Any,
        c: Any = None,
        *,
        alpha: Any = 1.0,
        beta: float = 0.0,
        bias: Any = None,
        out: Any = None,
        stream: Any = None,
    ) -> BoundMatmul:
        """Check these operands once and return a callable that runs :meth:`matmul` on them.

        The returned :class:`~pycusparselt.gemm.plan.BoundMatmul` does no validation, allocation or conversion per
        call: it is the leanest way to call a plan from Python, and what to capture in a CUDA graph. It reads
        the arrays at run time (update them in place between calls), including ``bias`` and a vector ``alpha``,
        which each call copies into the plan's buffers with one device-to-device copy. Arguments as :meth:`matmul`;
        ``out`` is allocated once here when omitted. A padded plan copies the dense operands per call, as
        :meth:`matmul` does.
        """
        cupy = gpu.cupy()

        self._live()
        with cupy.cuda.Device(self.device):
            return BoundMatmul(self, MatmulArgs(a, b, c, alpha, beta, bias, out), self._stream_for(stream, a, b))

    def launcher(self, compressed: CompressedOperand, *, alpha: Any = 1.0, bias: Any = None,
                 stream: Any = None) -> Launcher:
        """A product on raw device addresses with the sparse operand, alpha and bias fixed: for layers and
        captured networks that own their dense operand and output buffers.

        ``launch(x_ptr, d_ptr, stream_ptr)`` enqueues ``D = activation(alpha * S @ X + bias)`` in the plan's
        canonical form (``Y = S @ X``; for ``sparse="b"`` X is A's memory and D's memory holds Y, see the module
        docstring), reading the dense operand at ``x_ptr`` and writing D at ``d_ptr``, both with the layouts of
        the plan's examples; nothing is checked or converted per call. ``bias`` and a vector ``alpha`` are copied
        into the plan's buffers here, once, on ``stream``: a later :meth:`matmul`, :meth:`bind` call or
        launcher of this plan with another bias replaces them. Only plans that pad nothing have launchers.
        """
        cupy = gpu.cupy()

        self._live()
        if self.padded:
            raise ValueError(
                f"launcher: this plan pads its operands {self.shape} to the sizes cuSPARSELt takes, which needs "
                f"copies per call; use matmul() or bind(), or make the plan with padded operands"
            )
        check_compressed(self, compressed)
        with cupy.cuda.Device(self.device):
            alpha_arg = self._epilogue_args(alpha, bias, _stream_ptr(stream, self.device))
        return Launcher(self, compressed, alpha_arg)

    def _epilogue_args(self, alpha: Any, bias: Any, stream_ptr: int) -> Any:
        """Check ``alpha`` and ``bias`` against the plan, copy a bias or vector alpha into the plan's buffers on
        the stream, and return the alpha argument of the C call (a float, or the alpha buffer's address)."""
        if self._has_bias:
            if bias is None:
                raise ValueError("bias: the plan was made with bias=True; pass bias=")
            self._copy_vector("bias", bias, self._dims[0], stream_ptr)
        elif bias is not None:
            raise ValueError("bias: the plan was made without bias; make it with bias=True")
        if self._has_alpha_vector:
            self._copy_vector("alpha", alpha, self._dims[0], stream_ptr)
            return bindings.DevicePointer(self._buffers["alpha"].data.ptr)
        if np.ndim(alpha):
            raise ValueError("alpha: a vector alpha needs a plan made with alpha_vector=True")
        return float(alpha)

    def autotune(
        self,
        a: Any,
        b: Any,
        c: Any = None,
        *,
        alpha: Any = 1.0,
        beta: float = 0.0,
        bias: Any = None,
        out: Any = None,
        stream: Any = None,
        method: str = "timed",
        repeats: int = 10,
        warmup: int = 3,
        budget_s: float | None = None,
        cache: TuningCache | bool | None = None,
    ) -> PlanConfig:
        """Pick the fastest configuration for these operands and keep it. Returns the new :attr:`config`.

        Parameters
        ----------
        a, b, c, alpha, beta, bias, out, stream
            As :meth:`matmul`. D (``out``) is overwritten; tuning synchronises the device.
        method : {"timed", "search"}
            ``"timed"`` (default): pycusparselt's tuner. Every algorithm id, split-K variants of the best
            ones, the default configuration and ``cusparseLtMatmulSearch``'s choice are each timed with CUDA
            events (``warmup`` calls, then the median of ``repeats``; inputs rotated when the problem fits in
            L2), and the fastest is kept: never slower than the default or than the library's search, up to
            timing noise. ``"search"``: only ``cusparseLtMatmulSearch``; the plan is then re-initialised with
            its choice. Only on device 0 (:data:`~pycusparselt.tuning.TUNING_OFF_DEVICE_0`): elsewhere
            ``"timed"`` keeps the default configuration and ``"search"`` raises ValueError.
        repeats, warmup : int
            Timed and untimed calls per candidate (``"timed"``).
        budget_s : float, optional
            Stop timing further candidates after this many seconds (the default configuration and the
            search's choice are always timed).
        cache : TuningCache, bool or None
            ``"timed"`` only. None: the default on-disk cache (:class:`~pycusparselt.tuning.cache.TuningCache`;
            ``PYCUSPARSELT_TUNING_CACHE=0`` disables it), False: no cache, or a cache object. A stored
            winner for the same GPU, library version and problem is applied without timing anything.

        The candidates and their times are in :attr:`tuning_report` afterwards.
        """
        self.tuning_report = autotune_plan(self, MatmulArgs(a, b, c, alpha, beta, bias, out, stream), method=method,
                                           repeats=repeats, warmup=warmup, budget_s=budget_s, cache=cache)
        return self.config

    def problem_signature(self) -> dict[str, Any]:
        """The problem as the tuning cache keys it: types, compute type, the matrices' layouts, the epilogue,
        and which of bias, vector alpha and C the plan takes (see :func:`~pycusparselt.tuning.tuning_key`)."""
        return {
            "dtype": str(self.dtype),
            "out_dtype": str(self.out_dtype),
            "compute": int(self._compute_type),
            "sparse": self.sparse,
            "matrices": [[m.rows, m.cols, m.ld, m.order, m.batch, m.batch_stride] for m in self._mats],
            "activation": self.activation,
            "bias": self._has_bias,
            "alpha_vector": self._has_alpha_vector,
            "c": self._layouts["c"] is not None,
        }

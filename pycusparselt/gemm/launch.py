"""What runs a plan's product: the compressed sparse operand, and the objects that launch
``cusparseLtMatmul`` with a plan's arguments fixed.

The compressed operand (:class:`~pycusparselt.CompressedOperand`) is what
:meth:`SparseMatmulPlan.compress <pycusparselt.SparseMatmulPlan.compress>` makes; :func:`check_compressed` says
whether a plan can read one. :class:`MatmulArgs` are the arguments of one
product. :class:`Launcher` (from :meth:`~pycusparselt.SparseMatmulPlan.launcher`) runs the product on raw device
addresses, for layers that own their buffers; :class:`BoundMatmul` (from :meth:`~pycusparselt.SparseMatmulPlan.bind`)
runs it on fixed operands. Both take the handle, native plan and workspace from the plan's
:attr:`~pycusparselt.SparseMatmulPlan.matmul_call`, call the C function with every fixed argument held as an
integer, and follow the plan through re-initialisation by that call object's identity.
:class:`TuningTarget` is what :func:`pycusparselt.tuning.autotune` tunes, and :func:`autotune_plan`
the body of :meth:`~pycusparselt.SparseMatmulPlan.autotune`.

The plan's module imports this one (never the other way round); the public names are also
``pycusparselt.gemm.plan``'s, where they are documented.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from .._native import gpu
from .._native.ffi import ffi
from .. import bindings
from ..errors import ClosedError
from .._native.streams import stream_ptr as _stream_ptr
from ..tuning import PlanConfig, TuningReport
from ..tuning.cache import TuningCache

__all__ = ["COMPRESSED_SLACK", "CompressedOperand", "check_compressed", "MatmulArgs", "TimedCall", "TuningTarget",
           "autotune_plan", "Launcher", "BoundMatmul"]

#: Bytes allocated past the end of every compressed buffer. cuSPARSELt 0.8.0's SM 9.0 kernels read up to 256
#: bytes past the size cusparseLtSpMMACompressedSize reports (compute-sanitizer, FP16 33x50x70 on the H100), an
#: illegal address whenever the buffer ends a mapped region; the margin keeps those reads inside our
#: allocation, with room to spare for other tile shapes.
COMPRESSED_SLACK = 64 * 1024


class CompressedOperand:
    """The sparse operand in cuSPARSELt's compressed form, made by :meth:`SparseMatmulPlan.compress`.

    It owns its device buffer and can be used with the plan that made it and with plans of exactly the same
    problem (shapes, layouts, types, compute type and device; the epilogue may differ). Attributes: ``shape``
    and ``dtype`` (of the dense sparse operand), ``side`` ("a" or "b"), ``nbytes`` (of the compressed buffer).
    """

    def __init__(self, buffer: Any, key: tuple, shape: tuple, dtype: np.dtype, side: str) -> None:
        self._buffer = buffer
        self._key = key
        self.shape = shape
        self.dtype = dtype
        self.side = side
        self.nbytes = int(buffer.nbytes)

    @property
    def closed(self) -> bool:
        return self._buffer is None

    @property
    def ptr(self) -> int:
        """Device address of the compressed buffer."""
        if self._buffer is None:
            raise ClosedError("the compressed operand was closed")
        return self._buffer.data.ptr

    def close(self) -> None:
        """Free the compressed buffer (back to CuPy's memory pool). Harmless when repeated."""
        self._buffer = None

    def __enter__(self) -> CompressedOperand:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        return f"<CompressedOperand {self.side}: {self.shape} {self.dtype}, {state}>"


def check_compressed(plan: Any, compressed: Any) -> None:
    """Raise unless ``compressed`` is a :class:`~pycusparselt.CompressedOperand` that ``plan`` (a
    :class:`~pycusparselt.SparseMatmulPlan`) can read under its current configuration: made by a plan of the
    same problem and configuration id (:attr:`~pycusparselt.SparseMatmulPlan.compressed_key`), and at least
    :meth:`~pycusparselt.SparseMatmulPlan.compressed_size` bytes."""
    plan_format = plan.compressed_key[-1]  # the configuration id the plan was initialised with
    if type(compressed) is not CompressedOperand:
        got = type(compressed).__name__
        raise TypeError(f"{plan.sparse}: expected the CompressedOperand made by plan.compress(), got {got}")
    if compressed._key[:-1] == plan.compressed_key[:-1] and compressed._key[-1] != plan_format:
        raise ValueError(
            f"{plan.sparse}: this CompressedOperand was compressed for configuration {compressed._key[-1]}, "
            f"but the plan was re-initialised with configuration {plan_format} (by autotune or by setting "
            f"config), whose compressed form differs; compress the sparse operand again with plan.compress"
        )
    if compressed._key != plan.compressed_key:
        other = "dense operand or output shape" if compressed._key[:-2] == plan.sparse_key else (
            "sparse operand (shape, layout, dtype, output or compute type, or device)")
        raise ValueError(
            f"{plan.sparse}: this CompressedOperand was made by a plan of another {other}; compress the sparse "
            f"operand with this plan"
        )
    if compressed.nbytes < plan.compressed_size():
        raise ValueError(
            f"{plan.sparse}: this CompressedOperand holds {compressed.nbytes} bytes, but this plan's configuration "
            f"reads {plan.compressed_size()}; compress the sparse operand with this plan"
        )


def _address(cdata: Any) -> int:
    """The address of a cffi buffer, as the C call takes it."""
    return int(ffi.cast("intptr_t", cdata))


class MatmulArgs(NamedTuple):
    """The arguments of one product, as :meth:`SparseMatmulPlan.matmul` takes them."""

    a: Any
    b: Any
    c: Any = None
    alpha: Any = 1.0
    beta: float = 0.0
    bias: Any = None
    out: Any = None
    stream: Any = None


class TimedCall(NamedTuple):
    """One checked product of a :class:`TuningTarget` on raw addresses: ``run(s_ptr, x_ptr, d_ptr)`` enqueues
    it on ``stream_ptr``; the others are the addresses and sizes of the operands it was checked with, and
    ``s_slack``, the bytes the library may read past the compressed buffer (a copy must have them)."""

    run: Callable[[int, int, int], None]
    stream_ptr: int
    s_ptr: int
    s_nbytes: int
    s_slack: int
    x_ptr: int
    x_nbytes: int
    d_ptr: int
    d_nbytes: int


class TuningTarget:
    """What :func:`pycusparselt.tuning.autotune` tunes: one plan on the operands of one call.

    The tuner sets each candidate with :meth:`try_config`, calls :meth:`prepare` (which compresses the sparse
    operand for that configuration and checks the call once) and times ``run`` on copies of the operands;
    :meth:`search` runs ``cusparseLtMatmulSearch`` on the default configuration. The sparse operand is the
    caller's dense one when given, else data with its layout made of the dense operand's values (the
    compressed form depends on the configuration, so each candidate compresses its own). Close it (or use it
    as a context manager) to free what it compressed and allocated.
    """

    def __init__(self, plan: Any, args: MatmulArgs) -> None:
        self.plan = plan
        self.args = args
        self._source: Any = None  # what each candidate compresses, found on first use
        self._compressed: CompressedOperand | None = None
        self._out = args.out  # one D for every candidate: the caller's, or the one the first check allocates

    device = property(lambda self: self.plan.device, doc="The plan's device.")
    default_config = property(lambda self: self.plan.default_config, doc="The library's default configuration.")
    max_alg_id = property(lambda self: self.plan.max_alg_id, doc="Algorithm ids are 0 .. max_alg_id - 1.")
    padded = property(lambda self: self.plan.padded, doc="Whether the plan pads (and copies) its operands.")

    @property
    def config(self) -> PlanConfig:
        """The plan's configuration; setting it re-initialises the plan."""
        return self.plan.config

    @config.setter
    def config(self, config: PlanConfig) -> None:
        self.plan.config = config

    def try_config(self, config: PlanConfig) -> None:
        """Set a candidate's configuration (:meth:`SparseMatmulPlan.try_config`: on the plan's own selection)."""
        self.plan.try_config(config)

    def problem_signature(self) -> dict[str, Any]:
        """The plan's :meth:`~SparseMatmulPlan.problem_signature`."""
        return self.plan.problem_signature()

    def _sample_sparse_side(self, dense: Any) -> Any:
        """Data with the layout of the plan's sparse operand, made of the dense operand's own values (tiled),
        so that the timed products see realistic magnitudes: power draw, and so clocks, depend on the data."""
        cupy = gpu.cupy()

        plan = self.plan
        _, shape, order, ld, batch_stride = plan.problem.layouts[plan.sparse]
        rows, cols = shape[-2:]
        count = shape[0] if len(shape) == 3 and batch_stride else 1
        base = (count, rows, ld) if order == "row" else (count, cols, ld)
        values = cupy.asarray(dense)
        storage = plan.problem.storage  # how the plan stores the values (FP8 as bytes)
        values = (values if values.dtype == storage else values.view(storage)).ravel()
        size = math.prod(base)
        data = cupy.tile(values, -(-size // values.size))[:size].reshape(base)
        data = data[:, :, :cols] if order == "row" else data.swapaxes(-1, -2)[:, :rows, :]
        if len(shape) == 2:
            return data[0]
        return data if batch_stride else cupy.broadcast_to(data, shape)

    def _call_args(self, stream: Any) -> MatmulArgs:
        """The call's arguments with the compressed operand in the sparse place, this target's D and
        ``stream``."""
        if self.plan.sparse == "a":
            return self.args._replace(a=self._compressed, out=self._out, stream=stream)
        return self.args._replace(b=self._compressed, out=self._out, stream=stream)

    def prepare(self, stream: Any) -> TimedCall:
        """Compress for the plan's current configuration (freeing the previous candidate's) and check the
        call once, on ``stream``."""
        plan, args = self.plan, self.args
        if self._source is None:
            sparse_arg = args.a if plan.sparse == "a" else args.b
            dense_arg = args.b if plan.sparse == "a" else args.a
            compressed = type(sparse_arg) is CompressedOperand
            self._source = self._sample_sparse_side(dense_arg) if compressed else sparse_arg
        if self._compressed is not None:
            self._compressed.close()
        self._compressed = plan.compress(self._source, prune="strip", stream=stream)
        dense_name = "b" if plan.sparse == "a" else "a"
        run, stream_ptr, (s_ptr, x_ptr, d_ptr), self._out = self._timing_call(self._call_args(stream))
        return TimedCall(run, stream_ptr, s_ptr, self._compressed.nbytes, COMPRESSED_SLACK, x_ptr,
                         _extent_bytes(plan.problem.layouts[dense_name]), d_ptr,
                         _extent_bytes(plan.problem.d_layout))

    def _timing_call(self, args: MatmulArgs) -> tuple:
        """For the tuner: check a call once; return ``(run, stream pointer, (S, X, D pointers), out)``, where
        ``run(s, x, d)`` enqueues one product with the plan's current configuration on those device pointers
        (the caller keeps ``out`` alive while it uses D's pointer)."""
        plan = self.plan
        stream_ptr = _stream_ptr(args.stream, plan.device)
        s_ptr, x_ptr, c_ptr, d_ptr, alpha_arg, out, _ = plan.call_arguments(args, stream_ptr)
        beta = float(args.beta)
        shared_c = args.c is None

        def run(s: int, x: int, d: int) -> None:
            plan.matmul_call(alpha_arg, s, x, beta, d if shared_c else c_ptr, d, stream_ptr)

        return run, stream_ptr, (s_ptr, x_ptr, d_ptr), out

    def search(self, stream: Any) -> None:
        """``cusparseLtMatmulSearch`` on a freshly initialised default configuration; :attr:`config` is then its
        choice, which the tuner sets again (re-initialising: a plan the search changed in place is never used,
        see :meth:`pycusparselt.SparseMatmulPlan.autotune`)."""
        plan = self.plan
        plan.try_config(plan.default_config)
        self.prepare(stream)
        plan.run_search(self._call_args(stream))

    def close(self) -> None:
        """Free the compressed operand and the output this target allocated. Harmless when repeated."""
        if self._compressed is not None:
            self._compressed.close()
            self._compressed = None
        self._out = self._source = None

    def __enter__(self) -> TuningTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extent_bytes(layout: tuple) -> int:
    """Bytes spanned by an operand with this layout (dtype, shape, order, ld, batch stride)."""
    dtype, shape, order, ld, batch_stride = layout
    rows, cols = shape[-2:]
    matrix = (rows - 1) * ld + cols if order == "row" else (cols - 1) * ld + rows
    batch = shape[0] if len(shape) == 3 else 1
    return ((batch - 1) * batch_stride + matrix) * dtype.itemsize


def autotune_plan(plan: Any, call: MatmulArgs, *, method: str = "timed", repeats: int = 10, warmup: int = 3,
                  budget_s: float | None = None, cache: TuningCache | bool | None = None) -> TuningReport:
    """The body of :meth:`SparseMatmulPlan.autotune <pycusparselt.SparseMatmulPlan.autotune>` (which documents the
    arguments): tune ``plan`` on the operands of ``call``, leave it running the winner and return the report."""
    from .. import tuning

    if method not in ("timed", "search"):
        raise ValueError(f"method: expected 'timed' or 'search', got {method!r}")
    a, b, c, alpha, beta, bias, out, stream = call
    if method == "search":
        cupy = gpu.cupy()

        if not tuning.tuning_is_safe_on(plan.device):
            raise ValueError(
                f"method='search' on device {plan.device}: {tuning.TUNING_OFF_DEVICE_0}; use method='timed' "
                f"(the default: it keeps the default configuration there), or make this GPU device 0 with "
                f"CUDA_VISIBLE_DEVICES"
            )
        with cupy.cuda.Device(plan.device):
            # the search changes the selection: the plan's own, before anything is compressed for the plan
            plan.try_config(plan.config)
            sparse_arg = a if plan.sparse == "a" else b
            temporary = None
            if type(sparse_arg) is not CompressedOperand:
                temporary = sparse_arg = plan.compress(sparse_arg, prune="strip", stream=stream)
            args = (sparse_arg, b) if plan.sparse == "a" else (a, sparse_arg)
            try:
                plan.run_search(MatmulArgs(*args, c, alpha, beta, bias, out, stream))
            finally:
                if temporary is not None:
                    temporary.close()
            # The search changes the configuration of the initialised plan in place; data compressed by
            # such a plan afterwards gave an output that was never written (FP16 8192x4096x4096 on the
            # H100). So the plan is initialised anew with the configuration found, like any other.
            plan.config = plan.config
        return TuningReport("search", "search", plan.config, ())
    with TuningTarget(plan, call) as target:
        return tuning.autotune(target, repeats=repeats, warmup=warmup, budget_s=budget_s, cache=cache)


class Launcher:
    """``launch(x_ptr, d_ptr, stream_ptr)``: one product of a plan on raw addresses (see
    :meth:`SparseMatmulPlan.launcher`). Follows the plan through re-initialisation (a new configuration);
    raises :class:`~pycusparselt.errors.ClosedError` once the plan or the compressed operand is closed, and
    ValueError after a re-initialisation whose configuration needs another compressed form.

    It holds every fixed argument of ``cusparseLtMatmul`` as an integer (the handle, the native plan and the
    workspace of the plan's :attr:`~SparseMatmulPlan.matmul_call`, the compressed operand, and the addresses of
    its own alpha, beta and stream buffers) and calls the C function itself: a call passes the dense operand's
    and D's addresses and the stream, and converts nothing else. Not thread-safe (the stream buffer is its
    own)."""

    __slots__ = ("plan", "compressed", "_via", "_fn", "_args", "_buffers", "_stream", "_last_stream", "_alpha_at",
                 "_get_device")

    def __init__(self, plan: Any, compressed: CompressedOperand, alpha: Any) -> None:
        cupy = gpu.cupy()

        self.plan, self.compressed = plan, compressed
        self._get_device = cupy.cuda.runtime.getDevice
        # alpha (a float here, or a DevicePointer to the plan's alpha vector), beta = 0 and the stream handle live
        # in buffers of this object, so other calls of the plan (which set the plan's own) never change them
        beta, self._stream = ffi.new("float *", 0.0), ffi.new("cudaStream_t[1]")
        self._last_stream = 0  # what the stream buffer holds (NULL)
        self._buffers: tuple = (beta,)
        if type(alpha) is bindings.DevicePointer:
            self._alpha_at = int(alpha)
        else:
            alpha_buf = ffi.new("float *", float(alpha))
            self._buffers += (alpha_buf,)
            self._alpha_at = _address(alpha_buf)
        self._via = None
        self._follow(plan.matmul_call)

    def _follow(self, call: Any) -> None:
        """Fix the arguments for the plan's current call object ``call`` (None once the plan is closed)."""
        if call is None:
            raise ClosedError("the plan was closed")
        check_compressed(self.plan, self.compressed)  # a new configuration needs its own compression
        self._fn, handle, plan_ptr, workspace = call.fixed_arguments()
        # handle, plan, alpha, S (A), beta, workspace, streams: X (B), C and D are the call's
        self._args = (handle, plan_ptr, self._alpha_at, self.compressed.ptr,  # ptr raises once the operand is closed
                      _address(self._buffers[0]), workspace, _address(self._stream))
        self._via = call

    def __call__(self, x_ptr: int, d_ptr: int, stream_ptr: int) -> None:
        plan = self.plan
        if plan.matmul_call is not self._via:  # None: closed; another object: re-initialised
            self._follow(plan.matmul_call)
        elif self.compressed._buffer is None:
            raise ClosedError("the compressed operand was closed")
        if stream_ptr != self._last_stream:
            self._stream[0] = ffi.cast("cudaStream_t", stream_ptr)
            self._last_stream = stream_ptr
        handle, native, alpha_at, s_ptr, beta_at, workspace, streams = self._args
        if self._get_device() != plan.device:
            cupy = gpu.cupy()

            with cupy.cuda.Device(plan.device):
                status = self._fn(handle, native, alpha_at, s_ptr, x_ptr, beta_at, d_ptr, d_ptr, workspace, streams, 1)
        else:
            status = self._fn(handle, native, alpha_at, s_ptr, x_ptr, beta_at, d_ptr, d_ptr, workspace, streams, 1)
        if status:
            bindings.check_status("cusparseLtMatmul", status)

    def __repr__(self) -> str:
        return f"<Launcher of {self.plan!r}>"


#: What a bound call without a direct path holds as its plan's call object: never the plan's (a closed plan
#: holds None), so every call takes the checked path.
_NO_CALL = object()


class BoundMatmul:
    """A plan's product on fixed operands, checked once: ``call()`` runs it (see
    :meth:`SparseMatmulPlan.bind`). Holds references to the operands; returns ``out``."""

    __slots__ = ("plan", "out", "_args", "_stream", "_format", "_via", "_launch", "_prepared", "_get_device")

    def __init__(self, plan: Any, args: MatmulArgs, stream_ptr: int) -> None:
        cupy = gpu.cupy()

        self.plan = plan
        self._stream = stream_ptr
        self._format = plan.compressed_key[-1]  # the configuration id
        self._get_device = cupy.cuda.runtime.getDevice
        self._via, self._launch, self._prepared = _NO_CALL, None, None
        self._prepare(args)

    def _prepare(self, args: MatmulArgs) -> None:
        """Check the operands and fix every argument of the C call (the direct path) where nothing needs
        copying per call; ``_via`` is the plan's call object they were fixed for."""
        plan = self.plan
        s_ptr, x_ptr, c_ptr, d_ptr, alpha_arg, out, _ = plan.call_arguments(args, self._stream)
        self.out = out
        self._args = args._replace(out=out, stream=self._stream)
        if not (plan.padded or plan.options.bias or plan.options.alpha_vector):
            self._prepared = plan.matmul_call.prepare(alpha_arg, s_ptr, x_ptr, float(args.beta), c_ptr, d_ptr,
                                                self._stream)
            self._launch, self._via = self._prepared.launch, plan.matmul_call

    def __call__(self) -> Any:
        plan = self.plan
        # One identity check covers a closed plan (its call object is None) and a re-initialised one (a new
        # call object, a new workspace): both take the checked path.
        if plan.matmul_call is not self._via:
            return self._rebound()
        if self._get_device() != plan.device:
            cupy = gpu.cupy()

            with cupy.cuda.Device(plan.device):
                status = self._launch()
        else:
            status = self._launch()
        if status:
            bindings.check_status("cusparseLtMatmul", status)
        return self.out

    def _rebound(self) -> Any:
        plan = self.plan
        if self._launch is not None and not plan.closed and plan.compressed_key[-1] == self._format:
            # re-initialised with the same compressed form: fix the arguments again for the new workspace
            cupy = gpu.cupy()

            with cupy.cuda.Device(plan.device):
                self._prepare(self._args)
            return self()
        a, b, c, alpha, beta, bias, out, stream = self._args
        # checks everything (and refuses stale data)
        return plan.matmul(a, b, c, alpha=alpha, beta=beta, bias=bias, out=out, stream=stream)

    def __repr__(self) -> str:
        return f"<BoundMatmul of {self.plan!r}>"

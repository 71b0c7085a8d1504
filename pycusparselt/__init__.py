"""pycusparselt: Python bindings for NVIDIA cuSPARSELt, 2:4 structured-sparse matrix multiplies on
Sparse Tensor Cores, with a NumPy reference that runs anywhere.

Importing the package loads nothing native: the library is found and loaded on first use (see
:func:`library_version`). The modules, in layers that import only from their own layer and the ones below
(docs/architecture.rst draws them; tests/test_structure.py checks it):

- ground (NumPy and ml_dtypes only, no GPU): :mod:`pycusparselt.types` (the one type table: dtypes,
  combinations, default output and compute types) and :mod:`pycusparselt.reference`, the NumPy oracle, one
  job a module: ``pycusparselt.reference.sparsity`` (pruning, compression), ``pycusparselt.reference.semantics``
  (the GEMM), ``pycusparselt.reference.tolerance`` (how close a GPU result must be) and
  ``pycusparselt.reference.elements`` (element checks and conversions).
- native floor: :mod:`pycusparselt.enums` (the header's enumerations), :mod:`pycusparselt.errors` (the
  exceptions) and ``pycusparselt._native``: ``pycusparselt._native.ffi`` (the cffi declarations),
  ``pycusparselt._native.library`` (finding and loading libcusparseLt), ``pycusparselt._native.opaque`` (the
  opaque C structures as owned, aligned storage), :mod:`pycusparselt._native.settings`
  (environment variables), ``pycusparselt._native.gpu`` (CuPy, imported there only, on first use),
  :mod:`pycusparselt._native.streams` (every stream helper: handles, current streams, stream contexts),
  :mod:`pycusparselt._native.devices` (which GPUs are usable).
- bindings: :mod:`pycusparselt.bindings` (one checked wrapper per C function), on the native floor.
- arrays: ``pycusparselt._arrays``, the one module that tells NumPy, CuPy, PyTorch and DLPack arrays apart
  and answers in the caller's framework.
- tuning: :mod:`pycusparselt.tuning` (exports ``pycusparselt.tuning.tuner``, the auto-tuner, on any
  :class:`~pycusparselt.tuning.Tunable`),
  ``pycusparselt.tuning.timing`` (CUDA-event timing), :mod:`pycusparselt.tuning.cache` (winners on disk).
- gemm: :mod:`pycusparselt.gemm.plan` (:class:`SparseMatmulPlan`, persistent GEMMs on device arrays),
  ``pycusparselt.gemm.launch`` (the compressed operand and the objects that launch a plan's product with its
  arguments fixed: launchers, bound calls, the tuner's target),
  ``pycusparselt.gemm.problem`` (the canonical problem and its layout rules, pure),
  ``pycusparselt.gemm.options`` (the plan's options as one checked object),
  ``pycusparselt.gemm.operands`` (operand layouts), ``pycusparselt.gemm.handles`` (library handles per
  device and thread), ``pycusparselt.gemm.selections`` (algorithm selections shared by the plans of one
  problem), ``pycusparselt.gemm.descriptors`` (a problem's descriptors, made for each plan and each selection),
  :mod:`pycusparselt.gemm.dtypes` (type
  combinations), ``pycusparselt.gemm.oneshot`` (:func:`matmul` through a cache of plans),
  ``pycusparselt.gemm.decode`` (a 2:4 decode kernel of our own for 1-16 rows) with
  ``pycusparselt.gemm.decode_layout`` (its weight layout, NumPy),
  ``pycusparselt.gemm.graphs`` (:func:`capture`: a network of layers and CuPy / PyTorch operations as one
  CUDA graph).
- nn: :mod:`pycusparselt.nn.linear` (:class:`SparseLinear`, an inference layer with a 2:4 weight in FP16,
  BF16, INT8 or FP8), ``pycusparselt.nn.route`` (a layer's prepared call per input: staging, output, launch),
  ``pycusparselt.nn.layer_plans`` (the configuration each of a layer's plans runs, and its compressed weight),
  ``pycusparselt.nn.small_batch`` (the decode kernel or cuSPARSELt for inputs of 1 to 16 rows, chosen by timing),
  :mod:`pycusparselt.nn.quantization` (quantized values, scales, calibration),
  :mod:`pycusparselt.nn.masks` (2:4 masks), :mod:`pycusparselt.nn.permutation` (channel permutations that keep
  more magnitude), :mod:`pycusparselt.nn.layer_files` (checked layer files), :mod:`pycusparselt.nn.layer_values`
  (a layer's scales and ReLU bounds, checked as float32).
- distributed and PyTorch (imported on demand): :mod:`pycusparselt.distributed` with
  :mod:`pycusparselt.distributed.sharding`, :mod:`pycusparselt.distributed.engines`,
  :mod:`pycusparselt.distributed.groups`, :mod:`pycusparselt.distributed.parallel` and
  :mod:`pycusparselt.distributed.data` (tensor-parallel SparseLinear layers over NCCL, data parallelism;
  ``python -m pycusparselt.distributed``, ``pycusparselt.distributed.__main__``, says how to start a job);
  :mod:`pycusparselt.torch` with ``pycusparselt.torch.pruning``,
  ``pycusparselt.torch.channels``, ``pycusparselt.torch.modules``, ``pycusparselt.torch.conversion``,
  ``pycusparselt.torch.compact`` and ``pycusparselt.torch.siblings`` (the 2:4 retraining workflow, the sparse
  ``nn.Module`` for PyTorch models and ``sparsify``, its state in a compact form, sibling projections merged
  into one product).
- tools: :mod:`pycusparselt.bench` with ``pycusparselt.bench.cases``, ``pycusparselt.bench.environment``,
  ``pycusparselt.bench.inputs``,
  ``pycusparselt.bench.runner``, ``pycusparselt.bench.report`` and ``pycusparselt.bench.__main__``
  (the sparse GEMM benchmark); ``pycusparselt.cli`` and ``pycusparselt.__main__`` (``python -m
  pycusparselt info | demo | bench``).
"""

from __future__ import annotations

from . import enums, errors
from ._native.library import ENV_VAR, MIN_VERSION, library_path, library_version
from ._native.devices import gpu_unavailable_reason, require_gpu
from .gemm.graphs import CapturedGraph, capture
from .nn.linear import SparseLinear
from .gemm.oneshot import clear_plan_cache, matmul, plan_cache_info
from .gemm.plan import CompressedOperand, PlanConfig, SparseMatmulPlan
from .errors import (
    ClosedError,
    CuSparseLtError,
    CuSparseLtMemoryError,
    CuSparseLtRuntimeError,
    CuSparseLtUsageError,
    GpuUnavailableError,
    LayerFileError,
    LibraryNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ENV_VAR",
    "MIN_VERSION",
    "library_version",
    "library_path",
    "enums",
    "errors",
    "ClosedError",
    "CuSparseLtError",
    "CuSparseLtMemoryError",
    "CuSparseLtRuntimeError",
    "CuSparseLtUsageError",
    "LibraryNotFoundError",
    "LayerFileError",
    "GpuUnavailableError",
    "require_gpu",
    "gpu_unavailable_reason",
    "SparseMatmulPlan",
    "SparseLinear",
    "CompressedOperand",
    "PlanConfig",
    "matmul",
    "capture",
    "CapturedGraph",
    "plan_cache_info",
    "clear_plan_cache",
]

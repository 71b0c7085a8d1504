"""pycusparselt: Python bindings for NVIDIA cuSPARSELt, 2:4 structured-sparse matrix multiplies on
Sparse Tensor Cores, with a NumPy reference that runs anywhere.

Importing the package loads nothing native: the library is found and loaded on first use (see
:func:`library_version`). Layers, each importing only the ones before it:

- :mod:`pycusparselt.bindings`: one checked wrapper per C function; :mod:`pycusparselt.enums`: the
  header's enumerations; :mod:`pycusparselt.errors`: the exceptions.
- :class:`SparseMatmulPlan` (:mod:`pycusparselt.gemm.plan`): persistent GEMMs on device arrays; :func:`matmul`
  (:mod:`pycusparselt.gemm.oneshot`): one-shot products through a cache of plans.
- :class:`SparseLinear` (:mod:`pycusparselt.nn.linear`): an inference layer with a 2:4 weight, in FP16, BF16,
  INT8 or FP8; :mod:`pycusparselt.nn.quantization`: quantized values, scales and calibration.
- :func:`capture` (:mod:`pycusparselt.gemm.graphs`): a whole network of layers and CuPy / PyTorch operations as
  one CUDA graph. :mod:`pycusparselt._arrays` is the one module that tells NumPy, CuPy, PyTorch and DLPack
  arrays apart and answers in the caller's framework.
- :mod:`pycusparselt.distributed` (imported on demand): tensor-parallel SparseLinear layers over NCCL and
  their launcher, ``python -m pycusparselt.distributed``.
- :mod:`pycusparselt.reference`: the NumPy oracle (pruning, compression, GEMM semantics); needs no GPU.
"""

from __future__ import annotations

from . import _moved, enums, errors
from ._native.library import ENV_VAR, MIN_VERSION, library_path, library_version
from ._native.devices import require_gpu
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

_moved.install()  # the old import paths of the modules that moved into the layer folders

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

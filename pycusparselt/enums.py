"""IntEnums mirroring the enumerations of ``cusparseLt.h``.

The members are read from the compiled cffi declarations (``build_ffi.py``), which the header conformance
test compares with the installed header, so no constant here is typed by hand. Member names drop the C
prefix: ``CUSPARSE_ORDER_ROW`` is ``Order.ROW``, ``CUDA_R_16F`` is ``DataType.R_16F``.
"""

from __future__ import annotations

from enum import IntEnum

from ._native.ffi import ffi

__all__ = [
    "Status",
    "Operation",
    "Order",
    "DataType",
    "LibraryProperty",
    "Sparsity",
    "MatDescAttribute",
    "ComputeType",
    "MatmulDescAttribute",
    "MatmulMatrixScale",
    "MatmulAlg",
    "MatmulAlgAttribute",
    "SplitKMode",
    "PruneAlg",
]


def _mirror(name: str, ctype: str, prefix: str, doc: str) -> type[IntEnum]:
    # relements keeps aliases (CUDA_R_8F_UE4M3 == CUDA_R_8F_E4M3), which IntEnum turns into aliases too.
    members = sorted(ffi.typeof(ctype).relements.items(), key=lambda item: (item[1], item[0]))
    enum = IntEnum(name, [(cname[len(prefix):], value) for cname, value in members], module=__name__)
    enum.__doc__ = f"{doc}\n\nMirrors ``{ctype}``; member ``X`` is the C constant ``{prefix}X``."
    enum.__qualname__ = name
    return enum


Status = _mirror("Status", "cusparseStatus_t", "CUSPARSE_STATUS_", "Status returned by every cuSPARSELt call.")
Operation = _mirror("Operation", "cusparseOperation_t", "CUSPARSE_OPERATION_", "Transpose or not.")
Order = _mirror("Order", "cusparseOrder_t", "CUSPARSE_ORDER_", "Memory order of a matrix (ROW or COL).")
DataType = _mirror("DataType", "cudaDataType", "CUDA_", "CUDA data type of a matrix's elements.")
LibraryProperty = _mirror("LibraryProperty", "libraryPropertyType", "", "Part of the library version.")
Sparsity = _mirror("Sparsity", "cusparseLtSparsity_t", "CUSPARSELT_", "Sparsity ratio of a structured matrix.")
MatDescAttribute = _mirror(
    "MatDescAttribute", "cusparseLtMatDescAttribute_t", "CUSPARSELT_MAT_", "Attribute of a matrix descriptor."
)
ComputeType = _mirror("ComputeType", "cusparseComputeType", "CUSPARSE_", "Precision of the multiply-accumulate.")
MatmulDescAttribute = _mirror(
    "MatmulDescAttribute",
    "cusparseLtMatmulDescAttribute_t",
    "CUSPARSELT_MATMUL_",
    "Attribute of a matmul descriptor (epilogue, scaling, bias, sparse pointer).",
)
MatmulMatrixScale = _mirror(
    "MatmulMatrixScale", "cusparseLtMatmulMatrixScale_t", "CUSPARSELT_MATMUL_", "Block-scaling mode of an operand."
)
MatmulAlg = _mirror("MatmulAlg", "cusparseLtMatmulAlg_t", "CUSPARSELT_MATMUL_ALG_", "Algorithm family.")
MatmulAlgAttribute = _mirror(
    "MatmulAlgAttribute",
    "cusparseLtMatmulAlgAttribute_t",
    "CUSPARSELT_MATMUL_",
    "Attribute of an algorithm selection (config id, split-k, search iterations).",
)
SplitKMode = _mirror("SplitKMode", "cusparseLtSplitKMode_t", "CUSPARSELT_", "Split-K mode.")
PruneAlg = _mirror("PruneAlg", "cusparseLtPruneAlg_t", "CUSPARSELT_PRUNE_", "Pruning pattern (TILE or STRIP).")

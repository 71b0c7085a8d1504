"""cffi declarations of the whole cuSPARSELt C API (0.8.0 through 0.10.x).

Out-of-line ABI mode: ``set_source(..., None)`` makes ``pip install`` write a plain Python module,
``pycusparselt/_cusparselt_cffi.py``, that holds the parsed declarations. Installing needs no compiler and no
CUDA header, and importing needs no pycparser.

Every value and signature here is checked against the installed ``cusparseLt.h`` by
``tests/native/test_header_conformance.py``; nothing in the package repeats these constants by hand (the enums in
``pycusparselt/enums.py`` are read from the compiled declarations).

A second, optional module, ``pycusparselt._fastcall``, is compiled (cffi's API mode) where a C compiler and
the Python headers exist: one C function that calls ``cusparseLtMatmul`` through an address, so the per-call
path skips libffi. It includes no CUDA or cuSPARSELt header and links nothing; where it cannot be built,
``pip install`` warns and the package calls the library through the ABI module instead.

Run ``python build_ffi.py`` in a source checkout to write the module in place for development
(``python build_ffi.py --fastcall`` also compiles the optional module beside it).
"""

from __future__ import annotations

import os

import cffi

#: Name of the generated module.
MODULE_NAME = "pycusparselt._cusparselt_cffi"

#: Size in bytes of each opaque structure in cuSPARSELt 0.8 - 0.10 (``uint8_t data[512]``).
OPAQUE_SIZE = 512

#: The opaque structures are declared ``alignas(16)`` in the header; cffi drops the alignment, so
#: pycusparselt allocates them at this alignment itself.
OPAQUE_ALIGNMENT = 16

# Types the cuSPARSELt header takes from CUDA headers that its wheel does not ship.
# library_types.h (CUDA 13): cudaDataType, libraryPropertyType. driver_types.h: cudaStream_t.
CUDA_TYPES_CDEF = """
typedef enum cudaDataType_t {
    CUDA_R_32F  =  0,
    CUDA_R_64F  =  1,
    CUDA_R_16F  =  2,
    CUDA_R_8I   =  3,
    CUDA_C_32F  =  4,
    CUDA_C_64F  =  5,
    CUDA_C_16F  =  6,
    CUDA_C_8I   =  7,
    CUDA_R_8U   =  8,
    CUDA_C_8U   =  9,
    CUDA_R_32I  = 10,
    CUDA_C_32I  = 11,
    CUDA_R_32U  = 12,
    CUDA_C_32U  = 13,
    CUDA_R_16BF = 14,
    CUDA_C_16BF = 15,
    CUDA_R_4I   = 16,
    CUDA_C_4I   = 17,
    CUDA_R_4U   = 18,
    CUDA_C_4U   = 19,
    CUDA_R_16I  = 20,
    CUDA_C_16I  = 21,
    CUDA_R_16U  = 22,
    CUDA_C_16U  = 23,
    CUDA_R_64I  = 24,
    CUDA_C_64I  = 25,
    CUDA_R_64U  = 26,
    CUDA_C_64U  = 27,
    CUDA_R_8F_E4M3  = 28,
    CUDA_R_8F_UE4M3 = 28,
    CUDA_R_8F_E5M2  = 29,
    CUDA_R_8F_UE8M0 = 30,
    CUDA_R_6F_E2M3  = 31,
    CUDA_R_6F_E3M2  = 32,
    CUDA_R_4F_E2M1  = 33
} cudaDataType;

typedef enum libraryPropertyType_t {
    MAJOR_VERSION = 0,
    MINOR_VERSION = 1,
    PATCH_LEVEL   = 2
} libraryPropertyType;

typedef struct CUstream_st *cudaStream_t;
"""

# cusparseStatus_t, cusparseOperation_t and cusparseOrder_t: the cuSPARSE subset that cuSPARSELt uses
# (cusparseLt_cusparse_stub.h in the 0.10 wheel; cusparse.h of the CUDA toolkit before that).
CUSPARSE_TYPES_CDEF = """
typedef enum {
    CUSPARSE_STATUS_SUCCESS                   = 0,
    CUSPARSE_STATUS_NOT_INITIALIZED           = 1,
    CUSPARSE_STATUS_ALLOC_FAILED              = 2,
    CUSPARSE_STATUS_INVALID_VALUE             = 3,
    CUSPARSE_STATUS_ARCH_MISMATCH             = 4,
    CUSPARSE_STATUS_MAPPING_ERROR             = 5,
    CUSPARSE_STATUS_EXECUTION_FAILED          = 6,
    CUSPARSE_STATUS_INTERNAL_ERROR            = 7,
    CUSPARSE_STATUS_MATRIX_TYPE_NOT_SUPPORTED = 8,
    CUSPARSE_STATUS_ZERO_PIVOT                = 9,
    CUSPARSE_STATUS_NOT_SUPPORTED             = 10,
    CUSPARSE_STATUS_INSUFFICIENT_RESOURCES    = 11
} cusparseStatus_t;

typedef enum {
    CUSPARSE_OPERATION_NON_TRANSPOSE = 0,
    CUSPARSE_OPERATION_TRANSPOSE     = 1
} cusparseOperation_t;

typedef enum {
    CUSPARSE_ORDER_COL = 1,
    CUSPARSE_ORDER_ROW = 2
} cusparseOrder_t;
"""

# cusparseLt.h itself, in the header's order. Enumerators carry explicit values so a reader needs no
# counting; the conformance test proves they equal the header's implicit ones.
CUSPARSELT_CDEF = """
typedef struct { uint8_t data[512]; } cusparseLtHandle_t;
typedef struct { uint8_t data[512]; } cusparseLtMatDescriptor_t;
typedef struct { uint8_t data[512]; } cusparseLtMatmulDescriptor_t;
typedef struct { uint8_t data[512]; } cusparseLtMatmulAlgSelection_t;
typedef struct { uint8_t data[512]; } cusparseLtMatmulPlan_t;

cusparseStatus_t cusparseLtInit(cusparseLtHandle_t* handle);
cusparseStatus_t cusparseLtDestroy(const cusparseLtHandle_t* handle);
cusparseStatus_t cusparseLtGetVersion(const cusparseLtHandle_t* handle, int* version);
cusparseStatus_t cusparseLtGetProperty(libraryPropertyType propertyType, int* value);
const char* cusparseLtGetErrorName(cusparseStatus_t status);
const char* cusparseLtGetErrorString(cusparseStatus_t status);

cusparseStatus_t cusparseLtDenseDescriptorInit(const cusparseLtHandle_t* handle,
                                               cusparseLtMatDescriptor_t* matDescr,
                                               int64_t rows, int64_t cols, int64_t ld,
                                               uint32_t alignment, cudaDataType valueType,
                                               cusparseOrder_t order);

typedef enum {
    CUSPARSELT_SPARSITY_50_PERCENT = 0
} cusparseLtSparsity_t;

cusparseStatus_t cusparseLtStructuredDescriptorInit(const cusparseLtHandle_t* handle,
                                                    cusparseLtMatDescriptor_t* matDescr,
                                                    int64_t rows, int64_t cols, int64_t ld,
                                                    uint32_t alignment, cudaDataType valueType,
                                                    cusparseOrder_t order,
                                                    cusparseLtSparsity_t sparsity);

cusparseStatus_t cusparseLtMatDescriptorDestroy(const cusparseLtMatDescriptor_t* matDescr);

typedef enum {
    CUSPARSELT_MAT_NUM_BATCHES  = 0,
    CUSPARSELT_MAT_BATCH_STRIDE = 1
} cusparseLtMatDescAttribute_t;

cusparseStatus_t cusparseLtMatDescSetAttribute(const cusparseLtHandle_t* handle,
                                               cusparseLtMatDescriptor_t* matmulDescr,
                                               cusparseLtMatDescAttribute_t matAttribute,
                                               const void* data, size_t dataSize);

cusparseStatus_t cusparseLtMatDescGetAttribute(const cusparseLtHandle_t* handle,
                                               const cusparseLtMatDescriptor_t* matmulDescr,
                                               cusparseLtMatDescAttribute_t matAttribute,
                                               void* data, size_t dataSize);

typedef enum {
    CUSPARSE_COMPUTE_32I = 0,
    CUSPARSE_COMPUTE_16F = 1,
    CUSPARSE_COMPUTE_32F = 2
} cusparseComputeType;

cusparseStatus_t cusparseLtMatmulDescriptorInit(const cusparseLtHandle_t* handle,
                                                cusparseLtMatmulDescriptor_t* matmulDescr,
                                                cusparseOperation_t opA, cusparseOperation_t opB,
                                                const cusparseLtMatDescriptor_t* matA,
                                                const cusparseLtMatDescriptor_t* matB,
                                                const cusparseLtMatDescriptor_t* matC,
                                                const cusparseLtMatDescriptor_t* matD,
                                                cusparseComputeType computeType);

typedef enum {
    CUSPARSELT_MATMUL_ACTIVATION_RELU            = 0,
    CUSPARSELT_MATMUL_ACTIVATION_RELU_UPPERBOUND = 1,
    CUSPARSELT_MATMUL_ACTIVATION_RELU_THRESHOLD  = 2,
    CUSPARSELT_MATMUL_ACTIVATION_GELU            = 3,
    CUSPARSELT_MATMUL_ACTIVATION_GELU_SCALING    = 4,
    CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING       = 5,
    CUSPARSELT_MATMUL_BETA_VECTOR_SCALING        = 6,
    CUSPARSELT_MATMUL_BIAS_STRIDE                = 7,
    CUSPARSELT_MATMUL_BIAS_POINTER               = 8,
    CUSPARSELT_MATMUL_SPARSE_MAT_POINTER         = 9,
    CUSPARSELT_MATMUL_A_SCALE_MODE               = 10,
    CUSPARSELT_MATMUL_B_SCALE_MODE               = 11,
    CUSPARSELT_MATMUL_C_SCALE_MODE               = 12,
    CUSPARSELT_MATMUL_D_SCALE_MODE               = 13,
    CUSPARSELT_MATMUL_D_OUT_SCALE_MODE           = 14,
    CUSPARSELT_MATMUL_A_SCALE_POINTER            = 15,
    CUSPARSELT_MATMUL_B_SCALE_POINTER            = 16,
    CUSPARSELT_MATMUL_C_SCALE_POINTER            = 17,
    CUSPARSELT_MATMUL_D_SCALE_POINTER            = 18,
    CUSPARSELT_MATMUL_D_OUT_SCALE_POINTER        = 19
} cusparseLtMatmulDescAttribute_t;

typedef enum {
    CUSPARSELT_MATMUL_SCALE_NONE               = 0,
    CUSPARSELT_MATMUL_MATRIX_SCALE_SCALAR_32F  = 1,
    CUSPARSELT_MATMUL_MATRIX_SCALE_VEC32_UE4M3 = 2,
    CUSPARSELT_MATMUL_MATRIX_SCALE_VEC64_UE8M0 = 3
} cusparseLtMatmulMatrixScale_t;

cusparseStatus_t cusparseLtMatmulDescSetAttribute(const cusparseLtHandle_t* handle,
                                                  cusparseLtMatmulDescriptor_t* matmulDescr,
                                                  cusparseLtMatmulDescAttribute_t matmulAttribute,
                                                  const void* data, size_t dataSize);

cusparseStatus_t cusparseLtMatmulDescGetAttribute(const cusparseLtHandle_t* handle,
                                                  const cusparseLtMatmulDescriptor_t* matmulDescr,
                                                  cusparseLtMatmulDescAttribute_t matmulAttribute,
                                                  void* data, size_t dataSize);

typedef enum {
    CUSPARSELT_MATMUL_ALG_DEFAULT = 0
} cusparseLtMatmulAlg_t;

cusparseStatus_t cusparseLtMatmulAlgSelectionInit(const cusparseLtHandle_t* handle,
                                                  cusparseLtMatmulAlgSelection_t* algSelection,
                                                  const cusparseLtMatmulDescriptor_t* matmulDescr,
                                                  cusparseLtMatmulAlg_t alg);

cusparseStatus_t cusparseLtMatmulAlgSelectionDestroy(const cusparseLtMatmulAlgSelection_t* algSelection);

typedef enum {
    CUSPARSELT_MATMUL_ALG_CONFIG_ID     = 0,
    CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID = 1,
    CUSPARSELT_MATMUL_SEARCH_ITERATIONS = 2,
    CUSPARSELT_MATMUL_SPLIT_K           = 3,
    CUSPARSELT_MATMUL_SPLIT_K_MODE      = 4,
    CUSPARSELT_MATMUL_SPLIT_K_BUFFERS   = 5
} cusparseLtMatmulAlgAttribute_t;

typedef enum {
    CUSPARSELT_INVALID_MODE             = 0,
    CUSPARSELT_SPLIT_K_MODE_ONE_KERNEL  = 1,
    CUSPARSELT_SPLIT_K_MODE_TWO_KERNELS = 2,
    CUSPARSELT_HEURISTIC                = 3,
    CUSPARSELT_DATAPARALLEL             = 4,
    CUSPARSELT_SPLITK                   = 5,
    CUSPARSELT_STREAMK                  = 6
} cusparseLtSplitKMode_t;

cusparseStatus_t cusparseLtMatmulAlgSetAttribute(const cusparseLtHandle_t* handle,
                                                 cusparseLtMatmulAlgSelection_t* algSelection,
                                                 cusparseLtMatmulAlgAttribute_t attribute,
                                                 const void* data, size_t dataSize);

cusparseStatus_t cusparseLtMatmulAlgGetAttribute(const cusparseLtHandle_t* handle,
                                                 const cusparseLtMatmulAlgSelection_t* algSelection,
                                                 cusparseLtMatmulAlgAttribute_t attribute,
                                                 void* data, size_t dataSize);

cusparseStatus_t cusparseLtMatmulGetWorkspace(const cusparseLtHandle_t* handle,
                                              const cusparseLtMatmulPlan_t* plan,
                                              size_t* workspaceSize);

cusparseStatus_t cusparseLtMatmulPlanInit(const cusparseLtHandle_t* handle,
                                          cusparseLtMatmulPlan_t* plan,
                                          const cusparseLtMatmulDescriptor_t* matmulDescr,
                                          const cusparseLtMatmulAlgSelection_t* algSelection);

cusparseStatus_t cusparseLtMatmulPlanDestroy(const cusparseLtMatmulPlan_t* plan);

cusparseStatus_t cusparseLtMatmul(const cusparseLtHandle_t* handle,
                                  const cusparseLtMatmulPlan_t* plan,
                                  const void* alpha, const void* d_A, const void* d_B,
                                  const void* beta, const void* d_C, void* d_D,
                                  void* workspace, cudaStream_t* streams, int32_t numStreams);

cusparseStatus_t cusparseLtMatmulSearch(const cusparseLtHandle_t* handle,
                                        cusparseLtMatmulPlan_t* plan,
                                        const void* alpha, const void* d_A, const void* d_B,
                                        const void* beta, const void* d_C, void* d_D,
                                        void* workspace, cudaStream_t* streams, int32_t numStreams);

typedef enum {
    CUSPARSELT_PRUNE_SPMMA_TILE  = 0,
    CUSPARSELT_PRUNE_SPMMA_STRIP = 1
} cusparseLtPruneAlg_t;

cusparseStatus_t cusparseLtSpMMAPrune(const cusparseLtHandle_t* handle,
                                      const cusparseLtMatmulDescriptor_t* matmulDescr,
                                      const void* d_in, void* d_out,
                                      cusparseLtPruneAlg_t pruneAlg, cudaStream_t stream);

cusparseStatus_t cusparseLtSpMMAPruneCheck(const cusparseLtHandle_t* handle,
                                           const cusparseLtMatmulDescriptor_t* matmulDescr,
                                           const void* d_in, int* valid, cudaStream_t stream);

cusparseStatus_t cusparseLtSpMMAPrune2(const cusparseLtHandle_t* handle,
                                       const cusparseLtMatDescriptor_t* sparseMatDescr,
                                       int isSparseA, cusparseOperation_t op,
                                       const void* d_in, void* d_out,
                                       cusparseLtPruneAlg_t pruneAlg, cudaStream_t stream);

cusparseStatus_t cusparseLtSpMMAPruneCheck2(const cusparseLtHandle_t* handle,
                                            const cusparseLtMatDescriptor_t* sparseMatDescr,
                                            int isSparseA, cusparseOperation_t op,
                                            const void* d_in, int* d_valid, cudaStream_t stream);

cusparseStatus_t cusparseLtSpMMACompressedSize(const cusparseLtHandle_t* handle,
                                               const cusparseLtMatmulPlan_t* plan,
                                               size_t* compressedSize,
                                               size_t* compressedBufferSize);

cusparseStatus_t cusparseLtSpMMACompress(const cusparseLtHandle_t* handle,
                                         const cusparseLtMatmulPlan_t* plan,
                                         const void* d_dense, void* d_compressed,
                                         void* d_compressed_buffer, cudaStream_t stream);

cusparseStatus_t cusparseLtSpMMACompressedSize2(const cusparseLtHandle_t* handle,
                                                const cusparseLtMatDescriptor_t* sparseMatDescr,
                                                size_t* compressedSize,
                                                size_t* compressedBufferSize);

cusparseStatus_t cusparseLtSpMMACompress2(const cusparseLtHandle_t* handle,
                                          const cusparseLtMatDescriptor_t* sparseMatDescr,
                                          int isSparseA, cusparseOperation_t op,
                                          const void* d_dense, void* d_compressed,
                                          void* d_compressed_buffer, cudaStream_t stream);
"""

#: The complete declaration text handed to cffi.
CDEF = CUDA_TYPES_CDEF + CUSPARSE_TYPES_CDEF + CUSPARSELT_CDEF

#: Ours, not the header's: cusparseLtMatmul seen through a pointer type whose parameters are all integers
#: (pointers and handles have the size of intptr_t, the status enum that of int), so the per-call path
#: passes Python integers without creating a cdata object per argument (bindings.MatmulCall).
FAST_PATH_CDEF = """
typedef int (*pycusparselt_matmul_fn)(intptr_t handle, intptr_t plan, intptr_t alpha, intptr_t a, intptr_t b,
                                      intptr_t beta, intptr_t c, intptr_t d, intptr_t workspace,
                                      intptr_t streams, int num_streams);
"""


#: Name of the optional compiled module.
FASTCALL_MODULE = "pycusparselt._fastcall"

#: The compiled module's one function: ``fn`` is the address of ``cusparseLtMatmul``, the other parameters
#: are those of ``pycusparselt_matmul_fn`` (the same integers, so both paths take the same arguments).
FASTCALL_CDEF = """
int pycusparselt_matmul_at(intptr_t fn, intptr_t handle, intptr_t plan, intptr_t alpha, intptr_t a, intptr_t b,
                           intptr_t beta, intptr_t c, intptr_t d, intptr_t workspace, intptr_t streams,
                           int num_streams);
"""

#: Its C source: cusparseLtMatmul's parameter list (cusparseLt.h), every pointer as ``void *``.
FASTCALL_SOURCE = r"""
#include <stdint.h>

typedef int (*pycusparselt_matmul_ptr)(const void *handle, const void *plan, const void *alpha, const void *a,
                                       const void *b, const void *beta, const void *c, void *d, void *workspace,
                                       void *streams, int32_t num_streams);

static int pycusparselt_matmul_at(intptr_t fn, intptr_t handle, intptr_t plan, intptr_t alpha, intptr_t a,
                                  intptr_t b, intptr_t beta, intptr_t c, intptr_t d, intptr_t workspace,
                                  intptr_t streams, int num_streams)
{
    return ((pycusparselt_matmul_ptr)fn)((const void *)handle, (const void *)plan, (const void *)alpha,
                                         (const void *)a, (const void *)b, (const void *)beta, (const void *)c,
                                         (void *)d, (void *)workspace, (void *)streams, (int32_t)num_streams);
}
"""


def make_ffibuilder(cdef: str = CDEF) -> cffi.FFI:
    """Return an out-of-line ABI-mode builder for ``cdef``."""
    builder = cffi.FFI()
    builder.cdef(cdef + FAST_PATH_CDEF)
    builder.set_source(MODULE_NAME, None)
    return builder


def make_fastcall_builder() -> cffi.FFI:
    """Return the API-mode builder of the optional compiled module (``optional``: a failed build warns)."""
    builder = cffi.FFI()
    builder.cdef(FASTCALL_CDEF)
    builder.set_source(FASTCALL_MODULE, FASTCALL_SOURCE, optional=True)
    return builder


ffibuilder = make_ffibuilder()
fastcall_builder = make_fastcall_builder()

if __name__ == "__main__":
    import sys

    # Development: write the module(s) into the source tree.
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.emit_python_code(os.path.join(here, "pycusparselt", "_cusparselt_cffi.py"))
    if "--fastcall" in sys.argv[1:]:
        fastcall_builder.compile(tmpdir=here)

"""A 2:4 sparse FP16 GEMM through the thin bindings, checked against the NumPy reference.

Needs a GPU of SM 8.0+, CuPy and cuSPARSELt: ``python examples/raw_bindings_fp16.py``.
"""

import pycusparselt as psl

psl.require_gpu(exit=True)  # one line instead of a CUDA traceback where no GPU is usable

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from pycusparselt import bindings as b  # noqa: E402
from pycusparselt import reference  # noqa: E402
from pycusparselt.enums import ComputeType, DataType, MatmulDescAttribute, Operation, Order, PruneAlg  # noqa: E402

m, n, k = 512, 256, 1024
rng = np.random.default_rng(0)
a = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))  # the sparse operand, row-major
x = cp.asarray(rng.standard_normal((k, n)).astype(np.float16))
bias = cp.asarray(rng.standard_normal(m).astype(np.float16))  # one value per row of D, in D's type
d = cp.empty((m, n), cp.float16)
stream = cp.cuda.get_current_stream()

handle = b.RawHandle()
mat_a, mat_x, mat_d = b.RawMatDescriptor(), b.RawMatDescriptor(), b.RawMatDescriptor()
desc, selection, plan = b.RawMatmulDescriptor(), b.RawAlgSelection(), b.RawPlan()
b.init(handle)
try:
    b.structured_descriptor_init(handle, mat_a, m, k, k, 16, DataType.R_16F, Order.ROW)
    b.dense_descriptor_init(handle, mat_x, k, n, n, 16, DataType.R_16F, Order.ROW)
    b.dense_descriptor_init(handle, mat_d, m, n, n, 16, DataType.R_16F, Order.ROW)
    b.matmul_descriptor_init(handle, desc, Operation.NON_TRANSPOSE, Operation.NON_TRANSPOSE,
                             mat_a, mat_x, mat_d, mat_d, ComputeType.COMPUTE_32F)
    b.matmul_desc_set_attribute(handle, desc, MatmulDescAttribute.SPARSE_MAT_POINTER, a.data.ptr)
    b.matmul_desc_set_attribute(handle, desc, MatmulDescAttribute.ACTIVATION_RELU, 1)
    b.matmul_desc_set_attribute(handle, desc, MatmulDescAttribute.BIAS_POINTER, bias.data.ptr)
    b.matmul_alg_selection_init(handle, selection, desc)
    b.matmul_plan_init(handle, plan, desc, selection)

    b.spmma_prune(handle, desc, a.data.ptr, a.data.ptr, PruneAlg.SPMMA_STRIP, stream)
    flag = cp.zeros(1, cp.int32)  # written only if the matrix is not 2:4
    b.spmma_prune_check(handle, desc, a.data.ptr, flag.data.ptr, stream)
    assert int(flag.get()[0]) == 0

    size, scratch_size = b.spmma_compressed_size(handle, plan)
    # 64 KiB more than asked: the library's kernels read a little past the compressed size (plan.COMPRESSED_SLACK)
    compressed = cp.empty(size + 64 * 1024, cp.uint8)
    scratch = cp.empty(max(scratch_size, 1), cp.uint8)
    b.spmma_compress(handle, plan, a.data.ptr, compressed.data.ptr, scratch.data.ptr, stream)
    workspace = cp.empty(max(b.matmul_get_workspace(handle, plan), 1), cp.uint8)
    b.matmul(handle, plan, 1.0, compressed.data.ptr, x.data.ptr, 0.0, d.data.ptr, d.data.ptr,
             workspace.data.ptr, [stream])
    result = d.get()
finally:
    for destroy, obj in ((b.matmul_plan_destroy, plan), (b.matmul_alg_selection_destroy, selection),
                         (b.mat_descriptor_destroy, mat_a), (b.mat_descriptor_destroy, mat_x),
                         (b.mat_descriptor_destroy, mat_d)):
        if obj.initialized:
            destroy(obj)
    desc.release()
    b.destroy(handle)

# The GPU pruned A; the reference computes the same epilogue from the same rounded inputs.
a_pruned, x_host = a.get(), x.get()
assert reference.is_2to4(a_pruned)
reference.assert_close(result, reference.matmul(a_pruned, x_host, bias=bias.get(), activation="relu"),
                       a=a_pruned, b=x_host, bias=bias.get(), activation="relu")
print(f"D = relu(A_2:4 @ X + bias), {m}x{k} @ {k}x{n}: matches the NumPy reference within its bounds")

"""GPU smoke test: the raw call sequence through the thin bindings alone, for FP16.

init -> descriptors -> matmul descriptor -> algorithm selection -> plan -> prune -> prune check ->
compress -> search -> workspace -> matmul -> destroy everything; the result is compared with a float64
NumPy product of the pruned inputs. The descriptor-only variants (Prune2, PruneCheck2, CompressedSize2,
Compress2) are exercised on the same problem.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

M, N, K = 128, 96, 256


def _is_2to4_rows(a: np.ndarray) -> bool:
    return bool((np.count_nonzero(a.reshape(a.shape[0], -1, 4), axis=-1) <= 2).all())


@pytest.fixture
def raw():
    """A handle, four descriptors, a matmul descriptor, a selection and a plan; destroyed afterwards."""
    from pycusparselt import bindings as b
    from pycusparselt.enums import ComputeType, DataType, Operation, Order

    objs = {
        "handle": b.RawHandle(),
        "a": b.RawMatDescriptor(),
        "b": b.RawMatDescriptor(),
        "c": b.RawMatDescriptor(),
        "desc": b.RawMatmulDescriptor(),
        "sel": b.RawAlgSelection(),
        "plan": b.RawPlan(),
    }
    h = objs["handle"]
    b.init(h)
    b.structured_descriptor_init(h, objs["a"], M, K, K, 16, DataType.R_16F, Order.ROW)
    b.dense_descriptor_init(h, objs["b"], K, N, N, 16, DataType.R_16F, Order.ROW)
    b.dense_descriptor_init(h, objs["c"], M, N, N, 16, DataType.R_16F, Order.ROW)
    b.matmul_descriptor_init(
        h, objs["desc"], Operation.NON_TRANSPOSE, Operation.NON_TRANSPOSE,
        objs["a"], objs["b"], objs["c"], objs["c"], ComputeType.COMPUTE_32F,
    )
    b.matmul_alg_selection_init(h, objs["sel"], objs["desc"])
    b.matmul_plan_init(h, objs["plan"], objs["desc"], objs["sel"])
    yield objs
    b.matmul_plan_destroy(objs["plan"])
    b.matmul_alg_selection_destroy(objs["sel"])
    for key in ("a", "b", "c"):
        b.mat_descriptor_destroy(objs[key])
    objs["desc"].release()
    b.destroy(h)
    for obj in objs.values():
        assert not obj.initialized


def test_raw_sequence_fp16(raw):
    import cupy as cp

    from pycusparselt import bindings as b
    from pycusparselt import library_version
    from pycusparselt.enums import MatmulAlgAttribute, MatmulDescAttribute, PruneAlg
    from pycusparselt.gemm.plan import COMPRESSED_SLACK

    h, desc, plan = raw["handle"], raw["desc"], raw["plan"]
    major, minor, patch = library_version()
    assert b.get_version(h) == major * 1000 + minor * 100 + patch

    rng = np.random.default_rng(1)
    a_host = rng.standard_normal((M, K)).astype(np.float16)
    b_host = rng.standard_normal((K, N)).astype(np.float16)
    a, bm = cp.asarray(a_host), cp.asarray(b_host)
    d = cp.full((M, N), np.nan, dtype=cp.float16)  # poisoned: every element must be written
    flag = cp.full(1, -1, dtype=cp.int32)
    stream = cp.cuda.get_current_stream()

    b.matmul_desc_set_attribute(h, desc, MatmulDescAttribute.SPARSE_MAT_POINTER, a.data.ptr)

    # Random data is not 2:4: the check must say so. The library writes the flag only on failure.
    flag.fill(0)
    b.spmma_prune_check(h, desc, a.data.ptr, flag.data.ptr, stream)
    stream.synchronize()
    assert int(flag.get()[0]) != 0

    b.spmma_prune(h, desc, a.data.ptr, a.data.ptr, PruneAlg.SPMMA_STRIP, stream)
    flag.fill(0)
    b.spmma_prune_check(h, desc, a.data.ptr, flag.data.ptr, stream)
    stream.synchronize()
    assert int(flag.get()[0]) == 0
    a_pruned = a.get()
    assert _is_2to4_rows(a_pruned)
    # Strip pruning keeps the two largest magnitudes of each group of four.
    groups = np.abs(a_host.astype(np.float32)).reshape(M, -1, 4)
    kept = np.abs(a_pruned.astype(np.float32)).reshape(M, -1, 4)
    assert np.allclose(np.sort(kept, axis=-1)[..., 2:], np.sort(groups, axis=-1)[..., 2:])

    size, scratch_size = b.spmma_compressed_size(h, plan)
    assert size == pytest.approx(M * K * 2 * 0.5625, rel=0.02)
    compressed = cp.empty(size + COMPRESSED_SLACK, dtype=cp.uint8)  # the kernels read past `size`
    scratch = cp.empty(max(scratch_size, 1), dtype=cp.uint8)
    b.spmma_compress(h, plan, a.data.ptr, compressed.data.ptr, scratch.data.ptr, stream)

    max_id = b.matmul_alg_get_attribute(h, raw["sel"], MatmulAlgAttribute.ALG_CONFIG_MAX_ID)
    assert max_id >= 1
    workspace = cp.empty(max(b.matmul_get_workspace(h, plan), 1), dtype=cp.uint8)
    b.matmul_search(h, plan, 1.0, compressed.data.ptr, bm.data.ptr, 0.0, d.data.ptr, d.data.ptr,
                    workspace.data.ptr, [stream])
    workspace = cp.empty(max(b.matmul_get_workspace(h, plan), 1), dtype=cp.uint8)
    d.fill(np.nan)
    b.matmul(h, plan, 1.0, compressed.data.ptr, bm.data.ptr, 0.0, d.data.ptr, d.data.ptr,
             workspace.data.ptr, [stream])
    result = d.get().astype(np.float64)
    assert np.isfinite(result).all()
    expected = a_pruned.astype(np.float64) @ b_host.astype(np.float64)
    error = np.linalg.norm(result - expected) / np.linalg.norm(expected)
    assert error < 1e-3


def test_descriptor_only_variants(raw):
    """Prune2 / PruneCheck2 / CompressedSize2 / Compress2 agree with their plan-based forms."""
    import cupy as cp

    from pycusparselt import bindings as b
    from pycusparselt.enums import Operation, PruneAlg

    h, mat_a, plan = raw["handle"], raw["a"], raw["plan"]
    rng = np.random.default_rng(2)
    a = cp.asarray(rng.standard_normal((M, K)).astype(np.float16))
    a_pruned1 = cp.empty_like(a)
    a_pruned2 = cp.empty_like(a)
    flag = cp.zeros(1, dtype=cp.int32)
    stream = cp.cuda.get_current_stream()

    b.spmma_prune(h, raw["desc"], a.data.ptr, a_pruned1.data.ptr, PruneAlg.SPMMA_TILE, stream)
    b.spmma_prune2(h, mat_a, True, Operation.NON_TRANSPOSE, a.data.ptr, a_pruned2.data.ptr, PruneAlg.SPMMA_TILE, stream)
    assert cp.array_equal(a_pruned1, a_pruned2)
    b.spmma_prune_check2(h, mat_a, True, Operation.NON_TRANSPOSE, a_pruned2.data.ptr, flag.data.ptr, stream)
    stream.synchronize()
    assert int(flag.get()[0]) == 0
    flag.fill(0)
    b.spmma_prune_check2(h, mat_a, True, Operation.NON_TRANSPOSE, a.data.ptr, flag.data.ptr, stream)
    stream.synchronize()
    assert int(flag.get()[0]) != 0

    assert b.spmma_compressed_size2(h, mat_a) == b.spmma_compressed_size(h, plan)
    size, scratch_size = b.spmma_compressed_size2(h, mat_a)
    out1, out2 = cp.zeros(size, dtype=cp.uint8), cp.zeros(size, dtype=cp.uint8)
    scratch = cp.empty(max(scratch_size, 1), dtype=cp.uint8)
    b.spmma_compress(h, plan, a_pruned1.data.ptr, out1.data.ptr, scratch.data.ptr, stream)
    b.spmma_compress2(h, mat_a, True, Operation.NON_TRANSPOSE, a_pruned1.data.ptr, out2.data.ptr,
                      scratch.data.ptr, stream)
    assert cp.array_equal(out1, out2)


def test_attribute_round_trips(raw):
    from pycusparselt import bindings as b
    from pycusparselt.enums import MatDescAttribute, MatmulAlgAttribute, MatmulDescAttribute

    h, desc, sel = raw["handle"], raw["desc"], raw["sel"]
    b.mat_desc_set_attribute(h, raw["b"], MatDescAttribute.NUM_BATCHES, 3)
    assert b.mat_desc_get_attribute(h, raw["b"], MatDescAttribute.NUM_BATCHES) == 3
    b.mat_desc_set_attribute(h, raw["b"], MatDescAttribute.BATCH_STRIDE, K * N)
    assert b.mat_desc_get_attribute(h, raw["b"], MatDescAttribute.BATCH_STRIDE) == K * N

    b.matmul_desc_set_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU, 1)
    assert b.matmul_desc_get_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU) == 1
    b.matmul_desc_set_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU_UPPERBOUND, 6.5)
    assert b.matmul_desc_get_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU_UPPERBOUND) == 6.5
    b.matmul_desc_set_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU_THRESHOLD, 0.25)
    assert b.matmul_desc_get_attribute(h, desc, MatmulDescAttribute.ACTIVATION_RELU_THRESHOLD) == 0.25
    b.matmul_desc_set_attribute(h, desc, MatmulDescAttribute.BIAS_STRIDE, M)
    assert b.matmul_desc_get_attribute(h, desc, MatmulDescAttribute.BIAS_STRIDE) == M

    max_id = b.matmul_alg_get_attribute(h, sel, MatmulAlgAttribute.ALG_CONFIG_MAX_ID)
    b.matmul_alg_set_attribute(h, sel, MatmulAlgAttribute.ALG_CONFIG_ID, max_id - 1)
    assert b.matmul_alg_get_attribute(h, sel, MatmulAlgAttribute.ALG_CONFIG_ID) == max_id - 1
    b.matmul_alg_set_attribute(h, sel, MatmulAlgAttribute.SEARCH_ITERATIONS, 7)
    assert b.matmul_alg_get_attribute(h, sel, MatmulAlgAttribute.SEARCH_ITERATIONS) == 7


def test_library_errors_raise_typed_exceptions(raw):
    """Statuses from the real library become the documented exception classes, with NVIDIA's text."""
    from pycusparselt import bindings as b
    from pycusparselt.enums import DataType, MatmulAlgAttribute, Order
    from pycusparselt.errors import CuSparseLtUsageError

    h = raw["handle"]
    bad = b.RawMatDescriptor()
    # 13 rows is no multiple of 16: the structured descriptor must be refused, never crash.
    with pytest.raises(CuSparseLtUsageError) as info:
        b.structured_descriptor_init(h, bad, 13, K, K, 16, DataType.R_16F, Order.ROW)
    assert info.value.function == "cusparseLtStructuredDescriptorInit"
    assert info.value.name.startswith("CUSPARSE_STATUS_")
    assert not bad.initialized
    max_id = b.matmul_alg_get_attribute(h, raw["sel"], MatmulAlgAttribute.ALG_CONFIG_MAX_ID)
    with pytest.raises(CuSparseLtUsageError):
        b.matmul_alg_set_attribute(h, raw["sel"], MatmulAlgAttribute.ALG_CONFIG_ID, max_id + 100)

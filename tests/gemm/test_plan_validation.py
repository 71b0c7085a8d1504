"""SparseMatmulPlan's argument validation, on the CPU: every check that needs no GPU, through fake device arrays.

The fakes expose only ``__cuda_array_interface__`` (version 3: shape, typestr, data pointer, strides in bytes)
at made-up, 256-byte aligned addresses; nothing ever reads them. Each case must be refused in Python with the
documented TypeError or ValueError before any device query or native call: an autouse fixture makes
``import cupy`` fail and the library loader raise, so reaching either fails the test (on any machine, GPU or
not). Messages are checked for key words only (the argument's name, the shapes involved).
"""

from __future__ import annotations

import itertools
import re
import sys

import numpy as np
import pytest

import pycusparselt as psl



@pytest.fixture(autouse=True)
def no_device(monkeypatch):
    """Validation must not need CuPy, a GPU or libcusparseLt: make each of them unreachable."""
    from pycusparselt._native import library as _library

    def no_library(*args, **kwargs):
        raise AssertionError("libcusparseLt was loaded before the arguments were validated")

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    monkeypatch.setattr(_library, "load", no_library)


_addresses = itertools.count(0x7F00_0000_0000, 0x0100_0000)  # 16 MiB apart, 256-byte aligned


class FakeDeviceArray:
    """A device array as the CUDA Array Interface describes it; the memory behind it does not exist."""

    def __init__(self, shape, typestr, *, ptr=None, strides=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (next(_addresses) if ptr is None else ptr, False),
            "strides": strides,
            "version": 3,
        }

    @classmethod
    def col_major(cls, shape, typestr, **kw):
        """F-contiguous (column-major) matrix: unit stride down the rows."""
        itemsize = np.dtype(typestr).itemsize
        rows, cols = shape
        return cls(shape, typestr, strides=(itemsize, rows * itemsize), **kw)

    def __repr__(self):
        cai = self.__cuda_array_interface__
        return f"FakeDeviceArray({cai['shape']}, {cai['typestr']!r}, strides={cai['strides']})"


F16, I8, F32, F64 = "<f2", "|i1", "<f4", "<f8"
M, N, K = 64, 32, 128


def row(shape, typestr=F16, **kw):
    return FakeDeviceArray(shape, typestr, **kw)


def col(shape, typestr=F16, **kw):
    return FakeDeviceArray.col_major(shape, typestr, **kw)


def both_shapes(*shapes):
    """A regex matching a message that contains every one of the given shapes (in any order)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(str(tuple(s)))})" for s in shapes)


# -- shapes --------------------------------------------------------------------------------------------


def test_inner_dimension_mismatch_names_both_shapes():
    a, b = row((M, K)), row((K + 8, N))
    with pytest.raises(ValueError, match=both_shapes((M, K), (K + 8, N))):
        psl.SparseMatmulPlan(a, b)


def test_transposed_b_by_mistake_names_both_shapes():
    a, b = row((M, K)), row((N, K))  # b given as (N, K) instead of (K, N)
    with pytest.raises(ValueError, match=both_shapes((M, K), (N, K))):
        psl.SparseMatmulPlan(a, b)


def test_inner_dimension_mismatch_with_sparse_b():
    a, b = row((M, K)), row((K // 2, N))
    with pytest.raises(ValueError, match=both_shapes((M, K), (K // 2, N))):
        psl.SparseMatmulPlan(a, b, sparse="b")


def test_c_of_wrong_shape_is_named():
    a, b, c = row((M, K)), row((K, N)), row((M, N + 1))
    with pytest.raises(ValueError, match=rf"(?s)\bc\b.*{re.escape(str((M, N + 1)))}"):
        psl.SparseMatmulPlan(a, b, c)


def test_c_transposed_is_refused():
    a, b, c = row((M, K)), row((K, N)), row((N, M))
    with pytest.raises(ValueError, match=rf"(?s)\bc\b.*{re.escape(str((N, M)))}"):
        psl.SparseMatmulPlan(a, b, c)


@pytest.mark.parametrize("shape", [(K,), (2, 2, M, K)], ids=["1-D", "4-D"])
def test_a_must_be_a_matrix_or_a_batch(shape):
    with pytest.raises(ValueError, match=r"\ba\b"):
        psl.SparseMatmulPlan(row(shape), row((K, N)))


def test_batch_sizes_must_agree():
    a, b = row((3, M, K)), row((2, K, N))
    with pytest.raises(ValueError, match=both_shapes((3, M, K), (2, K, N))):
        psl.SparseMatmulPlan(a, b)


# -- types ---------------------------------------------------------------------------------------------


def test_float64_is_unsupported_and_the_supported_types_are_listed():
    a, b = row((M, K), F64), row((K, N), F64)
    with pytest.raises(TypeError, match=r"(?s)float64.*float16.*int8"):
        psl.SparseMatmulPlan(a, b)


@pytest.mark.parametrize("typestr", ["<i4", "|u1", "<c8", "|b1"])
def test_other_unsupported_types(typestr):
    with pytest.raises(TypeError, match="float16"):
        psl.SparseMatmulPlan(row((M, K), typestr), row((K, N), typestr))


def test_a_and_b_must_share_a_dtype():
    with pytest.raises(TypeError, match=r"(?s)float16.*float32|float32.*float16"):
        psl.SparseMatmulPlan(row((M, K), F16), col((K, N), F32))


@pytest.mark.parametrize(
    "typestr, out_dtype",
    [(F16, np.int32), (F16, np.float32), (I8, np.float32), (F32, np.float16), (I8, np.int16)],
    ids=["f16->i32", "f16->f32", "i8->f32", "f32->f16", "i8->i16"],
)
def test_unsupported_output_type_lists_the_combinations(typestr, out_dtype):
    a, b = row((M, K), typestr), col((K, N), typestr)
    with pytest.raises(TypeError, match=r"(?s)int8 -> int32"):
        psl.SparseMatmulPlan(a, b, out_dtype=out_dtype)


def test_c_dtype_must_be_d_dtype():
    a, b, c = row((M, K), I8), col((K, N), I8), row((M, N), "<i4")
    with pytest.raises(TypeError, match=r"(?s)\bc\b.*int32.*int8|\bc\b.*int8.*int32"):
        psl.SparseMatmulPlan(a, b, c, out_dtype=np.int8)


@pytest.mark.parametrize("typestr, compute", [("<f2", "32I"), ("|i1", "16F"), ("|i1", "32F"), ("<f4", "16F")])
def test_invalid_compute_type(typestr, compute):
    a, b = row((M, K), typestr), col((K, N), typestr)
    with pytest.raises(ValueError, match="compute"):
        psl.SparseMatmulPlan(a, b, compute=compute)


# -- host arrays and other objects ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_numpy_arrays_are_refused_with_advice(which):
    arrays = {"a": row((M, K)), "b": row((K, N)), "c": row((M, N))}
    host = {"a": np.zeros((M, K), np.float16), "b": np.zeros((K, N), np.float16), "c": np.zeros((M, N), np.float16)}
    arrays[which] = host[which]
    with pytest.raises(TypeError, match=r"cupy\.asarray|pycusparselt\.reference"):
        psl.SparseMatmulPlan(arrays["a"], arrays["b"], arrays["c"])


class _HostDLPack:
    """A CPU array of another framework (a PyTorch CPU tensor, a JAX CPU array): DLPack on device kDLCPU."""

    def __dlpack__(self, **kwargs):
        raise AssertionError("a host array must be refused before it is read")

    def __dlpack_device__(self):
        return (1, 0)


@pytest.mark.parametrize("which", ["a", "b"])
def test_host_arrays_of_other_frameworks_are_refused_with_advice(which):
    arrays = {"a": row((M, K)), "b": row((K, N))}
    arrays[which] = _HostDLPack()
    with pytest.raises(TypeError, match=rf"{which}: a _HostDLPack \(host\) array was given.*\.cuda\(\)"):
        psl.SparseMatmulPlan(arrays["a"], arrays["b"])


@pytest.mark.parametrize("obj", [[[1.0, 2.0], [3.0, 4.0]], 3.0, None], ids=["list", "float", "None"])
def test_non_arrays_are_refused(obj):
    with pytest.raises(TypeError):
        psl.SparseMatmulPlan(obj, row((K, N)))


# -- sparse side, layouts, alignment -------------------------------------------------------------------


@pytest.mark.parametrize("sparse", ["x", "A", "", None, 0])
def test_sparse_must_be_a_or_b(sparse):
    with pytest.raises(ValueError, match="sparse"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N)), sparse=sparse)


TN_WORDS = r"(?i)column-major|col-major|F-contiguous|\bTN\b"


@pytest.mark.parametrize("typestr", [I8, F32], ids=["int8", "float32"])
@pytest.mark.parametrize("sparse", ["a", "b"])
@pytest.mark.parametrize(
    "a_order, b_order", [("row", "row"), ("col", "col"), ("col", "row")],
    ids=["A_row-B_row", "A_col-B_col", "A_col-B_row"],
)
def test_tn_types_refuse_other_layouts_and_name_the_one_to_pass(typestr, sparse, a_order, b_order):
    """int8, FP8 and float32 need K contiguous in both operands: A C-contiguous, B F-contiguous ("TN").

    float32 with a row-major B never returns from cusparseLtMatmul on 0.8.0, so this check is what keeps
    a GPU run alive: it must happen in Python.
    """
    make = {"row": row, "col": col}
    a, b = make[a_order]((M, K), typestr), make[b_order]((K, N), typestr)
    with pytest.raises(ValueError, match=TN_WORDS):
        psl.SparseMatmulPlan(a, b, sparse=sparse)


def test_misaligned_pointer_is_refused():
    a = row((M, K), ptr=0x7E00_0000_0008)  # 8 bytes past a 256-byte boundary
    with pytest.raises(ValueError, match=r"(?s)\ba\b.*align|align.*\ba\b"):
        psl.SparseMatmulPlan(a, row((K, N)))


def test_misaligned_b_and_c_are_refused():
    with pytest.raises(ValueError, match=r"(?s)\bb\b.*align|align.*\bb\b"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N), ptr=0x7E00_0000_0102))
    with pytest.raises(ValueError, match=r"(?s)\bc\b.*align|align.*\bc\b"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N)), row((M, N), ptr=0x7E00_0000_0104))


def test_non_contiguous_strides_are_refused():
    # every other column of a (M, 2K) float16 matrix: contiguous along neither axis
    a = FakeDeviceArray((M, K), F16, strides=(2 * K * 2, 2 * 2))
    with pytest.raises(ValueError, match=r"(?i)contiguous"):
        psl.SparseMatmulPlan(a, row((K, N)))


def test_strides_must_be_multiples_of_the_element_size():
    a = FakeDeviceArray((M, K), F16, strides=(K * 2, 1))
    with pytest.raises(ValueError, match=r"\ba\b"):
        psl.SparseMatmulPlan(a, row((K, N)))


def test_non_contiguous_c_is_refused():
    c = FakeDeviceArray((M, N), F16, strides=(2 * N * 2, 2 * 2))
    with pytest.raises(ValueError, match=r"(?i)contiguous"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N)), c)


# -- epilogue flags for types that do not have them ----------------------------------------------------


@pytest.mark.parametrize(
    "typestr, out_dtype", [(F16, None), (F32, None), (I8, np.int32), (I8, np.float16)],
    ids=["f16", "f32", "i8->i32", "i8->f16"],
)
def test_gelu_only_for_int8_to_int8(typestr, out_dtype):
    a, b = row((M, K), typestr), col((K, N), typestr)
    with pytest.raises((ValueError, TypeError), match=r"(?i)gelu"):
        psl.SparseMatmulPlan(a, b, activation="gelu", out_dtype=out_dtype)


@pytest.mark.parametrize("typestr", [F16, F32], ids=["f16", "f32"])
def test_alpha_vector_only_for_int8(typestr):
    a, b = row((M, K), typestr), col((K, N), typestr)
    with pytest.raises((ValueError, TypeError), match=r"(?i)alpha"):
        psl.SparseMatmulPlan(a, b, alpha_vector=True)


def test_alpha_vector_with_c_is_refused():
    """The library leaves beta * C out under alpha vector scaling (measured on the H100): refused."""
    with pytest.raises(ValueError, match="ignores C under alpha vector scaling"):
        psl.SparseMatmulPlan(row((M, K), I8), col((K, N), I8), row((M, N), I8), alpha_vector=True)


def test_gelu_with_bias_and_alpha_vector_on_float16_is_refused():
    with pytest.raises((ValueError, TypeError), match=r"(?i)gelu|alpha"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N)), activation="gelu", bias=True, alpha_vector=True)


@pytest.mark.parametrize("activation", ["tanh", "RELU6", 1])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        psl.SparseMatmulPlan(row((M, K)), row((K, N)), activation=activation)


# -- valid arguments pass every check ------------------------------------------------------------------


VALID = {
    "f16-row-row": lambda: (row((M, K)), row((K, N)), None, {}),
    "f16-col-col-sparse_b": lambda: (col((M, K)), col((K, N)), None, {"sparse": "b"}),
    "f16-c-relu-bias": lambda: (row((M, K)), col((K, N)), row((M, N)),
                                {"activation": "relu", "relu_threshold": 0.5, "relu_upper_bound": 6.0, "bias": True}),
    "f16-16F": lambda: (row((M, K)), row((K, N)), None, {"compute": "16F"}),
    "i8-tn-sparse_a": lambda: (row((M, K), I8), col((K, N), I8), None, {}),
    "i8-tn-sparse_b": lambda: (row((M, K), I8), col((K, N), I8), None, {"sparse": "b"}),
    "i8-i8-gelu-alpha_vector": lambda: (row((M, K), I8), col((K, N), I8), None,
                                        {"out_dtype": I8, "activation": "gelu", "gelu_scaling": 2.0,
                                         "alpha_vector": True}),
    "f32-tn": lambda: (row((M, K), F32), col((K, N), F32), None, {}),
    "padded": lambda: (row((33, 70)), row((70, 50)), None, {}),
    "batched": lambda: (row((3, M, K)), row((3, K, N)), row((3, M, N)), {}),
    "batch_of_one_broadcasts": lambda: (row((1, M, K)), row((3, K, N)), None, {}),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_arguments_pass_validation_and_only_then_need_the_gpu(name):
    """Valid arguments get through every Python check; the first thing they need is CuPy (blocked here).

    This pins down which layouts are the TN form for each sparse side (A C-contiguous, B F-contiguous for
    both), and that the refusals above are specific, not blanket.
    """
    a, b, c, kwargs = VALID[name]()
    with pytest.raises(ImportError):
        psl.SparseMatmulPlan(a, b, c, **kwargs)


# -- the fakes themselves ------------------------------------------------------------------------------


def test_the_fixture_blocks_cupy_and_the_library():
    """Guards the guard: with the fixture active, neither CuPy nor the library can be reached."""
    from pycusparselt._native import library as _library

    with pytest.raises(ImportError):
        import cupy  # noqa: F401
    with pytest.raises(AssertionError):
        _library.load()

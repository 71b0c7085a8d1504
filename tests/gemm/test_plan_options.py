"""PlanOptions and the problem a plan works out (pycusparselt.gemm.options, pycusparselt.gemm.problem), on the
CPU: options checked when made, accepted as an object, a dict or keywords; the canonical problem, its padding
and its layout rules worked out from operand descriptions alone."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt.gemm.operands import as_operand
from pycusparselt.gemm.options import PlanOptions, plan_options
from pycusparselt.gemm.problem import Matrix, plan_problem, round_up

_addresses = itertools.count(0x7E00_0000_0000, 0x0100_0000)


class _Fake:
    """A device array as the CUDA Array Interface describes it (nothing behind it is read)."""

    def __init__(self, shape, typestr="<f2", col_major=False):
        item = np.dtype(typestr).itemsize
        strides = (item, shape[0] * item) if col_major else None
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (next(_addresses), False), "strides": strides, "version": 3}


def _problem(a, b, c=None, **options):
    ops = [as_operand(x, name) for x, name in ((a, "a"), (b, "b"))]
    return plan_problem(*ops, None if c is None else as_operand(c, "c"), PlanOptions(**options))


# -- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"sparse": "c"}, ValueError, "sparse: expected 'a' or 'b', got 'c'"),
        ({"activation": "tanh"}, ValueError, "activation: expected None, 'relu' or 'gelu', got 'tanh'"),
        ({"compute": "64F"}, ValueError, "compute: expected"),
        ({"relu_upper_bound": 6.0}, ValueError, "need activation='relu'"),
        ({"gelu_scaling": 2.0, "activation": "relu"}, ValueError, "gelu_scaling needs activation='gelu'"),
        ({"activation": "relu", "relu_threshold": float("nan")}, ValueError, "relu_threshold: expected a number"),
        ({"activation": "relu", "relu_upper_bound": "6"}, TypeError, "relu_upper_bound: expected a number"),
        ({"bias": 1}, TypeError, "bias: expected True or False, got 1"),
        ({"out_dtype": "no such type"}, TypeError, "out_dtype: expected a dtype"),
    ],
)
def test_options_are_checked_when_made(fields, error, match):
    with pytest.raises(error, match=match):
        PlanOptions(**fields)


def test_options_are_frozen_normalised_and_replaced_with_checks():
    opts = PlanOptions(activation="relu", relu_upper_bound=6, out_dtype="float32", bias=np.bool_(True))
    assert opts.relu_upper_bound == 6.0 and type(opts.relu_upper_bound) is float
    assert opts.out_dtype == np.dtype(np.float32) and opts.bias is True
    with pytest.raises(AttributeError):
        opts.sparse = "b"  # type: ignore[misc]
    assert opts.replace(sparse="b").sparse == "b"
    with pytest.raises(ValueError, match="need activation='relu'"):
        opts.replace(activation=None)


def test_options_come_as_an_object_a_dict_or_keywords_and_once():
    want = PlanOptions(sparse="b", activation="relu")
    assert plan_options(want) is want
    assert plan_options({"sparse": "b", "activation": "relu"}) == want
    assert plan_options(None, sparse="b", activation="relu", relu_upper_bound=math.inf) == want
    assert plan_options(None) == PlanOptions()
    with pytest.raises(TypeError, match="unknown key.*'sprase'"):
        plan_options({"sprase": "b"})
    with pytest.raises(TypeError, match=r"options= and keyword options together \(activation\)"):
        plan_options(want, activation="gelu")
    with pytest.raises(TypeError, match="expected a PlanOptions, a dict or None, got list"):
        plan_options([("sparse", "b")])
    with pytest.raises(TypeError, match="unknown plan option"):
        plan_options(None, sprase="b")


def test_the_plan_refuses_options_in_both_places_before_any_device_query(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # reaching a device query fails the test
    a, b = _Fake((64, 128)), _Fake((128, 32))
    with pytest.raises(TypeError, match="options= and keyword options together"):
        psl.SparseMatmulPlan(a, b, options={"activation": "relu"}, sparse="b")
    with pytest.raises(ValueError, match="activation: expected"):
        psl.SparseMatmulPlan(a, b, options={"activation": "swish"})


# -- the problem --------------------------------------------------------------------------------------------


def test_an_aligned_problem_uses_the_callers_memory():
    p = _problem(_Fake((64, 128)), _Fake((128, 32)))
    assert not p.padded and p.dims == (64, 128, 32) and p.shape == (64, 128, 32)
    assert p.mats == (Matrix(64, 128, 128, "row", 1, 0), Matrix(128, 32, 32, "row", 1, 0),
                      Matrix(64, 32, 32, "row", 1, 0))
    assert p.out_dtype == np.dtype(np.float16) and p.d_spec[1] == (64, 32)


def test_sparse_b_is_the_transposed_problem():
    p = _problem(_Fake((16, 256)), _Fake((256, 64), col_major=True), sparse="b")
    assert p.transpose and p.dims == (64, 256, 16)  # Y (N, M) = B.T (N, K) @ A.T (K, M)
    s_mat, x_mat, y_mat = p.mats
    assert (s_mat.order, x_mat.order, y_mat.order) == ("row", "col", "col")


@pytest.mark.parametrize("m", [33, 50, 70])
def test_shapes_off_the_multiples_are_padded_to_them(m):
    p = _problem(_Fake((m, 70)), _Fake((70, 50)))
    sm, dm = p.rules.sparse_multiple, p.rules.dense_multiple
    assert p.padded and p.dims == (m, 70, 50)
    s_mat, x_mat, y_mat = p.mats
    assert (s_mat.rows, s_mat.cols) == (round_up(m, sm), round_up(70, sm))
    assert (x_mat.rows, x_mat.cols, x_mat.order) == (round_up(70, sm), round_up(50, dm), "col")
    assert all(v % mult == 0 for v, mult in ((s_mat.rows, sm), (s_mat.cols, sm), (y_mat.cols, dm)))


def test_int8_needs_the_tn_layout_and_gelu_needs_int8():
    with pytest.raises(ValueError, match="'TN' layout"):
        _problem(_Fake((64, 128), "|i1"), _Fake((128, 32), "|i1"))
    p = _problem(_Fake((64, 128), "|i1"), _Fake((128, 32), "|i1", col_major=True), out_dtype="int8",
                 activation="gelu")
    assert p.out_dtype == np.dtype(np.int8)
    with pytest.raises(ValueError, match="GELU only for int8 inputs with int8 output"):
        _problem(_Fake((64, 128)), _Fake((128, 32)), activation="gelu")


def test_alpha_vectors_need_int8_and_no_c():
    with pytest.raises(ValueError, match="only int8 inputs support alpha vector"):
        _problem(_Fake((64, 128)), _Fake((128, 32)), alpha_vector=True)
    with pytest.raises(ValueError, match="cuSPARSELt ignores C under alpha vector scaling"):
        _problem(_Fake((64, 128), "|i1"), _Fake((128, 32), "|i1", col_major=True),
                 _Fake((64, 32), "<i4"), alpha_vector=True)


def test_a_calls_operands_are_checked_against_the_examples():
    a, b, c = _Fake((64, 128)), _Fake((128, 32)), _Fake((64, 32))
    p = _problem(a, b, c)
    p.check_sparse(as_operand(_Fake((64, 128)), "a"))
    p.check_dense(as_operand(_Fake((128, 32)), "b"))
    p.check_c(as_operand(_Fake((64, 32)), "c"))
    p.check_out(as_operand(_Fake((64, 32)), "out"))
    with pytest.raises(ValueError, match=r"a: shape \(64, 256\).*does not match the plan's sparse operand"):
        p.check_sparse(as_operand(_Fake((64, 256)), "a"))
    with pytest.raises(ValueError, match=r"b: \(128, 32\) float16 col-major .*does not match the plan's b"):
        p.check_dense(as_operand(_Fake((128, 32), col_major=True), "b"))
    with pytest.raises(ValueError, match="out: expected"):
        p.check_out(as_operand(_Fake((64, 32), "<f4"), "out"))
    fake = _Fake((128, 32))
    fake.__cuda_array_interface__["data"] = (fake.__cuda_array_interface__["data"][0] + 8, False)
    with pytest.raises(ValueError, match="b: device pointer 0x[0-9a-f]+ is not 16-byte aligned"):
        p.check_dense(as_operand(fake, "b"))
    with pytest.raises(ValueError, match="c: .* does not match the plan's c None"):
        _problem(a, b).check_c(as_operand(c, "c"))
    with pytest.raises(ValueError, match="beta is non-zero but c is None"):
        p.check_scalars(False, 0.5)
    p.check_scalars(True, 0.5)

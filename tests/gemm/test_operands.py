"""Reading device arrays without copying: layouts from strides, batches, dtypes, refusals (no GPU needed)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt.gemm.operands import COL, ROW, as_operand


class FakeDeviceArray:
    """Just a ``__cuda_array_interface__``: what CuPy, PyTorch or Numba arrays expose."""

    def __init__(self, shape, typestr="<f2", strides=None, ptr=1 << 20):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "data": (ptr, False), "strides": strides, "version": 3,
        }


def test_c_contiguous_is_row_major():
    op = as_operand(FakeDeviceArray((64, 32)), "a")
    assert (op.rows, op.cols, op.order, op.ld, op.batch, op.batch_stride) == (64, 32, ROW, 32, 1, 0)
    assert op.dtype == np.float16 and op.shape == (64, 32)


def test_f_contiguous_is_column_major():
    op = as_operand(FakeDeviceArray((64, 32), strides=(2, 128)), "b")  # bytes: float16
    assert (op.order, op.ld) == (COL, 64)


def test_padded_leading_dimension():
    op = as_operand(FakeDeviceArray((64, 32), strides=(2 * 40, 2)), "a")
    assert (op.order, op.ld) == (ROW, 40)
    op = as_operand(FakeDeviceArray((64, 32), strides=(2, 2 * 72)), "a")
    assert (op.order, op.ld) == (COL, 72)


def test_transposed_view_flips_the_order():
    op = as_operand(FakeDeviceArray((32, 64)), "b").transposed()
    assert (op.rows, op.cols, op.order, op.ld) == (64, 32, COL, 64)


def test_batches_and_broadcast():
    op = as_operand(FakeDeviceArray((3, 16, 8)), "a")
    assert (op.batch, op.batch_stride, op.ndim) == (3, 128, 3)
    op = as_operand(FakeDeviceArray((3, 16, 8), strides=(0, 16, 2)), "a")  # a broadcast view
    assert (op.batch, op.batch_stride) == (3, 0)
    op = as_operand(FakeDeviceArray((1, 16, 8)), "a")
    assert (op.batch, op.batch_stride) == (1, 0)


def test_vectors_and_single_rows():
    assert as_operand(FakeDeviceArray((1, 8)), "a").order == ROW
    assert as_operand(FakeDeviceArray((8, 1)), "a").order == ROW
    # a single row or column can be read in either order; a matrix only in its own
    assert as_operand(FakeDeviceArray((8, 1)), "a").fits(COL) and as_operand(FakeDeviceArray((1, 1)), "a").fits(COL)
    assert not as_operand(FakeDeviceArray((8, 2)), "a").fits(COL)


@pytest.mark.parametrize(
    "shape, strides, words",
    [
        ((64, 32), (4, 4), "contiguous along neither"),  # every second element in both directions
        ((64, 32), (2 * 16, 2), "contiguous along neither"),  # rows overlap
        ((64, 32), (3, 2), "not multiples of the element size"),
        ((2, 16, 8), (2 * 64, 16, 2), "overlaps"),
        ((4,), None, "expected a matrix"),
        ((2, 2, 2, 2), None, "expected a matrix"),
    ],
)
def test_refused_layouts(shape, strides, words):
    with pytest.raises(ValueError, match=words):
        as_operand(FakeDeviceArray(shape, strides=strides), "a")


def test_host_arrays_and_other_objects_are_refused():
    with pytest.raises(TypeError, match=r"NumPy \(host\) array.*cupy.asarray\(a\).*pycusparselt.reference"):
        as_operand(np.zeros((4, 4)), "a")
    with pytest.raises(TypeError, match="expected a device array"):
        as_operand([[1, 2], [3, 4]], "b")


def test_one_byte_storage_read_as_float8():
    op = as_operand(FakeDeviceArray((32, 64), typestr="|u1"), "a", ml_dtypes.float8_e4m3fn)
    assert op.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and op.ld == 64
    with pytest.raises(TypeError, match="only uint8/int8 storage"):
        as_operand(FakeDeviceArray((32, 64)), "a", ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(0, 16), (16, 0), (0, 16, 16), (2, 0, 16), (-1, 16)])
def test_empty_and_negative_shapes_are_refused_by_name(shape):
    with pytest.raises(ValueError, match="b: shape .* has an empty dimension"):
        as_operand(FakeDeviceArray(shape), "b")


@pytest.mark.parametrize("ptr", [0, -4096, 1 << 64])
def test_null_negative_and_oversized_addresses_are_refused(ptr):
    with pytest.raises(ValueError, match="a: device address .* is not a valid pointer"):
        as_operand(FakeDeviceArray((16, 16), ptr=ptr), "a")


@pytest.mark.parametrize("typestr", ["|O", "<U4", "|S2", "<M8[s]"])
def test_non_numeric_element_types_are_refused(typestr):
    with pytest.raises(TypeError, match="a: element type .* cannot be a matrix operand"):
        as_operand(FakeDeviceArray((16, 16), typestr=typestr), "a")

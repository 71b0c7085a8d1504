"""The one place that tells array kinds apart (pycusparselt._arrays), and capture()'s argument checks, on the CPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import _arrays


def test_numpy_arrays_are_host_arrays_with_no_fast_key():
    a = np.zeros((2, 3), np.float16)
    assert _arrays.kind(a) == _arrays.NUMPY
    assert not _arrays.is_device(a)
    assert _arrays.array_key(a) is None
    assert _arrays.to_numpy(a) is a
    assert _arrays.dtype_of(np.zeros(2, ml_dtypes.bfloat16)) == np.dtype(ml_dtypes.bfloat16)


def test_unknown_objects_are_refused_by_name():
    with pytest.raises(TypeError, match="got list"):
        _arrays.kind([1, 2])
    assert not _arrays.is_torch([1, 2])


def test_results_stay_in_their_framework_for_non_torch_templates():
    marker = object()
    assert _arrays.like(marker, np.zeros(1)) is marker
    assert _arrays.as_framework(marker, _arrays.CUPY) is marker


def test_capture_checks_its_arguments_before_running_anything():
    calls = []

    def fn(x):
        calls.append(x)
        return x

    with pytest.raises(ValueError, match="warmup"):
        psl.capture(fn, np.zeros(2), warmup=0)
    with pytest.raises(ValueError, match="at least one"):
        psl.capture(fn)
    with pytest.raises(TypeError, match="all CuPy arrays or all CUDA tensors"):
        psl.capture(fn, np.zeros(2))
    assert not calls


def test_torch_cpu_tensors_are_host_arrays():
    torch = pytest.importorskip("torch")
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert _arrays.kind(t) == _arrays.TORCH and not _arrays.is_device(t)
    assert _arrays.array_key(t) is None
    assert _arrays.dtype_of(t) == np.dtype(ml_dtypes.bfloat16)
    assert _arrays.to_numpy(t).dtype == np.dtype(ml_dtypes.bfloat16)
    assert _arrays.torch_dtype(np.float16) is torch.float16


def test_signature_is_none_for_host_arrays():
    assert _arrays.signature(np.zeros(3)) is None
    assert _arrays.signature([1, 2]) is None


class _HostDLPack:
    """A CPU array of another library: DLPack only (NumPy's own capsule, device kDLCPU)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (1, 0)


class _CudaDLPack:
    """What a GPU array of another library says about its device (nothing else is read on the CPU)."""

    shape = (2,)

    def __dlpack__(self, **kwargs):
        raise AssertionError("not read on the CPU")

    def __dlpack_device__(self):
        return (2, 0)


def test_a_host_dlpack_array_is_a_host_array_and_a_cuda_one_a_device_array():
    host = _HostDLPack(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not _arrays.is_device(host) and _arrays.is_device(_CudaDLPack())
    arr, xp = _arrays.namespace(host)
    assert xp is np and np.shares_memory(arr, host.array)  # viewed, not copied


@pytest.mark.parametrize("value", [np.ones((2, 2), np.float16), [[1.0, 2.0]], (3, 4), 5.0])
def test_host_values_are_numpy_in_namespace(value):
    arr, xp = _arrays.namespace(value)
    assert xp is np and isinstance(arr, np.ndarray)
    np.testing.assert_array_equal(arr, np.asarray(value))
    if isinstance(value, np.ndarray):
        assert arr is value
    assert not _arrays.is_cupy(value)


def test_a_cpu_tensor_is_a_host_array_everywhere():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert not _arrays.is_device(t)
    arr, xp = _arrays.namespace(t)
    assert xp is np and np.shares_memory(arr, t.numpy())
    from pycusparselt.nn import quantization

    q = quantization.quantize(t, 0.5, "int8")  # a host computation, as for NumPy
    assert isinstance(q, np.ndarray) and q.dtype == np.int8
    np.testing.assert_array_equal(q, quantization.quantize(t.numpy(), 0.5, "int8"))


def test_without_cupy_the_gpu_path_says_what_to_install(monkeypatch):
    import sys

    from pycusparselt._native import gpu

    monkeypatch.setitem(sys.modules, "cupy", None)  # as where CuPy is not installed
    with pytest.raises(ImportError, match=r"needs CuPy and a GPU: pip install 'pycusparselt\[cu13\]'"):
        gpu.cupy()

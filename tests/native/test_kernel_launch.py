"""Overlapped launches (programmatic dependent launch through ``cuLaunchKernelEx``) without a GPU: the structs
have cuda.h's layout, the launch hands the driver what it was given, and a failed launch raises (that one needs
the driver, for the error's text). A cffi callback with cuLaunchKernelEx's signature stands in for the driver."""

from __future__ import annotations

import types

import pytest

from pycusparselt._native import kernel_launch
from pycusparselt._native.kernel_launch import FFI

pytest.importorskip("cupy_backends", reason="CuPy is not installed (the launch raises CuPy's CUDADriverError)")


def test_the_structs_have_cuda_h_layout_on_64_bit_platforms():
    # cuda.h: CUlaunchAttribute {CUlaunchAttributeID id; char pad[4]; CUlaunchAttributeValue value (64 bytes)}
    assert FFI.sizeof("CUlaunchAttribute") == 72 and FFI.offsetof("CUlaunchAttribute", "value") == 8
    # CUlaunchConfig: seven unsigned ints, then hStream at 32, attrs at 40, numAttrs at 48
    assert FFI.offsetof("CUlaunchConfig", "hStream") == 32
    assert FFI.offsetof("CUlaunchConfig", "attrs") == 40
    assert FFI.offsetof("CUlaunchConfig", "numAttrs") == 48
    assert FFI.sizeof("CUlaunchConfig") == 56


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9)])
def test_gpus_before_hopper_are_refused_with_the_reason(cc):
    assert "needs SM 9.0" in kernel_launch.unavailable_reason(cc)


def _stand_in(status):
    seen = []

    @FFI.callback("int(const CUlaunchConfig *, uintptr_t, uintptr_t, uintptr_t)")
    def launch(config, function, params, extra):
        c = config[0]
        a = c.attrs[0]
        seen.append({"grid": (c.gridDimX, c.gridDimY, c.gridDimZ), "block": (c.blockDimX, c.blockDimY, c.blockDimZ),
                     "smem": c.sharedMemBytes, "stream": c.hStream, "attrs": c.numAttrs, "id": a.id,
                     "allowed": a.value.programmaticStreamSerializationAllowed, "function": function,
                     "params": params, "extra": extra})
        return status[0]

    return types.SimpleNamespace(cuLaunchKernelEx=launch), seen


def test_a_launch_hands_the_driver_its_configuration_and_the_stream_of_each_call():
    status = [0]
    driver, seen = _stand_in(status)
    launch = kernel_launch.OverlappedLaunch(0xF00, (64, 8, 1), (128, 1, 1), 4096, 0xBA5E, driver=driver)
    launch(0x51)
    launch(0x52)
    want = {"grid": (64, 8, 1), "block": (128, 1, 1), "smem": 4096, "attrs": 1, "id": 6, "allowed": 1,
            "function": 0xF00, "params": 0xBA5E, "extra": 0}
    assert seen == [dict(want, stream=0x51), dict(want, stream=0x52)]


@pytest.mark.gpu  # CuPy's CUDADriverError reads the status's name from the CUDA driver
def test_a_failed_launch_raises_cupys_driver_error_with_the_status():
    from cupy_backends.cuda.api.driver import CUDADriverError

    status = [1]  # CUDA_ERROR_INVALID_VALUE
    driver, seen = _stand_in(status)
    launch = kernel_launch.OverlappedLaunch(1, (1, 1, 1), (32, 1, 1), 0, 2, driver=driver)
    with pytest.raises(CUDADriverError) as info:
        launch(0)
    assert info.value.status == 1 and len(seen) == 1

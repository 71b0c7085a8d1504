"""Device correctness of the object layer: what several GPUs in one process need.

Handles, plans, compressed operands and workspaces belong to the device of the arrays they were made from,
whatever device is current when they are made, called or closed; each device (and thread) has its own
handle; arrays of different devices in one call are refused with a message naming the devices. The tests
that need a second GPU skip, saying so, on a machine with one.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import bindings, reference
from pycusparselt.gemm.handles import Handle, handle_for_device
from pycusparselt.gemm import selections

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

F16 = np.dtype(np.float16)


def _needs_two() -> None:
    have = cp.cuda.runtime.getDeviceCount()
    if have < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {have}")


def _problem(seed: int = 0, m: int = 128, k: int = 256, n: int = 64):
    rng = np.random.default_rng(seed)
    a = reference.prune_2to4(rng.standard_normal((m, k)).astype(F16))
    b = rng.standard_normal((k, n)).astype(F16)
    bias = rng.standard_normal(m).astype(F16)
    return a, b, bias


def _on(device: int, *arrays):
    with cp.cuda.Device(device):
        return [cp.asarray(a) for a in arrays]


# -- one GPU --------------------------------------------------------------------------------------------


def test_plan_made_in_a_device_context_runs_outside_it():
    a_h, b_h, _ = _problem(1)
    with cp.cuda.Device(0):
        a, b = _on(0, a_h, b_h)
        plan = psl.SparseMatmulPlan(a, b)
        compressed = plan.compress(a)
    d = plan.matmul(compressed, b)
    assert plan.device == 0 and d.device.id == 0
    assert compressed._buffer.device.id == 0 and plan._workspace.device.id == 0
    reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h), a=a_h, b=b_h)
    plan.close()


def test_sparse_linear_made_in_a_device_context_runs_outside_it():
    rng = np.random.default_rng(2)
    w, x = rng.standard_normal((64, 128)).astype(F16), rng.standard_normal((8, 128)).astype(F16)
    with cp.cuda.Device(0):
        layer = psl.SparseLinear(cp.asarray(w))
    y = layer(_on(0, x)[0])
    assert y.device.id == 0
    pruned = reference.prune_2to4(w)
    reference.assert_close(cp.asnumpy(y).T, reference.matmul(pruned, x.T), a=pruned, b=x.T)


def test_handles_are_one_per_device_and_thread():
    handle = handle_for_device(0)
    assert handle is handle_for_device(0) and handle.device == 0 and not handle.closed
    other = []
    thread = threading.Thread(target=lambda: other.append(handle_for_device(0)))
    thread.start()
    thread.join()
    assert other[0] is not handle and other[0].device == 0
    a_h, b_h, _ = _problem(3)
    a, b = _on(0, a_h, b_h)
    with psl.SparseMatmulPlan(a, b) as plan:
        assert plan._handle is handle


def test_plan_on_an_explicit_stream():
    a_h, b_h, bias_h = _problem(4)
    a, b, bias = _on(0, a_h, b_h, bias_h)
    stream = cp.cuda.Stream(non_blocking=True)
    with psl.SparseMatmulPlan(a, b, bias=True) as plan:
        compressed = plan.compress(a, stream=stream)
        d = plan.matmul(compressed, b, bias=bias, stream=stream)
        stream.synchronize()
    reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h, bias=bias_h), a=a_h, b=b_h, bias=bias_h)


# -- two GPUs -------------------------------------------------------------------------------------------


def test_plan_on_device_1_while_device_0_is_current():
    _needs_two()
    a_h, b_h, bias_h = _problem(5)
    a1, b1, bias1 = _on(1, a_h, b_h, bias_h)
    assert cp.cuda.Device().id == 0
    plan = psl.SparseMatmulPlan(a1, b1, bias=True)
    compressed = plan.compress(a1)
    d = plan.matmul(compressed, b1, bias=bias1)
    assert plan.device == 1 and plan._handle.device == 1 and plan._handle is handle_for_device(1)
    assert compressed._buffer.device.id == 1 and plan._workspace.device.id == 1 and d.device.id == 1
    assert cp.cuda.Device().id == 0  # the caller's current device is left alone
    reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h, bias=bias_h), a=a_h, b=b_h, bias=bias_h)
    assert handle_for_device(0) is not handle_for_device(1)
    plan.close()


def test_arrays_on_different_devices_in_one_call_are_refused():
    _needs_two()
    a_h, b_h, _ = _problem(6)
    a1, b1 = _on(1, a_h, b_h)
    a0, b0 = _on(0, a_h, b_h)
    with psl.SparseMatmulPlan(a1, b1) as plan:
        compressed = plan.compress(a1)
        with pytest.raises(ValueError, match="device 0.*device 1"):
            plan.matmul(compressed, b0)
        with pytest.raises(ValueError, match="device 0.*device 1"):
            plan.compress(a0)
        with pytest.raises(ValueError, match="device 0.*device 1"):
            plan.matmul(compressed, b1, out=cp.empty((a_h.shape[0], b_h.shape[1]), dtype=F16))
    with pytest.raises(ValueError, match="different devices"):
        psl.SparseMatmulPlan(a0, b1)


def test_a_bias_on_another_device_is_refused():
    _needs_two()
    a_h, b_h, bias_h = _problem(7)
    a1, b1 = _on(1, a_h, b_h)
    (bias0,) = _on(0, bias_h)
    with psl.SparseMatmulPlan(a1, b1, bias=True) as plan:
        compressed = plan.compress(a1)
        with pytest.raises(ValueError, match="device"):
            plan.matmul(compressed, b1, bias=bias0)


def test_the_current_stream_of_the_plans_device_is_used():
    _needs_two()
    a_h, b_h, _ = _problem(8)
    a0, b0 = _on(0, a_h, b_h)
    with psl.SparseMatmulPlan(a0, b0) as plan:
        compressed = plan.compress(a0)
        with cp.cuda.Device(1):
            other = cp.cuda.Stream(non_blocking=True)  # a stream of device 1, current there
            with other:
                d = plan.matmul(compressed, b0)  # must run on device 0's current stream, not on `other`
        cp.cuda.Device(0).synchronize()
    reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h), a=a_h, b=b_h)


def test_closing_destroys_with_the_objects_device_current(monkeypatch):
    _needs_two()
    monkeypatch.setattr(selections, "IDLE_KEPT", 0)  # the closed plan's selection is not kept for another
    seen = []

    def recording(name):
        original = getattr(bindings, name)

        def wrapper(*args, **kwargs):
            seen.append((name, cp.cuda.runtime.getDevice()))
            return original(*args, **kwargs)

        monkeypatch.setattr(bindings, name, wrapper)

    for name in ("matmul_plan_destroy", "matmul_alg_selection_destroy", "mat_descriptor_destroy", "destroy"):
        recording(name)
    a_h, b_h, _ = _problem(9)
    a1, b1 = _on(1, a_h, b_h)
    plan = psl.SparseMatmulPlan(a1, b1)
    handle = Handle(1)
    assert cp.cuda.Device().id == 0
    plan.close()
    handle.close()
    assert {name for name, _ in seen} >= {"matmul_plan_destroy", "matmul_alg_selection_destroy",
                                          "mat_descriptor_destroy", "destroy"}
    assert all(device == 1 for _, device in seen), seen
    assert cp.cuda.Device().id == 0


def test_sparse_linear_on_device_1_while_device_0_is_current():
    _needs_two()
    rng = np.random.default_rng(10)
    w, b = rng.standard_normal((64, 128)).astype(F16), rng.standard_normal(64).astype(F16)
    x = rng.standard_normal((16, 128)).astype(F16)
    w1, b1, x1 = _on(1, w, b, x)
    layer = psl.SparseLinear(w1, b1, activation="relu")
    y = layer(x1)
    assert y.device.id == 1 and cp.cuda.Device().id == 0
    pruned = reference.prune_2to4(w)
    desired = reference.matmul(pruned, x.T, bias=b, activation="relu")
    reference.assert_close(cp.asnumpy(y).T, desired, a=pruned, b=x.T, bias=b, activation="relu")
    with pytest.raises(ValueError, match="device"):
        layer(_on(0, x)[0])


# -- every public object on device 1 while device 0 is current ------------------------------------------


def _assert_on_1(*arrays):
    for a in arrays:
        assert a.device.id == 1
    assert cp.cuda.Device().id == 0  # the caller's current device is left alone


def test_tuning_and_its_timing_kernel_on_device_1():
    _needs_two()
    from pycusparselt.tuning.timing import hold_stream, time_gpu

    a_h, b_h, bias_h = _problem(11)
    a1, b1, bias1 = _on(1, a_h, b_h, bias_h)
    plan = psl.SparseMatmulPlan(a1, b1, bias=True)
    config = plan.autotune(a1, b1, bias=bias1, budget_s=0.5, cache=False)
    assert plan.config == config
    d = plan.matmul(plan.compress(a1), b1, bias=bias1)
    _assert_on_1(d)
    reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h, bias=bias_h), a=a_h, b=b_h, bias=bias_h)
    with cp.cuda.Device(1):
        stream = cp.cuda.Stream(non_blocking=True)
    compressed = plan.compress(a1)
    cp.cuda.runtime.deviceSynchronize()
    with cp.cuda.Device(1):  # the hold kernel on the second GPU, then timing there
        hold_stream(stream, 50)
        timing = time_gpu(lambda i: plan.matmul(compressed, b1, bias=bias1, stream=stream), repeats=3,
                          stream=stream, hold_us=100)
    assert timing.median_ms > 0
    plan.close()


def test_only_the_default_configuration_runs_off_device_0():
    """Off device 0 cuSPARSELt 0.8.0 ran some configurations on the wrong device (tuning.TUNING_OFF_DEVICE_0):
    there the timed tuner keeps the default, reads and writes no cache, and method='search' is refused; on
    device 0 the search and the other configurations are tried."""
    _needs_two()
    from pycusparselt.tuning.cache import TuningCache

    a_h, b_h, _ = _problem(13)
    for device in (0, 1):
        a, b = _on(device, a_h, b_h)
        with psl.SparseMatmulPlan(a, b) as plan, tempfile.TemporaryDirectory() as where:
            cache = TuningCache(where, enabled=True)
            # a budget that leaves room for the other configurations on a GPU shared with other test workers
            # (0.2 s was spent on the default and the search alone there)
            plan.autotune(a, b, budget_s=2.0, cache=cache)
            sources = {c.source for c in plan.tuning_report.candidates}
            if device:
                assert sources == {"default"} and plan.config == plan.default_config
                assert not os.listdir(where)
                with pytest.raises(ValueError, match="method='search' on device 1.*CUDA_VISIBLE_DEVICES"):
                    plan.autotune(a, b, method="search")
            else:
                assert {"default", "search", "alg"} <= sources and os.listdir(where)
                plan.autotune(a, b, method="search")
            d = plan.matmul(plan.compress(a), b)
            assert d.device.id == device and cp.cuda.Device().id == 0
            reference.assert_close(cp.asnumpy(d), reference.matmul(a_h, b_h), a=a_h, b=b_h)


@pytest.mark.parametrize("mode", ["fp16", "int8", "fp8"])
def test_sparse_linear_modes_on_device_1(mode):
    _needs_two()
    rng = np.random.default_rng(12)
    w, b = rng.standard_normal((64, 128)).astype(F16), rng.standard_normal(64).astype(F16)
    x = rng.standard_normal((16, 128)).astype(F16)
    w1, b1, x1 = _on(1, w, b, x)
    layer = psl.SparseLinear(w1, b1, mode=mode, activation="relu", autotune={"budget_s": 0.3, "cache": False})
    cpu = psl.SparseLinear(w, b, mode=mode, activation="relu")
    if mode != "fp16":
        layer.calibrate([x1])
        cpu.calibrate([x])
    out = _on(1, np.zeros((16, 64), F16))[0]
    for y in (layer(x1), layer(x1), layer(x1, out=out)):  # the first call, the prepared call, into `out`
        _assert_on_1(y)
        got, want = cp.asnumpy(y).astype(np.float32), cpu(x).astype(np.float32)
        if mode == "fp16":
            pruned = reference.prune_2to4(w)
            reference.assert_close(cp.asnumpy(y).T, reference.matmul(pruned, x.T, bias=b, activation="relu"),
                                   a=pruned, b=x.T, bias=b, activation="relu")
        else:  # the NumPy twin of the same quantized layer: a few units of rounding apart
            scale = float(np.abs(want).max())
            assert np.abs(got - want).max() <= 0.05 * scale


def test_bound_calls_graphs_and_the_one_shot_cache_on_device_1():
    _needs_two()
    a_h, b_h, bias_h = _problem(13)
    a1, b1, bias1 = _on(1, a_h, b_h, bias_h)
    want = reference.matmul(a_h, b_h, bias=bias_h)
    plan = psl.SparseMatmulPlan(a1, b1, bias=True)
    compressed = plan.compress(a1)
    _assert_on_1(compressed._buffer)
    bound = plan.bind(compressed, b1, bias=bias1)
    d = bound()
    _assert_on_1(d)
    reference.assert_close(cp.asnumpy(d), want, a=a_h, b=b_h, bias=bias_h)
    layer = psl.SparseLinear(*_on(1, a_h, bias_h), prune=None, autotune=False)
    x1 = _on(1, np.ascontiguousarray(b_h.T))[0]
    eager = layer(x1)
    graph = psl.capture(layer, x1)
    replay = graph(x1)
    _assert_on_1(eager, replay)
    assert cp.array_equal(eager, replay)
    graph.close()
    y = psl.matmul(a1, b1)  # the one-shot path and its plan cache
    _assert_on_1(y)
    reference.assert_close(cp.asnumpy(y), reference.matmul(a_h, b_h), a=a_h, b=b_h)
    plan.close()

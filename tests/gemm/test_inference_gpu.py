"""The inference path on the GPU: a layer's prepared calls, small batches, one compressed weight, results in the
caller's framework, and whole networks captured in CUDA graphs (CuPy's and PyTorch's)."""

from __future__ import annotations

import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import SparseLinear, reference
from pycusparselt.nn.linear import calibrate_chain

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")


def _layer_pair(rng, out_f, in_f, dtype=np.float16, **kw):
    """A device layer and its CPU twin on the same weights."""
    w = rng.standard_normal((out_f, in_f)).astype(dtype)
    b = rng.standard_normal(out_f).astype(dtype)
    gpu = SparseLinear(cp.asarray(w), cp.asarray(b), autotune=False, **kw)
    cpu = SparseLinear(w, b, **kw)
    return gpu, cpu


def _close_to_twin(y_gpu, cpu, x_host, layer):
    y_cpu = cpu(x_host)
    w = cp.asnumpy(layer.weight)
    reference.assert_close(np.asarray(y_gpu).T, y_cpu.T, a=w, b=x_host.T, bias=cpu._bias_host,
                           activation=layer.activation)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])
def test_small_and_odd_batches_match_the_reference_and_share_plans(rows):
    rng = np.random.default_rng(rows)
    gpu, cpu = _layer_pair(rng, 256, 512, activation="relu")
    x = rng.standard_normal((rows, 512)).astype(np.float16)
    y = gpu(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.shape == (rows, 256) and y.flags.c_contiguous
    _close_to_twin(cp.asnumpy(y), cpu, x, gpu)
    # a vector is a batch of one
    v = gpu(cp.asarray(x[0]))
    assert v.shape == (256,)
    np.testing.assert_array_equal(cp.asnumpy(v), cp.asnumpy(y[0]))
    # batches of 1 to 16 rows run on one plan of 16 rows: one tuned shape
    for other in (1, 5, 16):
        gpu(cp.asarray(rng.standard_normal((other, 512)).astype(np.float16)))
    shapes = gpu.plan_shapes
    assert (16, 512) in shapes and all(s[0] >= 16 for s in shapes) and len(shapes) <= 2


def test_a_seen_input_is_not_checked_or_allocated_again():
    rng = np.random.default_rng(1)
    gpu, cpu = _layer_pair(rng, 256, 512, activation="relu")
    for rows in (1, 64):  # padded (copied into the staging buffer) and direct
        x = cp.asarray(rng.standard_normal((rows, 512)).astype(np.float16))
        out = cp.empty((rows, 256), cp.float16)
        assert gpu(x, out=out) is out
        pool = cp.get_default_memory_pool()
        cp.cuda.Device().synchronize()
        used, total = pool.used_bytes(), pool.total_bytes()
        for _ in range(50):
            gpu(x, out=out)
        cp.cuda.Device().synchronize()
        if rows == 64:  # the direct path writes `out` itself: nothing allocated, not even from the pool
            assert (pool.used_bytes(), pool.total_bytes()) == (used, total)
        else:
            assert pool.total_bytes() == total  # the padded path reuses its own scratch buffer
        _close_to_twin(cp.asnumpy(out), cpu, cp.asnumpy(x), gpu)
        # the data is read at run time: new values at the same address give the new product
        x[...] = cp.asarray(rng.standard_normal((rows, 512)).astype(np.float16))
        _close_to_twin(cp.asnumpy(gpu(x)), cpu, cp.asnumpy(x), gpu)


def test_out_of_the_wrong_shape_is_refused_on_the_prepared_path():
    rng = np.random.default_rng(2)
    gpu, _ = _layer_pair(rng, 256, 512)
    x = cp.asarray(rng.standard_normal((64, 512)).astype(np.float16))
    gpu(x)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        gpu(x, out=cp.empty((64, 255), cp.float16))
    with pytest.raises(ValueError, match="out"):
        gpu(x, out=cp.empty((64, 256), cp.float32))


@pytest.mark.parametrize("rows", [3, 64])
def test_strided_inputs_and_out_give_the_contiguous_product(rows):
    """A strided input is staged by a copy kernel, a contiguous one by one cudaMemcpyAsync (3 rows: padded to
    16) or not at all (64); a padded batch's `out` receives its rows by one copy: all give the same product."""
    rng = np.random.default_rng(6)
    gpu, cpu = _layer_pair(rng, 256, 512, activation="relu")
    wide = cp.asarray(rng.standard_normal((rows, 1024)).astype(np.float16))
    strided = wide[:, 256:768]
    contiguous = cp.ascontiguousarray(strided)
    want = cp.asnumpy(gpu(contiguous))
    _close_to_twin(want, cpu, cp.asnumpy(contiguous), gpu)
    out = cp.full((rows, 256), np.nan, cp.float16)
    assert gpu(strided, out=out) is out
    np.testing.assert_array_equal(cp.asnumpy(out), want)
    np.testing.assert_array_equal(cp.asnumpy(gpu(strided)), want)
    out[...] = np.nan
    assert gpu(contiguous, out=out) is out
    np.testing.assert_array_equal(cp.asnumpy(out), want)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        gpu(contiguous, out=cp.empty((rows, 512), cp.float16)[:, :256])


def test_one_byte_results_land_in_out_at_small_batches():
    """An int8-output layer at a padded batch: `out` (int8, or uint8 bytes) receives what the call returns."""
    rng = np.random.default_rng(8)
    w = cp.asarray(rng.standard_normal((256, 512)).astype(np.float32))
    layer = SparseLinear(w, input_scale=0.05, mode="int8", out_dtype=np.int8, output_scale=0.1, autotune=False)
    x = cp.asarray(rng.standard_normal((5, 512)).astype(np.float16))
    want = cp.asnumpy(layer(x))
    assert want.dtype == np.int8 and np.abs(want.astype(int)).max() > 0
    for dtype in (cp.int8, cp.uint8):
        out = cp.zeros((5, 256), dtype)
        assert layer(x, out=out) is out
        np.testing.assert_array_equal(cp.asnumpy(out).view(np.int8), want)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        layer(x, out=cp.zeros((5, 256), cp.float16))


def test_small_batches_share_one_compressed_weight_and_other_shapes_have_their_own():
    """Inputs of 1-16 rows run on one plan and one compressed weight; each other batch size has its own plan and
    compressed weight (sharing one across dense shapes ended long runs with an illegal instruction)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1024, 512)).astype(np.float16)
    layer = SparseLinear(cp.asarray(w), autotune=False)
    outs = {}
    for rows in (1, 16):
        x = rng.standard_normal((rows, 512)).astype(np.float16)
        outs[rows] = (x, cp.asnumpy(layer(cp.asarray(x))))
    one = layer.compressed_nbytes
    assert 0 < one <= 0.5625 * w.nbytes + (64 << 10)  # one copy (and its read-past slack) for 1 and 16 rows
    for rows in (64, 384):
        x = rng.standard_normal((rows, 512)).astype(np.float16)
        outs[rows] = (x, cp.asnumpy(layer(cp.asarray(x))))
    assert layer.plan_shapes == [(16, 512), (64, 512), (384, 512)]
    assert layer.compressed_nbytes == 3 * one
    fresh = SparseLinear(cp.asarray(w), autotune=False)
    for x, y in outs.values():
        fresh.close()
        np.testing.assert_array_equal(y, cp.asnumpy(fresh(cp.asarray(x))))


def test_a_compressed_operand_is_refused_by_plans_of_another_dense_shape_or_configuration():
    rng = np.random.default_rng(4)
    w = cp.asarray(reference.prune_2to4(rng.standard_normal((256, 512)).astype(np.float16)))
    x0 = cp.asarray(rng.standard_normal((64, 512)).astype(np.float16))
    x1 = cp.asarray(rng.standard_normal((128, 512)).astype(np.float16))
    with psl.SparseMatmulPlan(x0, w.T, sparse="b") as first, psl.SparseMatmulPlan(x1, w.T, sparse="b") as other:
        compressed = first.compress(w.T)
        with pytest.raises(ValueError, match="another dense operand or output shape; compress the sparse"):
            other.matmul(x1, compressed)
        with pytest.raises(ValueError, match="another dense operand or output shape"):
            other.launcher(compressed)
        launch = first.launcher(compressed)
        first.config = 1  # another configuration: the launcher refuses the old compressed form
        with pytest.raises(ValueError, match="compress the sparse operand again"):
            launch(x0.data.ptr, cp.empty((64, 256), cp.float16).data.ptr, 0)


# -- PyTorch in, PyTorch out ------------------------------------------------------------------------------


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no GPU")
    return torch


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_tensors_in_torch_tensors_out(torch, dtype):
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(5)
    w = torch.randn(256, 512, device="cuda", dtype=tdt)
    b = torch.randn(256, device="cuda", dtype=tdt)
    layer = SparseLinear(w, b, activation="relu", autotune=False)
    for rows in (3, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=tdt)
        y = layer(x)
        assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.device == x.device and y.shape == (rows, 256)
        want = torch.relu(torch.nn.functional.linear(x.float(), torch.from_dlpack(layer.weight).float(), b.float()))
        assert float((y.float() - want).abs().max()) <= 0.02 * float(want.abs().max()) + 1e-2
        # the same tensor again takes the prepared path, on PyTorch's stream
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y2 = layer(x)
        s.synchronize()
        assert torch.equal(y2, y)
        out = torch.empty(rows, 256, device="cuda", dtype=tdt)  # padded (3 rows) and direct (64)
        assert layer(x, out=out) is out
        assert torch.equal(out, y)
    # the plan, the one-shot product and pruning answer in PyTorch too
    x = torch.randn(64, 512, device="cuda", dtype=tdt)
    wt = torch.from_dlpack(layer.weight).t()
    with psl.SparseMatmulPlan(x, wt, sparse="b") as plan:
        comp = plan.compress(wt)
        d = plan.matmul(x, comp)
        assert isinstance(d, torch.Tensor) and d.dtype == tdt
        bound = plan.bind(x, comp)
        assert isinstance(bound(), torch.Tensor)
        pruned = plan.prune(torch.randn(256, 512, device="cuda", dtype=tdt).t())
        assert isinstance(pruned, torch.Tensor) and pruned.dtype == tdt
    one = psl.matmul(x, wt, sparse="b")
    assert isinstance(one, torch.Tensor) and torch.equal(one, d)
    del rng


def test_fp8_and_int8_layers_answer_in_torch(torch):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    x = torch.randn(32, 512, device="cuda", dtype=torch.float16)
    for kw in ({"mode": "int8", "out_dtype": np.int8, "output_scale": 0.1}, {"mode": "fp8"}, {"mode": "int8"}):
        layer = SparseLinear(cp.asarray(w), input_scale=0.05, autotune=False, **kw)
        y = layer(x)
        want = cp.asnumpy(layer(cp.asarray(x.cpu().numpy())))
        assert isinstance(y, torch.Tensor)
        np.testing.assert_array_equal(y.cpu().numpy(), want)


# -- whole-network capture -----------------------------------------------------------------------------


def _ffn(layers):
    def run(x):
        for layer in layers:
            x = layer(x)
        return x
    run.layers = layers
    return run


def _fp16_stack(rng, n=4):
    layers = []
    for i in range(n):
        shape = (512, 256) if i % 2 == 0 else (256, 512)
        w = rng.standard_normal(shape).astype(np.float16) / 16
        b = rng.standard_normal(shape[0]).astype(np.float16)
        layers.append(SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu" if i % 2 == 0 else None,
                                   autotune=False))
    return layers


@pytest.mark.parametrize("rows", [1, 48])
def test_captured_fp16_stack_equals_eager_bit_for_bit(rows):
    rng = np.random.default_rng(7)
    fn = _ffn(_fp16_stack(rng))
    xs = [cp.asarray(rng.standard_normal((rows, 256)).astype(np.float16)) for _ in range(3)]
    graph = psl.capture(fn, xs[0])
    for x in xs:
        eager = cp.asnumpy(fn(x))
        stepwise = x
        for layer in fn.layers:  # each layer on a fresh copy of its input
            stepwise = layer(stepwise.copy())
        np.testing.assert_array_equal(eager, cp.asnumpy(stepwise))
        replay = cp.asnumpy(graph(x))
        np.testing.assert_array_equal(replay, eager)
    graph.close()
    with pytest.raises(psl.ClosedError):
        graph.replay()


def test_captured_int8_and_fp8_chains_equal_eager():
    rng = np.random.default_rng(8)
    w1, b1 = rng.standard_normal((512, 256)).astype(np.float32), rng.standard_normal(512).astype(np.float32)
    w2, b2 = rng.standard_normal((256, 512)).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    batches = [cp.asarray(rng.standard_normal((64, 256)).astype(np.float16)) for _ in range(3)]
    int8 = [SparseLinear(cp.asarray(w1), cp.asarray(b1), mode="int8", activation="relu", out_dtype=np.int8,
                         autotune=False),
            SparseLinear(cp.asarray(w2), cp.asarray(b2), mode="int8", autotune=False)]
    calibrate_chain(int8, batches)
    fp8 = [SparseLinear(cp.asarray(w1), cp.asarray(b1), mode="fp8", activation="relu", autotune=False),
           SparseLinear(cp.asarray(w2), cp.asarray(b2), mode="fp8", autotune=False)]
    calibrate_chain(fp8, batches)
    for layers in (int8, fp8):
        fn = _ffn(layers)
        graph = psl.capture(fn, batches[0])
        for x in batches:
            np.testing.assert_array_equal(cp.asnumpy(graph(x)), cp.asnumpy(fn(x)))


def test_torch_capture_and_torch_cuda_graph(torch):
    rng = np.random.default_rng(9)
    layers = _fp16_stack(rng)
    fn = _ffn(layers)
    xs = [torch.randn(48, 256, device="cuda", dtype=torch.float16) for _ in range(3)]
    graph = psl.capture(fn, xs[0])
    for x in xs:
        assert torch.equal(graph(x), fn(x))
    # inside the caller's own torch.cuda.graph, after one eager call of that shape
    static = xs[0].clone()
    fn(static)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)
    for x in xs:
        static.copy_(x)
        g.replay()
        assert torch.equal(out, fn(x))


def test_a_new_shape_during_capture_is_refused_clearly():
    rng = np.random.default_rng(10)
    (layer,) = _fp16_stack(rng, 1)
    stream = cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(rng.standard_normal((32, 256)).astype(np.float16))
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="call the layer once with such an input before capturing"):
                layer(x)
        finally:
            stream.end_capture()


@pytest.mark.parametrize("rows,mode", [(1, "fp16"), (64, "fp16"), (3, "int8")])
def test_fresh_addresses_reuse_the_prepared_call(monkeypatch, rows, mode):
    """An eager loop's activations land at new addresses: a call with an array of a known signature at a new
    address is re-aimed (no new route checks) and reads the new address."""
    rng = np.random.default_rng(rows)
    kw = {"activation": "relu"} if mode == "fp16" else {"mode": "int8"}
    gpu, cpu = _layer_pair(rng, 256, 512, **kw)
    if mode == "int8":
        calib = rng.standard_normal((64, 512)).astype(np.float16)
        gpu.calibrate([cp.asarray(calib)])
        cpu.calibrate([calib])
    gpu(cp.asarray(rng.standard_normal((rows, 512)).astype(np.float16)))
    made = []
    real = SparseLinear._make_route
    monkeypatch.setattr(SparseLinear, "_make_route", lambda self, *a: made.append(1) or real(self, *a))
    keep = []  # kept alive so that each array has its own address
    for _ in range(5):
        x_host = rng.standard_normal((rows, 512)).astype(np.float16)
        x = cp.asarray(x_host)
        keep.append(x)
        y = gpu(x)
        if mode == "fp16":
            _close_to_twin(cp.asnumpy(y), cpu, x_host, gpu)
        else:  # the same quantized product as the reference twin, up to one int8 step of rounding
            want = cpu(x_host).astype(np.float32)
            np.testing.assert_allclose(cp.asnumpy(y).astype(np.float32), want,
                                       atol=2 * gpu.input_scale * float(np.abs(gpu.weight_scale).max()) * 512)
    assert made == []
    assert len({int(x.data.ptr) for x in keep}) == 5


def test_setting_tuned_configs_takes_effect_on_prepared_shapes():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((256, 512)).astype(np.float16)
    b = rng.standard_normal(256).astype(np.float16)
    gpu = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu", autotune={"budget_s": 0.2, "cache": False})
    cpu = SparseLinear(w, b, activation="relu")
    x_host = rng.standard_normal((64, 512)).astype(np.float16)
    x = cp.asarray(x_host)
    gpu(x)
    (entry,) = gpu.tuned_configs
    tuned = entry["config"]["alg_id"]
    other = {"alg_id": 0 if tuned != 0 else 1}
    gpu.tuned_configs = [{**entry, "config": other}]
    y = gpu(x)  # the same input: its prepared call was dropped and the shape runs the new configuration
    (plan,) = [p for p in gpu._plans.values() if not p.closed]
    assert plan.config.alg_id == other["alg_id"]
    _close_to_twin(cp.asnumpy(y), cpu, x_host, gpu)


def test_signature_leaves_out_the_address_only():
    from pycusparselt import _arrays

    a, b = cp.zeros((4, 64), cp.float16), cp.zeros((4, 64), cp.float16)
    assert _arrays.array_key(a) != _arrays.array_key(b)
    assert _arrays.signature(a) == _arrays.signature(b)
    assert _arrays.signature(a.T) != _arrays.signature(a)  # strides
    assert _arrays.signature(a.astype(cp.float32)) != _arrays.signature(a)  # dtype
    flat = cp.zeros(4 * 64 + 1, cp.float16)
    assert _arrays.signature(flat[1:].reshape(4, 64)) != _arrays.signature(a)  # 2-byte aligned only

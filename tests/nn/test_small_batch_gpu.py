"""SparseLinear's inputs of 1 to 16 rows on the decode kernel (pycusparselt.nn.small_batch): equal to the
reference for every row count, with staging (strided inputs, a permutation), in PyTorch modules and CUDA
graphs; the timed choice is the faster kernel and is stored in the tuning cache and read back."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import SparseLinear, reference
from pycusparselt.errors import ClosedError
from pycusparselt.gemm.decode import DecodeLauncher
from pycusparselt.gemm.launch import Launcher
from pycusparselt.nn import small_batch
from pycusparselt.nn.layer_plans import device_identity
from pycusparselt.tuning.cache import TuningCache

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")


def _weights(rng, n, k, dtype):
    w = reference.prune_2to4(rng.standard_normal((n, k)).astype(np.float32)).astype(dtype)
    return w, (0.5 * rng.standard_normal(n)).astype(dtype)


@pytest.fixture
def decode_on(monkeypatch, tmp_path):
    monkeypatch.setenv(small_batch.SETTING, "on")
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYCUSPARSELT_TUNING_CACHE", "1")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("epilogue", [dict(), dict(activation="relu", relu_threshold=0.25, relu_upper_bound=1.5)])
def test_every_small_row_count_runs_the_decode_kernel_and_matches_the_reference(decode_on, dtype, epilogue):
    rng = np.random.default_rng(5)
    w, b = _weights(rng, 200, 520, dtype)  # N, K not multiples of the kernel's tiles: its padding
    layer = SparseLinear(cp.asarray(w), cp.asarray(b), autotune=False, **epilogue)
    twin = SparseLinear(w, b, **epilogue)
    for rows in range(1, 17):
        x = rng.standard_normal((rows, 520)).astype(dtype)
        y = layer(cp.asarray(x))
        assert y.shape == (rows, 200) and y.dtype == np.dtype(dtype)
        reference.assert_close(cp.asnumpy(y).T, twin(x).T, a=w, b=x.T, bias=b, **epilogue)
        launch, padded = layer.direct_launcher(rows, cp.cuda.get_current_stream().ptr)
        assert isinstance(launch, DecodeLauncher) and padded == rows and launch.m == rows
    # 17 rows and more: cuSPARSELt (a weight of these sizes through its padded path: no direct launcher)
    assert layer.direct_launcher(17, cp.cuda.get_current_stream().ptr) is None
    x = rng.standard_normal((17, 520)).astype(dtype)
    reference.assert_close(cp.asnumpy(layer(cp.asarray(x))).T, twin(x).T, a=w, b=x.T, bias=b, **epilogue)


def test_strided_inputs_a_vector_out_and_a_permutation_are_staged(decode_on):
    rng = np.random.default_rng(6)
    w, b = _weights(rng, 128, 256, np.float16)
    perm = rng.permutation(256)
    for permutation in (None, perm):
        layer = SparseLinear(cp.asarray(w), cp.asarray(b), permutation=permutation, autotune=False)
        twin = SparseLinear(w, b, permutation=permutation)
        wide = rng.standard_normal((5, 300)).astype(np.float16)
        x = cp.asarray(wide)[:, 10:266]  # rows of stride 300: staged
        xs = np.ascontiguousarray(wide[:, 10:266] if permutation is None else wide[:, 10:266][:, permutation])
        reference.assert_close(cp.asnumpy(layer(x)).T, twin(wide[:, 10:266]).T, a=twin.weight, b=xs.T, bias=b)
        v = rng.standard_normal(256).astype(np.float16)
        out = cp.empty(128, np.float16)
        assert layer(cp.asarray(v)).shape == (128,)
        got = layer(cp.asarray(v[None]), out=out[None])
        assert got.shape == (1, 128)
        vs = v[None] if permutation is None else v[None][:, permutation]
        reference.assert_close(cp.asnumpy(out)[:, None], twin(v[None]).T, a=twin.weight, b=vs.T, bias=b)


def test_graph_capture_replays_the_decode_kernel(decode_on):
    rng = np.random.default_rng(7)
    w, b = _weights(rng, 256, 512, np.float16)
    layer = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu", autotune=False)
    twin = SparseLinear(w, b, activation="relu")
    x = cp.asarray(rng.standard_normal((12, 512)).astype(np.float16))
    out = cp.empty((12, 256), np.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fresh = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu", autotune=False)
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="before capturing"):  # no choice, no packed weight yet
            fresh(x[:2])
        stream.end_capture()  # refused before anything was enqueued: an empty graph
        layer(x[:1])  # one small call outside the capture prepares both buckets (here 12 rows)
        layer.close()  # the packed weight goes, the choices stay
        layer(x[:1])
        stream.begin_capture()
        layer(x, out=out)
        graph = stream.end_capture()
        new = rng.standard_normal((12, 512)).astype(np.float16)
        x[...] = cp.asarray(new)
        out.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
    reference.assert_close(cp.asnumpy(out).T, twin(new).T, a=w, b=new.T, bias=b, activation="relu")


def test_closing_the_layer_closes_its_decode_launchers_and_the_layer_runs_again(decode_on):
    rng = np.random.default_rng(8)
    w, b = _weights(rng, 64, 256, np.float16)
    layer = SparseLinear(cp.asarray(w), cp.asarray(b), autotune=False)
    x = rng.standard_normal((3, 256)).astype(np.float16)
    sp = cp.cuda.get_current_stream().ptr
    launch, _ = layer.direct_launcher(3, sp)
    layer.close()
    y = cp.empty((3, 64), np.float16)
    with pytest.raises(ClosedError):
        launch(cp.asarray(x).data.ptr, y.data.ptr, sp)
    reference.assert_close(cp.asnumpy(layer(cp.asarray(x))).T, SparseLinear(w, b)(x).T, a=w, b=x.T, bias=b)


def test_the_off_setting_and_unsupported_layers_use_cusparselt(monkeypatch):
    monkeypatch.setenv(small_batch.SETTING, "off")
    rng = np.random.default_rng(9)
    w, b = _weights(rng, 64, 256, np.float16)
    sp = cp.cuda.get_current_stream().ptr
    launch, padded = SparseLinear(cp.asarray(w), cp.asarray(b), autotune=False).direct_launcher(3, sp)
    assert isinstance(launch, Launcher) and padded == 16
    monkeypatch.setenv(small_batch.SETTING, "on")
    gelu = SparseLinear(cp.asarray(w), cp.asarray(b), activation="gelu", autotune=False)
    gelu(cp.asarray(rng.standard_normal((3, 256)).astype(np.float16)))
    assert [type(route.launch) for route in gelu._routes.values()] == [Launcher]  # GELU runs after the product
    assert gelu.direct_launcher(3, sp) is None


def test_the_timed_choice_is_the_faster_kernel_and_is_stored_and_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv(small_batch.SETTING, "auto")
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYCUSPARSELT_TUNING_CACHE", "1")
    rng = np.random.default_rng(10)
    n, k = 4096, 4096
    w, b = _weights(rng, n, k, np.float16)
    layer = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu", autotune={"budget_s": 0.2})
    x = rng.standard_normal((2, k)).astype(np.float16)
    y = layer(cp.asarray(x))
    reference.assert_close(cp.asnumpy(y).T, SparseLinear(w, b, activation="relu")(x).T, a=w, b=x.T, bias=b,
                           activation="relu")
    key = small_batch.cache_key(device_identity(0), n, k, np.float16, "relu", True, small_batch.bucket_of(2))
    entry = TuningCache().get(key)
    assert entry is not None and entry["decode_us"] > 0 and entry["cusparselt_us"] > 0
    faster = "decode" if entry["decode_us"] < entry["cusparselt_us"] else "cusparselt"
    assert entry["backend"] == faster
    sp = cp.cuda.get_current_stream().ptr
    launch, padded = layer.direct_launcher(2, sp)
    assert isinstance(launch, DecodeLauncher if faster == "decode" else Launcher)
    # a new layer of the same problem takes the stored choice without timing: an entry edited to the other
    # kernel is what it runs
    other = "cusparselt" if faster == "decode" else "decode"
    TuningCache().put(key, dict(entry, backend=other, splits=None if other == "cusparselt" else 4))
    fresh = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu", autotune={"budget_s": 0.2})
    launch, _ = fresh.direct_launcher(2, sp)
    assert isinstance(launch, DecodeLauncher if other == "decode" else Launcher)
    y2 = fresh(cp.asarray(x))
    reference.assert_close(cp.asnumpy(y2).T, SparseLinear(w, b, activation="relu")(x).T, a=w, b=x.T, bias=b,
                           activation="relu")


def test_pytorch_modules_run_small_batches_on_the_decode_kernel_without_a_stage(decode_on):
    torch = pytest.importorskip("torch")
    import pycusparselt.torch as pst

    torch.manual_seed(4)
    dense = torch.nn.Linear(256, 512).cuda().half()
    pst.prune_trained_model(torch.nn.Sequential(dense), permute=False)
    layer = pst.SparseLinear.from_dense(dense.weight, dense.bias, mode="fp16", prune=None, autotune=False)
    with torch.no_grad():
        for rows in (1, 5, 16, 1):
            for _ in range(3):  # the first call prepares, the others launch directly at new addresses
                x = torch.randn(rows, 256, device="cuda", dtype=torch.half)
                got = layer(x)
                want = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
                assert got.shape == (rows, 512)
                assert torch.allclose(got.float(), want, rtol=2e-3, atol=2e-2), rows
    assert layer.prepared_shapes == [(1, 256), (5, 256), (16, 256)]
    assert layer.stage_nbytes == 0  # no stage: the rows as given

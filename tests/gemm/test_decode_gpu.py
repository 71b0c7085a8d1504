"""GPU tests of the decode kernel (pycusparselt.gemm.decode) against the NumPy oracle: every M in 1..16, odd N
and K (padding), each epilogue, FP16 and BF16, strided inputs and outputs, every split of K, PyTorch tensors,
CUDA graph capture. Outputs are poisoned with NaN first, so an unwritten element fails."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import reference
from pycusparselt.gemm import decode

pytestmark = pytest.mark.gpu

F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
EPILOGUES = [
    dict(),
    dict(bias=True),
    dict(bias=True, activation="relu"),
    dict(activation="relu", relu_threshold=0.25, relu_upper_bound=1.5),
    dict(bias=True, activation="gelu"),
    dict(activation="gelu", gelu_scaling=0.5, alpha=2.0),
]


def _cp():
    import cupy

    return cupy


def _case(rng, m, n, k, dtype):
    w = rng.standard_normal((n, k)).astype(np.float32)
    w = reference.prune_2to4(np.pad(w, ((0, 0), (0, -k % 4))), axis=-1)[:, :k].astype(dtype)
    x = rng.standard_normal((m, k)).astype(dtype)
    b = (0.5 * rng.standard_normal(n)).astype(dtype)
    return w, x, b


def _check(y_host, w, x, b, ep):
    kw = {key: v for key, v in ep.items() if key != "bias"}
    bias = b if ep.get("bias") else None
    want = reference.matmul(w, x.T, bias=bias, **kw)
    reference.assert_close(y_host.T, want, a=w, b=x.T, bias=bias, **kw)


def _run_torch(w, x, b, ep, *, x_stride=None, splits=None, compact=False):
    import torch

    from pycusparselt._arrays import host_tensor

    dev = "cuda"
    wt = host_tensor(w).to(dev)
    bt = host_tensor(b).to(dev) if ep.get("bias") else None
    kw = {key: v for key, v in ep.items() if key != "bias"}
    if compact:  # the weight read in the module's compact form, where it is
        from pycusparselt.torch import compact as compact_form

        gemm = decode.DecodeGemm.from_compact(*compact_form.pack(wt), bt, splits=splits, **kw)
        assert gemm.layout == "compact" and gemm.nbytes == w.size + w.size // 8
    else:
        gemm = decode.DecodeGemm(wt, bt, splits=splits, **kw)
    m, k = x.shape
    if x_stride is None:
        xt = host_tensor(x).to(dev)
    else:
        big = torch.zeros((m, x_stride), dtype=wt.dtype, device=dev)
        big[:, :k] = host_tensor(x).to(dev)
        xt = big[:, :k]
    out = torch.full((m, w.shape[0]), float("nan"), dtype=wt.dtype, device=dev)
    y = gemm(xt, out)
    assert y is out
    torch.cuda.synchronize()
    from pycusparselt._arrays import to_numpy

    return to_numpy(out), gemm


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("m", range(1, 17))
def test_every_m_matches_the_reference(dtype, m):
    rng = np.random.default_rng(100 * m + (dtype == BF16))
    n, k = (203, 601) if m % 2 else (256, 1024)  # odd N and K pad; even ones take the 16-byte path
    ep = EPILOGUES[m % len(EPILOGUES)]
    w, x, b = _case(rng, m, n, k, dtype)
    y, _ = _run_torch(w, x, b, ep)
    _check(y, w, x, b, ep)


@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: "-".join(f"{a}" for a in e) or "plain")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_each_epilogue(ep, dtype):
    rng = np.random.default_rng(7)
    w, x, b = _case(rng, 12, 130, 520, dtype)
    y, _ = _run_torch(w, x, b, ep)
    _check(y, w, x, b, ep)


@pytest.mark.parametrize("x_stride", [1040, 1037, 1031])
def test_strided_x(x_stride):
    rng = np.random.default_rng(x_stride)
    w, x, b = _case(rng, 9, 96, 1030, F16)
    y, _ = _run_torch(w, x, b, {"bias": True}, x_stride=x_stride)
    _check(y, w, x, b, {"bias": True})


def test_every_split_gives_the_same_bits():
    rng = np.random.default_rng(3)
    w, x, b = _case(rng, 16, 200, 2000, F16)  # 8 blocks of 256 columns
    for splits in range(1, 9):
        y, gemm = _run_torch(w, x, b, {"bias": True}, splits=splits)
        _check(y, w, x, b, {"bias": True})
        # run again: the tickets reset themselves and the sum's order is fixed
        y2, _ = _run_torch(w, x, b, {"bias": True}, splits=splits)
        assert np.array_equal(y.view(np.uint16), y2.view(np.uint16)), splits


def test_cupy_arrays_strided_out_and_a_vector():
    cp = _cp()
    rng = np.random.default_rng(5)
    w, x, b = _case(rng, 3, 64, 512, F16)
    gemm = decode.DecodeGemm(cp.asarray(w), cp.asarray(b))
    out = cp.full((3, 80), cp.nan, dtype=cp.float16)
    gemm(cp.asarray(x), out[:, :64])
    _check(cp.asnumpy(out[:, :64]), w, x, b, {"bias": True})
    assert cp.isnan(out[:, 64:]).all()  # nothing written past N
    v = gemm(cp.asarray(x[1]))
    _check(cp.asnumpy(v)[None], w, x[1:2], b, {"bias": True})


def test_cuda_graph_capture_replays_the_product():
    cp = _cp()
    rng = np.random.default_rng(11)
    w, x, b = _case(rng, 4, 512, 4096, F16)
    gemm = decode.DecodeGemm(cp.asarray(w), cp.asarray(b), activation="relu", splits=4)
    xd = cp.asarray(x)
    out = cp.empty((4, 512), cp.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()  # the operands were written on the default stream, which this one ignores
    with stream:
        gemm(xd, out)  # outside the capture first
        stream.begin_capture()
        gemm(xd, out)
        graph = stream.end_capture()
    stream.synchronize()
    out.fill(cp.nan)
    x2 = rng.standard_normal(x.shape).astype(F16)
    xd.set(x2)
    cp.cuda.Device().synchronize()  # the new input and the NaNs in place before the replay reads them
    graph.launch(stream)
    stream.synchronize()
    _check(cp.asnumpy(out), w, x2, b, {"bias": True, "activation": "relu"})


def test_bad_inputs_are_refused_before_launching():
    cp = _cp()
    w = reference.prune_2to4(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16))
    gemm = decode.DecodeGemm(cp.asarray(w))
    with pytest.raises(ValueError, match="1..16 rows"):
        gemm(cp.zeros((17, 64), cp.float16))
    with pytest.raises(ValueError, match="64 columns"):
        gemm(cp.zeros((2, 65), cp.float16))
    with pytest.raises(TypeError, match="float16"):
        gemm(cp.zeros((2, 64), cp.float32))
    with pytest.raises(ValueError, match="unit stride"):
        gemm(cp.zeros((64, 2), cp.float16).T)
    with pytest.raises(ValueError, match="not 2:4"):
        decode.DecodeGemm(cp.ones((16, 16), cp.float16))
    with pytest.raises(ValueError, match="activation"):
        decode.DecodeGemm(cp.asarray(w), activation="silu")
    assert decode.available() and not math.isnan(0.0)


# The compact form (DecodeGemm.from_compact): K a multiple of 256, any N.

@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("m", range(1, 17))
def test_compact_every_m_matches_the_reference(dtype, m):
    rng = np.random.default_rng(300 * m + (dtype == BF16))
    n, k = (203, 768) if m % 2 else (256, 1024)
    ep = EPILOGUES[m % len(EPILOGUES)]
    w, x, b = _case(rng, m, n, k, dtype)
    y, _ = _run_torch(w, x, b, ep, compact=True)
    _check(y, w, x, b, ep)


@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: "-".join(f"{a}" for a in e) or "plain")
def test_compact_each_epilogue_and_strided_x(ep):
    rng = np.random.default_rng(17)
    w, x, b = _case(rng, 12, 130, 512, BF16)
    y, _ = _run_torch(w, x, b, ep, compact=True, x_stride=517)
    _check(y, w, x, b, ep)


def test_compact_every_split_is_exact_and_gives_the_same_bits_again():
    rng = np.random.default_rng(4)
    w, x, b = _case(rng, 16, 200, 2048, F16)  # 8 blocks of 256 columns
    for splits in (1, 3, 8):
        y, _ = _run_torch(w, x, b, {"bias": True}, splits=splits, compact=True)
        _check(y, w, x, b, {"bias": True})
        y2, _ = _run_torch(w, x, b, {"bias": True}, splits=splits, compact=True)
        assert np.array_equal(y.view(np.uint16), y2.view(np.uint16)), splits


def test_compact_refuses_what_it_cannot_read():
    import torch

    from pycusparselt.torch import compact as compact_form

    w = torch.from_numpy(reference.prune_2to4(np.random.default_rng(0).standard_normal((32, 512))
                                              .astype(np.float16))).cuda()
    values, indices = compact_form.pack(w)
    with pytest.raises(ValueError, match="multiple of 256"):
        decode.DecodeGemm.from_compact(values[:, :64].contiguous(), indices[:, :16].contiguous())
    with pytest.raises(ValueError, match="indices: expected shape"):
        decode.DecodeGemm.from_compact(values, indices[:16])
    with pytest.raises(TypeError, match="uint8"):
        decode.DecodeGemm.from_compact(values, indices.view(torch.int8))
    with pytest.raises(ValueError, match="C-contiguous"):
        decode.DecodeGemm.from_compact(values.t().contiguous().t(), indices)
    with pytest.raises(TypeError, match="CUDA tensor"):
        decode.DecodeGemm.from_compact(values.cpu(), indices.cpu())
    gemm = decode.DecodeGemm.from_compact(values, indices)
    launch = gemm.launcher(1)
    gemm.close()
    from pycusparselt.errors import ClosedError

    with pytest.raises(ClosedError):
        launch(0, 0, 0)

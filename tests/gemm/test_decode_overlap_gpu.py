"""GPU tests of the decode kernel's overlapped launches (programmatic dependent launch): a chain of calls, each
reading the output of the one before and some sharing a split-K workspace, gives the bits of plain launches,
eagerly and replayed from a CUDA graph; a weight rewritten by the kernel just before a call is read as
rewritten; the setting and the argument choose the launch."""

from __future__ import annotations

import numpy as np
import pytest

from pycusparselt import reference
from pycusparselt.gemm import decode

pytestmark = pytest.mark.gpu

OVERLAP_REASON = decode.overlap_unavailable_reason() if decode.available() else "no GPU for the decode kernel"
needs_overlap = pytest.mark.skipif(OVERLAP_REASON is not None, reason=f"overlapped launches: {OVERLAP_REASON}")


def _weight(rng, n, k):
    w = reference.prune_2to4(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5)
    return w.astype(np.float16)


def _chain(overlap: bool, seed: int = 1):
    """Layers 512 -> 1024 -> 512 -> 512 -> 1024 -> 512, the third called twice in a row (one workspace, two
    launches back to back), split K on most; ReLU, GELU and bias epilogues."""
    import cupy as cp

    rng = np.random.default_rng(seed)
    shapes = [(1024, 512, dict(activation="relu"), 2), (512, 1024, dict(), 4), (512, 512, dict(activation="gelu"), 2),
              (1024, 512, dict(), 1), (512, 1024, dict(activation="relu"), 3)]
    gemms = []
    for n, k, ep, splits in shapes:
        b = cp.asarray((0.1 * rng.standard_normal(n)).astype(np.float16))
        gemms.append(decode.DecodeGemm(cp.asarray(_weight(rng, n, k)), b, splits=splits, overlap=overlap, **ep))
    order = [0, 1, 2, 2, 3, 4]
    return gemms, order


def _run_chain(gemms, order, x, outs):
    t = x
    for i, g in zip(order, outs, strict=True):
        gemms[i](t, g)
        t = g
    return t


@needs_overlap
@pytest.mark.parametrize("m", [1, 5, 16])
def test_a_chain_of_overlapped_calls_gives_the_bits_of_plain_launches_eager_and_replayed(m):
    import cupy as cp

    rng = np.random.default_rng(m)
    x = cp.asarray(rng.standard_normal((m, 512)).astype(np.float16))
    results = {}
    for overlap in (False, True):
        gemms, order = _chain(overlap)
        assert all(g.overlap is overlap for g in gemms)
        outs = [cp.empty((m, gemms[i].out_features), cp.float16) for i in order]
        stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()
        with stream:
            eager = []
            for _ in range(20):  # back to back: each call's launch may overlap the one before
                eager.append(_run_chain(gemms, order, x, outs).copy())
            stream.begin_capture()
            _run_chain(gemms, order, x, outs)
            graph = stream.end_capture()
            replayed = []
            for _ in range(20):
                for o in outs:
                    o.fill(cp.nan)
                graph.launch(stream)
                replayed.append(outs[-1].copy())
        stream.synchronize()
        results[overlap] = [cp.asnumpy(a).view(np.uint16) for a in eager + replayed]
    plain = results[False][0]
    assert not np.isnan(plain.view(np.float16)).any()
    for got in results[False] + results[True]:
        assert np.array_equal(got, plain)


@needs_overlap
def test_the_chain_is_the_references():
    import cupy as cp

    gemms, order = _chain(True)
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float16)
    outs = [cp.empty((3, gemms[i].out_features), cp.float16) for i in order]
    got = cp.asnumpy(_run_chain(gemms, order, cp.asarray(x), outs))
    # each layer against the oracle on the previous layer's actual output
    t = x
    rng = np.random.default_rng(1)  # the weights of _chain(seed=1), regenerated in its order
    layers = []
    for n, k, ep in [(1024, 512, dict(activation="relu")), (512, 1024, dict()), (512, 512, dict(activation="gelu")),
                     (1024, 512, dict()), (512, 1024, dict(activation="relu"))]:
        b = (0.1 * rng.standard_normal(n)).astype(np.float16)
        layers.append((_weight(rng, n, k), b, ep))
    for i, o in zip(order, outs, strict=True):
        w, b, ep = layers[i]
        want = reference.matmul(w, t.T, bias=b, **ep)
        out = cp.asnumpy(o)
        reference.assert_close(out.T, want, a=w, b=t.T, bias=b, **ep)
        t = out
    assert np.array_equal(got.view(np.uint16), t.view(np.uint16))


@needs_overlap
def test_a_weight_rewritten_by_the_kernel_just_before_a_call_is_read_as_rewritten():
    import torch

    from pycusparselt.torch import compact as compact_form

    rng = np.random.default_rng(7)
    w1, w2 = (torch.from_numpy(_weight(rng, 1024, 4096)).cuda() for _ in range(2))
    (v1, i1), (v2, i2) = compact_form.pack(w1), compact_form.pack(w2)
    values, indices = v1.clone(), i1.clone()
    gemm = decode.DecodeGemm.from_compact(values, indices, splits=4, overlap=True)
    x = torch.from_numpy(rng.standard_normal((4, 4096)).astype(np.float16)).cuda()
    want = {1: (x.float() @ w1.float().T), 2: (x.float() @ w2.float().T)}
    outs = []
    for i in range(40):
        src = (v2, i2) if i % 2 else (v1, i1)
        indices.copy_(src[1])
        values.copy_(src[0])  # the kernel right before the product's launch
        outs.append(gemm(x))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        ref = want[2 if i % 2 else 1]
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        assert err < 2e-3, (i, err)  # the other weight's product is O(1) away


def test_the_setting_and_the_argument_choose_the_launch(monkeypatch):
    import cupy as cp

    from pycusparselt._native import kernel_launch

    w = cp.asarray(_weight(np.random.default_rng(0), 64, 256))
    assert decode.DecodeGemm(w, overlap=False).overlap is False
    monkeypatch.setenv("PYCUSPARSELT_DECODE_OVERLAP", "0")
    assert decode.DecodeGemm(w).overlap is False
    monkeypatch.setenv("PYCUSPARSELT_DECODE_OVERLAP", "1")
    assert decode.DecodeGemm(w).overlap is (OVERLAP_REASON is None)
    monkeypatch.setattr(kernel_launch, "unavailable_reason", lambda cc: "a reason of the test")
    assert decode.DecodeGemm(w).overlap is False
    with pytest.raises(ValueError, match="overlap: a reason of the test"):
        decode.DecodeGemm(w, overlap=True)


def test_info_says_whether_decode_calls_overlap():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-P", "-m", "pycusparselt", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    want = "overlap      on" if OVERLAP_REASON is None else f"overlap      off: {OVERLAP_REASON}"
    assert want in result.stdout, result.stdout

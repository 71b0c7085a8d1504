"""pycusparselt.torch's inputs of 1 to 16 rows on the GPU: the decode kernel reads the module's compact state
where it is, so nothing else holds the weight (product_nbytes stays 0), against the NumPy oracle for every row
count, both types and the fused epilogues; in CUDA graphs; after in-place edits of the state; and the layers it
does not serve."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="pycusparselt.torch needs PyTorch (the 'torch' extra)")
if not torch.cuda.is_available():
    pytest.skip("PyTorch sees no GPU", allow_module_level=True)
nn = torch.nn

from pycusparselt import reference  # noqa: E402
from pycusparselt import torch as pst  # noqa: E402
from pycusparselt._arrays import to_numpy  # noqa: E402
from pycusparselt.nn import small_batch  # noqa: E402


def _layer(dtype, bias, activation=None, out_features=203, in_features=512, seed=0, **options):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias).cuda().to(dtype)
    pst.prune_trained_model(nn.Sequential(dense), permute=False)
    mode = "fp16" if dtype == torch.float16 else "bf16"
    return pst.SparseLinear.from_dense(dense.weight, dense.bias, mode=mode, prune=None, activation=activation,
                                       **options)


def _check(layer, x, y):
    """y against the oracle: D^T = W @ x^T with the layer's bias and fused activation."""
    w, xh = to_numpy(layer.weight), to_numpy(x)
    bias = None if layer.bias is None else to_numpy(layer.bias)
    kw = {} if layer.activation is None else {"activation": layer.activation}
    want = reference.matmul(w, xh.T, bias=bias, **kw)
    reference.assert_close(to_numpy(y).T, want, a=w, b=xh.T, bias=bias, **kw)


@pytest.mark.parametrize("dtype, bias, activation", [(torch.float16, True, None), (torch.bfloat16, False, "relu"),
                                                     (torch.float16, False, "relu")])
def test_every_small_row_count_runs_on_the_compact_state(dtype, bias, activation, monkeypatch):
    monkeypatch.setenv(small_batch.SETTING, "on")
    layer = _layer(dtype, bias, activation)
    with torch.no_grad():
        for rows in range(1, 17):
            for _ in range(2):  # the first call prepares; the second launches directly at a new address
                x = torch.randn(rows, 512, device="cuda", dtype=dtype)
                y = layer(x)
                assert y.shape == (rows, 203) and y.dtype == dtype
                _check(layer, x, y)
    assert layer.product_nbytes == 0  # nothing but the state holds the weight
    assert {c.backend for c in layer.small_batch_choices.values()} == {"decode"}
    with torch.no_grad():
        x = torch.randn(64, 512, device="cuda", dtype=dtype)
        _check(layer, x, layer(x))  # a large input makes cuSPARSELt's product: its copies are counted
    assert layer.product_nbytes >= 203 * 512 * 2


def test_auto_policy_serves_small_inputs_on_the_compact_state_memory_first(monkeypatch, tmp_path):
    monkeypatch.setenv(small_batch.SETTING, "auto")
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", str(tmp_path))
    layers = [_layer(torch.float16, True, out_features=4096, in_features=4096, seed=s, autotune={"budget_s": 0.2})
              for s in (1, 2)]
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for layer in layers:
            _check(layer, x, layer(x))
    first, second = (layer.small_batch_choices for layer in layers)
    assert list(first) == [(1, 8), (9, 16)]
    # the splits timed, never against cuSPARSELt (which would keep two more copies of the weight)
    assert all(c.backend == "decode" and c.source == "timed" and c.cusparselt_us is None and c.decode_us > 0
               for c in first.values())
    assert all(c.source == "cache" and c.splits == first[b].splits for b, c in second.items())
    assert all(layer.product_nbytes == 0 for layer in layers)


def test_graph_capture_replays_the_small_product_and_eager_calls_see_edits(monkeypatch):
    monkeypatch.setenv(small_batch.SETTING, "on")
    layer = _layer(torch.float16, True)
    static = torch.randn(3, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(static)  # the first call outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        static.copy_(torch.randn(3, 512, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        _check(layer, static, out)
        eager = layer(static)
        assert torch.equal(eager, out)
        layer.values.mul_(2)  # an in-place edit: the next eager call's caches are made again
        y = layer(static)
        _check(layer, static, y)
        assert not torch.equal(y, eager)
    assert layer.product_nbytes == 0


@pytest.mark.parametrize("case", ["in_features", "gelu", "policy-off"])
def test_layers_the_kernel_does_not_serve_run_on_cusparselt(case, monkeypatch):
    monkeypatch.setenv(small_batch.SETTING, "off" if case == "policy-off" else "on")
    if case == "in_features":
        layer = _layer(torch.float16, True, in_features=384, autotune=False)  # not a multiple of 256
    else:
        layer = _layer(torch.float16, True, activation="gelu" if case == "gelu" else None, autotune=False)
    x = torch.randn(5, layer.in_features, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = layer(x)
    if case != "gelu":
        _check(layer, x, y)
    else:  # GELU follows the product's rounding, where the oracle's fused GELU rounds once
        z = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        want = torch.nn.functional.gelu(z, approximate="tanh")
        assert torch.allclose(y.float(), want, rtol=4e-3, atol=4e-3)
    assert layer.product_nbytes > 0
    assert layer.small_batch_choices == {} or all(
        c.backend == "cusparselt" for c in layer.small_batch_choices.values())


def test_a_deep_copy_and_a_state_dict_round_trip_give_the_same_small_outputs(monkeypatch):
    import copy

    monkeypatch.setenv(small_batch.SETTING, "on")
    layer = _layer(torch.bfloat16, True, activation="relu")
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        twin = copy.deepcopy(layer)
        fresh = pst.SparseLinear(512, 203, True, mode="bf16", activation="relu", device="cuda")
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(twin(x), want) and torch.equal(fresh(x), want)
    assert np.isfinite(to_numpy(want).astype(np.float32)).all()


def test_cuda_graph_trees_of_torch_compile_take_the_sparse_model(monkeypatch):
    """torch.compile(mode="reduce-overhead") warms up in its graphs' memory pool, and refuses a tensor of that
    pool the model keeps: the product's stages and buffers are not PyTorch's (a regression: Hugging Face
    generate() with a static cache failed so)."""
    monkeypatch.setenv(small_batch.SETTING, "on")
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(512, 768), nn.ReLU(), nn.Linear(768, 256)).cuda().half()
    pst.prune_trained_model(model, permute=False)
    pst.sparsify(model, "fp16", autotune=False)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for rows in (4, 20, 4, 20):  # the decode kernel, and cuSPARSELt on a stage of 24 rows
            x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
            for _ in range(3):  # warm-up, recording, replay
                got = compiled(x).clone()
            assert torch.allclose(got.float(), model(x).float(), rtol=2e-3, atol=2e-3), rows


def test_an_empty_input_and_swapped_buffer_memory(monkeypatch):
    monkeypatch.setenv(small_batch.SETTING, "on")
    layer = _layer(torch.float16, True)
    with torch.no_grad():
        assert layer(torch.empty(0, 512, device="cuda", dtype=torch.float16)).shape == (0, 203)
        x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
        before = layer(x)
        layer.values.data = layer.values.detach() * 2  # new memory, no in-place change counted
        after = layer(x)
        _check(layer, x, after)
        assert not torch.equal(before, after)

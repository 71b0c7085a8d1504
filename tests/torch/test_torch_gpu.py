"""pycusparselt.torch on the GPU: a sparsified model against F.linear with the pruned weights, inside
torch.cuda.graph capture and under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="pycusparselt.torch needs PyTorch (the 'torch' extra)")
if not torch.cuda.is_available():
    pytest.skip("PyTorch sees no GPU", allow_module_level=True)
nn = torch.nn

from pycusparselt import reference  # noqa: E402
from pycusparselt import torch as pst  # noqa: E402


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).cuda().half()
    pst.prune_trained_model(model, permute=False)
    return model


@pytest.mark.parametrize("rows", [1, 16, 384])
def test_sparsified_layers_match_the_pruned_dense_product(rows):
    model = _mlp(0)
    w, b = model[0].weight.detach().float().cpu().numpy(), model[0].bias.detach().float().cpu().numpy()
    x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
    report = pst.sparsify(model, "fp16", autotune=False, fuse=False)  # model[0] alone: the product
    assert report.replaced == ["0", "2"]
    with torch.no_grad():
        h = model[0](x)
    assert h.is_cuda and h.dtype == torch.float16 and h.shape == (rows, 512)
    xh = x.float().cpu().numpy()
    reference.assert_close(h.float().cpu().numpy().T.astype("float16"), reference.matmul(
        w.astype("float16"), xh.T.astype("float16"), bias=b.astype("float16")), a=w.astype("float16"),
        b=xh.T.astype("float16"), bias=b.astype("float16"))


def test_graph_capture_and_compile_equal_eager():
    model = _mlp(1)
    pst.sparsify(model, "fp16", autotune=False)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = model(x).clone()
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static)  # the shape's first call (tuning, compression) happens outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        compiled = torch.compile(model, fullgraph=True)
        assert torch.equal(compiled(x), eager)


def test_int8_sparsified_model_on_the_gpu():
    model = _mlp(2)
    x = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = model(x).float()
    pst.sparsify(model, "int8", calibration=[x], autotune=False)
    with torch.no_grad():
        got = model(x).float()
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


def _sparse_mlp(seed: int) -> nn.Module:
    model = _mlp(seed)
    pst.sparsify(model, "fp16", autotune=False)
    return model


def test_state_round_trips_give_bit_identical_outputs_on_the_gpu(tmp_path):
    import copy
    import io

    model = _sparse_mlp(3)
    x = torch.randn(40, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = model(x)
        fresh = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).cuda().half()
        pst.sparsify(fresh, "fp16", state_dict=model.state_dict(), autotune=False)
        assert torch.equal(fresh(x), want)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), want)
        twin = copy.deepcopy(model)
        del model
        assert torch.equal(twin(x), want)  # runs its own product, not the deleted original's
        moved = twin.cpu().cuda()
        assert torch.equal(moved(x), want)


def test_eager_calls_skip_the_operator_and_compiled_calls_use_it(monkeypatch):
    from pycusparselt.torch import modules

    model = _sparse_mlp(4)
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    calls = []
    real = modules._linear_op

    def counted(rows, layer_id):
        calls.append(layer_id)
        return real(rows, layer_id)

    monkeypatch.setattr(modules, "_linear_op", counted)
    with torch.no_grad():
        eager = model(x)
    assert calls == []
    traced = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_function" for n in traced.graph.nodes)
    with torch.no_grad():
        assert torch.equal(traced(x), eager)
    assert len(calls) == 2


def test_compact_state_is_0_5625_of_the_dense_fp16_weight():
    model = _sparse_mlp(5)
    layer = model[0]
    dense_bytes = layer.in_features * layer.out_features * 2
    state = layer.values.numel() * layer.values.element_size() + layer.indices.numel()
    assert state == dense_bytes * 9 // 16


def test_new_input_shapes_after_the_first_are_prepared_from_the_state():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(256, 512)).cuda().half()
    pst.prune_trained_model(model, permute=False)
    w, b = model[0].weight.detach().float(), model[0].bias.detach().float()
    pst.sparsify(model, "fp16", autotune=False)
    for rows in (3, 64, 384, 3):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            got = model(x).float()
        want = x.float() @ w.T + b
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-2), rows
    assert model[0].native().compressed_nbytes > 0


def _hf_twins(build):
    """A pruned Hugging Face model (FP16, GPU) and its sparsified, tuned deep copy."""
    import copy

    torch.manual_seed(8)
    dense = build().cuda().half().eval()
    pst.prune_trained_model(dense, permute=False)
    pst.remove_masks(dense)
    sparse = copy.deepcopy(dense)
    pst.sparsify(sparse, "fp16", autotune={"budget_s": 0.5})
    return dense, sparse


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_tuned_hugging_face_models_match_their_dense_twins(model):
    """Every layer shape, tuned, at several batch sizes, prepared and then on the prepared path, against the
    same pruned model dense: a whole model, not one layer (a regression seen only on whole models)."""
    transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")
    if model == "bert":
        config = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=1024, vocab_size=1000)
        dense, sparse = _hf_twins(lambda: transformers.BertModel(config))
        inputs = [torch.randint(0, 1000, (batch, 128), device="cuda") for batch in (1, 4)]
    else:
        config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
        dense, sparse = _hf_twins(lambda: transformers.LlamaForCausalLM(config))
        inputs = [torch.randint(0, 1000, (1, tokens), device="cuda") for tokens in (1, 16, 128)]
    for ids in inputs:
        with torch.no_grad():
            want = dense(ids)[0].float()
            for _ in range(3):  # the first call prepares; the others run the prepared path at new addresses
                got = sparse(ids)[0].float()
                assert float((got - want).norm() / want.norm()) < 1e-2, tuple(ids.shape)


@pytest.mark.parametrize("dtype, bias", [(torch.float16, True), (torch.bfloat16, False)])
def test_prepared_eager_calls_launch_the_product_directly_and_stay_exact(dtype, bias, monkeypatch):
    """After the first call with a number of rows, eager calls launch the prepared product themselves (inputs of
    fewer rows than the product's copied into a stage): equal to the checked path at every size, on inputs at
    new addresses; unaligned, strided and mis-shaped inputs, other streams, changed state and closed plans are
    handled as the checked path handles them."""
    from pycusparselt.nn import small_batch

    monkeypatch.setenv(small_batch.SETTING, "off")  # cuSPARSELt's product at every size: the stages are its
    torch.manual_seed(3)
    dense = nn.Linear(256, 512, bias=bias).cuda().to(dtype)
    pst.prune_trained_model(nn.Sequential(dense), permute=False)
    layer = pst.SparseLinear.from_dense(dense.weight, dense.bias, mode="fp16" if dtype == torch.float16 else "bf16",
                                        prune=None, autotune=False)
    checked = []  # inputs that reached the checked call beneath the module
    native_call = type(layer.native()).__call__
    monkeypatch.setattr(type(layer.native()), "__call__", lambda self, x, **kw: checked.append(x) or
                        native_call(self, x, **kw))

    def want(x):
        return torch.nn.functional.linear(x.float(), layer.weight.float(), None if layer.bias is None else
                                          layer.bias.float())

    def check(x):
        got = layer(x)
        assert got.shape == x.shape[:-1] + (512,) and got.dtype == dtype
        rtol = 2e-3 if dtype == torch.float16 else 1e-2  # the output's rounding
        assert torch.allclose(got.float(), want(x), rtol=rtol, atol=2e-2), tuple(x.shape)

    sizes = (1, 5, 16, 17, 20, 24, 384)
    with torch.no_grad():
        for rows in sizes + (5, 1):
            for _ in range(3):  # the first call prepares, the others launch directly at new addresses
                check(torch.randn(rows, 256, device="cuda", dtype=dtype))
        assert len(checked) == len(sizes)  # one checked call per size, none after
        assert layer.prepared_shapes == [(rows, 256) for rows in sizes]
        # one stage per padded size: 16 rows (for 1 and 5), 24 rows (for 17 and 20)
        assert layer.stage_nbytes == (16 + 24) * 256 * dtype.itemsize
        flat = []  # the 2-D products forward asks for
        product = layer.product
        monkeypatch.setattr(layer, "product", lambda x: flat.append(tuple(x.shape)) or product(x))
        for rows in (20, 24):  # (2, rows / 2, 256): the 2-D shape's product, then a direct launch of its own
            for _ in range(3):
                check(torch.randn(2, rows // 2, 256, device="cuda", dtype=dtype))
            assert (2, rows // 2, 256) in layer.prepared_shapes
        assert flat == [(20, 256), (24, 256)]  # only the first call with each shape
        assert len(checked) == len(sizes)
        with pytest.raises(ValueError, match="x: expected"):
            product(torch.randn(256, device="cuda", dtype=dtype))  # the product is of 2-D inputs only
        checked.clear()
        base = torch.randn(17, 256, device="cuda", dtype=dtype)
        check(base.view(-1)[1:1 + 16 * 256].view(16, 256))  # 2 bytes past an aligned address: checked
        check(torch.randn(256, 16, device="cuda", dtype=dtype).T)  # strided: made contiguous, direct
        assert len(checked) == 1
        with pytest.raises(ValueError, match="in_features|256"):
            layer(torch.randn(16, 128, device="cuda", dtype=dtype))  # a prepared row count, other columns
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x = torch.randn(5, 256, device="cuda", dtype=dtype)
            for _ in range(2):
                check(x)
        torch.cuda.current_stream().wait_stream(side)
        if layer.bias is not None:
            layer.bias.add_(1.0)  # an in-place edit of the state: the product is made again
        layer.values.mul_(2)
        check(torch.randn(5, 256, device="cuda", dtype=dtype))
        layer.native().close()  # plans closed under the prepared entries: made again, no error
        check(torch.randn(5, 256, device="cuda", dtype=dtype))
        check(torch.randn(5, 256, device="cuda", dtype=dtype))

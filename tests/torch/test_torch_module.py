"""pycusparselt.torch.SparseLinear as a PyTorch module, on the CPU (the NumPy reference runs the product):
its compact state, state_dict / torch.save / pickle / deepcopy / safetensors round trips, tied and shared
modules, empty layers, fusion, and Hugging Face models built from small configs."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pycusparselt.torch needs PyTorch (the 'torch' extra)")
nn = torch.nn

from pycusparselt import reference  # noqa: E402
from pycusparselt import torch as pst  # noqa: E402
from pycusparselt.torch import compact, modules  # noqa: E402


def _pruned(out: int, inp: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    w = reference.prune_2to4(g.standard_normal((out, inp)).astype(np.float32), axis=-1)
    return torch.from_numpy(w).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("inp", [4, 8, 12, 20, 64])
def test_compact_form_round_trips(dtype, inp):
    w = _pruned(6, inp, torch.float32) * 10
    w = w.to(dtype)
    w[0, :4] = 0  # a group with no non-zero
    w[1, :4] = torch.tensor([0, 0, 0, 1]).to(dtype)  # a group with one
    values, indices = compact.pack(w)
    assert values.shape == (6, inp // 2) and values.dtype == dtype
    assert indices.shape == (6, -(-inp // 8)) and indices.dtype == torch.uint8
    assert torch.equal(compact.unpack(values, indices, inp), w)
    compact.check_pair(values, indices, 6, inp, "layer")


def test_compact_form_refuses_what_is_not_2to4_naming_where():
    w = _pruned(4, 8)
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 2, inputs 4..7 hold 3 non-zeros"):
        compact.pack(w, name="w")
    values, indices = compact.pack(_pruned(4, 8))
    bad = indices.clone()
    bad[1, 0] = 0x11  # positions 1 and 0: not ascending
    with pytest.raises(ValueError, match="two distinct positions"):
        compact.check_pair(values, bad, 4, 8, "layer")


def _mlp(dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(dtype)


def _sparse_mlp(seed: int = 0, **options) -> nn.Module:
    model = _mlp(seed=seed)
    pst.sparsify(model, "bf16", autotune=False, **options)
    return model


def test_the_module_is_public_and_its_state_is_in_buffers():
    model = _sparse_mlp()
    assert type(model[0]) is pst.SparseLinear and pst.SparseLinear.__module__ == "pycusparselt.torch.modules"
    state = model.state_dict()
    assert set(state) == {"0.values", "0.indices", "0.bias", "2.values", "2.indices", "2.bias"}
    dense_bytes = 64 * 32 * 2
    assert state["0.values"].nbytes + state["0.indices"].nbytes == dense_bytes * 9 // 16
    assert torch.equal(model[0].weight.count_nonzero(dim=1) <= 16, torch.ones(64, dtype=torch.bool))


def test_round_trips_give_identical_outputs(tmp_path):
    model = _sparse_mlp()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    want = model(x)
    fresh = _mlp(seed=1)  # other weights: all of them must come from the state
    pst.sparsify(fresh, "bf16", state_dict=model.state_dict(), autotune=False)
    assert torch.equal(fresh(x), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), want)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), want)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    other = _mlp(seed=2)
    pst.sparsify(other, "bf16", autotune=False)
    safetensors_torch.load_model(other, str(path))
    assert torch.equal(other(x), want)


def test_a_deep_copy_is_a_module_of_its_own():
    model = _sparse_mlp()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    want = model(x)
    twin = copy.deepcopy(model)
    assert twin[0].layer_id != model[0].layer_id
    with torch.no_grad():
        model[0].values.zero_()
    model[0].load_state_dict(model[0].state_dict())  # the changed state takes effect
    assert not torch.equal(model(x), want)
    del model
    assert torch.equal(twin(x), want)


def test_dtype_conversions_leave_sparse_layers_in_their_mode():
    model = _sparse_mlp()
    model.half()
    assert model[0].values.dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    assert model[0](torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_tampered_state_is_refused_naming_the_entry():
    model = _sparse_mlp()
    state = model.state_dict()
    state["0.indices"][0, 0] = 0x00  # positions 0 and 0
    with pytest.raises(RuntimeError, match="0.indices: every group needs two distinct positions"):
        model.load_state_dict(state)


def test_an_unknown_layer_id_is_a_clear_error():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="no live pycusparselt.torch.SparseLinear has id 999999"):
        torch.ops.pycusparselt.linear(x, 999999)


def test_eager_calls_do_not_go_through_the_operator(monkeypatch):
    model = _sparse_mlp()
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    want = model(x)

    def refuse(*args):
        raise AssertionError("the operator was called eagerly")

    monkeypatch.setattr(modules, "_linear_op", refuse)
    assert torch.equal(model(x), want)


def test_relu_after_a_linear_is_fused_and_gelu_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    model = model.to(torch.bfloat16)
    pst.prune_trained_model(model, permute=False)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    unfused = copy.deepcopy(model)
    pst.sparsify(unfused, "bf16", autotune=False, fuse=False)
    report = pst.sparsify(model, "bf16", autotune=False)
    assert report.fused == ["0 + 1"] and isinstance(model[1], nn.Identity) and model[0].activation == "relu"
    assert "3" in report.not_fused and "GELU" in report.not_fused["3"]
    assert torch.equal(model(x), unfused(x))


def test_a_module_registered_twice_is_replaced_everywhere_by_one_module():
    shared = nn.Linear(16, 16).to(torch.bfloat16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = pst.sparsify(model, "bf16", autotune=False, fuse=False)
    assert report.replaced == ["0"]
    assert model[0] is model[2] and isinstance(model[0], pst.SparseLinear)


def test_weights_tied_to_a_module_that_stays_dense_are_left_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.head = nn.Linear(16, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied().to(torch.bfloat16)
    before = model.embed.weight.detach().clone()
    prune = pst.prune_trained_model(model, permute=False)
    assert "head" in prune.skipped and "embed" in prune.skipped["head"]
    assert torch.equal(model.embed.weight, before)
    report = pst.sparsify(model, "bf16", autotune=False)
    assert "head" in report.dense and "embed" in report.dense["head"]
    assert model.head.weight is model.embed.weight


def test_a_tied_weight_is_not_permuted_twice():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)
            self.down2 = nn.Linear(16, 8)
            self.down2.weight = self.down.weight

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h) + self.down2(h)

    torch.manual_seed(0)
    model = TwoHeads().double()
    x = torch.randn(4, 8, dtype=torch.double)
    want = model(x)
    plan = pst.permute_network(model)
    assert any("tied" in (s.skipped or "") for s in plan.spaces)
    assert torch.allclose(model(x), want, rtol=0, atol=1e-12)


def test_empty_layers_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 0)).to(torch.bfloat16)
    report = pst.sparsify(model, "bf16", autotune=False)
    assert report.replaced == [] and set(report.dense) == {"0", "1"}
    assert all("empty" in why for why in report.dense.values())
    prune = pst.prune_trained_model(model, permute=False)
    assert set(prune.skipped) == {"0", "1"}


def test_a_pruned_checkpoint_loads_into_a_fresh_model():
    model = _mlp(torch.float32)
    pst.prune_trained_model(model, permute=False)
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="weight_mask_2to4"):
        _mlp(torch.float32, seed=3).load_state_dict(state)
    fresh = pst.load_pruned(_mlp(torch.float32, seed=3), state)
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x)) and hasattr(fresh[0], pst.MASK_NAME)


def test_int8_layers_keep_their_scales_through_a_round_trip():
    model = _mlp(torch.float32)
    x = torch.randn(8, 32)
    pst.sparsify(model, "int8", calibration=[x], autotune=False)
    state = model.state_dict()
    assert state["0.values"].dtype == torch.int8 and float(state["0.input_scale"]) > 0
    fresh = _mlp(torch.float32, seed=4)
    pst.sparsify(fresh, "int8", state_dict=state, autotune=False)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="sparsify with the mode the state was saved with"):
        pst.sparsify(_mlp(torch.float32), "fp16", state_dict=state)


transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    return transformers.BertModel(config).eval()


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


def test_hugging_face_bert_prunes_with_the_defaults_and_runs_sparse():
    model = _bert()
    report = pst.prune_trained_model(model)
    assert len(report.pruned) == 13 and "" in report.permutations.untraced
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    sparse = pst.sparsify(model, "bf16", autotune=False)
    assert len(sparse.replaced) == 13
    state = model.state_dict()
    with torch.no_grad():
        got = model(ids).last_hidden_state
        fresh = _bert().to(torch.bfloat16)
        pst.sparsify(fresh, "bf16", state_dict=state, autotune=False)
        again = fresh(ids).last_hidden_state
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
    assert torch.equal(again, got)


def test_hugging_face_llama_permutes_its_gated_mlp_and_keeps_its_function():
    model = _llama().double()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    before = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    plan = pst.permute_network(model)
    permuted = {s.producers[0] for s in plan.permuted}
    assert permuted == {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"}
    assert not torch.equal(model.model.layers[0].mlp.gate_proj.weight, before)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, rtol=0, atol=1e-10)
    report = pst.prune_trained_model(model)
    assert "lm_head" in report.pruned and len(report.pruned) == 15


def test_warm_up_prepares_the_named_row_counts_without_changing_results():
    model = _mlp()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    twin = copy.deepcopy(model)
    pst.sparsify(model, "bf16", autotune=False, warm_up=[1, 5, 64])
    pst.sparsify(twin, "bf16", autotune=False)
    assert torch.equal(model(x), twin(x))
    with pytest.raises(ValueError, match="positive numbers of rows"):
        model[0].warm_up([0])


def test_the_report_names_what_was_replaced_fused_and_left_dense():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 6), nn.Linear(6, 4)).to(torch.bfloat16)
    text = str(pst.sparsify(model, "bf16", autotune=False))
    assert "sparse: 0, 2" in text and "fused: 0 + 1" in text and "dense: 3 (6 input features" in text


def test_fp8_modules_of_masked_weights_keep_their_pattern():
    model = _mlp(torch.float32)
    pst.prune_trained_model(model, permute=False)  # masking leaves -0.0 where negative weights were pruned
    x = torch.randn(8, 32)
    pst.sparsify(model, "fp8", calibration=[x], autotune=False)
    assert model[0].values.dtype == torch.uint8
    state = model.state_dict()
    fresh = _mlp(torch.float32, seed=5)
    pst.sparsify(fresh, "fp8", state_dict=state, autotune=False)
    assert torch.equal(fresh(x), model(x))


def test_a_sparsified_model_traces_with_fx_and_make_fx_to_the_operator():
    from torch.fx.experimental.proxy_tensor import make_fx

    model = _sparse_mlp()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    traced = torch.fx.symbolic_trace(model)
    assert sum(n.op == "call_function" and "pycusparselt" in str(n.target) for n in traced.graph.nodes) == 2
    graph = make_fx(model)(x)
    other = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(traced(other), model(other)) and torch.equal(graph(other), model(other))


def test_in_place_edits_of_the_state_take_effect():
    model = _sparse_mlp()
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    before = model(x)
    with torch.no_grad():
        model[2].bias.add_(1)
    after = model(x)
    assert torch.equal(after, copy.deepcopy(model)(x))  # as a layer made from the edited state
    assert torch.allclose(after.float(), before.float() + 1, atol=2e-2) and not torch.equal(after, before)


def test_a_replaced_buffer_takes_effect():
    model = _sparse_mlp()
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    before = model(x)
    model[2].bias = model[2].bias + 1  # a new tensor in the buffer's place, not an in-place edit
    after = model(x)
    assert torch.equal(after, copy.deepcopy(model)(x))
    assert torch.allclose(after.float(), before.float() + 1, atol=2e-2) and not torch.equal(after, before)


def test_modules_made_and_run_under_inference_mode():
    """Inference tensors count no in-place changes; the module runs on them (edits made under inference mode
    are not seen: the product is made from the state of the first call)."""
    dense = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer = pst.SparseLinear.from_dense(dense.weight, dense.bias, mode="bf16", autotune=False)
        assert layer.values.is_inference()
        got = layer(x)
    want = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=2e-2)
    assert torch.equal(layer(x), got)  # outside inference mode too


def test_relu_bounds_apply_to_fused_relus_only():
    model = _mlp()
    report = pst.sparsify(model, "bf16", autotune=False, relu_upper_bound=0.5)
    assert report.fused == ["0 + 1"] and model[0].relu_upper_bound == 0.5 and model[2].activation is None
    assert float(model[0](torch.randn(4, 32, dtype=torch.bfloat16)).max()) <= 0.5


def test_a_layer_left_dense_stays_dense_when_its_state_is_loaded():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 6), nn.Linear(6, 8)).to(torch.bfloat16)
    pst.sparsify(model, "bf16", autotune=False)
    fresh = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 6), nn.Linear(6, 8)).to(torch.bfloat16)
    report = pst.sparsify(fresh, "bf16", state_dict=model.state_dict(), autotune=False)
    assert isinstance(fresh[2], nn.Linear) and "2" in report.dense
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), model(x))


def test_a_state_of_another_dtype_is_refused_when_assigned():
    model = _sparse_mlp()
    state = model.state_dict()
    state["0.values"] = state["0.values"].float()
    with pytest.raises(RuntimeError, match="0.values: a 'bf16' layer keeps torch.bfloat16, got torch.float32"):
        model.load_state_dict(state, assign=True)


def test_the_operator_is_inference_only_like_the_eager_call():
    model = torch.nn.Sequential(torch.nn.Linear(256, 64))
    pst.sparsify(model, "fp16", autotune=False)
    x = torch.randn(3, 256, dtype=torch.float16, requires_grad=True)
    traced = torch.fx.symbolic_trace(model)
    for y in (model(x), traced(x)):  # eager, and the operator
        assert not y.requires_grad and y.shape == (3, 64)
    assert torch.equal(model(x), traced(x))


def test_memory_swapped_under_a_buffer_is_seen():
    layer = pst.SparseLinear.from_dense(torch.randn(8, 16), torch.randn(8), mode="fp16")
    x = torch.randn(3, 16, dtype=torch.float16)
    before = layer(x)
    layer.values.data = layer.values.detach() * 2  # new memory, no in-place change counted
    assert torch.allclose(layer(x).float() - layer.bias.float(), 2 * (before.float() - layer.bias.float()),
                          rtol=1e-2, atol=1e-2)

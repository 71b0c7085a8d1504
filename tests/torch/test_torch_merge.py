"""Sibling projections merged by sparsify(merge_siblings=True), on the CPU (the NumPy reference runs the
product): outputs against the unmerged model, one product per group and forward, the shared product's
invalidation, state_dict / deepcopy / pickle round trips, tracing, and the groups refused."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch", reason="pycusparselt.torch needs PyTorch (the 'torch' extra)")
nn = torch.nn

from pycusparselt import torch as pst  # noqa: E402
from pycusparselt.torch import siblings  # noqa: E402

QKV = "attn.merged_q_proj_k_proj_v_proj"
GATE_UP = "mlp.merged_gate_proj_up_proj"


class Attention(nn.Module):
    def __init__(self, d: int = 32, kv: int = 16, v_in: int | None = None) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, kv)
        self.v_proj = nn.Linear(v_in or d, kv)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q * torch.cat([k, v], dim=-1))


class GatedMLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int = 32, kv: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(d, kv), GatedMLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


MODES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _block(dtype=torch.float16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Block().to(dtype)


def _pair(dtype=torch.float16, seed: int = 0):
    """The same block sparsified without and with merging."""
    plain, merged = _block(dtype, seed), _block(dtype, seed)
    pst.sparsify(plain, MODES[dtype], autotune=False)
    report = pst.sparsify(merged, MODES[dtype], autotune=False, merge_siblings=True)
    return plain, merged, report


def _x(rows: int = 5, dtype=torch.float16, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_outputs_equal_the_unmerged_ones_bit_for_bit(dtype):
    plain, merged, report = _pair(dtype)
    assert report.merged == {QKV: ["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                             GATE_UP: ["mlp.gate_proj", "mlp.up_proj"]}
    assert report.not_merged == {}
    assert f"merged: attn.q_proj + attn.k_proj + attn.v_proj -> {QKV}" in str(report)
    assert isinstance(merged.attn.q_proj, siblings.SiblingProjection)
    assert merged.get_submodule(QKV).out_features == 32 + 16 + 16
    for rows in (1, 5, 17):
        x = _x(rows, dtype)
        assert torch.equal(merged(x), plain(x))
        x3 = x.reshape(1, rows, 32)  # (batch, tokens, features): slices of the last dimension
        assert torch.equal(merged(x3), plain(x3))
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(merged.attn, name).weight, getattr(plain.attn, name).weight)
        assert torch.equal(getattr(merged.attn, name).bias, getattr(plain.attn, name).bias)
    assert merged.mlp.gate_proj.bias is None


def _count_products(monkeypatch) -> dict:
    calls: dict = {}
    real = pst.SparseLinear.product

    def counted(self, x):
        calls[self.layer_id] = calls.get(self.layer_id, 0) + 1
        return real(self, x)

    monkeypatch.setattr(pst.SparseLinear, "product", counted)
    return calls


def test_one_product_per_group_and_forward(monkeypatch):
    _, model, _ = _pair()
    calls = _count_products(monkeypatch)
    x = _x()
    with torch.no_grad():
        model(x)
        model(x)  # the same input again: each sibling has had its slice, so the products are made again
    qkv, gate_up = model.get_submodule(QKV).layer_id, model.get_submodule(GATE_UP).layer_id
    assert calls[qkv] == 2 and calls[gate_up] == 2
    assert sum(calls.values()) == 8  # and o_proj, down_proj: 2 each


def test_a_sibling_called_on_another_tensor_computes_its_own(monkeypatch):
    plain, model, _ = _pair()
    calls = _count_products(monkeypatch)
    x, other = _x(seed=1), _x(seed=2)
    q = model.attn.q_proj(x)
    k = model.attn.k_proj(other)
    v = model.attn.v_proj(x)  # x's product is no longer the one kept
    assert torch.equal(q, plain.attn.q_proj(x))
    assert torch.equal(k, plain.attn.k_proj(other))
    assert torch.equal(v, plain.attn.v_proj(x))
    assert calls[model.get_submodule(QKV).layer_id] == 3
    model.attn.q_proj(x)  # x's product, made for v: q has not had its slice of it yet
    assert calls[model.get_submodule(QKV).layer_id] == 3
    same = _x(seed=1)  # equal values, another tensor: not reused
    assert torch.equal(model.attn.k_proj(same), plain.attn.k_proj(x))
    assert calls[model.get_submodule(QKV).layer_id] == 4


def test_an_in_place_edit_of_the_input_makes_a_new_product(monkeypatch):
    plain, model, _ = _pair()
    calls = _count_products(monkeypatch)
    x = _x()
    before = x.clone()
    q = model.attn.q_proj(x)
    x.add_(1)
    k = model.attn.k_proj(x)
    assert torch.equal(q, plain.attn.q_proj(before))
    assert torch.equal(k, plain.attn.k_proj(x))
    assert not torch.equal(k, plain.attn.k_proj(before))
    assert calls[model.get_submodule(QKV).layer_id] == 2
    v = model.attn.v_proj(x)  # unchanged since k's product: shared
    assert torch.equal(v, plain.attn.v_proj(x))
    assert calls[model.get_submodule(QKV).layer_id] == 2


def test_an_edited_product_or_state_is_not_shared(monkeypatch):
    plain, model, _ = _pair()
    calls = _count_products(monkeypatch)
    x = _x()
    q = model.attn.q_proj(x)
    q.mul_(2)  # the caller edits its slice of the shared product in place
    assert torch.equal(model.attn.k_proj(x), plain.attn.k_proj(x))
    assert calls[model.get_submodule(QKV).layer_id] == 2
    merged = model.get_submodule(QKV)
    model.attn.q_proj(x)
    with torch.no_grad():
        merged.values.zero_()  # the state changes: the kept product is stale
    assert torch.equal(model.attn.k_proj(x), plain.attn.k_proj.bias.expand(5, 16))


def test_inference_tensors_are_never_shared(monkeypatch):
    plain, model, _ = _pair()
    calls = _count_products(monkeypatch)
    with torch.inference_mode():
        x = _x()
        assert torch.equal(model(x), plain(x))
    # their in-place edits are not counted: every sibling computes the product
    assert calls[model.get_submodule(QKV).layer_id] == 3


def test_the_state_dict_round_trips_into_a_fresh_model(tmp_path):
    _, model, report = _pair()
    x = _x()
    want = model(x)
    state = model.state_dict()
    assert {k for k in state if k.startswith("attn.")} == {
        f"{QKV}.values", f"{QKV}.indices", f"{QKV}.bias", "attn.o_proj.values", "attn.o_proj.indices",
        "attn.o_proj.bias"}
    assert not any(k.startswith(("attn.q_proj", "mlp.gate_proj")) for k in state)
    fresh = _block(seed=5)  # other weights: everything comes from the state
    again = pst.sparsify(fresh, "fp16", autotune=False, state_dict=state, merge_siblings=True)
    assert again.merged == report.merged
    assert torch.equal(fresh(x), want)
    safetensors_torch = pytest.importorskip("safetensors.torch")  # refuses tensors saved twice
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    other = _block(seed=6)
    pst.sparsify(other, "fp16", autotune=False, merge_siblings=True)
    safetensors_torch.load_model(other, str(path))
    assert torch.equal(other(x), want)


def test_an_unmerged_state_loads_with_merge_siblings_unmerged():
    plain, _, _ = _pair()
    x = _x()
    fresh = _block(seed=5)
    report = pst.sparsify(fresh, "fp16", autotune=False, state_dict=plain.state_dict(), merge_siblings=True)
    assert report.merged == {}
    assert "saved without merge_siblings" in report.not_merged["attn.{q_proj,k_proj,v_proj}"]
    assert torch.equal(fresh(x), plain(x))


def test_deepcopy_pickle_and_save_keep_one_merged_module_shared():
    _, model, _ = _pair()
    x = _x()
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        merged = twin.get_submodule(QKV)
        assert merged is not model.get_submodule(QKV)
        assert all(getattr(twin.attn, n).merged is merged for n in ("q_proj", "k_proj", "v_proj"))
        assert twin.mlp.up_proj.merged is twin.get_submodule(GATE_UP)
        assert torch.equal(twin(x), want)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model.get_submodule(QKV).values.zero_()
    assert torch.equal(twin(x), want)  # the copy's siblings read the copy's state
    twin.float().to("cpu")  # conversions and moves go through the parent to the one merged module
    assert twin.attn.q_proj.merged is twin.get_submodule(QKV)
    assert torch.equal(twin(x), want)


def test_tracing_runs_the_operator_and_slices():
    plain, model, _ = _pair()
    x = _x()
    want = plain(x)
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), want)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), want)


def _refusals(model, mode="fp16", **options) -> pst.SparsifyReport:
    return pst.sparsify(model, mode, autotune=False, merge_siblings=True, **options)


def test_groups_that_cannot_merge_are_reported_with_the_reason():
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = Attention(v_in=64)  # one input cannot feed a 64-feature layer
    model.tied = GatedMLP()
    model.other = nn.Linear(32, 48, bias=False)
    model.other.weight = model.tied.gate_proj.weight
    model.twice = GatedMLP()
    model.alias = model.twice.up_proj
    model.fused = nn.Sequential(OrderedDict(q=nn.Linear(32, 32), relu=nn.ReLU(), k=nn.Linear(32, 32),
                                            v=nn.Linear(32, 32)))
    model.small = nn.Module()
    model.small.w1, model.small.w3 = nn.Linear(32, 8), nn.Linear(6, 8)  # w3 stays dense: 6 inputs
    model.taken = GatedMLP()
    model.taken.merged_gate_proj_up_proj = nn.Identity()
    model.half()
    report = _refusals(model)
    assert report.merged == {}
    assert report.not_merged == {
        "attn.{q_proj,k_proj,v_proj}": "one input needs one in_features; got q_proj 32, k_proj 32, v_proj 64",
        "tied.{gate_proj,up_proj}": "tied.gate_proj shares a parameter with other",
        "twice.{gate_proj,up_proj}": "twice.up_proj is registered under several names (twice.up_proj, alias)",
        "fused.{q,k,v}": "fused.q has its activation fused into its product; the others would get it too",
        "small.{w1,w3}": "small.w3 stays dense",
        "taken.{gate_proj,up_proj}": "the parent already has an attribute 'merged_gate_proj_up_proj'",
    }
    assert "not merged: tied.{gate_proj,up_proj} (tied.gate_proj shares a parameter with other)" in str(report)
    assert isinstance(model.attn.q_proj, pst.SparseLinear)


def test_other_differences_and_quantized_modes_are_refused():
    torch.manual_seed(0)
    model = nn.Module()
    model.mixed = Attention().half()
    model.mixed.v_proj = nn.Linear(32, 16, bias=False).half()
    model.typed = GatedMLP().half()
    model.typed.up_proj.float()
    report = _refusals(model)
    assert report.not_merged["mixed.{q_proj,k_proj,v_proj}"] == (
        "one input needs one bias; got q_proj True, k_proj True, v_proj False")
    assert report.not_merged["typed.{gate_proj,up_proj}"].startswith("one input needs one dtype")
    quantized = _block()
    report = _refusals(quantized, "int8", calibration=[_x()])
    assert report.not_merged["attn.{q_proj,k_proj,v_proj}"] == (
        "int8 layers keep scales of their own: merged in 'fp16' and 'bf16' only")


def test_merge_siblings_off_leaves_every_layer_as_it_was():
    model = _block()
    report = pst.sparsify(model, "fp16", autotune=False)
    assert report.merged == {} and report.not_merged == {}
    assert all(type(getattr(model.attn, n)) is pst.SparseLinear for n in ("q_proj", "k_proj", "v_proj"))
    assert not any("merged" in name for name, _ in model.named_modules())


def test_a_sibling_checks_its_slice():
    merged = pst.SparseLinear(8, 12)
    with pytest.raises(ValueError, match=r"start, stop: expected 0 <= start < stop <= 12 .*got 4, 16"):
        siblings.SiblingProjection(merged, 4, 16)


# -- on the GPU ---------------------------------------------------------------------------------------------


def _gpu_pair(seed: int):
    """A CUDA FP16 block pruned 2:4, sparsified without and with merging."""
    torch.manual_seed(seed)
    dense = Block(256, 128, 512).cuda().half()
    pst.prune_trained_model(dense, permute=False)
    plain, merged = copy.deepcopy(dense), copy.deepcopy(dense)
    pst.sparsify(plain, "fp16", autotune=False)
    report = pst.sparsify(merged, "fp16", autotune=False, merge_siblings=True)
    assert sorted(report.merged) == [QKV, GATE_UP]
    return dense, plain, merged


def _assert_like_the_pruned_product(got, layer, x):
    from pycusparselt import reference

    w = layer.weight.detach().cpu().numpy().astype("float16")
    b = None if layer.bias is None else layer.bias.detach().cpu().numpy().astype("float16")
    xh = x.cpu().numpy().T.astype("float16")
    reference.assert_close(got.cpu().numpy().T, reference.matmul(w, xh, bias=b), a=w, b=xh, bias=b)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 384])
def test_merged_siblings_on_the_gpu_match_the_pruned_products(rows):
    dense, plain, merged = _gpu_pair(0)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for parent, names in (("attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for name in names:
                got = getattr(merged.get_submodule(parent), name)(x)
                assert got.is_cuda and got.shape == (rows, getattr(dense.get_submodule(parent), name).out_features)
                _assert_like_the_pruned_product(got, getattr(dense.get_submodule(parent), name), x)
        want, got = plain(x).float(), merged(x).float()
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())  # FP16 rounding of two GEMMs


@pytest.mark.gpu
def test_merged_siblings_in_a_cuda_graph_equal_eager():
    _, plain, merged = _gpu_pair(1)
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            merged(static)  # first calls outside capture; their products must not be reused inside it
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = merged(static)
        for _ in range(2):
            new = torch.randn(16, 256, device="cuda", dtype=torch.float16)
            static.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            eager = merged(new)
            assert torch.equal(out, eager)
            want = plain(new).float()
            assert float((out.float() - want).abs().max()) <= 1e-2 * float(want.abs().max())
        # aot_eager keeps eager's arithmetic, so the operator path must give the same bits; inductor fuses
        # the block's other operations and rounds them differently
        assert torch.equal(torch.compile(merged, backend="aot_eager", fullgraph=True)(x), merged(x))
        want, got = merged(x).float(), torch.compile(merged, fullgraph=True)(x).float()
        assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())

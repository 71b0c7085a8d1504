"""pycusparselt.torch on the CPU: channel permutations that keep the network's function, 2:4 masks that survive
optimizer steps and checkpoints. Runs wherever PyTorch is installed."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pycusparselt.torch needs PyTorch (the 'torch' extra)")
nn = torch.nn

from pycusparselt import reference  # noqa: E402
from pycusparselt.nn import masks  # noqa: E402
from pycusparselt import torch as pst  # noqa: E402


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.block1, self.block2 = Block(16), Block(16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.block2(self.block1(x))).mean(dim=(2, 3))


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 32, ffn: int = 64) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8.0, dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """float64, random parameters and BatchNorm statistics (so every permuted tensor matters), eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model


def _kept(model: nn.Module, names) -> float:
    named = dict(model.named_modules())
    total = 0.0
    for name in names:
        w = named[name].weight.detach().numpy()
        if w.ndim == 4:
            w = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
        total += float(np.abs(w * masks.compute_mask(w)).sum())
    return total


@pytest.mark.parametrize("make, shape, permuted, skipped", [
    (MLP, (5, 32), {"fc1", "fc2"}, set()),
    (CNN, (2, 4, 8, 8), {"stem", "block1.conv1", "block2.conv1"}, set()),
    (TransformerBlock, (2, 6, 32), {"fc1"}, {"q", "o"}),
])
def test_permuted_networks_compute_the_same_function(make, shape, permuted, skipped):
    model = _randomise(make(), 0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = model(x)
    consumers = [c for s in pst.find_channel_spaces(model)[1] if s.skipped is None for c in s.consumers]
    kept_before = _kept(model, consumers)
    plan = pst.permute_network(model, time_budget=None)
    after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    got = {p for s in plan.permuted for p in s.producers}
    assert permuted <= got, str(plan)
    assert all(s.report.kept_after >= s.report.kept_before for s in plan.permuted)
    assert _kept(model, consumers) > kept_before  # pruning now keeps more
    skipped_producers = {p for s in plan.skipped for p in s.producers}
    assert skipped <= skipped_producers, str(plan)
    for s in plan.skipped:
        assert s.skipped  # every skip says why


def test_spaces_that_touch_the_input_or_output_or_a_reshape_are_skipped():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
            self.conv = nn.Conv2d(3, 16, 1)

        def forward(self, x, img):
            h = self.a(x)
            out = self.c(self.b(h) + x)  # a residual with the network's input: not permutable
            flat = self.conv(img).flatten(1)  # a reshape: not provable
            return out, h, flat

    _, spaces = pst.find_channel_spaces(_randomise(Net(), 2))
    reasons = {s.name: s.skipped for s in spaces}
    assert "input" in reasons["a"] or "output" in reasons["a"]
    assert "input" in reasons["b"]
    assert "flatten" in reasons["conv"] or "output" in reasons["conv"]


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01),
])
def test_masks_survive_optimizer_steps(make_opt):
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt(model.parameters())
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    for _ in range(3):  # dense training first: momentum and moments are non-zero everywhere
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    report = pst.prune_trained_model(model, opt, permute=True)
    assert set(report.pruned) == {"fc1", "fc2", "fc3"}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for name in report.pruned:
        mod = dict(model.named_modules())[name]
        w = mod.weight.detach().numpy()
        assert reference.is_2to4(w, axis=-1), name
        assert torch.equal(mod.weight != 0, getattr(mod, pst.MASK_NAME) & (mod.weight != 0))
        assert not torch.any(mod.weight[~getattr(mod, pst.MASK_NAME)])
    pst.remove_masks(model, opt)
    assert not any(hasattr(m, pst.MASK_NAME) for m in model.modules())
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # the plain step again: pruned weights move
    assert not reference.is_2to4(model.fc1.weight.detach().numpy(), axis=-1)


def test_masks_are_saved_and_loaded_with_the_model():
    torch.manual_seed(1)
    model = CNN()
    report = pst.prune_trained_model(model, permute=False)
    assert report.skipped == {} and "stem" in report.pruned and "head" in report.pruned
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = CNN()
    pst.prune_trained_model(fresh, permute=False)  # the same buffers exist, then the checkpoint fills them
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    for (name, a), (_, b) in zip(model.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    masks = [n for n, _ in model.named_buffers() if n.endswith(pst.MASK_NAME)]
    assert len(masks) == len(report.pruned) > 0


def test_what_cannot_be_pruned_is_listed():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2))
    report = pst.prune_trained_model(model, permute=False)
    assert "6 input channels" in report.skipped["0"]
    assert "grouped" in report.skipped["2"]
    with pytest.raises(ValueError, match="method"):
        pst.prune_trained_model(model, method="random")


# -- sparsify: the model run through SparseLinear (here on the NumPy reference; tests/torch/test_torch_gpu.py on GPUs)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.odd = nn.Linear(64, 128), nn.Linear(128, 32), nn.Linear(32, 6)
        self.conv, self.conv3 = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x, img):
        return self.odd(self.fc2(torch.relu(self.fc1(x)))), self.conv3(self.conv(img))


def test_sparsify_replaces_what_it_can_and_lists_the_rest():
    torch.manual_seed(0)
    model = Small().half()
    x, img = torch.randn(5, 64).half(), torch.randn(2, 8, 4, 4).half()
    pst.prune_trained_model(model, permute=False)  # fc1, fc2, conv, conv3 become 2:4
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules() if hasattr(m, "bias")}
    report = pst.sparsify(model, "fp16", autotune=False)
    assert set(report.replaced) == {"fc1", "fc2", "conv", "odd"}  # odd: 6 outputs are padded, 32 inputs fine
    assert list(report.dense) == ["conv3"] and "1x1" in report.dense["conv3"]
    y, z = model(x, img)
    # fc1: activation-free check of one replaced layer against the reference bounds
    h = model.fc1(x)
    w, b = weights["fc1"].numpy(), biases["fc1"].numpy()
    reference.assert_close(h.numpy().T, reference.matmul(w, x.numpy().T, bias=b), a=w, b=x.numpy().T, bias=b)
    c = model.conv(img)
    wc, bc = weights["conv"].reshape(16, 8).numpy(), biases["conv"].numpy()
    flat = img.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    want = reference.matmul(wc, flat.T, bias=bc)
    reference.assert_close(c.permute(0, 2, 3, 1).reshape(-1, 16).numpy().T, want, a=wc, b=flat.T, bias=bc)
    assert y.shape == (5, 6) and z.shape == (2, 16, 4, 4)


def test_sparsify_int8_calibrates_every_layer_on_its_own_inputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    pst.prune_trained_model(model, permute=False)
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match="calibration"):
        pst.sparsify(model, "int8")
    report = pst.sparsify(model, "int8", calibration=[x], autotune=False)
    assert report.replaced == ["0", "2"]
    with torch.no_grad():
        got = model(x).float()
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())  # quantization error only


def test_the_sparse_module_compiles_whole():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).half()
    pst.prune_trained_model(model, permute=False)
    pst.sparsify(model, "fp16", autotune=False)
    x = torch.randn(8, 64).half()
    eager = model(x)
    for backend in ("eager", "aot_eager"):  # aot_eager: traced through the operator's shape-only version
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        assert torch.equal(compiled(x), eager)
    assert torch.equal(torch.ops.pycusparselt.linear(x, model[0].layer_id), model[0](x))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
])
def test_optimizer_state_is_permuted_with_the_parameters(make_opt):
    """Training on after a permutation equals training the permuted copy of the unpermuted run: the
    optimizer's momentum and moments move with their channels."""
    torch.manual_seed(3)
    model = MLP().double()
    x, y = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)

    def steps(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    opt = make_opt(model.parameters())
    steps(model, opt, 3)
    twin = MLP().double()
    twin.load_state_dict(model.state_dict())
    twin_opt = make_opt(twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict shares the state's tensors
    plan = pst.permute_network(model, optimizer=opt, time_budget=None)
    assert plan.permuted
    steps(model, opt, 2)
    steps(twin, twin_opt, 2)
    # the permuted network computes what the unpermuted one does, after the same training steps
    torch.testing.assert_close(model(x), twin(x), rtol=1e-10, atol=1e-10)

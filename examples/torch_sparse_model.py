"""A PyTorch model run sparse and saved like any PyTorch model: ``sparsify``, ``state_dict``, a fresh model.

1. prune a small model 2:4 (``prune_trained_model``; retraining would follow in real use),
2. ``sparsify`` it: its ``nn.Linear`` layers become ``pycusparselt.torch.SparseLinear`` modules (the ReLU after
   the first is fused into its product), whose 2:4 weights live in buffers,
3. save ``state_dict()``, build the dense model class again and load the sparse state into it with
   ``sparsify(fresh, state_dict=...)``: the outputs are identical, and inputs of 1 to 16 rows keep no weight
   but the state (``product_nbytes``).

On the GPU (FP16, cuSPARSELt) where PyTorch has one, else on the CPU (BF16, the NumPy reference):
``python examples/torch_sparse_model.py``.
"""

import io

import torch

import pycusparselt.torch as pst


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))


gpu = torch.cuda.is_available()
device, dtype, mode = ("cuda", torch.float16, "fp16") if gpu else ("cpu", torch.bfloat16, "bf16")
torch.manual_seed(0)
model = build().to(device, dtype).eval()
pst.prune_trained_model(model, permute=False)
x = torch.randn(64, 256, device=device, dtype=dtype)
with torch.no_grad():
    dense = model(x)
    print(pst.sparsify(model, mode))                    # what was replaced, fused, left dense
    sparse = model(x)
error = float((sparse.float() - dense.float()).norm() / dense.float().norm())
print(f"sparse vs dense ({'GPU' if gpu else 'CPU reference'}): relative difference {error:.1e}")
assert error < 1e-2

buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)                 # values, indices and bias of each sparse layer
state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
dense_bytes = sum(m.in_features * m.out_features * 2 + m.out_features * 2 for m in model if hasattr(m, "values"))
print(f"state: {state_bytes} bytes, {state_bytes / dense_bytes:.3f} of the dense 16-bit layers")

buffer.seek(0)
fresh = build().to(device, dtype).eval()               # the dense class again, other weights
pst.sparsify(fresh, mode, state_dict=torch.load(buffer))
with torch.no_grad():
    fresh(x[:4])  # a decode-sized input: on the GPU the decode kernel reads each layer's state where it is
held = sum(m.product_nbytes for m in fresh.modules() if isinstance(m, pst.SparseLinear))
print(f"after a 4-row input the sparse layers hold {held} bytes beside their state")
assert held == 0
with torch.no_grad():
    assert torch.equal(fresh(x), sparse)
print("a fresh model loaded from the sparse state dict gives identical outputs")
first = next(m for m in fresh.modules() if isinstance(m, pst.SparseLinear))
# on the GPU a repeated call with one of these shapes makes identity checks and the launch only (none on the CPU)
print(f"input shapes the first sparse layer launches directly: {first.prepared_shapes}")

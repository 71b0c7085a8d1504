"""Move a 2:4-pruned PyTorch ``nn.Linear`` into pycusparselt and check that the outputs agree.

The end of the 3-step recipe in PyTorch: a layer whose weight carries a fixed 2:4 mask. ``SparseLinear``
takes its weight and bias without copying them (DLPack) and runs the product through cuSPARSELt.

Needs PyTorch with a GPU: ``python examples/torch_linear.py``.
"""

import sys

import torch

import pycusparselt as psl
from pycusparselt.nn import masks

psl.require_gpu(exit=True)  # one line instead of a CUDA traceback where no GPU is usable
if not torch.cuda.is_available():
    sys.exit(f"torch_linear.py: PyTorch {torch.__version__} cannot use the GPU (a CPU-only build, or no CUDA "
             f"device visible to it); install a CUDA build of PyTorch")

torch.manual_seed(0)
linear = torch.nn.Linear(1024, 4096).cuda().half()
with torch.no_grad():
    mask = masks.compute_mask(linear.weight.detach().cpu())  # 2:4 along the inputs, on the CPU copy
    linear.weight.mul_(torch.as_tensor(mask, device="cuda"))

layer = psl.SparseLinear.from_torch(linear, prune=None)  # already 2:4: no pruning
x = torch.randn(384, 1024, device="cuda", dtype=torch.float16)
y = torch.from_dlpack(layer(x))  # shares the CuPy result
expected = linear(x)
error = ((y.float() - expected.float()).norm() / expected.float().norm()).item()
print(f"SparseLinear vs nn.Linear on {tuple(x.shape)} -> {tuple(y.shape)}: relative error {error:.2e}")
assert error < 1e-3

"""The 2:4 format on the CPU with the NumPy reference: prune, check, compress, multiply.

Runs anywhere (no GPU): ``python examples/reference_2to4.py``.
"""

import numpy as np

from pycusparselt import reference

# The seed's example: pruning 2:4 keeps the two largest magnitudes of each group of four.
row = np.array([[100, 90, 80, 10, 20, 40, 30, 70]], dtype=np.float16)
pruned = reference.prune_2to4(row)
print("row:          ", row[0])
print("pruned (2:4): ", pruned[0], " magnitude lost:", float(np.abs(row).sum() - np.abs(pruned).sum()))
permuted = row[:, [0, 1, 4, 3, 2, 5, 6, 7]]  # swap two channels first, as a permutation search would
print("permuted:     ", permuted[0], " lost:",
      float(np.abs(permuted).sum() - np.abs(reference.prune_2to4(permuted)).sum()))

# A weight matrix pruned along its reduction dimension, compressed and multiplied.
rng = np.random.default_rng(0)
m, k, n = 64, 128, 32
w = reference.prune_2to4(rng.standard_normal((m, k)).astype(np.float16), axis=-1)
assert reference.is_2to4(w, axis=-1)
values, indices = reference.compress(w, axis=-1)
assert np.array_equal(reference.decompress(values, indices, axis=-1), w)
ratio = reference.compressed_nbytes(w.shape, w.dtype) / w.nbytes
print(f"compressed {w.shape} float16: values {values.shape}, indices {indices.shape}, "
      f"{ratio:.4f} of the dense size")

x = rng.standard_normal((k, n)).astype(np.float16)
bias = rng.standard_normal(m).astype(np.float16)
d = reference.matmul(w, x, bias=bias, activation="relu", relu_upper_bound=6.0)
print("D = relu6(W @ X + bias):", d.shape, d.dtype, "min", float(d.min()), "max", float(d.max()))

# int8 -> int32 is exact; int8 outputs round half to even and saturate, as the GPU does.
a8 = reference.prune_2to4(rng.integers(-128, 128, (16, 64)).astype(np.int8))
b8 = rng.integers(-128, 128, (64, 16)).astype(np.int8)
exact = reference.matmul(a8, b8, out_dtype=np.int32)
assert np.array_equal(exact, a8.astype(np.int64) @ b8.astype(np.int64))
print("int8 -> int8 with alpha 1/2048:", reference.matmul(a8, b8, alpha=1 / 2048, out_dtype=np.int8)[0, :6])

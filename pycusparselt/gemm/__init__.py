"""Sparse GEMMs on device arrays: :mod:`~pycusparselt.gemm.plan` (SparseMatmulPlan, the stateful object),
``pycusparselt.gemm.launch`` (the compressed operand and the objects that launch a plan's product),
``pycusparselt.gemm.operands`` (operand layouts), :mod:`~pycusparselt.gemm.dtypes` (type combinations),
``pycusparselt.gemm.oneshot`` (one-shot products), ``pycusparselt.gemm.graphs`` (CUDA graphs) and
``pycusparselt.gemm.decode`` with ``pycusparselt.gemm.decode_layout`` (the 2:4 decode kernel for 1-16 rows)."""

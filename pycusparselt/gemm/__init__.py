"""Sparse GEMMs on device arrays: :mod:`~pycusparselt.gemm.plan` (SparseMatmulPlan, the stateful object),
:mod:`~pycusparselt.gemm.operands` (operand layouts), :mod:`~pycusparselt.gemm.dtypes` (type combinations),
:mod:`~pycusparselt.gemm.oneshot` (one-shot products) and :mod:`~pycusparselt.gemm.graphs` (CUDA graphs)."""

"""Sparse GEMMs on device arrays: :mod:`~pycusparselt.gemm.plan` (SparseMatmulPlan, the stateful object),
``pycusparselt.gemm.operands`` (operand layouts), :mod:`~pycusparselt.gemm.dtypes` (type combinations),
``pycusparselt.gemm.oneshot`` (one-shot products) and ``pycusparselt.gemm.graphs`` (CUDA graphs)."""

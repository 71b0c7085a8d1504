"""Layers for networks: :mod:`~pycusparselt.nn.linear` (SparseLinear), :mod:`~pycusparselt.nn.quantization`,
:mod:`~pycusparselt.nn.masks`, :mod:`~pycusparselt.nn.permutation` and :mod:`~pycusparselt.nn.layer_files`."""

"""The native floor: the cffi declarations, loading libcusparseLt, the settings read from the environment, and
the CUDA objects the bindings take (library handles per device, streams, devices). The public faces of this
layer are :mod:`pycusparselt.bindings`, :mod:`pycusparselt.enums` and :mod:`pycusparselt.errors`."""

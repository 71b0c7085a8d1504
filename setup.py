from setuptools import setup

# build_ffi.py: the ABI module (pycusparselt/_cusparselt_cffi.py, no compiler needed) and the optional compiled
# per-call shim (pycusparselt._fastcall; where it cannot be built, the install warns and goes on without it).
setup(cffi_modules=["build_ffi.py:ffibuilder", "build_ffi.py:fastcall_builder"])

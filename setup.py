from setuptools import setup

# build_ffi.py writes pycusparselt/_cusparselt_cffi.py (out-of-line ABI mode: no compiler needed).
setup(cffi_modules=["build_ffi.py:ffibuilder"])

"""The cffi declarations, generated from ``build_ffi.py`` when the package is built.

In a source checkout that was never built (``python -m pycusparselt`` run from the repository root, say),
the generated module is missing; the same declarations are then parsed in process from ``build_ffi.py``
(cffi's in-line ABI mode, which needs pycparser, a dependency of cffi).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["ffi"]


def _from_source_checkout(build_file: Path | None = None):
    build_file = build_file or Path(__file__).resolve().parents[2] / "build_ffi.py"
    if not build_file.is_file():
        raise ImportError(
            "pycusparselt's generated binding module (pycusparselt/_cusparselt_cffi.py) is missing and no "
            "build_ffi.py is beside the package: reinstall pycusparselt (`pip install --force-reinstall pycusparselt`)"
        )
    spec = importlib.util.spec_from_file_location("_pycusparselt_build_ffi", build_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_ffibuilder()


try:
    from .._cusparselt_cffi import ffi
except ImportError:  # an unbuilt source checkout
    ffi = _from_source_checkout()

"""The cffi declarations, generated from ``build_ffi.py`` when the package is built."""

from __future__ import annotations

try:
    from ._cusparselt_cffi import ffi
except ImportError as exc:  # a source checkout that was never built
    raise ImportError(
        "pycusparselt's generated binding module (pycusparselt/_cusparselt_cffi.py) is missing: this looks "
        "like an unbuilt source checkout. Install the package (`pip install .`) or run `python build_ffi.py` "
        "to generate the module in place."
    ) from exc

__all__ = ["ffi"]

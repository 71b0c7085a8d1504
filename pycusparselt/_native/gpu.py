"""CuPy, the GPU array library the package computes with, imported in this one place and only on first use:
importing pycusparselt needs no CuPy, and the NumPy reference runs where none is installed."""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["cupy", "INSTALL_HINT"]

#: What to install where CuPy is missing.
INSTALL_HINT = "pip install 'pycusparselt[cu13]' (or '[cu12]' for CUDA 12)"


def cupy() -> ModuleType:
    """The ``cupy`` module; ImportError saying what to install where it is missing."""
    module = sys.modules.get("cupy")
    if module is not None:
        return module
    try:
        import cupy as module
    except ImportError as exc:
        raise ImportError(f"this needs CuPy and a GPU: {INSTALL_HINT} ({exc})") from exc
    return module

"""Files of the checkout that tests load by path (the checkout root and tests/ are not on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(relative: str, name: str) -> ModuleType:
    """The module at ``ROOT / relative``, executed under ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


#: build_ffi.py: the cdef the bindings are generated from.
build_ffi = load("build_ffi.py", "build_ffi")

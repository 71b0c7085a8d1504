"""Finding and loading libcusparseLt: lazily, once, thread-safely.

Order: the ``PYCUSPARSELT_LIBRARY`` environment variable (a path to the shared library), then
cuda-pathfinder, which looks at what the process already loaded (PyTorch's copy, say), the pip wheels
(``nvidia/cu13/lib``, ``nvidia/cusparselt/lib``) and system installs. The library links the CUDA runtime
statically, so it loads (and reports its version) on a machine without a GPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from . import settings
from .ffi import ffi
from ..errors import LibraryNotFoundError

__all__ = ["ENV_VAR", "MIN_VERSION", "MAX_TESTED", "LoadedLibrary", "load", "library_version", "library_path"]

#: Environment variable naming the shared library to load, bypassing the search.
ENV_VAR = settings.LIBRARY
#: Oldest supported release: the opaque structures shrank to 512 bytes and the API took its present form in 0.8.
MIN_VERSION = (0, 8, 0)
#: Newest (major, minor) release line this version of pycusparselt was checked against.
MAX_TESTED = (0, 10)


class UntestedLibraryWarning(UserWarning):
    """The loaded cuSPARSELt is newer than any release pycusparselt was checked against."""


@dataclass(frozen=True)
class LoadedLibrary:
    """The loaded library: the cffi ``lib`` object, where it came from and its version."""

    lib: Any
    path: str
    found_via: str
    version: tuple[int, int, int]


_lock = threading.Lock()
_loaded: LoadedLibrary | None = None


def pip_package_hint() -> str:
    """Name the pip package that provides cuSPARSELt for the CUDA major version in use here."""
    from importlib import metadata

    for dist, package in (("cupy-cuda13x", "nvidia-cusparselt-cu13"), ("cupy-cuda12x", "nvidia-cusparselt-cu12")):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        extra = "cu13" if package.endswith("cu13") else "cu12"
        return f"`pip install {package}` (or `pip install pycusparselt[{extra}]`), since {dist} is installed"
    return (
        "`pip install nvidia-cusparselt-cu13` for CUDA 13 or `pip install nvidia-cusparselt-cu12` for CUDA 12 "
        "(or `pip install pycusparselt[cu13]` / `[cu12]`, which also installs CuPy)"
    )


def _query_version(lib: Any) -> tuple[int, int, int]:
    value = ffi.new("int*")
    parts = []
    for prop in (lib.MAJOR_VERSION, lib.MINOR_VERSION, lib.PATCH_LEVEL):
        status = lib.cusparseLtGetProperty(prop, value)
        if status != lib.CUSPARSE_STATUS_SUCCESS:
            raise LibraryNotFoundError(f"cusparseLtGetProperty failed with status {status}: not a usable cuSPARSELt")
        parts.append(int(value[0]))
    return (parts[0], parts[1], parts[2])


def _locate() -> tuple[str, str]:
    """Return (path, how it was found), or raise LibraryNotFoundError."""
    override = settings.path(ENV_VAR)
    if override:
        if not os.path.isfile(override):
            raise LibraryNotFoundError(f"{ENV_VAR}={override!r} is set, but no such file exists")
        return override, f"${ENV_VAR}"
    try:
        from cuda import pathfinder
    except ImportError as exc:  # a base dependency, so only a broken install gets here
        raise LibraryNotFoundError(
            "cuda-pathfinder is not installed; `pip install 'cuda-pathfinder>=1.5'` or set " + ENV_VAR
        ) from exc
    try:
        found = pathfinder.load_nvidia_dynamic_lib("cusparseLt")
    except Exception as exc:  # DynamicLibNotFoundError and friends
        raise LibraryNotFoundError(
            f"libcusparseLt was not found ({' '.join(str(exc).split())}). Install it with {pip_package_hint()}, "
            f"or set {ENV_VAR} to the path of libcusparseLt.so.0"
        ) from exc
    # abs_path is None only when the library was loaded by someone else from an unknown place;
    # dlopen by soname then returns that same copy.
    return found.abs_path or "libcusparseLt.so.0", f"cuda-pathfinder ({found.found_via})"


def load() -> LoadedLibrary:
    """Load cuSPARSELt on first use and return it; later calls return the same object."""
    global _loaded
    loaded = _loaded
    if loaded is not None:
        return loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        path, how = _locate()
        try:
            lib = ffi.dlopen(path)
        except OSError as exc:
            raise LibraryNotFoundError(
                f"libcusparseLt at {path} could not be loaded ({exc}). Reinstall it with {pip_package_hint()}"
            ) from exc
        try:
            version = _query_version(lib)
        except Exception as exc:  # noqa: BLE001 - a library without the symbols: cffi's AttributeError/ffi.error
            raise LibraryNotFoundError(
                f"{path} (found via {how}) is not libcusparseLt: {exc}. Point {ENV_VAR} at libcusparseLt.so.0, "
                f"or unset it"
            ) from None
        if version < MIN_VERSION:
            raise LibraryNotFoundError(
                f"libcusparseLt {'.'.join(map(str, version))} at {path} is too old: pycusparselt needs "
                f"{'.'.join(map(str, MIN_VERSION))} or newer. Install a newer one with {pip_package_hint()}"
            )
        if version[:2] > MAX_TESTED:
            warnings.warn(
                f"libcusparseLt {'.'.join(map(str, version))} is newer than the newest release pycusparselt "
                f"was checked against ({MAX_TESTED[0]}.{MAX_TESTED[1]}.x); run the header conformance test",
                UntestedLibraryWarning,
                stacklevel=3,
            )
        _loaded = LoadedLibrary(lib=lib, path=path, found_via=how, version=version)
        return _loaded


def library_version() -> tuple[int, int, int]:
    """Return the loaded cuSPARSELt's version as ``(major, minor, patch)``, loading it if needed."""
    return load().version


def library_path() -> str:
    """Return the path of the loaded libcusparseLt, loading it if needed."""
    return load().path

"""What machine a benchmark ran on: GPU, driver, CUDA, library and package versions."""

from __future__ import annotations

import datetime
import platform
import subprocess
from typing import Any

import numpy as np

from .._native import gpu


# -- environment -----------------------------------------------------------------------------------


def _dist_version(*dists: str) -> str | None:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return done.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cuda_version(value: int) -> str:
    return f"{value // 1000}.{value % 1000 // 10}"


def environment(torch_module: Any = None) -> dict[str, Any]:
    """What a result depends on: GPU, SM, driver, CUDA runtime, cuSPARSELt, CuPy, PyTorch, date, host."""
    from .. import __version__

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pycusparselt": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": _dist_version("cupy-cuda13x", "cupy-cuda12x", "cupy"),
        "driver": _driver_version(),
    }
    try:
        from .._native.library import load

        loaded = load()
        env["cusparselt"] = ".".join(map(str, loaded.version))
        env["cusparselt_path"] = loaded.path
        from ..bindings import matmul_call_path

        env["matmul_call"] = matmul_call_path()
    except Exception as exc:  # LibraryNotFoundError, or anything a broken install raises
        env["cusparselt"] = f"not available: {exc}"
    try:
        cupy = gpu.cupy()

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        env["device"] = name.decode() if isinstance(name, bytes) else str(name)
        env["sm"] = f"{props['major']}.{props['minor']}"
        env["multiprocessors"] = int(props["multiProcessorCount"])
        env["cuda_runtime"] = _cuda_version(cupy.cuda.runtime.runtimeGetVersion())
        env["cuda_driver_api"] = _cuda_version(cupy.cuda.runtime.driverGetVersion())
    except Exception as exc:  # no CuPy, no driver, no GPU
        env["device"] = f"none: {type(exc).__name__}: {exc}"
    if torch_module is not None:
        env["torch"] = torch_module.__version__
        env["torch_cuda"] = getattr(torch_module.version, "cuda", None)
        try:
            version = torch_module.backends.cusparselt.version()
            # CUSPARSELT_VERSION: major * 1000 + minor * 100 + patch
            env["torch_cusparselt"] = (
                None if version is None else f"{version // 1000}.{version // 100 % 10}.{version % 100}"
            )
        except Exception as exc:
            env["torch_cusparselt"] = f"not available: {exc}"
    else:
        env["torch"] = None
    return env



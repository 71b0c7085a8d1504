"""Skipping a GPU test on machines with too few GPUs, shared by the test files that need several."""

from __future__ import annotations

import pytest


def needs_gpus(count: int) -> None:
    """Skip the calling test, saying why, unless this machine has at least ``count`` GPUs."""
    import cupy

    have = cupy.cuda.runtime.getDeviceCount()
    if have < count:
        pytest.skip(f"needs {count} GPUs, this machine has {have}")


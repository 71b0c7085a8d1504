"""Shared test setup: the ``gpu`` and ``alone`` markers' skip logic and the hypothesis profiles."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# "ci": the default, for CPU tests. "gpu": fixed and derandomised, sized for one run on the GPU machine.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", deadline=None, derandomize=True, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("PYCUSPARSELT_HYPOTHESIS_PROFILE", "ci"))


@functools.lru_cache(maxsize=1)
def _gpu_skip_reason() -> str | None:
    from pycusparselt._native.devices import gpu_unavailable_reason

    return gpu_unavailable_reason()


def pytest_configure(config):
    # tuning in tests never writes the user's tuning cache
    if not os.environ.get("PYCUSPARSELT_CACHE_DIR"):
        os.environ["PYCUSPARSELT_CACHE_DIR"] = tempfile.mkdtemp(prefix="pycusparselt-tests-")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # other workers share the GPU: its timings and whole-GPU memory readings are theirs too
        alone = pytest.mark.skip(reason="needs the GPU to itself: run it without pytest-xdist "
                                        "(pytest -m 'gpu and alone')")
        for item in items:
            if "alone" in item.keywords:
                item.add_marker(alone)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"{_GPU_SKIP_PREFIX}{reason}")
    for item in gpu_items:
        item.add_marker(marker)


_GPU_SKIP_PREFIX = "GPU test: "


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Every GPU test skipped for the same reason reports one location, this file's, so that ``pytest -ra``
    prints the reason once with the count instead of once per test function."""
    outcome = yield
    report = outcome.get_result()
    longrepr = report.longrepr
    reason = str(longrepr[2]).removeprefix("Skipped: ") if isinstance(longrepr, tuple) else ""
    if report.skipped and reason.startswith(_GPU_SKIP_PREFIX):
        report.longrepr = (__file__, None, longrepr[2])


def pytest_report_header(config):
    reason = _gpu_skip_reason()
    return "pycusparselt GPU tests: " + ("will run" if reason is None else f"skipped ({reason})")

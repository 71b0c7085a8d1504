"""Fixtures of the distributed tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def nccl():
    """NCCL, loaded once per module; the test is skipped, saying why, where it cannot be loaded."""
    from pycusparselt import distributed

    try:
        return distributed.load_nccl()
    except ImportError as exc:
        pytest.skip(f"NCCL cannot be loaded here: {exc}")


@pytest.fixture
def one_rank(nccl, monkeypatch):
    """A process group of one rank on GPU 0, made from the environment as the launcher sets it."""
    from pycusparselt import distributed

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    group = distributed.init_process_group("nccl")
    yield group
    group.close()

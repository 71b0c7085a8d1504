"""The layer-loop host benchmark's shape and arguments, on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports bench_hf
    spec = importlib.util.spec_from_file_location("bench_torch_host_layers",
                                                  ROOT / "benchmarks" / "bench_torch_host_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_layers_are_bert_large_s_145(bench):
    shapes = bench.shapes()
    assert len(shapes) == 145
    assert shapes.count((1024, 4096)) == shapes.count((4096, 1024)) == 24
    assert shapes[:6] == [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)] and shapes[-1] == (1024, 1024)


@pytest.mark.parametrize("rows", ["0", "-3"])
def test_rows_must_be_positive(bench, rows, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rows", rows])
    assert f"--rows: expected a positive number of rows, got {rows}" in capsys.readouterr().err

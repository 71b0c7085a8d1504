"""The sparsify benchmark's report on the CPU: saved results become the documented table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    path = ROOT / "benchmarks" / "bench_torch_sparsify.py"
    spec = importlib.util.spec_from_file_location("bench_torch_sparsify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULTS = {
    "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "cusparselt": "0.8.0",
                    "python": "3.12.3"},
    "repeat": 50,
    "rows": [{"model": "ffn", "tokens": 384, "layers": 8, "eager_dense_ms": 0.5, "eager_sparse_ms": 0.4,
              "graph_dense_ms": 0.3, "graph_sparse_ms": 0.2, "eager_speedup": 1.25, "graph_speedup": 1.5,
              "max_rel_diff": 0.001}],
}


def test_the_report_is_the_table_of_the_saved_results(tmp_path, capsys):
    bench = _bench()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert bench.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NVIDIA H200, PyTorch 2.11.0, cuSPARSELt 0.8.0; medians of 50 samples.")
    assert "| ffn | 384 | 0.500 | 0.400 | 1.25x | 0.300 | 0.200 | 1.50x |" in out
    assert out.count("\n| ") == 2  # the header and one row

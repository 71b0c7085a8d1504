"""The documentation's accuracy and speed tables are generated from the committed results, and the accuracy
script runs on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_documentation_tables_match_the_committed_results():
    tables = _module(ROOT / "benchmarks" / "tables.py")
    assert tables.render(check=True) == [], "run: python benchmarks/tables.py quantization"


def test_committed_results_have_every_column():
    accuracy = json.loads((ROOT / "benchmarks/results/accuracy_digits.json").read_text())
    assert len(accuracy["networks"]) >= 2
    for data in accuracy["networks"].values():
        assert set(data["mean"]) >= {"dense_fp16", "sparse_fp16", "sparse_int8", "sparse_fp8"}
        assert len(data["per_seed"]) == len(accuracy["seeds"])
    speed_path = ROOT / "benchmarks/results/bert_ffn_h100.json"
    if speed_path.exists():  # measured on the GPU
        speed = json.loads(speed_path.read_text())
        assert speed["rows"] and not speed["errors"]
        for row in speed["rows"]:
            assert all(row["samples_per_s"].get(k) for k in ("dense_fp16", "dense_int8", "sparse_fp16",
                                                              "sparse_int8", "sparse_fp8"))
    else:
        assert "Not measured for this version yet" in (ROOT / "docs/quantization.rst").read_text()


def test_the_region_markers_are_required():
    tables = _module(ROOT / "benchmarks" / "tables.py")
    with pytest.raises(ValueError, match="markers"):
        tables.replace_region("no markers here", "accuracy-table", ["x"])
    text = "a\n.. t:start\nold\n.. t:end\nb"
    assert tables.replace_region(text, "t", ["new"]) == "a\n.. t:start\n\nnew\n\n.. t:end\nb"


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (the digits data set)")
def test_accuracy_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "accuracy.json"
    result = subprocess.run([sys.executable, "-P", str(SCRIPTS / "accuracy_table.py"), "--seeds", "0", "--epochs",
                             "10", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for name, net in data["networks"].items():
        (run,) = net["per_seed"]
        # 10 epochs already learn digits; every variant of the trained network classifies well
        assert all(run[k] > 0.85 for k in ("dense_fp16", "sparse_fp16", "sparse_int8", "sparse_fp8")), (name, run)
    assert "sparse INT8" in result.stdout


def test_speed_tables_render_a_complete_result():
    """The renderer turns a benchmark result into the seed-format rows: samples/s per variant and the gains."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    ms = {"dense_fp16_cupy": 2.0, "dense_fp16_torch": 1.6, "dense_fp16": 1.6, "dense_int8_cublas": 1.2,
          "dense_int8": 1.2, "sparse_fp16": 1.0, "sparse_int8": 0.8, "sparse_fp8": 0.9}
    layers, batch = 4, 8
    row = {"batch": batch, "tokens": batch * 384, "ms": ms, "rel_error": {"sparse_fp16": 1e-3},
           "samples_per_s": {k: batch * 1000 / (v * 24 / layers) for k, v in ms.items()},
           "sparse_int8_gain_over_dense_int8": 1.2 / 0.8 - 1, "sparse_fp16_gain_over_dense_fp16": 1.6 - 1}
    result = {"seq": 384, "hidden": 1024, "ffn": 4096, "device": "GPU", "cusparselt": "0.8.0", "layers": layers,
              "repeat": 20, "rows": [row], "errors": {}}
    text = "\n".join(tables.speed_table(result))
    assert f"     - {batch * 1000 / (0.8 * 6):.0f}" in text  # sparse INT8 samples/s
    assert "+50 %" in text and "+60 %" in text
    linear = "\n".join(tables.bert_ffn_table(result))
    assert "     - 0.250" in linear and "2.00x" in linear and "1.60x" in linear  # ms per block, speed-ups

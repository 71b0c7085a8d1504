"""The benchmark on the GPU: one tiny case per type gives a well-formed result whose columns agree with the
float64 reference, and the command line writes JSON and markdown."""

from __future__ import annotations

import json

import pytest

from pycusparselt import bench
from pycusparselt.bench import cases
from pycusparselt.cli import main as cli_main

pytestmark = pytest.mark.gpu

TINY = bench.Shape("tiny", "custom", 128, 256, 512)


def _check_case(record: dict, dtype: str) -> None:
    assert "error" not in record, record.get("error")
    assert (record["m"], record["n"], record["k"], record["dtype"]) == (128, 256, 512, dtype)
    assert record["flops"] == 2 * 128 * 256 * 512
    for key, column in record["columns"].items():
        assert set(column) - {"repeats"} in ({"na"}, {"median_ms", "min_ms", "rel_err", "ok"}), (key, column)
        if "na" in column:
            assert isinstance(column["na"], str) and column["na"]
        else:
            assert column["median_ms"] > 0 and column["min_ms"] <= column["median_ms"] * (1 + 1e-9), key
            assert column["ok"], (key, column)  # every column that ran computed the right product
    ours = record["columns"]["ours_default"]
    assert "median_ms" in ours and ours["rel_err"] <= cases.TOLERANCE[bench.DTYPES[dtype]]
    assert record["configs"]["default"][0] >= 0
    derived = record["derived"]
    assert derived["ours_ms"] is not None and derived["tflops"] > 0
    assert not derived["failed_checks"]


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_tiny_case_is_well_formed(dtype):
    # in a worker process, as the command line runs it: a PyTorch column that breaks the CUDA context is
    # reported as not run instead of ending the test
    results = bench.run_benchmark([TINY], [dtype], repeats=3, warmup=1, progress=False, isolate=True)
    json.loads(json.dumps(results, allow_nan=False))
    env = results["environment"]
    assert env["sm"] and env["cusparselt"][0].isdigit() and env["device"]
    (record,) = results["cases"]
    _check_case(record, dtype)
    dense = [key for key in bench.DENSE_COLUMNS if "median_ms" in record["columns"].get(key, {})]
    assert dense, record["columns"]  # cuBLAS through CuPy runs everywhere CuPy does
    assert record["derived"]["speedup"] > 0
    if dtype == "int8":  # int8 -> int32 is exact: ours equals the float64 reference bit for bit
        assert record["columns"]["ours_default"]["rel_err"] == 0.0
    assert set(record["columns"]) >= set(cases.DENSE_FOR[dtype]) | {"ours_default", "ours_search", "ours_timed"}


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli_main(["bench", "--shapes", "128x256x512", "--dtypes", "bf16", "--repeats", "3", "--warmup", "1",
                     "--no-progress", "--in-process", "--no-torch", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    results = json.loads(out_json.read_text())
    (record,) = results["cases"]
    _check_case(record, "bf16")
    assert record["columns"]["cslt_default"] == {"na": "disabled (--no-torch)"}
    page = out_md.read_text()
    assert "## Targets" in page and "| 128x256x512 |" in page
    assert "## Targets" in capsys.readouterr().out

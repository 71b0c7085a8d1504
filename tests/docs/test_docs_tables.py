"""The documented result tables are the committed JSON results, formatted: a table edited by hand or a result
file replaced without its table fails here."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv_table(page: str, caption_start: str, root: Path = ROOT) -> tuple[str, list[list[str]]]:
    """The caption and rows of the csv-table whose caption starts with ``caption_start``."""
    text = (root / "docs" / page).read_text()
    match = re.search(r"^\.\. csv-table:: (" + re.escape(caption_start) + r".*)\n((?:   .*\n|\n)+)", text, re.M)
    assert match, f"{page}: no csv-table captioned {caption_start!r}"
    body = [line.strip() for line in match.group(2).splitlines() if line.strip() and not line.strip().startswith(":")]
    return match.group(1), [[cell.strip() for cell in row] for row in csv.reader(body)]


def test_the_sparsify_speed_table_is_the_committed_result():
    bench = _module(ROOT / "benchmarks" / "bench_torch_sparsify.py")
    results = json.loads((RESULTS / "torch_sparsify_h200_2026-11-30.json").read_text())
    caption, rows = _csv_table("pytorch.rst", "NVIDIA H200, PyTorch")
    env = results["environment"]
    assert caption.startswith(f"{env['device']}, PyTorch {env['torch']}, cuSPARSELt {env['cusparselt']}; "
                              f"medians of {results['repeat']} samples")
    expected = [[cell.strip() for cell in bench.markdown_row(row).strip("|").split("|")] for row in results["rows"]]
    assert rows == expected


def test_the_scaling_table_is_the_committed_result():
    results = json.loads((RESULTS / "mlp_scaling_2xh200_2026-11-30.json").read_text())
    assert results["environment"]["one_gpu_per_process"] and not results["not_run"]
    _, rows = _csv_table("distributed.rst", "FP16 block")
    names = {"bert-large": "BERT-large", "llm": "LLM"}
    by_case = {(r["shape"], r["tokens"], r["gpus"]): r for r in results["rows"]}
    expected = []
    for (shape, tokens, gpus), one in sorted(by_case.items(), key=lambda item: (item[0][0], item[0][1])):
        if gpus != 1:
            continue
        two = by_case[(shape, tokens, 2)]
        expected.append([names[shape], str(tokens), f"{one['parallel_ms']:.3f}", f"{two['parallel_ms']:.3f}",
                         f"{two['speedup_vs_1gpu']:.2f}x", f"{two['allreduce_ms']:.3f}", f"{one['dense_ms']:.3f}"])
    assert rows == expected


def _spread(spread: dict) -> str:
    return f"{spread['mean']:.1%} ± {spread['std']:.1%}"  # as examples/torch_recipe.py --rst writes it


def test_the_recipe_accuracy_table_is_the_committed_result():
    results = json.loads((RESULTS / "torch_recipe_cpu_10seeds.json").read_text())
    text = (ROOT / "docs" / "pytorch.rst").read_text()
    assert results["command"] in " ".join(text.replace("``", "").split())  # the command the page names
    assert len(results["seeds"]) >= 5 and results["threads"] == 1 and results["deterministic_algorithms"]
    for model, summary in results["summary"].items():
        match = re.search(r"^   \* - " + re.escape(model) + r" \(.*\n((?:     - .*\n)+)", text, re.M)
        assert match, f"pytorch.rst: no accuracy row for {model}"
        cells = [line.strip()[2:] for line in match.group(1).splitlines()]
        expected = [_spread(summary[key]) for key in ("dense_fp32", "dense_fp16", "naive_retrained_fp32",
                                                      "permuted_retrained_fp32", "sparse_fp16", "sparse_int8")]
        expected.append(f"{summary['naive_kept_magnitude']['mean']:.3f} / "
                        f"{summary['permuted_kept_magnitude']['mean']:.3f}")
        assert cells == expected, model
        assert f"({summary['params']:,} parameters)" in match.group(0)
        rows = [r for r in results["rows"] if r["model"] == model]
        assert [r["seed"] for r in rows] == results["seeds"] == summary["seeds"]
        for key in ("permuted_retrained_fp32", "naive_retrained_fp32"):  # the summary is of these rows
            assert summary[key]["mean"] == pytest.approx(sum(r[key] for r in rows) / len(rows), rel=1e-12, abs=0)


@pytest.mark.parametrize("page, caption", [("pytorch.rst", "NVIDIA H200, PyTorch"), ("distributed.rst", "FP16 block"),
                                           ("pytorch.rst", "Hugging Face models on")])
def test_a_changed_cell_is_caught(page, caption, tmp_path):
    """The checks above can fail: one digit changed in a copy of the page changes the parsed rows."""
    _, rows = _csv_table(page, caption)
    text = (ROOT / "docs" / page).read_text()
    first = ", ".join(rows[0])
    changed = first[:-2] + ("0" if first[-2] != "0" else "1") + first[-1]
    copy = tmp_path / "docs" / page
    copy.parent.mkdir()
    copy.write_text(text.replace(first, changed, 1))
    assert _csv_table(page, caption, tmp_path)[1][0] != rows[0]


def _markdown_tables(text: str) -> list[list[str]]:
    """Every Markdown table of a page, as its lines."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_inference_tables_are_the_committed_result():
    tables = _module(ROOT / "benchmarks" / "tables.py")
    text = (ROOT / "docs" / "inference.md").read_text()
    path = re.search(r"Results: `benchmarks/results/(inference_[^`]+\.json)`", text).group(1)
    expected = tables.inference_tables(json.loads((RESULTS / path).read_text()))
    on_page = _markdown_tables(text)
    for table in expected:
        assert table in on_page, f"docs/inference.md lacks the table headed {table[0]!r} of {path}"


def test_a_changed_inference_cell_is_caught():
    """A table with one number changed is not the one the JSON gives."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    result = json.loads((RESULTS / "inference_h200_2026-11-30.json").read_text())
    table = tables.llm_table(result)
    result["rows"][0]["ms"] *= 1.01
    assert tables.llm_table(result) != table
    page = "\n".join(table).replace(table[2], table[2].replace("|", "| 9", 1))
    assert table not in _markdown_tables(page)


@pytest.mark.parametrize("name", ["hf_bert_h100_2026-12-06_module.json", "hf_llama_h100_2026-12-06_module.json"])
def test_the_hugging_face_tables_are_the_committed_results(monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # bench_hf imports its sibling's sampler
    bench = _module(ROOT / "benchmarks" / "bench_hf.py")
    results = json.loads((RESULTS / name).read_text())
    caption, rows = _csv_table("pytorch.rst", bench.caption(results))
    assert caption == bench.caption(results)
    assert rows == bench.table_rows(results)
    text = " ".join((ROOT / "docs" / "pytorch.rst").read_text().split())
    for line in bench.report(results).split("\n")[len(rows) + 3:]:  # the lines after the table
        assert " ".join(line.split()) in text
    assert results["command"] in text.replace("``", "")  # the command the page names made the file
    measured = {(r["model"], r.get("batch", r.get("tokens")), r["mode"]) for r in results["rows"]}
    assert len(measured) == len(results["rows"])
    assert all(("rel_err" in r) != ("same_tokens" in r) for r in results["rows"] if "error" not in r)


def test_the_decode_tables_are_the_committed_result():
    """docs/inference.md carries, between its decode markers, exactly what benchmarks/tables.py makes of the
    results JSON the region names."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    text = (ROOT / "docs" / "inference.md").read_text()
    region = tables.markdown_region(text, tables.DECODE_REGION)
    source = re.search(r"results `(benchmarks/results/decode_[^`]+\.json)`", region).group(1)
    results = json.loads((ROOT / source).read_text())
    assert tables.replace_markdown_region(text, tables.DECODE_REGION, tables.decode_region(results, source)) == text
    assert results["command"] in region  # the command the page names made the file
    on_page = _markdown_tables(text)
    for table in tables.decode_tables(results):
        assert table in on_page
    # the GEMM rows the run did not measure validly are shown as such, not as numbers
    missing = results.get("not_measured", {}).get("gemm", [])
    for backend in missing:
        assert not [r for r in results["rows"] if r["backend"] == backend]
    assert (tables.NOT_MEASURED in region) == bool(missing)


def _decode_result(backends=("ours-best", "cusparselt", "dense"), stack=True) -> dict:
    us = {"ours-best": 10.0, "cusparselt": 20.0, "cusparselt-0.10": 16.0, "dense": 30.0}
    rows = [{"m": m, "n": 4096, "k": 4096, "dtype": "float16", "backend": b, "us": us[b] * (1 + m / 16),
             "gbps": 1000.0 / (1 + m / 16), **({"splits": 8, "default": True} if b == "ours-best" else {})}
            for m in (1, 16) for b in backends]
    result = {"gpu": "GPU", "date": "2026-12-06", "command": "python benchmarks/bench_decode.py --out x.json",
              "backend_label": "cusparselt", "cusparselt": "0.8.0", "copy_gbps": 2000.0, "rows": rows}
    if stack:
        result["stack"] = [{"m": 1, "blocks": 32, "distinct_weights": 4, "dense_ms": 2.0, "cusparselt_ms": 1.6,
                            "ours_ms": 1.25}]
    return result


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_decode_tables_compute_their_ratios():
    tables = _module(ROOT / "benchmarks" / "tables.py")
    gemm = tables.decode_gemm_table(_decode_result())
    assert _cells(gemm[0])[5:7] == ["cuSPARSELt 0.8.0", "dense (cuBLAS)"]
    assert gemm[2] == ("| 4096 x 4096 | 1 | 10.6 us (8) | 941 | 47 % | 21.2 us | 31.9 us | 3.00x | 1.50x |")
    assert len(gemm) == 4
    (stack,) = tables.decode_stack_table(_decode_result())[2:]
    assert stack == "| 1 | 2.000 ms | 1.600 ms | 1.250 ms | 1.60x | 1.25x | 1.28x |"


def test_the_decode_tables_cope_with_missing_backends():
    """A JSON without cuSPARSELt or dense rows (or without the stack) gives "not measured" cells, not errors;
    rows of another cuSPARSELt label get columns of their own."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    gemm = tables.decode_gemm_table(_decode_result(backends=("ours-best",)))
    cells = _cells(gemm[2])
    assert cells[2] == "10.6 us (8)" and cells[5:] == [tables.NOT_MEASURED] * 4
    only_theirs = tables.decode_gemm_table(_decode_result(backends=("dense", "cusparselt-0.10")))
    assert "cusparselt-0.10 vs dense" in only_theirs[0]
    cells = _cells(only_theirs[2])
    assert cells[2:5] == [tables.NOT_MEASURED] * 3 and cells[5:] == [tables.NOT_MEASURED, "17.0 us", "31.9 us",
                                                                     tables.NOT_MEASURED, tables.NOT_MEASURED,
                                                                     "1.88x"]
    region = tables.decode_region(_decode_result(stack=False), "benchmarks/results/x.json")
    assert f"The LLM decode stack: {tables.NOT_MEASURED}." in region
    partial = _decode_result()
    del partial["stack"][0]["cusparselt_ms"]
    assert tables.decode_stack_table(partial)[2].count(tables.NOT_MEASURED) == 3


def test_a_changed_decode_cell_is_caught(tmp_path):
    """A page whose table differs from the JSON by one number fails the comparison."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    result = _decode_result()
    body = tables.decode_region(result, "benchmarks/results/x.json")
    page = tables.replace_markdown_region("# Page\n\n<!-- decode-tables:start -->\n<!-- decode-tables:end -->\n",
                                          tables.DECODE_REGION, body)
    result["rows"][0]["us"] *= 1.01
    assert tables.replace_markdown_region(page, tables.DECODE_REGION,
                                          tables.decode_region(result, "benchmarks/results/x.json")) != page
    with pytest.raises(ValueError, match="markers"):
        tables.replace_markdown_region("# no markers\n", tables.DECODE_REGION, body)


def _forms_result() -> dict:
    """A two-GPU result with every form: one GPU 2.0 ms, all-reduce 1.6, sequence 1.5 (2 chunks) and 1.25 (4),
    data 1.05, at LLM 8192 tokens only."""
    base = {"shape": "llm", "hidden": 4096, "ffn": 14336, "tokens": 8192}
    rows = [{**base, "gpus": 1, "form": "allreduce", "chunks": 1, "parallel_ms": 2.0, "gemm_ms": 2.0,
             "exposed_ms": 0.0},
            {**base, "gpus": 2, "form": "allreduce", "chunks": 1, "parallel_ms": 1.6, "gemm_ms": 1.0,
             "exposed_ms": 0.6},
            {**base, "gpus": 2, "form": "sequence", "chunks": 2, "parallel_ms": 1.5, "gemm_ms": 1.1, "exposed_ms": 0.4},
            {**base, "gpus": 2, "form": "sequence", "chunks": 4, "parallel_ms": 1.25, "gemm_ms": 1.2,
             "exposed_ms": 0.05},
            {**base, "gpus": 2, "form": "data", "chunks": 1, "parallel_ms": 1.05, "gemm_ms": 1.05, "exposed_ms": 0.0}]
    env = {"device": "NVIDIA H200", "visible_gpus": 2, "cusparselt": "0.8.0", "nccl": 22809}
    return {"environment": env, "rows": rows, "not_run": []}


def test_the_forms_table_is_the_committed_result():
    """docs/distributed.rst carries, between its scaling-forms markers, what benchmarks/tables.py makes of the
    newest two-GPU result with forms ("not measured" rows while there is none); the all-reduce table stays."""
    tables = _module(ROOT / "benchmarks" / "tables.py")
    path = tables.forms_result_path()
    text = (ROOT / "docs" / "distributed.rst").read_text()
    result = None if path is None else json.loads(path.read_text())
    source = None if path is None else str(path.relative_to(ROOT))
    assert tables.replace_region(text, tables.FORMS_REGION, tables.forms_table(result, source)) == text
    region = text.split(".. scaling-forms-table:start", 1)[1].split(".. scaling-forms-table:end", 1)[0]
    assert (tables.NOT_MEASURED_RUN in region) == (path is None)
    assert tables.scaling_forms(check=True) == 0


def test_the_forms_table_computes_speedups_and_picks_the_best_chunks():
    tables = _module(ROOT / "benchmarks" / "tables.py")
    lines = tables.forms_table(_forms_result(), "benchmarks/results/mlp_scaling_2xh200_x.json")
    assert lines[0].startswith("NVIDIA H200 x2, cuSPARSELt 0.8.0, NCCL 22809, ``benchmarks/results/")
    rows = [line.strip() for line in lines if line.startswith("   LLM, 8192")]
    assert rows == ["LLM, 8192, all-reduce (tensor), 2.000, 1.600, 1.25x, 0.600, >= 1.75x",
                    "LLM, 8192, sequence (tensor; 4 chunks), 2.000, 1.250, 1.60x, 0.050, >= 1.75x",
                    "LLM, 8192, data, 2.000, 1.050, 1.90x, 0.000, -"]
    assert all(line.count(tables.NOT_MEASURED_RUN) == 4 for line in lines if line.startswith("   BERT-large"))


def test_a_changed_forms_cell_is_caught(tmp_path):
    tables = _module(ROOT / "benchmarks" / "tables.py")
    page = tmp_path / "page.rst"
    page.write_text("Page\n\n.. scaling-forms-table:start\n.. scaling-forms-table:end\n")
    assert tables.scaling_forms(check=True, page=page) == 1  # an empty region is out of date
    assert tables.scaling_forms(page=page) == 0  # written
    assert tables.scaling_forms(check=True, page=page) == 0
    page.write_text(page.read_text().replace(">= 1.90x", ">= 1.50x"))
    assert tables.scaling_forms(check=True, page=page) == 1


def test_the_newest_result_with_forms_is_chosen(tmp_path):
    tables = _module(ROOT / "benchmarks" / "tables.py")
    assert tables.forms_result_path(tmp_path) is None
    (tmp_path / "mlp_scaling_2xh200_2026-11-30.json").write_text(json.dumps({"rows": [{"gpus": 2}]}))  # no forms
    assert tables.forms_result_path(tmp_path) is None
    for date in ("2026-12-01", "2026-12-09"):
        (tmp_path / f"mlp_scaling_2xh100_{date}.json").write_text(json.dumps(_forms_result()))
    assert tables.forms_result_path(tmp_path).name == "mlp_scaling_2xh100_2026-12-09.json"

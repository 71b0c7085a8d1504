"""The benchmark's CPU side: shape set, argument parsing, FLOP counting, summaries, targets and the report.

Results are built by hand here (the JSON layout :func:`pycusparselt.bench.run_benchmark` writes), so every
figure the targets and tables must show is known in advance.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pycusparselt import bench
from pycusparselt.bench import cases, report
from pycusparselt.bench import inputs as bench_inputs
from pycusparselt.bench import runner as bench_runner
from pycusparselt.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


# -- the shape set -----------------------------------------------------------------------------------


def test_shape_set():
    shapes = bench.SHAPES
    assert len(shapes) == 3 + 9 + 12
    assert len({s.name for s in shapes}) == len(shapes)
    squares = [(s.m, s.n, s.k) for s in shapes if s.group == "square"]
    assert squares == [(4096, 4096, 4096), (8192, 8192, 8192), (10240, 10240, 10240)]
    bert = [s for s in shapes if s.group == "bert"]
    assert sorted({s.m for s in bert}) == [384, 3072, 12288]  # sequence 384 times batch 1, 8, 32
    assert sorted({(s.k, s.n) for s in bert}) == [(1024, 1024), (1024, 4096), (4096, 1024)]  # (in, out)
    llm = [s for s in shapes if s.group == "llm"]
    assert sorted({s.m for s in llm}) == [16, 128, 2048, 8192]
    assert sorted({(s.k, s.n) for s in llm}) == [(4096, 4096), (4096, 11008), (11008, 4096)]
    # y (M, N) = x (M, K) @ W (N, K).T: the name says in -> out, i.e. K -> N
    up = next(s for s in shapes if s.name == "llm-m16-4096to11008")
    assert (up.m, up.n, up.k) == (16, 11008, 4096)
    # no shape needs padding for any type: sparse W (N, K) multiples of 32, M of 16
    assert all(s.n % 32 == 0 and s.k % 32 == 0 and s.m % 16 == 0 for s in shapes)
    assert set(bench.QUICK_SHAPES) < set(shapes) and {s.group for s in bench.QUICK_SHAPES} == set(cases.GROUPS)


# -- argument parsing ----------------------------------------------------------------------------------


def test_parse_shapes():
    assert bench.parse_shapes("all") == list(bench.SHAPES)
    assert bench.parse_shapes("quick") == list(bench.QUICK_SHAPES)
    assert [s.name for s in bench.parse_shapes("square")] == ["square-4096", "square-8192", "square-10240"]
    mixed = bench.parse_shapes("llm-m16-4096to4096, 512x1024x2048 ,square-4096,square-4096")
    assert [s.name for s in mixed] == ["llm-m16-4096to4096", "512x1024x2048", "square-4096"]  # duplicates dropped
    custom = mixed[1]
    assert (custom.group, custom.m, custom.n, custom.k) == ("custom", 512, 1024, 2048)
    assert len(bench.parse_shapes("bert,llm")) == 21


@pytest.mark.parametrize("text", ["12x3", "0x16x16", "16x16x-1", "squares", "", " , "])
def test_parse_shapes_rejects(text):
    with pytest.raises(ValueError, match="--shapes") as info:
        bench.parse_shapes(text)
    assert repr(text.strip(" ,")) in str(info.value) or "no shape" in str(info.value)


def test_parse_dtypes():
    assert bench.parse_dtypes("fp16, INT8,fp16") == ["fp16", "int8"]
    assert bench.parse_dtypes("e4m3") == ["e4m3"]
    with pytest.raises(ValueError, match=r"--dtypes: .*fp16, bf16, int8, e4m3.*'fp16,fp32'"):
        bench.parse_dtypes("fp16,fp32")
    with pytest.raises(ValueError, match="--dtypes"):
        bench.parse_dtypes(" ")


def test_cli_rejects_bad_options(capsys):
    assert cli_main(["bench", "--dtypes", "fp64"]) == 2
    assert "--dtypes" in capsys.readouterr().err
    assert cli_main(["bench", "--shapes", "4096x4096"]) == 2
    assert "'4096x4096'" in capsys.readouterr().err


def test_cli_without_gpu_says_why(capsys):
    from pycusparselt._native.devices import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is usable here: the benchmark would run")
    assert cli_main(["bench", "--quick", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "needs a GPU" in err and reason in err


# -- arithmetic ---------------------------------------------------------------------------------------


def test_flop_counting():
    assert bench.gemm_flops(2, 3, 4) == 48
    assert bench.gemm_flops(4096, 4096, 4096) == 2 * 4096**3
    assert bench.throughput(1000, 1000, 1000, 1.0) == pytest.approx(2.0)  # 2e9 operations in 1 ms
    assert bench.throughput(8192, 8192, 8192, 1.03) == pytest.approx(2 * 8192**3 / 1.03e-3 / 1e12)
    with pytest.raises(ValueError, match="ms"):
        bench.throughput(16, 16, 16, 0.0)


def test_large_shapes():
    assert bench.is_large(4096, 4096, 4096)
    assert bench.is_large(12288, 4096, 1024)  # BERT batch 32, 1024 -> 4096: 1.03e11 operations
    assert not bench.is_large(12288, 1024, 1024)  # 2.6e10
    assert not bench.is_large(3072, 4096, 1024)  # 2.6e10
    assert not bench.is_large(16, 11008, 4096)  # skinny
    assert [s.name for s in bench.SHAPES if bench.is_large(s.m, s.n, s.k)] == [
        "square-4096", "square-8192", "square-10240", "bert-b32-1024to4096", "bert-b32-4096to1024",
        "llm-m2048-4096to11008", "llm-m2048-11008to4096",  # not m2048-4096to4096: 6.9e10
        "llm-m8192-4096to11008", "llm-m8192-11008to4096", "llm-m8192-4096to4096",
    ]


# -- summaries, targets and the report from hand-made results -----------------------------------------


def col(ms, ok=True, err=1e-4):
    return {"median_ms": ms, "min_ms": ms * 0.98, "rel_err": err if ok else 0.7, "ok": ok}


def na(reason):
    return {"na": reason}


def case(dtype, shape, columns, **extra):
    return dict(shape=shape.name, group=shape.group, m=shape.m, n=shape.n, k=shape.k, dtype=dtype,
                out_dtype=bench.DTYPES[dtype], flops=bench.gemm_flops(shape.m, shape.n, shape.k),
                large=bench.is_large(shape.m, shape.n, shape.k), columns=columns, configs={}, tune_s={}, **extra)


SQ = bench.parse_shapes("square")
SMALL = bench.parse_shapes("llm-m16-4096to4096")[0]


def ours(default, search, timed, graphs=None):
    columns = {"ours_default": col(default), "ours_search": col(search), "ours_timed": col(timed)}
    if graphs is not None:
        columns.update({f"ours_{s}_graph": col(g) for s, g in zip(("default", "search", "timed"), graphs,
                                                                     strict=True)})
    return columns


def test_summarize_uses_only_checked_columns():
    columns = {"cupy_matmul": col(2.0), "cublas_gemmex": col(1.0, ok=False), "torch_mm": col(1.6),
               "cslt_default": col(1.5), "cslt_search": col(1.2), **ours(1.3, 1.1, 1.0, graphs=(1.2, 1.0, 0.4))}
    d = bench.summarize(case("fp16", SQ[0], columns))
    assert d["best_dense"] == "torch_mm" and d["best_dense_ms"] == 1.6  # the faster, wrong gemmEx is ignored
    assert d["ours"] == "ours_timed" and d["ours_ms"] == 1.0
    assert d["speedup"] == pytest.approx(1.6) and d["ours_graph_ms"] == 0.4
    assert d["vs_cslt"] == pytest.approx(1.2)
    assert d["tflops"] == pytest.approx(2 * 4096**3 / 1e-3 / 1e12)
    assert d["host_bound"]  # the replay takes under half the eager time
    assert d["failed_checks"] == ["cublas_gemmex"]
    # without the tuner's column the search's is the headline; with no dense column there is no speedup
    columns = {"cupy_matmul": na("no"), "ours_default": col(1.3), "ours_search": col(1.1), "ours_timed": na("x")}
    d = bench.summarize(case("fp16", SQ[0], columns))
    assert d["ours"] == "ours_search" and d["speedup"] is None and d["best_dense"] is None
    assert not d["host_bound"]


def _by_target(rows, text):
    found = [row for row in rows if text in row["target"]]
    assert len(found) == 1, [row["target"] for row in rows]
    return found[0]


def test_speedup_targets_median_over_large_shapes():
    cases = [
        case("fp16", SQ[0], {"cupy_matmul": col(1.4), **ours(1.1, 1.0, 1.0)}),  # 1.4x
        case("fp16", SQ[1], {"cupy_matmul": col(1.6), **ours(1.1, 1.0, 1.0)}),  # 1.6x
        case("fp16", SQ[2], {"cupy_matmul": col(1.7), **ours(1.1, 1.0, 1.0)}),  # 1.7x
        case("fp16", SMALL, {"cupy_matmul": col(0.5), **ours(1.1, 1.0, 1.0)}),  # 0.5x, not a large shape
        case("int8", SQ[0], {"cublas_gemmex": col(1.5), "torch_int_mm": col(3.0), **ours(1.1, 1.0, 1.0)}),
        case("int8", SQ[1], {"cublas_gemmex": col(2.0), **ours(1.1, 1.0, 1.0)}),
    ]
    rows = bench.targets({"cases": cases})
    fp16 = _by_target(rows, "fp16: median speedup")
    assert fp16["met"] is True and fp16["measured"].startswith("1.60x over 3 shapes")
    assert fp16["details"] == ["1 of 3 shapes below 1.55x: fp16 square-4096: 1.40x"]
    int8 = _by_target(rows, "int8: median speedup")
    assert int8["met"] is False and int8["measured"].startswith("1.75x over 2 shapes")  # against the best dense
    bf16 = _by_target(rows, "bf16: median speedup")
    assert bf16["met"] is None and "n/a" in bf16["measured"]


def test_tuner_violations_allow_two_percent_noise():
    cases = [
        # graph times: tuned 1.01x the default (noise, not counted), 1.03x the search (counted)
        case("fp16", SQ[0], ours(5.0, 5.0, 5.0, graphs=(1.00, 0.98, 1.01))),
        # tuned 1.05x the default: counted once (against the default), the search is slower still
        case("fp16", SQ[1], ours(5.0, 5.0, 5.0, graphs=(1.00, 1.20, 1.05))),
        # fine against both
        case("fp16", SQ[2], ours(5.0, 5.0, 5.0, graphs=(1.00, 0.90, 0.90))),
    ]
    rows = bench.targets({"cases": cases})
    vs_default = _by_target(rows, "never slower than the default config")
    assert vs_default["met"] is False and vs_default["measured"].startswith("1 of 3 cases slower")
    assert len(vs_default["details"]) == 1 and "square-8192" in vs_default["details"][0]
    vs_search = _by_target(rows, "never slower than cusparseLtMatmulSearch")
    assert vs_search["met"] is False and vs_search["measured"].startswith("1 of 3 cases slower")
    assert "square-4096" in vs_search["details"][0] and "1.031x" in vs_search["details"][0]
    assert "graph" in vs_search["measured"]
    # a wider noise allowance forgives both; eager times are used where a graph column is missing
    rows = bench.targets({"cases": cases}, noise=0.06)
    assert _by_target(rows, "default config")["met"] and _by_target(rows, "MatmulSearch")["met"]
    eager = [case("fp16", SQ[0], ours(1.00, 1.00, 1.04))]
    row = _by_target(bench.targets({"cases": eager}), "default config")
    assert row["met"] is False and "eager" in row["measured"]
    untuned = [case("fp16", SQ[0], {"ours_default": col(1.0), "ours_timed": na("no tuner")})]
    assert _by_target(bench.targets({"cases": untuned}), "default config")["met"] is None


def test_cslt_target_and_failed_checks():
    cases = [
        case("fp16", SQ[0], {"cslt_default": col(1.5), "cslt_search": col(0.9), **ours(1.1, 1.0, 1.0)}),
        case("bf16", SQ[0], {"cslt_default": col(2.0), "cslt_search": na("no search"), **ours(1.1, 1.0, 1.0)}),
        case("e4m3", SQ[0], {"cslt_default": col(0.5, ok=False), **ours(1.1, 1.0, 1.0)}),  # wrong: ignored
    ]
    rows = bench.targets({"cases": cases})
    row = _by_target(rows, "_cslt_sparse_mm")
    assert row["met"] is False and row["measured"].startswith("1 of 2 cases slower")
    assert row["details"] == ["fp16 square-4096: ours 1 ms vs 0.9 ms"]
    checks = _by_target(rows, "agrees with the float64 reference")
    assert checks["met"] is False and checks["details"] == ["e4m3 square-4096: cslt_default"]


def test_host_overhead_targets():
    host = {"problems": [
        {"m": 64, "n": 256, "k": 256, "c_host_us": 10.0, "py_matmul_host_us": 13.5, "py_bind_host_us": 11.0,
         "py_matmul_gpu_us": 13.6, "graph_gpu_us": 4.0},
        {"m": 4096, "n": 4096, "k": 4096, "c_host_us": 12.0, "py_matmul_host_us": 14.5, "py_bind_host_us": 12.5,
         "py_matmul_gpu_us": 150.0, "graph_gpu_us": 147.0},
    ]}
    rows = bench.targets({"cases": [], "host_overhead": host})
    matmul = _by_target(rows, "plan.matmul within")
    assert matmul["met"] is False and matmul["measured"].startswith("+3.5 us at worst")
    bind = _by_target(rows, "plan.bind(...)() within")
    assert bind["met"] is True and bind["measured"].startswith("+1.0 us at worst")
    graph = _by_target(rows, "graph replay")
    assert graph["met"] is True and "64x256x256: graph 4.0 us per GEMM vs host 10.0 us" in graph["measured"]
    # no C loop (no nvcc): n/a with the reason, not a pass
    no_c = {"c_reason": "nvcc not found", "problems": [dict(p, c_host_us=None) for p in host["problems"]]}
    row = _by_target(bench.targets({"cases": [], "host_overhead": no_c}), "plan.matmul within")
    assert row["met"] is None and "nvcc not found" in row["measured"]
    assert _by_target(bench.targets({"cases": []}), "host time")["met"] is None


def _results():
    columns = {
        "cupy_matmul": col(1.77), "cublas_gemmex": col(1.80), "torch_mm": na("PyTorch is not installed"),
        "cslt_default": na("PyTorch is not installed"), "cslt_search": na("PyTorch is not installed"),
        **ours(1.18, 1.05, 1.03, graphs=(1.17, 1.04, 1.02)),
    }
    small = {"cupy_matmul": col(0.02), "cublas_gemmex": col(0.018, ok=False), **ours(0.03, 0.03, 0.03,
                                                                                      graphs=(0.01, 0.01, 0.01))}
    return {
        "environment": {"device": "NVIDIA H100 80GB HBM3", "sm": "9.0", "driver": "580.159.04",
                        "cuda_runtime": "13.0", "cusparselt": "0.8.0", "cupy": "14.2.0", "torch": None,
                        "pycusparselt": "0.1.0", "date": "2026-11-25T10:00:00+00:00"},
        "settings": {"repeats": 20, "warmup": 5, "noise": 0.02},
        "cases": [case("fp16", SQ[1], columns), case("fp16", SMALL, small),
                  dict(case("int8", SQ[2], {}), error="OutOfMemoryError: out of memory")],
    }


def test_markdown_report():
    results = _results()
    page = bench.markdown_report(json.loads(json.dumps(results)), plot_path="../x/plot.png", notes="NOTES HERE",
                                 source="benchmarks/results/x.json")
    assert page.startswith("# Benchmarks\n")
    assert "NVIDIA H100 80GB HBM3 (SM 9.0), driver 580.159.04, CUDA runtime 13.0, cuSPARSELt 0.8.0" in page
    assert "Generated from `benchmarks/results/x.json`" in page
    assert "![Speedup over the best dense GEMM](../x/plot.png)" in page
    assert page.index("## Targets") < page.index("NOTES HERE") < page.index("## Results")
    row = next(line for line in page.splitlines() if line.startswith("| square-8192 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "8192 x 8192 x 8192"
    assert cells[2] == "1.77 (cupy.matmul)"  # three significant digits
    assert cells[3] == "n/a / n/a"
    assert cells[4:8] == ["1.18", "1.05", "1.03", "1.02"]
    assert cells[8] == f"{2 * 8192**3 / 1.03e-3 / 1e12:.0f}"
    assert cells[9:11] == ["1.72x", "n/a"] and len(cells) == 11
    small = next(line for line in page.splitlines() if line.startswith("| llm-m16-4096to4096 |"))
    assert "0.0300 * |" in small  # host-bound: the replay takes a third of the eager time
    assert "0.0200 (cupy.matmul)" in small  # the wrong, faster gemmEx is not the baseline
    assert "case failed: OutOfMemoryError" in page
    assert "`torch_mm` (1 case): PyTorch is not installed" in page
    assert "{eval-rst}" not in page
    assert "{eval-rst}" in bench.markdown_report(results, api=True)
    # recomputed from the raw medians: a stale "derived" entry in the file changes nothing
    stale = json.loads(json.dumps(results))
    stale["cases"][0]["derived"] = {"speedup": 99.0}
    assert bench.markdown_report(stale) == bench.markdown_report(results)


def test_markdown_tables_mark_wrong_results():
    columns = {"cupy_matmul": col(1.0), **ours(0.9, 0.8, 0.7)}
    columns["ours_search"] = col(0.1, ok=False)
    text = bench.markdown_tables({"cases": [case("bf16", SQ[0], columns)]})
    assert "### bf16 -> bf16" in text and "0.100 (wrong result)" in text
    assert "| 1.43x |" in text  # 1.0 / 0.7: the timed column, not the wrong faster one


def test_plot(tmp_path):
    path = tmp_path / "plot.png"
    why = bench.plot(_results(), str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert why is not None and "matplotlib" in why and not path.exists()
    else:
        assert why is None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.plot({"cases": []}, str(tmp_path / "none.png")) in ("no case to plot", why)


def test_report_script(tmp_path):
    results, host = tmp_path / "results.json", tmp_path / "host.json"
    results.write_text(json.dumps(_results()))
    host.write_text(json.dumps({"problems": [{"m": 64, "n": 256, "k": 256, "c_host_us": 10.0,
                                               "py_matmul_host_us": 12.0, "py_bind_host_us": 10.5,
                                               "py_bind_abi_host_us": 11.5, "py_matmul_gpu_us": 12.1,
                                               "graph_gpu_us": 3.0}]}))
    notes = tmp_path / "notes.md"
    notes.write_text("Why the misses happened.\n")
    out = tmp_path / "page.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "gemm", str(results), "--host-overhead", str(host),
         "--notes", str(notes), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "## Host overhead" in page and "| 64 x 256 x 256 | 10.0 | 12.0 | 10.5 | 11.5 | n/a | +2.0 | +0.5 |" in page
    assert "Why the misses happened." in page and "{eval-rst}" in page


# -- worker processes: a column that breaks the CUDA context costs that column, not the run -----------

FAKE_WORKER = r'''
import json, os, sys
from pycusparselt import bench
from pycusparselt.bench import runner as bench_runner

spec = json.load(open(sys.argv[1]))
skip = {(d, k): r for d, k, r in spec["skip"]}
events = open(spec["events"], "a")

def emit(event):
    events.write(json.dumps(event) + "\n")
    events.flush()

emit({"environment": {"device": "fake GPU"}})
for count, (index, dtype, fields, seed) in enumerate(spec["cases"]):
    if count == int(os.environ.get("FAKE_STOP", "-1")):
        emit({"stopped": "time limit"})
        break
    shape = bench.Shape(*fields)
    crash = os.environ["FAKE_CRASH"].split(",")  # "dtype:shape:column:how"
    for item in crash:
        c_dtype, c_shape, c_key, how = item.split(":")
        if (dtype, shape.name) == (c_dtype, c_shape) and (how == "always" or (dtype, c_key) not in skip):
            emit({"index": index, "column": c_key})
            if how in ("fatal", "always"):
                emit({"index": index, "fatal": c_key, "reason": "cudaErrorIllegalInstruction"})
            os._exit(3)
    record = bench_runner._failed(shape, dtype, "")
    del record["error"]
    record["seed"] = seed
    for key in ("cslt_search", "ours_default_graph", "ours_timed_graph", "ours_timed"):
        record["columns"][key] = {"na": skip[(dtype, key)]} if (dtype, key) in skip else {"median_ms": 1.0}
    emit({"index": index, "record": record})
'''


def _isolated(tmp_path, monkeypatch, crash, shapes="square-4096,square-8192,llm-m16-4096to4096"):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setenv("FAKE_CRASH", crash)
    cases = [(d, s) for s in bench.parse_shapes(shapes) for d in ("fp16", "bf16")]
    got: dict[int, dict] = {}
    env = bench_runner._run_isolated(cases, {"seed": 10}, lambda i, r: got.__setitem__(i, r),
                              command=lambda spec: [sys.executable, str(script), spec])
    return env, cases, got


def test_isolated_run_leaves_out_a_crashing_column(tmp_path, monkeypatch):
    env, cases, got = _isolated(tmp_path, monkeypatch,
                                "fp16:square-8192:cslt_search:fatal,fp16:llm-m16-4096to4096:ours_timed_graph:hard")
    assert env == {"device": "fake GPU"}
    assert sorted(got) == list(range(len(cases)))
    assert all(got[i]["seed"] == 10 + i for i in got)  # every case kept its own seed across restarts
    by = {(r["dtype"], r["shape"]): r["columns"] for r in got.values()}
    assert by[("fp16", "square-4096")]["cslt_search"] == {"median_ms": 1.0}  # before the crash: measured
    note = by[("fp16", "square-8192")]["cslt_search"]["na"]  # the crashed case, rerun without the column
    assert "broke the CUDA context on fp16 square-8192" in note and "cudaErrorIllegalInstruction" in note
    assert by[("fp16", "llm-m16-4096to4096")]["cslt_search"]["na"] == note  # left out for the rest of fp16
    assert by[("bf16", "llm-m16-4096to4096")]["cslt_search"] == {"median_ms": 1.0}  # other types unaffected
    # a graph capture that killed the worker outright: all graph columns of that type are left out
    graph = by[("fp16", "llm-m16-4096to4096")]
    assert "exit code 3" in graph["ours_timed_graph"]["na"] and "na" in graph["ours_default_graph"]
    assert graph["ours_timed"] == {"median_ms": 1.0}


def test_isolated_run_moves_past_a_case_that_cannot_run(tmp_path, monkeypatch):
    _, cases, got = _isolated(tmp_path, monkeypatch, "bf16:square-4096:setup:fatal")
    assert sorted(got) == list(range(len(cases)))
    failed = [r for r in got.values() if "error" in r]
    assert [(r["dtype"], r["shape"]) for r in failed] == [("bf16", "square-4096")]
    assert failed[0]["error"] == "crashed: cudaErrorIllegalInstruction"
    # two columns crash in turn: each is left out, the case reruns twice and then runs
    _, _, got = _isolated(tmp_path, monkeypatch, "fp16:square-4096:cslt_search:fatal,fp16:square-4096:x:fatal")
    assert all("error" not in r for r in got.values()) and "na" in got[0]["columns"]["cslt_search"]
    # a crash that leaving the column out does not prevent: the case fails once, the run goes on
    _, _, got = _isolated(tmp_path, monkeypatch, "fp16:square-8192:cslt_search:always")
    failed = [(r["dtype"], r["shape"]) for r in got.values() if "error" in r]
    assert failed == [("fp16", "square-8192")] and len(got) == 6


def test_isolated_run_gives_up_after_repeated_crashes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_runner, "MAX_RESTARTS", 2)
    crash = ",".join(f"fp16:{s}:col{i}:fatal" for i, s in enumerate(["square-4096", "square-8192",
                                                                      "llm-m16-4096to4096"]))
    _, cases, got = _isolated(tmp_path, monkeypatch, crash)
    assert sorted(got) == list(range(len(cases)))
    gave_up = [r for r in got.values() if "worker processes were lost" in r.get("error", "")]
    assert gave_up and all(r["dtype"] in ("fp16", "bf16") for r in gave_up)


# -- the inputs and the reference, with NumPy standing in for CuPy ----------------------------------------


class _NumpyAsCupy:
    """The part of CuPy's API that the benchmark's inputs use, on NumPy (same names and semantics)."""

    def __init__(self):
        import numpy as np

        self._np = np
        self._rng = np.random.default_rng(0)
        self.random = self
        self.linalg = np.linalg

    def __getattr__(self, name):
        return getattr(self._np, name)

    def seed(self, seed):
        self._rng = self._np.random.default_rng(seed)

    def standard_normal(self, shape, dtype):
        return self._rng.standard_normal(shape, dtype=dtype)

    def randint(self, low, high, shape, dtype):
        return self._rng.integers(low, high, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "e4m3"])
def test_inputs_and_reference(dtype):
    import ml_dtypes
    import numpy as np

    cp = _NumpyAsCupy()
    shape = bench.Shape("t", "custom", 32, 48, 64)
    data = bench_inputs.Inputs(cp, shape, dtype, seed=3)
    assert data.x_store.shape == (32, 64) and data.w_store.shape == (48, 64)
    typed = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "int8": np.int8, "e4m3": ml_dtypes.float8_e4m3fn}[dtype]
    # the storage decodes to the values of the input type exactly (bf16: the top half of float32; e4m3: its bytes)
    x64 = data.to_f64(data.x_store)
    values = data.x_store.view(typed) if dtype in ("bf16", "e4m3") else data.x_store
    assert np.array_equal(x64, values.astype(np.float64))
    assert np.isfinite(x64).all() and len(np.unique(x64)) > 20  # real data, no NaN (e4m3 never draws 0x7F/0xFF)
    if dtype == "int8":
        assert x64.min() < -100 and x64.max() > 100  # the whole range
    assert data.typed(data.x_store).dtype == (np.dtype(typed) if dtype == "bf16" else data.x_store.dtype)
    data.build_reference()
    expected = values.astype(np.float64) @ data.w_store.view(typed).astype(np.float64).T if dtype != "int8" else \
        x64 @ data.w_store.astype(np.float64).T
    assert np.array_equal(data.reference, expected)
    # the check: the exact product passes, a rounded one passes within the output type's tolerance, a wrong
    # one (transposed operand, unwritten output) fails
    out = data.reference.astype(data.out_np)
    err = data.rel_err(out)
    assert err <= cases.TOLERANCE[data.out]
    if dtype == "int8":
        assert err == 0.0
    wrong = data.reference.copy()
    wrong[:, :24] = wrong[:, 24:]
    assert data.rel_err(wrong.astype(data.out_np)) > 0.5
    poisoned = np.empty_like(out)
    bench_inputs.poison(cp, poisoned)
    assert not data.rel_err(poisoned) <= cases.TOLERANCE[data.out]
    with pytest.raises(ValueError, match="shape"):
        data.rel_err(out.T)


def test_column_failures(monkeypatch):
    from types import SimpleNamespace

    broken = {"now": None}

    def device_synchronize():
        if broken["now"]:
            raise RuntimeError(broken["now"])

    cp = _NumpyAsCupy()
    cp.cuda = SimpleNamespace(runtime=SimpleNamespace(deviceSynchronize=device_synchronize),
                              Device=lambda: SimpleNamespace(synchronize=device_synchronize))
    runner = object.__new__(bench_runner._Runner)
    runner.cp, runner.skip, events = cp, {("fp16", "cslt_search"): "left out: it crashed"}, []
    runner.events = events.append
    monkeypatch.setattr(runner, "_time", lambda fn, stream=None, per_call=1, first_s=0.0: {
        "median_ms": 2.0 / per_call, "min_ms": 1.0 / per_call}, raising=False)
    data = bench_inputs.Inputs(cp, bench.Shape("t", "custom", 16, 16, 32), "fp16", seed=0)
    data.build_reference()
    record = {"columns": {}}
    right = data.reference.astype(data.out_np)
    runner._column(record, "cupy_matmul", data, lambda: (lambda i: None, lambda: right))
    runner._column(record, "torch_mm", data, lambda: (lambda i: None, lambda: right * 2))
    runner._column(record, "ours_default_graph", data, lambda: (lambda i: None, lambda: right, 4, None))
    runner._column(record, "cslt_search", data, lambda: 1 / 0)

    def unavailable():
        raise bench_runner._NotAvailable("no such thing here")

    runner._column(record, "cublas_gemmex", data, unavailable)
    cols = record["columns"]
    assert cols["cupy_matmul"]["ok"] is True and 0 < cols["cupy_matmul"]["rel_err"] < 1e-3  # fp16 rounding
    assert (cols["cupy_matmul"]["median_ms"], cols["cupy_matmul"]["min_ms"]) == (2.0, 1.0)
    assert cols["torch_mm"]["ok"] is False and cols["torch_mm"]["rel_err"] == pytest.approx(1.0, rel=1e-3)
    assert cols["ours_default_graph"]["median_ms"] == 0.5  # per GEMM of a four-GEMM graph
    assert cols["cslt_search"] == {"na": "left out: it crashed"}  # skipped: never built
    assert cols["cublas_gemmex"] == {"na": "no such thing here"}
    assert [e["column"] for e in events] == ["cupy_matmul", "torch_mm", "ours_default_graph", "cublas_gemmex"]
    # a failure that took the CUDA context with it ends the process's work, naming the column
    broken["now"] = "cudaErrorIllegalInstruction"

    def crash():
        raise RuntimeError("CUDA error: an illegal instruction was encountered")

    with pytest.raises(bench_runner._Fatal) as info:
        runner._column(record, "cslt_default", data, crash)
    assert info.value.key == "cslt_default" and "CUDA context lost: RuntimeError: cudaErrorIllegalInstruction" in \
        info.value.reason
    assert "illegal instruction" in cols["cslt_default"]["na"]


def test_worker_reports_records_and_a_lost_context(tmp_path, monkeypatch):
    class FakeRunner:
        def __init__(self, **kwargs):
            self.kwargs, self.torch = kwargs, None

        def run_case(self, shape, dtype, seed):
            self.events({"column": "cupy_matmul"})
            if shape.name == "square-8192":
                raise bench_runner._Fatal("cupy_matmul", "cudaErrorIllegalInstruction")
            record = bench_runner._failed(shape, dtype, "")
            record.pop("error")
            record["seed"], record["skip"] = seed, sorted(map(list, self.skip))
            return record

    def fake_exit(code):
        raise SystemExit(code)

    monkeypatch.setattr(bench_runner, "_Runner", FakeRunner)
    monkeypatch.setattr(bench_runner, "environment", lambda torch=None: {"device": "fake"})
    monkeypatch.setattr(bench_runner.os, "_exit", fake_exit)
    events = tmp_path / "events.jsonl"
    spec = {"repeats": 3, "warmup": 1, "tune_budget_s": None, "use_torch": False, "events": str(events),
            "skip": [["fp16", "cslt_search", "why"]], "deadline": None,
            "cases": [[0, "fp16", list(SQ[0]), 5], [1, "fp16", list(SQ[1]), 6], [2, "fp16", list(SQ[2]), 7]]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as info:
        bench.main(["--worker", str(tmp_path / "spec.json")])
    assert info.value.code == 3
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0] == {"environment": {"device": "fake"}}
    assert lines[1] == {"column": "cupy_matmul", "index": 0}
    assert lines[2]["index"] == 0 and lines[2]["record"]["seed"] == 5
    assert lines[2]["record"]["skip"] == [["fp16", "cslt_search"]]
    assert lines[3:] == [{"column": "cupy_matmul", "index": 1},
                         {"index": 1, "fatal": "cupy_matmul", "reason": "cudaErrorIllegalInstruction"}]
    # past the deadline a worker starts no case and says so
    events.write_text("")
    (tmp_path / "spec.json").write_text(json.dumps(dict(spec, deadline=0.0)))
    assert bench.main(["--worker", str(tmp_path / "spec.json")]) == 0
    assert [json.loads(line) for line in events.read_text().splitlines()][1:] == [{"stopped": "time limit"}]


def test_isolated_run_stops_at_the_time_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STOP", "3")  # a worker stops before its fourth case
    _, cases, got = _isolated(tmp_path, monkeypatch, "fp16:square-8192:cslt_search:fatal")
    assert sorted(got) == list(range(len(cases)))
    not_run = sorted(i for i, r in got.items() if r.get("error") == "not run: the time limit was reached")
    # two cases, then a crash; the new worker reran the crashed case, did two more and stopped
    assert not_run == [5]
    assert "na" in got[2]["columns"]["cslt_search"] and "error" not in got[4]


def test_slow_columns_are_timed_fewer_times(monkeypatch):
    from pycusparselt.tuning import timing

    asked = []

    def fake_time_gpu(fn, *, repeats, warmup, stream=None):
        asked.append((repeats, warmup))
        return timing.Timing(3.0, 2.0, (3.0,) * repeats)

    monkeypatch.setattr(timing, "time_gpu", fake_time_gpu)
    runner = object.__new__(bench_runner._Runner)
    runner.repeats, runner.warmup = 20, 5
    assert runner._time(None, first_s=0.001) == {"median_ms": 3.0, "min_ms": 2.0}
    assert runner._time(None, per_call=4, first_s=0.1) == {"median_ms": 0.75, "min_ms": 0.5, "repeats": 10}
    assert runner._time(None, first_s=0.35)["repeats"] == 3  # never fewer than three samples
    assert asked == [(20, 5), (10, 1), (3, 1)]


class _FakeGpu:
    """A stand-in for ``cupy`` (NumPy arrays; CUDA events read a host clock) that logs events and syncs."""

    def __init__(self):
        from types import SimpleNamespace

        self.np = _NumpyAsCupy()
        self.clock, self.log = 0.0, []
        self.current = self.Stream("current")
        gpu = self

        class Event:
            def record(self, stream):
                self.stream, self.t = stream, gpu.clock
                gpu.log.append(("record", stream.name))

            def synchronize(self):
                gpu.log.append(("sync", self.stream.name))

        self.cuda = SimpleNamespace(
            Event=Event, get_current_stream=lambda: self.current,
            get_elapsed_time=lambda start, stop: stop.t - start.t,
            runtime=SimpleNamespace(deviceSynchronize=lambda: None),
            Device=lambda: SimpleNamespace(synchronize=lambda: None),
        )

    def Stream(self, name):  # noqa: N802 (CuPy's name)
        from types import SimpleNamespace

        return SimpleNamespace(name=name, synchronize=lambda: self.log.append(("sync", name)))

    def __getattr__(self, name):
        return getattr(self.np, name)


def test_time_gpu_interleaved_rotates_the_first_column(monkeypatch):
    from pycusparselt.tuning import timing

    gpu = _FakeGpu()
    monkeypatch.setitem(sys.modules, "cupy", gpu)
    calls = []

    def column(key, ms):
        def fn(i):
            calls.append((key, i))
            gpu.clock += ms + 0.01 * len(calls)  # the GPU slows down as the run goes on

        return fn

    fns = {"a": column("a", 1.0), "b": column("b", 2.0), "g": column("g", 3.0)}
    got = timing.time_gpu_interleaved(fns, repeats=4, warmup=2, streams={"g": gpu.Stream("graph")})
    assert list(got) == ["a", "b", "g"]
    # two warm-up calls of each, then per sample an untimed lead call and the timed call, of the same column
    order = [key for key, _ in calls]
    assert order[:6] == ["a", "a", "b", "b", "g", "g"]
    timed = order[7::2]
    assert timed == ["a", "b", "g", "b", "g", "a", "g", "a", "b", "a", "b", "g"]  # the first column rotates
    assert order[6::2] == timed
    assert [i for key, i in calls if key == "b"] == list(range(2 + 4 * 2))  # each column counts its own calls
    # events on the column's own stream; every sample synchronised before the next one starts
    stream = {"a": "current", "b": "current", "g": "graph"}
    samples = [entry for key in timed for entry in (("record", stream[key]),) * 2 + (("sync", stream[key]),)]
    assert gpu.log == [("sync", "current"), ("sync", "current"), ("sync", "graph")] + samples
    # each column's times are its own calls' (plus their drift), never another column's
    for key, ms in (("a", 1.0), ("b", 2.0), ("g", 3.0)):
        assert ms < got[key].median_ms < ms + 0.5 and len(got[key].times_ms) == 4
        assert got[key].min_ms == min(got[key].times_ms)
    with pytest.raises(ValueError, match="repeats"):
        timing.time_gpu_interleaved(fns, repeats=0)
    assert timing.time_gpu_interleaved({}) == {}


def test_time_gpu_holds_the_stream_once_before_the_first_sample(monkeypatch):
    from pycusparselt.tuning import timing

    gpu = _FakeGpu()
    monkeypatch.setitem(sys.modules, "cupy", gpu)
    monkeypatch.setattr(timing, "hold_stream", lambda stream, us: gpu.log.append(("hold", stream.name, us)))
    calls = []

    def fn(i):
        calls.append(i)
        gpu.log.append(("call", i))
        gpu.clock += 2.0

    got = timing.time_gpu(fn, repeats=3, warmup=2, hold_us=150.0)
    assert calls == [0, 1, 2, 3, 4]
    assert gpu.log == [("call", 0), ("call", 1), ("hold", "current", 150.0),
                       ("record", "current"), ("call", 2), ("record", "current"),
                       ("record", "current"), ("call", 3), ("record", "current"),
                       ("record", "current"), ("call", 4), ("record", "current"), ("sync", "current")]
    assert got.median_ms == 2.0 and got.times_ms == (2.0, 2.0, 2.0)
    gpu.log.clear()
    timing.time_gpu(fn, repeats=1, warmup=0)  # no hold unless asked
    assert not [entry for entry in gpu.log if entry[0] == "hold"]


class _FakeOperand:
    def __init__(self, plan, log):
        self.plan, self.log, self.closed = plan, log, False

    def close(self):
        self.closed = True
        self.log.append(("close operand", self.plan.name))


class _FakePlan:
    """Records what is done to it; its products are right only with an operand it compressed itself."""

    made: list = []
    fail: dict = {}  # method -> exception raised by autotune
    ms = {"default": 3.0, "search": 2.0, "timed": 1.0}

    def __init__(self, x, w, *, log, gpu, result, name="default", **kwargs):
        self.x, self.w, self.kwargs, self.log, self.gpu, self.result = x, w, kwargs, log, gpu, result
        self.name, self.config, self.max_alg_id, self.closed = name, (0, 1, 0), 7, False
        self.outs = set()
        _FakePlan.made.append(self)

    def autotune(self, a, b, c=None, *, out=None, method="timed", cache=None, budget_s=None):
        self.name = method
        self.log.append(("autotune", method, b is self.w))
        if method in self.fail:
            raise self.fail[method]
        self.config = {"search": (3, 1, 0), "timed": (5, 2, 1)}[method]

    def compress(self, w):
        self.log.append(("compress", self.name, w is self.w))
        return _FakeOperand(self, self.log)

    def matmul(self, x, wc, out):
        if wc.plan is not self:
            raise ValueError("compressed by another plan")
        self.outs.add(id(out))
        out[...] = self.result
        self.gpu.clock += self.ms[self.name]
        self.log.append(("matmul", self.name))

    def close(self):
        self.closed = True
        self.log.append(("close plan", self.name))


def _ours_runner(monkeypatch, fail=None, skip=None):
    """A runner on fakes for ``_Runner._ours``: returns (runner, record, data, default plan, log, events)."""
    from pycusparselt.gemm import plan as plan_module

    gpu = _FakeGpu()
    monkeypatch.setitem(sys.modules, "cupy", gpu)
    data = bench_inputs.Inputs(gpu, bench.Shape("t", "custom", 16, 16, 32), "fp16", seed=0)
    data.build_reference()
    x, wt = data.typed(data.x_store), data.typed(data.w_store).T
    log, events = [], []
    result = data.reference.astype(data.out_np)
    monkeypatch.setattr(_FakePlan, "made", [])
    monkeypatch.setattr(_FakePlan, "fail", fail or {})

    def new_plan(x_, w_, **kwargs):
        assert x_ is x and w_ is wt and kwargs == data.plan_kwargs  # the case's operands and kind
        return _FakePlan(x_, w_, log=log, gpu=gpu, result=result, name="new", **kwargs)

    monkeypatch.setattr(plan_module, "SparseMatmulPlan", new_plan)
    runner = object.__new__(bench_runner._Runner)
    runner.cp, runner.skip, runner.events = gpu, dict(skip or {}), events.append
    runner.repeats, runner.warmup, runner.tune_budget, runner.graph_calls = 3, 1, 2.0, 20

    def graph(plan, x_, wc, y, calls):
        stream = gpu.Stream(f"graph-{plan.name}")
        log.append(("capture", plan.name, calls))

        def run(_i):
            for _ in range(calls):
                plan.matmul(x_, wc, out=y)

        return run, lambda: y, calls, stream

    runner._graph = graph
    record = {"columns": {}, "configs": {}, "tune_s": {}}
    default = _FakePlan(x, wt, log=log, gpu=gpu, result=result, **data.plan_kwargs)
    runner._ours(record, data, default, x, wt)
    return runner, record, data, default, log, events, gpu


def _rounds(log, start, stages, repeats=3):
    """The stages of the timed products after ``start`` in the log: warm-up, then lead and timed per sample."""
    products = [entry[1] for entry in log[start:] if entry[0] == "matmul"]
    warm = len(stages)
    return products[:warm], products[warm:warm + 2 * repeats * len(stages)][1::2]


def test_ours_stages_have_their_own_plans_tuned_before_compressed(monkeypatch):
    _, record, _, default, log, events, _ = _ours_runner(monkeypatch)
    plans = _FakePlan.made
    assert len(plans) == 3 and len({id(p) for p in plans}) == 3 and plans[0] is default
    default_plan, search, timed = plans
    assert (search.name, timed.name) == ("search", "timed")
    # per plan: tuned on the dense, pruned W.T (not a compressed operand), then compressed; the default untuned
    setup = [entry for entry in log if entry[0] in ("autotune", "compress")]
    assert setup == [("compress", "default", True), ("autotune", "search", True), ("compress", "search", True),
                     ("autotune", "timed", True), ("compress", "timed", True)]
    assert record["configs"] == {"max_alg_id": 7, "default": [0, 1, 0], "search": [3, 1, 0], "timed": [5, 2, 1]}
    assert set(record["tune_s"]) == {"search", "timed"}
    # every product used its own plan's operand (a foreign one raises) and its own output
    outs = [p.outs for p in plans]
    assert all(len(o) == 1 for o in outs) and len(set.union(*outs)) == 3
    # everything made here is closed, operands before their plans; the case's own plan is left to the caller
    assert search.closed and timed.closed and not default.closed
    closes = [entry for entry in log if entry[0].startswith("close")]
    assert closes == [("close operand", "timed"), ("close plan", "timed"), ("close operand", "search"),
                      ("close plan", "search"), ("close operand", "default")]
    assert [e["column"] for e in events] == [
        "ours_default", "ours_search", "ours_timed", "ours_default", "ours_search", "ours_timed",
        "ours_eager_interleaved", "ours_default_graph", "ours_search_graph", "ours_timed_graph",
        "ours_graph_interleaved"]


def test_ours_columns_are_timed_in_alternation(monkeypatch):
    _, record, _, _, log, _, _ = _ours_runner(monkeypatch)
    stages = ["default", "search", "timed"]
    # eager: each checked once, then warmed up, then rounds with the first column rotated
    first_eager = next(i for i, e in enumerate(log) if e[0] == "matmul")
    checks = [e[1] for e in log[first_eager:] if e[0] == "matmul"][:3]
    assert checks == stages
    start = [i for i, e in enumerate(log) if e[0] == "matmul"][3]
    warm, timed = _rounds(log, start, stages)
    assert warm == stages
    assert timed == ["default", "search", "timed", "search", "timed", "default", "timed", "default", "search"]
    cols = record["columns"]
    for stage, ms in _FakePlan.ms.items():
        assert cols[f"ours_{stage}"] == {"rel_err": cols[f"ours_{stage}"]["rel_err"], "ok": True,
                                         "median_ms": ms, "min_ms": ms}  # its own plan's time, no other's
        assert cols[f"ours_{stage}_graph"]["median_ms"] == pytest.approx(ms)  # per GEMM of the graph
        assert cols[f"ours_{stage}_graph"]["ok"] is True
    # one graph length for all three: enough GEMMs that the fastest stage's replay lasts 0.2 ms
    captures = [e for e in log if e[0] == "capture"]
    assert captures == [("capture", s, 1) for s in stages]
    assert record["ours_timing"] == {"eager": "interleaved", "graph": "interleaved"}


def test_ours_stage_that_fails_to_tune_is_left_out(monkeypatch):
    _, record, _, _, log, events, _ = _ours_runner(monkeypatch, fail={"search": RuntimeError("no search here")})
    cols = record["columns"]
    assert cols["ours_search"] == {"na": "RuntimeError: no search here"} == cols["ours_search_graph"]
    assert "search" not in record["configs"] and "search" not in record["tune_s"]
    # the two others are still checked and timed in alternation
    start = [i for i, e in enumerate(log) if e[0] == "matmul"][2]
    warm, timed = _rounds(log, start, ["default", "timed"])
    assert warm == ["default", "timed"] and timed == ["default", "timed", "timed", "default", "default", "timed"]
    assert cols["ours_default"]["median_ms"] == 3.0 and cols["ours_timed_graph"]["median_ms"] == pytest.approx(1.0)
    # the plan whose tuning failed is closed all the same (and was never compressed for)
    plans = _FakePlan.made
    assert plans[1].closed and plans[2].closed and ("compress", "search", True) not in log
    assert [e["column"] for e in events][:3] == ["ours_default", "ours_search", "ours_timed"]


def test_ours_after_a_crash_in_the_interleaved_timing(monkeypatch):
    note = "not run: it broke the CUDA context"
    _, record, _, _, log, events, _ = _ours_runner(
        monkeypatch, skip={("fp16", "ours_eager_interleaved"): note, ("fp16", "ours_timed_graph"): note})
    cols = record["columns"]
    # eager: one column after another, each under its own name for the crash locator
    assert [e["column"] for e in events][3:9] == ["ours_default", "ours_search", "ours_timed"] * 2
    assert all(cols[f"ours_{s}"]["median_ms"] == ms for s, ms in _FakePlan.ms.items())
    assert record["ours_timing"]["eager"].startswith("one after another")
    # graph: the left-out column is n/a, the other two are interleaved
    assert cols["ours_timed_graph"] == {"na": note} and record["ours_timing"]["graph"] == "interleaved"
    assert ("capture", "timed", 1) not in log


def test_report_says_how_ours_were_timed():
    interleaved = bench.markdown_report(dict(_results(), settings={"repeats": 20, "ours_timing": "interleaved"}))
    assert "timed in alternation" in interleaved and "one after another" not in interleaved
    older = bench.markdown_report(_results())  # results written before: one plan, stage after stage
    assert "one after another" in older and "alternation" not in older


def test_number_formats():
    times = (1.001, 0.18, 0.0203, 18.34, 336.6)
    assert [report._fmt_time(v) for v in times] == ["1.00", "0.180", "0.0203", "18.3", "337"]
    assert [report._fmt_x(v) for v in (None, 1.456, 17009.6)] == ["n/a", "1.46x", "17010x"]
    failed = bench.markdown_tables({"cases": [
        bench_runner._failed(SQ[0], "fp16", "not run: the time limit was reached"),
        bench_runner._failed(SQ[1], "fp16", "OutOfMemoryError"),
    ]})
    assert "| not run: the time limit was reached |" in failed and "| case failed: OutOfMemoryError |" in failed
    assert all(line.count("|") == 12 for line in failed.splitlines() if line.startswith("| square"))


def _host_overhead_module():
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_overhead_problems_and_rounds():
    host = _host_overhead_module()
    assert host.parse_problems("64x256x256, 4096x4096x4096") == [(64, 256, 256), (4096, 4096, 4096)]
    with pytest.raises(ValueError, match="expected MxNxK"):
        host.parse_problems("64x256")
    rounds = [[{"m": 64, "n": 8, "k": 16, "bind": 12.0, "kind": "compiled"}, {"m": 1, "n": 2, "k": 3, "bind": 1.0}],
              [{"m": 64, "n": 8, "k": 16, "bind": 30.0, "kind": "abi"}, {"m": 1, "n": 2, "k": 3, "bind": 2.0}],
              [{"m": 64, "n": 8, "k": 16, "bind": 11.0, "kind": "abi"}, {"m": 1, "n": 2, "k": 3, "bind": 4.0}]]
    assert host.combine_rounds(rounds) == [{"m": 64, "n": 8, "k": 16, "bind": 12.0, "kind": "compiled"},
                                           {"m": 1, "n": 2, "k": 3, "bind": 2.0}]  # medians; the rest from round 1

"""GPU tests of the auto-tuner, the tuning cache across processes, bound calls, the per-call fast path and
CUDA graph capture."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from checkout import load

import pycusparselt as psl
from pycusparselt.tuning.cache import TuningCache, TuningCacheWarning

# the plan tests' cases and problem fixtures, shared (tests/gemm/test_plan_gpu.py)
_plan_gpu = load("tests/gemm/test_plan_gpu.py", "plan_gpu_cases")
F16, I8, I32, RELU, Case, Problem, _ids = (_plan_gpu.F16, _plan_gpu.I8, _plan_gpu.I32, _plan_gpu.RELU, _plan_gpu.Case,
                                            _plan_gpu.Problem, _plan_gpu._ids)

pytestmark = pytest.mark.gpu

CASES = [
    Case(F16, F16, with_c=True, beta=0.5, bias=True, **RELU),
    Case(I8, I32, side="b", a_order="row", b_order="col"),
    Case(F16, F16, m=256, n=512, k=1024),
    Case(F16, F16, m=33, n=50, k=70),  # padded
]


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_timed_autotune_keeps_the_fastest_candidate(cp, case, tmp_path):
    with Problem(cp, case) as p:
        config = p.plan.autotune(*p.args(), p.c_d, **p.call_kwargs(), cache=TuningCache(tmp_path))
        report = p.plan.tuning_report
        assert report.source == "timed" and report.method == "timed"
        assert config == p.plan.config == report.best
        sources = {c.source for c in report.candidates}
        assert {"default", "search", "alg"} <= sources
        timed = [c for c in report.candidates if c.median_ms is not None]
        assert all(c.median_ms > 0 for c in timed)
        # the winner is the fastest candidate, so never slower than the default or the library's search
        assert report.best_ms == min(c.median_ms for c in timed)
        assert report.best_ms <= report.time_of("default")
        assert report.best_ms <= report.time_of("search")
        # every algorithm id was timed (once: the default's and the search's are not timed twice)
        timed_ids = {c.config.alg_id for c in report.candidates if c.source in ("alg", "default", "search")}
        assert timed_ids == set(range(p.plan.max_alg_id))
        p.recompress()  # the winner's compressed form
        p.check(p.matmul())


def test_every_timed_candidate_is_correct(cp):
    """The tuner may keep any candidate it timed: each one must compute the right product."""
    case = Case(F16, F16, m=128, n=256, k=512)
    with Problem(cp, case) as p:
        p.plan.autotune(*p.args(), cache=False, repeats=2, warmup=1)
        configs = [c.config for c in p.plan.tuning_report.candidates if c.median_ms is not None]
        assert len(configs) >= 2
        for config in configs:
            p.plan.config = config
            p.recompress()
            p.check(p.matmul())


def test_search_method_and_bad_arguments(cp):
    with Problem(cp, Case(F16, F16)) as p:
        config = p.plan.autotune(*p.args(), method="search")
        assert p.plan.tuning_report.source == "search" and config == p.plan.config
        p.recompress()
        p.check(p.matmul())
        with pytest.raises(ValueError, match="method: expected 'timed' or 'search', got 'fast'"):
            p.plan.autotune(*p.args(), method="fast")
        with pytest.raises(ValueError, match="repeats must be >= 1"):
            p.plan.autotune(*p.args(), repeats=0, cache=False)
        with pytest.raises(TypeError, match="cache: expected a TuningCache"):
            p.plan.autotune(*p.args(), cache="yes")


def test_budget_limits_the_candidates(cp):
    with Problem(cp, Case(F16, F16, m=256, n=256, k=512)) as p:
        p.plan.autotune(*p.args(), cache=False, budget_s=0.0)
        sources = {c.source for c in p.plan.tuning_report.candidates}
        # the default and the search's choice are always timed; nothing else fits in no time
        assert sources == {"default", "search"}


def test_cache_is_reused_in_process_and_ignored_when_corrupt(cp, tmp_path):
    cache = TuningCache(tmp_path)
    case = Case(F16, F16, m=128, n=128, k=256)
    with Problem(cp, case) as p:
        tuned = p.plan.autotune(*p.args(), cache=cache)
        assert p.plan.tuning_report.source == "timed"
        [entry] = list(tmp_path.glob("*.json"))
        stored = json.loads(entry.read_text())
        assert stored["key"]["problem"]["dtype"] == "float16"
        assert PlanConfigFrom(stored) == tuned
    with Problem(cp, case, seed=1) as p:  # same problem, other data: the stored winner, nothing timed
        assert p.plan.autotune(*p.args(), cache=cache) == tuned
        assert p.plan.tuning_report.source == "cache" and p.plan.tuning_report.candidates == ()
        p.recompress()
        p.check(p.matmul())
    entry.write_text("{not json")
    with Problem(cp, case) as p, pytest.warns(TuningCacheWarning, match="corrupt"):
        p.plan.autotune(*p.args(), cache=cache, repeats=2)
    assert p.plan.tuning_report.source == "timed"
    # a foreign entry (another GPU's key stored under this file name) is ignored too
    stored = json.loads(entry.read_text())
    stored["key"]["gpu"] = "another GPU"
    entry.write_text(json.dumps(stored))
    with Problem(cp, case) as p, pytest.warns(TuningCacheWarning, match="another key"):
        p.plan.autotune(*p.args(), cache=cache, repeats=2)
    assert p.plan.tuning_report.source == "timed"


def PlanConfigFrom(stored: dict) -> psl.PlanConfig:
    return psl.PlanConfig(**stored["value"]["config"])


_SECOND_PROCESS = textwrap.dedent(
    """
    import json, sys
    import cupy as cp
    import pycusparselt as psl
    from pycusparselt.tuning.cache import TuningCache

    a = cp.random.standard_normal((128, 256), dtype=cp.float32).astype(cp.float16)
    b = cp.asfortranarray(cp.random.standard_normal((256, 192), dtype=cp.float32).astype(cp.float16))
    with psl.SparseMatmulPlan(a, b) as plan:
        ca = plan.compress(a, prune="strip")
        config = plan.autotune(ca, b, cache=TuningCache(sys.argv[1]))
        print(json.dumps({"source": plan.tuning_report.source, "config": list(config)}))
    """
)


def test_a_second_process_reuses_the_tuned_config(cp, tmp_path):
    script = tmp_path / "tune.py"
    script.write_text(_SECOND_PROCESS)
    cache_dir = tmp_path / "cache"

    def run() -> dict:
        done = subprocess.run([sys.executable, "-P", str(script), str(cache_dir)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["source"] == "timed"
    assert second == {"source": "cache", "config": first["config"]}


# -- the per-call path ----------------------------------------------------------------------------


def test_fast_path_still_rejects_a_different_array(cp):
    case = Case(F16, F16)
    with Problem(cp, case) as p:
        out = cp.empty(case.d_shape, dtype=np.float16)
        p.check(p.matmul(out=out))
        p.check(p.matmul(out=out))  # the remembered array
        wrong = cp.empty(case.d_shape, dtype=np.float16, order="F")
        with pytest.raises(ValueError, match="out: expected"):
            p.matmul(out=wrong)
        other = cp.asfortranarray(cp.zeros((case.k, case.n), dtype=cp.float32))
        with pytest.raises(ValueError, match="does not match the plan's b"):
            p.plan.matmul(p.comp, other)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bound_call_equals_matmul_and_reads_operands_at_run_time(cp, case):
    with Problem(cp, case) as p:
        call = p.plan.bind(*p.args(), p.c_d, **p.call_kwargs())
        d = call()
        assert d is call.out
        p.check(d)
        # update the dense operand in place: the next call uses the new values
        other = p.other_d
        fresh = Problem(cp, case, seed=5)
        other[...] = fresh.other_d
        host = fresh.b_h if case.side == "a" else fresh.a_h
        if case.side == "a":
            p.b_h = host
        else:
            p.a_h = host
        fresh.close()
        p.check(call())
        p.plan.close()
        with pytest.raises(psl.ClosedError):
            call()


def test_compressed_buffers_leave_room_for_the_kernels_reads(cp):
    """cuSPARSELt's SM 9.0 kernels read past the compressed size (compute-sanitizer, padded FP16 33x50x70):
    every compressed buffer, the tuner's copies included, is allocated with COMPRESSED_SLACK bytes more."""
    from pycusparselt.tuning import tuner
    from pycusparselt.gemm.plan import COMPRESSED_SLACK

    with Problem(cp, Case(F16, F16, m=33, n=50, k=70)) as p:
        assert p.comp._buffer.base.nbytes == p.comp.nbytes + COMPRESSED_SLACK
        keep: list = []
        ptrs = tuner._copies(p.comp.ptr, p.comp.nbytes, 3, cp.cuda.get_current_stream().ptr, keep, COMPRESSED_SLACK)
        assert len(ptrs) == 3 and ptrs[0] == p.comp.ptr
        assert [buf.nbytes for buf in keep] == [p.comp.nbytes + COMPRESSED_SLACK] * 2
        cp.cuda.Device().synchronize()
        for buf in keep:
            np.testing.assert_array_equal(buf[: p.comp.nbytes].get(), p.comp._buffer.get())


@pytest.mark.alone
def test_held_timing_measures_the_gpu_not_the_host(cp):
    """A call whose host side is slower than its GPU work: timed at the host's pace without the hold, at the
    GPU's with it (the tuner's case for small GEMMs)."""
    import time

    from pycusparselt.tuning.timing import hold_stream, time_gpu

    stream = cp.cuda.Stream(non_blocking=True)
    hold_stream(stream, 1)  # the kernel's first launch compiles or loads it: not part of the hold
    stream.synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    hold_stream(stream, 300)
    stop.record(stream)
    stop.synchronize()
    assert 0.29 <= cp.cuda.get_elapsed_time(start, stop) < 1.0  # ms: the hold lasts as long as asked

    x = cp.ones(1024, dtype=cp.float32)

    def slow_host(_i: int) -> None:
        until = time.perf_counter() + 100e-6  # 100 us of host work before a GPU add of a few us
        while time.perf_counter() < until:
            pass
        with stream:
            cp.add(x, 1, out=x)

    free = time_gpu(slow_host, repeats=10, warmup=2, stream=stream)
    held = time_gpu(slow_host, repeats=10, warmup=2, stream=stream, hold_us=10 * 300)
    assert free.median_ms > 0.09  # the GPU waited on the host
    assert held.median_ms < 0.03  # the GPU's own time
    assert float(x[0]) == 1 + 24


def test_bound_call_follows_a_reinitialised_plan(cp):
    """Re-initialising with the same configuration frees the old workspace: a bound call made before must fix
    its arguments again (not run on freed memory) and still give the right product."""
    with Problem(cp, Case(F16, F16, m=256, n=256, k=512)) as p:
        call = p.plan.bind(*p.args())
        p.check(call())
        before = p.plan.matmul_call
        p.plan.config = p.plan.config
        assert p.plan.matmul_call is not before
        out = call.out
        out.fill(0)
        assert call() is out
        p.check(out)
        assert call._via is p.plan.matmul_call  # back on the direct path


def test_compiled_and_abi_call_paths_agree(cp, monkeypatch):
    """The compiled per-call shim (where built) and cffi's ABI path give bit-identical products."""
    case = Case(F16, F16, m=128, n=256, k=512)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("PYCUSPARSELT_FAST_CALL", switch)
        with Problem(cp, case) as p:
            kind = p.plan.matmul_call.kind
            results[kind] = (p.matmul().get(), p.plan.bind(*p.args())().get())
            p.check(cp.asarray(results[kind][1]))
    assert "abi" in results
    try:
        import pycusparselt._fastcall  # noqa: F401
    except ImportError:
        pytest.skip("pycusparselt._fastcall was not built here: only the ABI path ran")
    assert set(results) == {"compiled", "abi"}
    for got, want in zip(results["compiled"], results["abi"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_graph_capture_replays_the_product(cp):
    case = Case(F16, F16, m=256, n=128, k=512, bias=True)
    with Problem(cp, case) as p:
        stream = cp.cuda.Stream(non_blocking=True)
        out = cp.empty(case.d_shape, dtype=np.float16)
        # the operands were written (and compressed) on the default stream, which a non-blocking stream does
        # not wait for: without this, the eager call could read them half written while the GPU is shared
        cp.cuda.Device().synchronize()
        with stream:
            call = p.plan.bind(*p.args(), **p.call_kwargs(), out=out, stream=stream)
            call()  # eager, before capture (the library initialises lazily)
            stream.synchronize()
            eager = out.copy()
            out.fill(0)
            stream.begin_capture()
            call()
            graph = stream.end_capture()
            stream.synchronize()
            assert not cp.any(out)  # capturing ran nothing
            graph.launch(stream)
            stream.synchronize()
        np.testing.assert_array_equal(out.get(), eager.get())
        p.check(out)
        # replays read the arrays: a new bias shows up without re-capturing (written on the graph's stream:
        # the non-blocking stream is not ordered after the default one)
        p.bias_h = (p.bias_h * 2).astype(p.bias_h.dtype)
        with stream:
            p.bias_d[...] = cp.asarray(p.bias_h)
        graph.launch(stream)
        stream.synchronize()
        p.check(out)


def test_a_new_configuration_refuses_data_compressed_before(cp):
    """Data compressed under another configuration crashed the H100 (illegal instruction): refused instead,
    by matmul and by bound calls, and accepted again once compressed anew."""
    with Problem(cp, Case(F16, F16, m=256, n=256, k=512)) as p:
        call = p.plan.bind(*p.args())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p.plan.config = psl.PlanConfig(p.plan.max_alg_id - 1)
        for run in (p.matmul, call):
            with pytest.raises(ValueError, match="compress the sparse operand again"):
                run()
        p.recompress()
        p.check(p.matmul())
        p.check(p.plan.bind(*p.args())())


@pytest.mark.parametrize("shape", [(256, 256, 512), (1024, 1024, 2048)], ids=str)
def test_search_then_compress_gives_the_right_product(cp, shape):
    m, n, k = shape
    with Problem(cp, Case(F16, F16, m=m, n=n, k=k)) as p:
        config = p.plan.autotune(*p.args(), method="search")
        assert p.plan._format == config.alg_id  # initialised anew with the search's choice
        p.recompress()
        p.check(p.matmul())
        p.check(p.plan.bind(*p.args())())


def test_autotune_on_the_dense_sparse_side_operand_then_compress(cp, tmp_path):
    """The documented order: tune on the dense operand, then compress for the tuned plan."""
    case = Case(I8, I32, m=128, n=256, k=512)
    with Problem(cp, case) as p:
        args = (p.sparse_d, p.other_d) if case.side == "a" else (p.other_d, p.sparse_d)
        config = p.plan.autotune(*args, cache=TuningCache(tmp_path), repeats=3)
        assert p.plan.tuning_report.source == "timed" and config == p.plan.config
        p.recompress()
        p.check(p.matmul())
        with pytest.raises(TypeError, match="expected the CompressedOperand"):
            p.plan.matmul(*args)  # matmul itself still wants the compressed operand

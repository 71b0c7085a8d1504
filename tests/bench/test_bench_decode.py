"""``benchmarks/bench_decode.py`` on the CPU: its options, the checks that refuse an empty capture or a wrong
output, and the split-K summary (the timing itself needs a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from checkout import load


def _bench():
    return load("benchmarks/bench_decode.py", "bench_decode")


def test_options():
    bench = _bench()
    a = bench.parse_args(["--out", "x.json"])
    assert a.parts == ["probe", "gemm", "stack"] and a.backend_label == "cusparselt"
    assert a.split_k == [1, 2, 3, 4, 6, 8, 16, 32] and a.split_k_modes == [1, 2]
    a = bench.parse_args(["--out", "x.json", "--parts", "splitk", "--backend-label", "cusparselt-0.10",
                          "--split-k", "2", "4", "--split-k-modes", "1"])
    assert a.parts == ["splitk"] and a.backend_label == "cusparselt-0.10"
    assert a.split_k == [2, 4] and a.split_k_modes == [1]
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--parts", "gemmm"])


def test_the_split_k_modes_are_the_librarys():
    """The modes tried are cusparseLtSplitKMode_t's one- and two-kernel values (0 is INVALID_MODE)."""
    from pycusparselt.enums import SplitKMode

    bench = _bench()
    assert bench.SPLIT_K_MODES == (SplitKMode.SPLIT_K_MODE_ONE_KERNEL, SplitKMode.SPLIT_K_MODE_TWO_KERNELS)


def test_an_empty_capture_is_refused():
    bench = _bench()
    assert bench.check_time(10.4, "ours") == 10.4
    for us in (0.15, 0.0, float("nan")):
        with pytest.raises(RuntimeError, match="empty|no GEMM"):
            bench.check_time(us, "cusparselt")


def test_a_wrong_or_unwritten_output_is_refused():
    bench = _bench()
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64)).astype(np.float16)
    close = (ref.astype(np.float32) * (1 + 1e-3)).astype(np.float16)
    assert bench.check_close(close, ref, "ours") < bench.MAX_REL_DIFF
    wrong = ref.copy()
    wrong[0, 0] += 0.1 * np.abs(ref).max()
    with pytest.raises(bench.WrongOutput, match="differs from dense"):
        bench.check_close(wrong, ref, "ours")
    unwritten = np.full_like(ref, np.nan)  # what the replays leave when they write nothing
    with pytest.raises(bench.WrongOutput):
        bench.check_close(unwritten, ref, "cusparselt")
    assert issubclass(bench.WrongOutput, RuntimeError)


def _row(m, alg, split_k, mode, us=None, refused=None, default=False):
    row = {"m": m, "n": 4096, "k": 4096, "dtype": "float16", "backend": "cusparselt-0.10", "alg_id": alg,
           "split_k": split_k, "split_k_mode": mode, "default": default}
    if refused:
        row["refused"] = refused
    else:
        row["us"] = us
    return row


def test_the_split_k_summary():
    bench = _bench()
    rows = [{"n": 4096, "k": 4096, "kind": "plan", "backend": "cusparselt-0.10"},
            _row(16, 0, None, None, 30.0, default=True), _row(16, 0, 2, 1, 20.0), _row(16, 0, 4, 1, 24.0),
            _row(1, 0, None, None, 33.0, default=True), _row(1, 0, 2, 1, 22.0),
            {k: v for k, v in _row(None, 0, 32, 2, refused="CuSparseLtError: invalid").items() if k != "m"}]
    (line,) = bench.splitk_summary(rows)
    assert line.startswith("4096x4096 split-K: 1 of 4 settings refused")
    assert "m=16: default 30.0 us, best split-K 20.0 us (alg 0, split_k 2, mode 1) = 1.50x" in line
    assert "m=1: default 33.0 us" in line
    refused = [{k: v for k, v in _row(None, 0, s, 1, refused="CuSparseLtError: INVALID_VALUE").items() if k != "m"}
               for s in (2, 4)]
    assert bench.splitk_summary(refused) == ["4096x4096 split-K: 2 of 2 settings refused (CuSparseLtError: "
                                             "INVALID_VALUE)"]

"""The benchmark's cases: shapes, types, columns, goals, and the arithmetic of GEMM throughput."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Shape(NamedTuple):
    """One GEMM ``y (m, n) = x (m, k) @ W (n, k).T``; ``group`` is "square", "bert", "llm" or "custom"."""

    name: str
    group: str
    m: int
    n: int
    k: int


def _linear(group: str, tag: str, m: int, k_in: int, n_out: int) -> Shape:
    return Shape(f"{group}-{tag}-{k_in}to{n_out}", group, m, n_out, k_in)


#: The benchmark's shapes: squares; BERT-large's linears at sequence length 384 for batch sizes 1, 8 and 32
#: (M = 384 * batch); LLM projections (4096 -> 11008, 11008 -> 4096, 4096 -> 4096) at M = 16 .. 8192.
SHAPES: tuple[Shape, ...] = (
    *(Shape(f"square-{s}", "square", s, s, s) for s in (4096, 8192, 10240)),
    *(
        _linear("bert", f"b{batch}", 384 * batch, k_in, n_out)
        for batch in (1, 8, 32)
        for k_in, n_out in ((1024, 4096), (4096, 1024), (1024, 1024))
    ),
    *(
        _linear("llm", f"m{m}", m, k_in, n_out)
        for m in (16, 128, 2048, 8192)
        for k_in, n_out in ((4096, 11008), (11008, 4096), (4096, 4096))
    ),
)
_BY_NAME = {shape.name: shape for shape in SHAPES}
#: ``--quick``: one shape of each group, for development (well under a minute).
QUICK_SHAPES: tuple[Shape, ...] = tuple(
    _BY_NAME[name] for name in ("square-4096", "bert-b1-1024to4096", "llm-m16-4096to11008")
)
GROUPS = ("square", "bert", "llm")

#: Input types and the output type each is benchmarked with (int8 -> int32 is exact; e4m3 -> bf16).
DTYPES: dict[str, str] = {"fp16": "fp16", "bf16": "bf16", "int8": "int32", "e4m3": "bf16"}
#: Relative Frobenius error a correct result stays under, by output type (the reference is float64).
TOLERANCE: dict[str, float] = {"fp16": 5e-3, "bf16": 2e-2, "int32": 0.0}

#: Dense baselines; "best dense" is the fastest of those that ran and agreed with the reference.
DENSE_COLUMNS: dict[str, str] = {
    "cupy_matmul": "cupy.matmul",
    "cublas_gemmex": "cuBLAS gemmEx",
    "torch_mm": "torch.mm",
    "torch_int_mm": "torch._int_mm",
    "torch_scaled_mm": "torch._scaled_mm",
    "torch_scaled_mm_fast": "torch._scaled_mm (fast accum)",
}
#: The dense baselines each input type has (cupy.matmul has no int8 Tensor Core path; FP8 needs cublasLt).
DENSE_FOR: dict[str, tuple[str, ...]] = {
    "fp16": ("cupy_matmul", "cublas_gemmex", "torch_mm"),
    "bf16": ("cupy_matmul", "cublas_gemmex", "torch_mm"),
    "int8": ("cublas_gemmex", "torch_int_mm"),
    "e4m3": ("torch_scaled_mm", "torch_scaled_mm_fast"),
}
#: Sparse columns: PyTorch's and ours (eager, and per-GEMM replay of a captured CUDA graph).
SPARSE_COLUMNS: dict[str, str] = {
    "cslt_default": "torch._cslt_sparse_mm",
    "cslt_search": "torch._cslt_sparse_mm, searched",
    "ours_default": "ours, default config",
    "ours_search": "ours, cusparseLtMatmulSearch",
    "ours_timed": "ours, timed tuner",
    "ours_default_graph": "ours, default config, CUDA graph",
    "ours_search_graph": "ours, search, CUDA graph",
    "ours_timed_graph": "ours, timed tuner, CUDA graph",
}
#: Our stages, each a plan of its own: the library's default config, cusparseLtMatmulSearch, our timed tuner.
STAGES = ("default", "search", "timed")
#: A column whose checking call takes longer (seconds) is timed fewer times (about a second's worth, >= 3).
SLOW_CALL_S = 0.05
#: Timing noise allowed when comparing our tuner with the default config and with the library's search.
NOISE = 0.02
#: Speedup goals over the best dense GEMM (median over the large shapes).
GOALS = {"fp16": 1.55, "bf16": 1.55, "int8": 1.8}
#: Goal for the host time per call above the C library's own (microseconds).
HOST_OVERHEAD_GOAL_US = 3.0


# -- parsing and arithmetic ------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """Shapes from a comma-separated list of group names ("square", "bert", "llm"), "all", "quick", shape
    names (``square-4096``, ``llm-m16-4096to11008``, ...) or explicit ``MxNxK`` (y (M, N) = x (M, K) @ W.T).
    """
    shapes: list[Shape] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "all":
            shapes += SHAPES
        elif item == "quick":
            shapes += QUICK_SHAPES
        elif item in GROUPS:
            shapes += [s for s in SHAPES if s.group == item]
        elif item in _BY_NAME:
            shapes.append(_BY_NAME[item])
        else:
            parts = item.lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"--shapes: expected 'all', 'quick', a group ({', '.join(GROUPS)}), a shape name such as "
                    f"'{SHAPES[0].name}', or MxNxK with positive integers; got {item!r}"
                )
            m, n, k = map(int, parts)
            shapes.append(Shape(f"{m}x{n}x{k}", "custom", m, n, k))
    if not shapes:
        raise ValueError(f"--shapes: no shape given in {text!r}")
    return list(dict.fromkeys(shapes))  # first occurrence wins, order kept


def parse_dtypes(text: str) -> list[str]:
    """Input types from a comma-separated list of ``fp16``, ``bf16``, ``int8``, ``e4m3``."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise ValueError(f"--dtypes: expected a comma-separated subset of {', '.join(DTYPES)}; got {text!r}")
    return list(dict.fromkeys(names))


def gemm_flops(m: int, n: int, k: int) -> int:
    """Operations of a dense M x N x K product (a multiply and an add each), the figure TFLOP/s are quoted
    against, sparse or not: a 2:4 product doing half the multiplies counts the same work."""
    return 2 * m * n * k


def throughput(m: int, n: int, k: int, ms: float) -> float:
    """TFLOP/s (TOPS for integers) of an M x N x K product taking ``ms`` milliseconds."""
    if not ms > 0:
        raise ValueError(f"ms: expected a positive time, got {ms}")
    return gemm_flops(m, n, k) / (ms * 1e-3) / 1e12


def is_large(m: int, n: int, k: int) -> bool:
    """The "large" shapes the speedup targets are judged on: every dimension >= 1024 and >= 1e11 operations."""
    return min(m, n, k) >= 1024 and gemm_flops(m, n, k) >= 1e11


def json_default(value: Any) -> Any:
    """For ``json.dump``: NumPy scalars as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")

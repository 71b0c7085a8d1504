"""``matmul``: a one-shot 2:4 sparse GEMM, backed by a bounded cache of plans.

Each call compresses the sparse operand again (pruning it first when asked); for repeated products with
the same sparse operand, keep a :class:`~pycusparselt.gemm.plan.SparseMatmulPlan` and its
:class:`~pycusparselt.CompressedOperand` instead. Plans are cached per thread (cuSPARSELt handles are
per thread here), keyed by the whole signature: device, shapes, dtypes, layouts, epilogue and compute type.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from .operands import as_operand
from .plan import SparseMatmulPlan

__all__ = ["matmul", "plan_cache_info", "clear_plan_cache", "CacheInfo", "MAX_CACHED_PLANS"]

#: Plans kept per thread; the least recently used one is closed when a new one would exceed this.
MAX_CACHED_PLANS = 32


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


class _Cache(threading.local):
    def __init__(self) -> None:
        self.plans: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0


_cache = _Cache()


def plan_cache_info() -> CacheInfo:
    """This thread's plan cache: hits, misses and the number of plans held."""
    return CacheInfo(_cache.hits, _cache.misses, len(_cache.plans))


def clear_plan_cache() -> None:
    """Close and forget this thread's cached plans."""
    while _cache.plans:
        _, plan = _cache.plans.popitem()
        plan.close()
    _cache.hits = _cache.misses = 0


def matmul(
    a: Any,
    b: Any,
    c: Any = None,
    *,
    sparse: str = "a",
    prune: str | None = None,
    alpha: Any = 1.0,
    beta: float = 0.0,
    bias: Any = None,
    activation: str | None = None,
    relu_upper_bound: float = math.inf,
    relu_threshold: float = 0.0,
    gelu_scaling: float = 1.0,
    out_dtype: Any = None,
    compute: str | None = None,
    out: Any = None,
    stream: Any = None,
    input_dtype: Any = None,
) -> Any:
    """``D = activation(alpha * A @ B + beta * C + bias)`` with A (or B, ``sparse="b"``) 2:4 sparse.

    The arguments are those of :class:`~pycusparselt.gemm.plan.SparseMatmulPlan` and its ``matmul``; ``prune``
    ("strip" or "tile") prunes a copy of the sparse operand first, otherwise it must already be 2:4.
    """
    operands = [as_operand(x, name, input_dtype if name != "c" else None)
                for x, name in ((a, "a"), (b, "b"), (c, "c")) if x is not None]
    vector_alpha = bool(np.ndim(alpha))
    key = (
        tuple((op.name, op.layout, op.device()) for op in operands),
        sparse,
        None if out_dtype is None else np.dtype(out_dtype),
        compute,
        activation,
        relu_upper_bound,
        relu_threshold,
        gelu_scaling,
        bias is not None,
        vector_alpha,
    )
    plan = _cache.plans.get(key)
    if plan is not None and not plan.closed:
        _cache.hits += 1
        _cache.plans.move_to_end(key)
    else:
        _cache.misses += 1
        plan = SparseMatmulPlan(
            a,
            b,
            c,
            sparse=sparse,
            out_dtype=out_dtype,
            compute=compute,
            activation=activation,
            relu_upper_bound=relu_upper_bound,
            relu_threshold=relu_threshold,
            gelu_scaling=gelu_scaling,
            bias=bias is not None,
            alpha_vector=vector_alpha,
        )
        _cache.plans[key] = plan
        while len(_cache.plans) > MAX_CACHED_PLANS:
            _, old = _cache.plans.popitem(last=False)
            old.close()
    sparse_side = a if sparse == "a" else b
    with plan.compress(sparse_side, prune=prune, stream=stream) as compressed:
        args = (compressed, b) if sparse == "a" else (a, compressed)
        return plan.matmul(*args, c, alpha=alpha, beta=beta, bias=bias, out=out, stream=stream)

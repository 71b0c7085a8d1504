"""Channel permutations that keep more magnitude under 2:4 pruning.

2:4 pruning of a weight ``W`` (outputs x inputs) keeps the two largest magnitudes of every group of
four consecutive *input* channels (:func:`pycusparselt.reference.prune_2to4` with ``axis=-1``).
Which channels share a group is an accident of the layout: large weights that happen to sit in the
same group compete, and two of them are lost. Permuting the input channels first (``W[:, perm]``)
can spread them over different groups. In a network the permutation costs nothing at inference:
the layer that *produces* those channels gets its output rows (and bias) permuted the same way, so
the composed function is unchanged (:func:`permute_pair`), and the permuted model is pruned and
retrained as usual.

On the seed's example row ``100 90 80 10 20 40 30 70`` strip pruning loses 140 in magnitude;
moving the 80 into the second group (``100 90 20 10 80 40 30 70``) loses only 100.

The search (:func:`find_permutation`)
-------------------------------------
The objective is the *kept magnitude*: the sum over all rows and groups of the two largest
magnitudes in each group (:func:`kept_magnitude`; equal to ``abs(prune_2to4(W)).sum()``). Only
which four channels form a group (a *stripe*) matters, not their order inside it. The search
follows NVIDIA's published channel-permutation method (Pool and Yu, "Channel Permutations for N:M
Sparsity", NeurIPS 2021, as implemented in APEX's ASP):

1. **Exhaustive search over stripe pairs.** For two stripes (eight channels) all 35 ways of
   dividing the eight channels into two groups of four are scored at once, vectorised over many
   stripe pairs: with magnitudes ``a, b, c, d`` the two largest sum to
   ``(a + b + c + d + max(|a+b-c-d|, |a-b+c-d|, |a-b-c+d|)) / 2``, so the 70 four-channel groups
   of a pair are one small matrix product (8 x 210 signs), an absolute value and a maximum.
2. **Greedy application.** The best split of every pair gives that pair's gain; the largest gains
   are applied greedily on disjoint pairs (no stripe twice per round). Every applied move is
   re-checked exactly in float64 (the scores are float32), so the kept magnitude never decreases.
   Each round scores a random perfect matching of the stripes (a fraction ``1 / (stripes - 1)``
   of all pairs); when that finds little and the problem is small enough for the time budget,
   a table of all stripe pairs takes over, and only the pairs whose stripes changed are
   rescored.
3. **Escapes from local optima.** At a local optimum a few random channels are swapped between
   stripes and the descent is repeated; the result is kept only if it ends above the best so far,
   otherwise the search returns to the best state.

The search stops at the time budget, the iteration limit, or when the escape attempts are spent.
The result is never worse than the identity (checked at the end, with a fallback).

NumPy arrays (and other host arrays) are searched on the CPU; device arrays (CuPy, CUDA tensors) on the
GPU with the same code, through CuPy (the permutation itself is returned as a NumPy array). What an array
is, ``pycusparselt._arrays`` decides (CuPy is not imported for that: a CuPy array cannot exist otherwise).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _arrays

__all__ = [
    "PermutationReport",
    "find_permutation",
    "kept_magnitude",
    "apply_permutation",
    "invert_permutation",
    "check_permutation",
    "permute_producer",
    "permute_consumer",
    "permute_pair",
]

# --------------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------------


def _array_module(a: Any) -> Any:
    """CuPy for a CuPy array, else NumPy (CuPy is not imported to find out)."""
    return sys.modules["cupy"] if _arrays.is_cupy(a) else np


def _to_host(a: Any) -> np.ndarray:
    return _arrays.to_numpy(a)


def check_permutation(perm: Any, n: int, what: str = "perm") -> np.ndarray:
    """``perm`` as a host int64 array, checked to be a permutation of ``range(n)``."""
    p = _to_host(perm)
    if p.ndim != 1 or p.shape[0] != n:
        raise ValueError(f"{what} must be a 1-D permutation of length {n}, got shape {p.shape}")
    if p.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {p.dtype}")
    p = p.astype(np.int64)
    seen = np.zeros(n, dtype=bool)
    if n and (p.min() < 0 or p.max() >= n):
        raise ValueError(f"{what} is not a permutation of range({n}): values out of range")
    seen[p] = True
    if not seen.all():
        raise ValueError(f"{what} is not a permutation of range({n}): repeated values")
    return p


def _take(a: Any, idx: np.ndarray, axis: int) -> Any:
    """``a`` indexed by ``idx`` along ``axis``, for NumPy, CuPy and other indexable arrays."""
    if isinstance(a, np.ndarray):
        return np.take(a, idx, axis=axis)
    xp = _array_module(a)
    if xp is not np:
        return xp.take(a, xp.asarray(idx), axis=axis)
    if not hasattr(a, "shape") or not hasattr(a, "__getitem__"):
        return np.take(np.asarray(a), idx, axis=axis)
    ax = axis % len(a.shape)
    # other array libraries (PyTorch, JAX, ...): plain advanced indexing with a list
    return a[(slice(None),) * ax + (idx.tolist(),)]


def _magnitudes(weight: Any) -> tuple[Any, Any]:
    """(xp, |weight| as a float64 matrix (M, K)) for NumPy/CuPy or array-likes; 1-D is one row."""
    w, xp = _arrays.namespace(weight)  # device arrays on the GPU, host ones (CPU DLPack: no copy) on the host
    if w.ndim == 1:
        w = w.reshape(1, -1)
    if w.ndim != 2:
        raise ValueError(f"weight must be a matrix (outputs x inputs), got {w.ndim} dimension(s)")
    if w.dtype.kind == "c":
        raise TypeError("weight must be real, got a complex dtype")
    if w.dtype.kind == "b":
        w = w.astype(np.uint8)
    return xp, xp.abs(w.astype(np.float64))


def _check_k(k: int) -> None:
    if k % 4:
        raise ValueError(
            f"the input dimension (axis -1) has size {k}, which is not a multiple of 4 "
            f"(2:4 groups of four run along it)"
        )


# --------------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------------


def invert_permutation(perm: Any) -> np.ndarray:
    """The inverse permutation: ``inv[perm[i]] == i``.

    Parameters
    ----------
    perm : array_like of int
        A permutation of ``range(n)``.

    Returns
    -------
    numpy.ndarray of int64
        ``inv`` such that ``x[perm][inv] == x`` and ``x[inv][perm] == x``.

    Raises
    ------
    ValueError
        ``perm`` is not a permutation.
    """
    p = _to_host(perm)
    if p.ndim != 1:
        raise ValueError(f"perm must be 1-D, got shape {p.shape}")
    p = check_permutation(p, p.shape[0])
    inv = np.empty_like(p)
    inv[p] = np.arange(p.shape[0], dtype=np.int64)
    return inv


def apply_permutation(weight: Any, perm: Any) -> Any:
    """The columns (input channels, axis -1) of ``weight`` in the order ``perm``: ``weight[..., perm]``.

    Parameters
    ----------
    weight : array
        NumPy or CuPy array (or another array type that supports advanced indexing), 1-D or more.
    perm : array_like of int
        A permutation of ``range(weight.shape[-1])``, e.g. from :func:`find_permutation`.

    Returns
    -------
    array
        A new array of the same family: column ``j`` of the result is column ``perm[j]`` of
        ``weight``. :func:`invert_permutation` undoes it.
    """
    p = check_permutation(perm, weight.shape[-1])
    return _take(weight, p, -1)


def kept_magnitude(weight: Any, perm: Any = None) -> float:
    """The magnitude that 2:4 strip pruning along the inputs keeps, optionally after a permutation.

    Parameters
    ----------
    weight : array
        Matrix (outputs x inputs), NumPy or CuPy, of any real dtype (a 1-D array is one row). The
        input dimension must be a multiple of 4.
    perm : array_like of int, optional
        Permutation of the input channels applied first (``weight[:, perm]``).

    Returns
    -------
    float
        ``sum(abs(prune_2to4(weight[:, perm], axis=-1)))`` computed in float64: the sum over all
        rows and groups of four of the two largest magnitudes (ties do not change the sum). NaN if
        ``weight`` holds a NaN.
    """
    xp, mag = _magnitudes(weight)
    _check_k(mag.shape[1])
    if perm is not None:
        p = check_permutation(perm, mag.shape[1])
        mag = xp.take(mag, xp.asarray(p), axis=1)
    groups = xp.sort(mag.reshape(mag.shape[0], mag.shape[1] // 4, 4), axis=-1)
    return float(groups[..., 2:].sum())


def permute_producer(weight: Any, bias: Any, perm: Any) -> tuple[Any, Any]:
    """Permute the *output* channels of the layer that produces the permuted channels.

    Parameters
    ----------
    weight : array, shape (outputs, inputs)
        The producer's weight; its rows are its output channels.
    bias : array, shape (outputs,), or None
        The producer's bias (None for a layer without one).
    perm : array_like of int
        Permutation of ``range(outputs)``, the one applied to the consumer's inputs.

    Returns
    -------
    weight, bias
        ``weight[perm, :]`` and ``bias[perm]`` (None stays None), of the same array family.

    Notes
    -----
    See :func:`permute_pair`: together with :func:`permute_consumer` and the same ``perm`` the
    composed network computes the same function.
    """
    p = check_permutation(perm, weight.shape[0])
    w = _take(weight, p, 0)
    b = None if bias is None else _take(bias, p, 0)
    return w, b


def permute_consumer(weight: Any, perm: Any) -> Any:
    """Permute the *input* channels (columns) of the layer that consumes the permuted channels.

    Parameters
    ----------
    weight : array, shape (outputs, inputs)
        The consumer's weight; its columns are its input channels.
    perm : array_like of int
        Permutation of ``range(inputs)``, e.g. from :func:`find_permutation` of this weight.

    Returns
    -------
    array
        ``weight[:, perm]`` (same as :func:`apply_permutation`).
    """
    return apply_permutation(weight, perm)


def permute_pair(producer_weight: Any, producer_bias: Any, consumer_weight: Any, perm: Any
                 ) -> tuple[Any, Any, Any]:
    """Permute the channels between two layers so that the network's function is unchanged.

    For a producer ``h = act(W1 @ x + b1)`` (``W1``: hidden x inputs) and a consumer
    ``y = W2 @ h + b2`` (``W2``: outputs x hidden) the hidden channels can be renumbered freely:
    with ``W1' = W1[perm]``, ``b1' = b1[perm]`` and ``W2' = W2[:, perm]``,
    ``W2' @ act(W1' @ x + b1') == W2 @ act(W1 @ x + b1)`` for every ``x``. Any *elementwise*
    activation (ReLU, GELU, tanh, ...) commutes with the permutation, and so does anything else
    that acts on each channel separately (per-channel scales, dropout at inference); operations that
    mix channels (LayerNorm statistics are fine, but grouped or attention-head structure is not)
    need the permutation to respect their grouping. The consumer's bias and every other layer are
    untouched.

    Parameters
    ----------
    producer_weight : array, shape (hidden, inputs)
    producer_bias : array, shape (hidden,), or None
    consumer_weight : array, shape (outputs, hidden)
    perm : array_like of int
        Permutation of ``range(hidden)``: usually ``find_permutation(consumer_weight)[0]``, so that
        the consumer, the layer to be pruned 2:4 along its inputs, keeps more magnitude.

    Returns
    -------
    producer_weight, producer_bias, consumer_weight
        The permuted arrays (new arrays; the producer's bias stays None if it was None).

    Raises
    ------
    ValueError
        The hidden sizes of the two layers differ, or ``perm`` is not a permutation of them.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> w1, b1, w2 = rng.normal(size=(8, 3)), rng.normal(size=8), rng.normal(size=(2, 8))
    >>> perm, report = find_permutation(w2, max_iterations=10, time_budget=None)
    >>> p1, pb1, p2 = permute_pair(w1, b1, w2, perm)
    >>> x = rng.normal(size=3)
    >>> bool(np.allclose(p2 @ np.maximum(p1 @ x + pb1, 0), w2 @ np.maximum(w1 @ x + b1, 0)))
    True
    """
    hidden = producer_weight.shape[0]
    if consumer_weight.shape[-1] != hidden:
        raise ValueError(
            f"the producer has {hidden} output channels but the consumer has "
            f"{consumer_weight.shape[-1]} input channels"
        )
    w1, b1 = permute_producer(producer_weight, producer_bias, perm)
    return w1, b1, permute_consumer(consumer_weight, perm)


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------

#: The 35 ways to divide eight channels (two stripes) into two groups of four; the first group
#: always holds channel 0, and split 0 is the current arrangement (0, 1, 2, 3 | 4, 5, 6, 7).
_SPLITS = np.array([s for s in itertools.combinations(range(8), 4) if 0 in s], dtype=np.int64)
_SPLITS_REST = np.array([sorted(set(range(8)) - set(s)) for s in _SPLITS.tolist()], dtype=np.int64)


def _build_signs() -> np.ndarray:
    """(8, 210) sign matrix, columns ordered [pairing 0..2][group: first, rest][split 0..34].

    The pairings of a group (a, b, c, d) are ab|cd, ac|bd, ad|bc; the largest ``|sum - sum|`` over
    them is (two largest) - (two smallest)."""
    cols = []
    for pairing in ((0, 1, 2, 3), (0, 2, 1, 3), (0, 3, 1, 2)):
        for groups in (_SPLITS, _SPLITS_REST):
            for g in groups:
                v = np.zeros(8)
                v[g[list(pairing[:2])]] = 1.0
                v[g[list(pairing[2:])]] = -1.0
                cols.append(v)
    return np.stack(cols, axis=1)


_SIGNS = _build_signs()
_N_SPLITS = len(_SPLITS)  # 35

#: Scoring rate assumed when deciding whether to keep the table of all stripe pairs, in
#: (stripe pair x row) units per second (NumPy on the 2-core x86-64 CPU of docs/workflow.rst
#: scores about 10 million; a GPU far more), and the largest table. With a time budget the table
#: is kept when scoring it once takes at most a quarter of the budget at this rate; the choice
#: depends only on the shape, the backend and ``time_budget``, never on measured time.
_TABLE_RATE = {"cpu": 5e6, "gpu": 1e9}
_TABLE_MAX = {"cpu": 1 << 26, "gpu": 1 << 30}
#: (stripe pair x row) units gathered at once, and per batch of sign products (CPU: 8192 x 210
#: float32 = 6.9 MB, cache-sized; GPU: large batches, few kernel launches)
_BLOCK_UNITS = {"cpu": 1 << 20, "gpu": 1 << 23}
_CHUNK_UNITS = {"cpu": 1 << 13, "gpu": 1 << 20}
_REL_TOL_EST = 1e-6  # float32 estimate: gains below this fraction of the pair's score are noise
_REL_TOL = 1e-9  # float64 check: gains below this fraction of the pair's kept magnitude are ignored
_PATIENCE = 3  # random pairings: rounds without a gain that count as a local optimum


@dataclass(frozen=True)
class PermutationReport:
    """What :func:`find_permutation` did.

    Attributes
    ----------
    kept_before, kept_after : float
        Magnitude kept by 2:4 strip pruning along the inputs without and with the permutation
        (float64 sums of absolute values, :func:`kept_magnitude`).
    total : float
        Total magnitude of the weight (a bound on what any pruning keeps).
    iterations : int
        Rounds of scoring stripe pairs and applying moves (all descents, escapes included).
    escapes_tried, escapes_accepted : int
        Perturbations from a local optimum, and those that led to a better result.
    seconds : float
        Wall-clock time of the search.
    method : str
        How the search ran (neighbourhood, backend, escapes).
    stopped_by : str
        ``"converged"`` (local optimum and the escape attempts spent), ``"time_budget"``,
        ``"max_iterations"``, or ``"trivial"`` (one stripe or no rows: nothing to search).
    """

    kept_before: float
    kept_after: float
    total: float
    iterations: int
    escapes_tried: int
    escapes_accepted: int
    seconds: float
    method: str
    stopped_by: str

    @property
    def improvement(self) -> float:
        """``kept_after - kept_before`` (never negative)."""
        return self.kept_after - self.kept_before

    @property
    def relative_improvement(self) -> float:
        """``improvement / kept_before`` (0 when nothing is kept)."""
        return self.improvement / self.kept_before if self.kept_before else 0.0

    @property
    def kept_fraction_before(self) -> float:
        """``kept_before / total`` (1 for an all-zero weight)."""
        return self.kept_before / self.total if self.total else 1.0

    @property
    def kept_fraction_after(self) -> float:
        """``kept_after / total`` (1 for an all-zero weight)."""
        return self.kept_after / self.total if self.total else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The fields and the derived figures, for JSON."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for f in ("improvement", "relative_improvement", "kept_fraction_before", "kept_fraction_after"):
            d[f] = getattr(self, f)
        return d

    def __str__(self) -> str:
        return (
            f"kept magnitude {self.kept_before:.6g} -> {self.kept_after:.6g} "
            f"({100 * self.kept_fraction_before:.3f}% -> {100 * self.kept_fraction_after:.3f}% of "
            f"{self.total:.6g}, +{100 * self.relative_improvement:.3f}%); {self.iterations} "
            f"iterations, {self.escapes_accepted}/{self.escapes_tried} escapes kept, "
            f"{self.seconds:.3f} s, stopped by {self.stopped_by}; {self.method}"
        )


class _Stop(Exception):
    """The time budget or the iteration limit ran out (``reason`` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Search:
    """State of one search: the permutation (host), its stripes' exact kept magnitudes, and the
    scaled float32 magnitudes on the array's device."""

    def __init__(self, xp: Any, mag64: Any, rng: np.random.Generator, deadline: float | None,
                 max_iterations: int | None, table: bool) -> None:
        self.xp = xp
        self.mag64 = mag64
        peak = float(mag64.max()) if mag64.size else 0.0
        scale = 1.0 / peak if peak > 0 else 1.0
        # (K, M): the magnitudes of each channel contiguous, scaled to at most 1 for float32
        self.mag32_t = xp.ascontiguousarray((mag64 * scale).astype(np.float32).T)
        self.signs_t = xp.asarray(np.ascontiguousarray(_SIGNS.T.astype(np.float32)))  # (210, 8)
        backend = "cpu" if xp is np else "gpu"
        self.block_units, self.chunk_units = _BLOCK_UNITS[backend], _CHUNK_UNITS[backend]
        self.m, self.k = mag64.shape
        self.g = self.k // 4
        self.perm = np.arange(self.k, dtype=np.int64)
        self.rng = rng
        self.deadline = deadline
        self.max_iterations = max_iterations
        self.iterations = 0
        self.stripe_kept = self._kept_of(self.perm.reshape(self.g, 4))
        self.use_table = table
        self.table_ready = False
        if table:
            ia, ib = np.triu_indices(self.g, 1)
            self.pairs = np.stack([ia, ib], axis=1).astype(np.int64)
            self.gain = np.zeros(len(self.pairs))
            self.split = np.zeros(len(self.pairs), dtype=np.int64)
            # pair index of (a, b), a < b, for rescoring the pairs of changed stripes
            self.pair_id = np.full((self.g, self.g), -1, dtype=np.int64)
            self.pair_id[ia, ib] = np.arange(len(ia))
            self.pair_id[ib, ia] = np.arange(len(ia))

    # -- budget ------------------------------------------------------------------------------------

    def check_budget(self) -> None:
        if self.max_iterations is not None and self.iterations >= self.max_iterations:
            raise _Stop("max_iterations")
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            raise _Stop("time_budget")

    # -- exact and estimated scores ------------------------------------------------------------------

    @property
    def kept(self) -> float:
        return float(self.stripe_kept.sum())

    def _kept_of(self, stripes: np.ndarray) -> np.ndarray:
        """Exact (float64) kept magnitude of each stripe in ``stripes`` (n, 4) of channel ids."""
        xp = self.xp
        out = np.empty(len(stripes))
        step = max(1, self.block_units // max(1, self.m))
        for s in range(0, len(stripes), step):
            cols = xp.asarray(stripes[s:s + step])
            x = xp.sort(self.mag64[:, cols], axis=-1)  # (M, n, 4)
            out[s:s + step] = _to_host(x[..., 2:].sum(axis=(0, 2)))
        return out

    def _scores(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each stripe pair (P, 2): the best split (P,) and its estimated gain over split 0
        (P,) in the scaled units; gains below the float32 noise level are 0.

        Each pair is one small product ``signs.T (210 x 8) @ magnitudes (8 x M)`` of its own, so a
        pair's score does not depend on which other pairs are scored with it."""
        xp = self.xp
        stripes = self.perm.reshape(self.g, 4)
        n_pairs = len(pairs)
        best = np.zeros(n_pairs, dtype=np.int64)
        gain = np.zeros(n_pairs)
        block = max(1, min(n_pairs, self.block_units // max(1, self.m)))
        step = max(1, self.chunk_units // max(1, self.m))
        for s in range(0, n_pairs, block):
            pb = pairs[s:s + block]
            nb = len(pb)
            cols = xp.asarray(np.concatenate([stripes[pb[:, 0]], stripes[pb[:, 1]]], axis=1))
            x = self.mag32_t[cols]  # (nb, 8, M)
            pair_total = _to_host(x.sum(axis=(1, 2), dtype=np.float64))
            total = xp.empty((nb, 70), dtype=np.float64)
            for c in range(0, nb, step):
                y = xp.abs(xp.matmul(self.signs_t, x[c:c + step]))  # (b, 210, M)
                d = xp.maximum(xp.maximum(y[:, :70], y[:, 70:140]), y[:, 140:])
                total[c:c + step] = d.sum(axis=2, dtype=np.float64)
            score = _to_host(total[:, :_N_SPLITS] + total[:, _N_SPLITS:])  # (nb, 35)
            b = np.argmax(score, axis=1)
            g = (score[np.arange(nb), b] - score[:, 0]) / 2
            noise = _REL_TOL_EST * (pair_total + score[:, 0]) / 2 + 1e-30  # of the kept estimate
            g[g <= noise] = 0.0
            best[s:s + block], gain[s:s + block] = b, g
            if s + block < n_pairs and self.deadline is not None and time.perf_counter() >= self.deadline:
                raise _Stop("time_budget")  # a large table's first scoring
        return best, gain

    def _rescore(self, ids: np.ndarray) -> None:
        if len(ids):
            self.split[ids], self.gain[ids] = self._scores(self.pairs[ids])

    # -- moves ---------------------------------------------------------------------------------------

    def _apply(self, pairs: np.ndarray, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply the splits on disjoint stripe pairs where they gain exactly (float64).

        Returns the accepted mask (per pair) and the stripes changed."""
        stripes = self.perm.reshape(self.g, 4)
        eight = np.concatenate([stripes[pairs[:, 0]], stripes[pairs[:, 1]]], axis=1)
        rows = np.arange(len(pairs))[:, None]
        first = eight[rows, _SPLITS[splits]]
        rest = eight[rows, _SPLITS_REST[splits]]
        new = self._kept_of(np.concatenate([first, rest], axis=0))
        new_a, new_b = new[:len(pairs)], new[len(pairs):]
        old = self.stripe_kept[pairs[:, 0]] + self.stripe_kept[pairs[:, 1]]
        ok = (new_a + new_b) - old > _REL_TOL * old
        a, b = pairs[ok, 0], pairs[ok, 1]
        stripes[a], stripes[b] = first[ok], rest[ok]  # writes through to self.perm
        self.stripe_kept[a], self.stripe_kept[b] = new_a[ok], new_b[ok]
        return ok, np.concatenate([a, b])

    def swap_channels(self, n_swaps: int) -> np.ndarray:
        """Swap ``n_swaps`` random channels between random distinct stripes; return the stripes
        changed."""
        stripes = self.perm.reshape(self.g, 4)
        touched = []
        for _ in range(n_swaps):
            a, b = self.rng.choice(self.g, size=2, replace=False)
            i, j = self.rng.integers(0, 4, size=2)
            stripes[a, i], stripes[b, j] = stripes[b, j], stripes[a, i]
            touched += [a, b]
        changed = np.unique(np.array(touched, dtype=np.int64))
        self.stripe_kept[changed] = self._kept_of(stripes[changed])
        if self.use_table:
            self._rescore_stripes(changed)
        return changed

    def _rescore_stripes(self, changed: np.ndarray) -> None:
        if self.table_ready:
            ids = np.unique(self.pair_id[changed].ravel())
            self._rescore(ids[ids >= 0])

    # -- descents --------------------------------------------------------------------------------------

    def descend(self) -> None:
        """Improve until a local optimum of the stripe-pair neighbourhood (or the budget ends).

        Random pairings first; with a table, once a round improves fewer than one pair in eight,
        the table of all pairs is built and finishes the descent (and serves every later one)."""
        if not self.use_table:
            self._descend_random(switch_below=0)
            return
        if not self.table_ready:
            self._descend_random(switch_below=max(1, self.g // 16))
            self._rescore(np.arange(len(self.pairs)))
            self.table_ready = True
        self._descend_table()

    def _descend_table(self) -> None:
        while True:
            cand = np.flatnonzero(self.gain > 0)
            if not len(cand):
                return
            self.check_budget()
            self.iterations += 1
            order = cand[np.argsort(-self.gain[cand], kind="stable")]
            used = np.zeros(self.g, dtype=bool)
            chosen = []
            for p in order.tolist():
                a, b = self.pairs[p]
                if not (used[a] or used[b]):
                    used[a] = used[b] = True
                    chosen.append(p)
                    if 2 * len(chosen) >= self.g - 1:
                        break
            chosen = np.array(chosen, dtype=np.int64)
            ok, changed = self._apply(self.pairs[chosen], self.split[chosen])
            self.gain[chosen[~ok]] = 0.0  # no exact gain: skip until one of its stripes changes
            self._rescore_stripes(changed)

    def _descend_random(self, switch_below: int) -> None:
        """Rounds of one random perfect matching of the stripes, until a round improves fewer
        than ``switch_below`` pairs, or ``_PATIENCE`` rounds in a row improve none."""
        idle = 0
        while idle < _PATIENCE:
            self.check_budget()
            self.iterations += 1
            order = self.rng.permutation(self.g)[: self.g // 2 * 2].reshape(-1, 2)
            pairs = np.sort(order, axis=1)
            split, gain = self._scores(pairs)
            sel = gain > 0
            n_ok = int(self._apply(pairs[sel], split[sel])[0].sum()) if sel.any() else 0
            if n_ok < switch_below:
                return
            idle = 0 if n_ok else idle + 1

    # -- state for escapes ---------------------------------------------------------------------------

    def save(self) -> tuple:
        table = (self.gain.copy(), self.split.copy()) if self.table_ready else None
        return self.perm.copy(), self.stripe_kept.copy(), table

    def restore(self, state: tuple) -> None:
        perm, kept, table = state
        self.perm[:] = perm
        self.stripe_kept[:] = kept
        if table is not None:
            self.gain[:], self.split[:] = table


def find_permutation(
    weight: Any,
    *,
    time_budget: float | None = 1.0,
    max_iterations: int | None = None,
    seed: int = 0,
    escape_attempts: int = 20,
    escape_swaps: tuple[int, int] = (4, 8),
) -> tuple[np.ndarray, PermutationReport]:
    """Search a permutation of the input channels that keeps more magnitude under 2:4 pruning.

    Parameters
    ----------
    weight : array, shape (outputs, inputs)
        The layer's weight, to be pruned 2:4 along the inputs (axis -1, groups of four input
        channels). NumPy (searched on the CPU) or CuPy (on its GPU); any real dtype (magnitudes are
        taken in float64). The number of inputs must be a multiple of 4; a 1-D array is one row.
    time_budget : float or None
        Seconds the search may take (checked before every round, so it can run over by one round);
        None for no limit. Default 1 s.
    max_iterations : int or None
        Most rounds (scoring stripe pairs and applying moves), over all descents; None for no
        limit. With ``time_budget=None`` and this limit the result depends on nothing but the
        weight, the seed and the backend.
    seed : int
        Seed of the random pairings and escape perturbations.
    escape_attempts : int
        Perturbations tried from local optima (0: plain greedy descent).
    escape_swaps : (int, int)
        Each perturbation swaps between ``escape_swaps[0]`` and ``escape_swaps[1]`` (inclusive)
        random channels between stripes.

    Returns
    -------
    perm : numpy.ndarray of int64, shape (inputs,)
        Use as ``weight[:, perm]`` (:func:`apply_permutation`); the producing layer gets
        ``[perm]`` on its outputs (:func:`permute_pair`). Within each group of four the channels
        are in no particular order (the order does not change what is kept).
    report : PermutationReport
        Kept magnitude before and after, iterations, time, method.

    Raises
    ------
    ValueError
        Not a matrix, the input dimension not a multiple of 4, or non-finite values.
    TypeError
        A complex dtype.

    Notes
    -----
    The kept magnitude after is never below the identity's: every move is checked exactly, and the
    final permutation is compared with the identity (which is returned if it were better).

    **Determinism.** For a given weight and seed the search takes the same steps every time; where
    it ends depends on what stops it. Without a time budget (``time_budget=None``, with
    ``max_iterations`` and/or ``escape_attempts`` bounding the work) the result is reproducible.
    When the time budget stops the search (``report.stopped_by == "time_budget"``) the result
    depends on the machine's speed.

    **Neighbourhood.** Each descent first scores random perfect matchings of the stripes (one
    round scores ``stripes / 2`` pairs). When the table of all ``stripes * (stripes - 1) / 2`` pairs
    is affordable (scoring it once, at an assumed 5 million (pair x row) units per second on the
    CPU, takes at most a quarter of ``time_budget``; up to 2**26 units without a budget, e.g.
    1024 x 1024), the descent switches to it once random rounds improve fewer than one pair in
    eight: the best disjoint moves are applied greedily, only pairs of changed stripes are
    rescored, and a local optimum is exact for the pair neighbourhood. Otherwise random rounds go
    on until three in a row improve nothing. ``report.method`` says which ran.

    Examples
    --------
    The seed's example row loses 140 in magnitude when pruned as it is, 100 after the search:

    >>> import numpy as np
    >>> row = np.array([[100, 90, 80, 10, 20, 40, 30, 70]], dtype=np.float32)
    >>> perm, report = find_permutation(row, time_budget=None)
    >>> float(np.abs(row).sum() - report.kept_before), float(np.abs(row).sum() - report.kept_after)
    (140.0, 100.0)
    """
    start = time.perf_counter()
    if time_budget is not None and time_budget < 0:
        raise ValueError(f"time_budget must be >= 0 or None, got {time_budget}")
    if max_iterations is not None and max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0 or None, got {max_iterations}")
    if escape_attempts < 0:
        raise ValueError(f"escape_attempts must be >= 0, got {escape_attempts}")
    lo_swaps, hi_swaps = (int(v) for v in escape_swaps)
    if not 1 <= lo_swaps <= hi_swaps:
        raise ValueError(f"escape_swaps must be (low, high) with 1 <= low <= high, got {escape_swaps}")
    xp, mag = _magnitudes(weight)
    m, k = mag.shape
    _check_k(k)
    if not bool(xp.isfinite(mag).all()):
        raise ValueError("weight holds NaN or infinite values; the search needs finite magnitudes")
    identity = np.arange(k, dtype=np.int64)
    total = float(mag.sum())
    kept_before = kept_magnitude(mag)
    backend = "cpu" if xp is np else "gpu"
    g = k // 4
    if g < 2 or m == 0:
        report = PermutationReport(kept_before, kept_before, total, 0, 0, 0,
                                   time.perf_counter() - start, "nothing to search", "trivial")
        return identity, report

    n_pairs = g * (g - 1) // 2
    cap = _TABLE_MAX[backend]
    if time_budget is not None:
        cap = min(cap, 0.25 * time_budget * _TABLE_RATE[backend])
    table = n_pairs * m <= cap
    neighbourhood = ("random stripe pairings, then all stripe pairs (table)" if table
                     else "random stripe pairings")
    method = (f"exhaustive 2-stripe splits (35 per pair), greedy disjoint moves over "
              f"{neighbourhood}, up to {escape_attempts} escapes of {lo_swaps}-{hi_swaps} channel "
              f"swaps; {'NumPy (CPU)' if xp is np else 'CuPy (GPU)'}")
    rng = np.random.default_rng(seed)
    deadline = None if time_budget is None else start + time_budget
    stopped_by = "converged"
    tried = accepted = 0
    search = None
    best_state = None
    best_kept = -math.inf
    try:
        search = _Search(xp, mag, rng, deadline, max_iterations, table)
        search.check_budget()
        search.descend()
        best_state, best_kept = search.save(), search.kept
        for _ in range(escape_attempts):
            search.check_budget()
            tried += 1
            search.swap_channels(int(rng.integers(lo_swaps, hi_swaps + 1)))
            try:
                search.descend()
            finally:
                if search.kept > best_kept * (1 + _REL_TOL):
                    best_state, best_kept = search.save(), search.kept
                    accepted += 1
                else:
                    search.restore(best_state)
    except _Stop as stop:
        stopped_by = stop.reason
        if search is not None and search.kept > best_kept:
            best_state = search.save()
    perm = identity if best_state is None else best_state[0]
    kept_after = kept_magnitude(mag, perm)
    if not kept_after >= kept_before:  # cannot happen (every move is checked), but guaranteed
        perm, kept_after = identity, kept_before
    report = PermutationReport(
        kept_before=kept_before,
        kept_after=kept_after,
        total=total,
        iterations=0 if search is None else search.iterations,
        escapes_tried=tried,
        escapes_accepted=accepted,
        seconds=time.perf_counter() - start,
        method=method,
        stopped_by=stopped_by,
    )
    return perm, report

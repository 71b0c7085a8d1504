"""Framework-neutral 2:4 mask tools for the three-step recipe.

NVIDIA's recipe for 2:4 sparse networks (see :doc:`workflow`):

1. train (or obtain) a dense network;
2. prune each weight to 2:4 along its input channels, by magnitude, once (optionally after a
   channel permutation, :mod:`pycusparselt.nn.permutation`);
3. repeat the original training with the same hyper-parameters, starting from the pruned weights
   and keeping the zero pattern of step 2 fixed (the mask is not recomputed).

This module gives the pieces for steps 2 and 3 on any array library: :func:`compute_mask` (the
keep-mask of :func:`pycusparselt.reference.mask_2to4`, optionally through a permutation),
:func:`apply_mask` (prune; also masks gradients), and :func:`enforce_mask` /
:func:`masked_update` (keep pruned weights at zero across optimizer updates).

Arrays
------
NumPy arrays are used as they are. CuPy arrays (CuPy is imported only if the caller's array is
one) are handled on their GPU, except that the mask is selected on the host (``cupy.asnumpy`` and
back). Any other object with ``__dlpack__`` (a PyTorch CPU tensor, a JAX array, ...) is viewed
through :func:`numpy.from_dlpack` without a copy (a CUDA tensor through ``cupy.from_dlpack`` when
CuPy is installed); results go back to the caller's library through its ``from_dlpack``
(``__array_namespace__().from_dlpack``, or the top-level ``from_dlpack`` of the object's package,
such as ``torch.from_dlpack``), and are NumPy arrays where there is none. In-place operations on
such objects write through the shared memory. PyTorch refuses to export tensors that require
gradients: pass ``param.detach()`` (which shares the storage).

Selection rules
---------------
Masks are exactly those of :func:`pycusparselt.reference.mask_2to4` (two largest magnitudes per
group of four; ties to the lower index; NaN ranks above everything; ``"tile"``: the best of the 90
4x4 patterns). Types the reference does not take are ranked exactly by their own magnitudes with
the same rules: float64 (and wider floats, converted to float64) and the integer types; bool is
treated as 0/1.

In a training loop (NumPy; the same calls work on CuPy arrays and DLPack tensors)::

    mask = compute_mask(w)                  # step 2: once, from the trained dense weight
    apply_mask(w, mask, inplace=True)       # prune
    for x, y in batches:                    # step 3: the original training procedure
        grad = gradient(w, x, y)
        apply_mask(grad, mask, inplace=True)          # optional: masked gradients (Adam's
                                                      # moments of pruned weights stay 0)
        masked_update(w, -lr * grad, mask)            # w += update where kept; pruned stay 0

or, with an optimizer that updates ``w`` itself (weight decay, momentum), call
``enforce_mask(w, mask)`` after every step.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from .. import _arrays, reference
from .permutation import check_permutation, invert_permutation

__all__ = [
    "compute_mask",
    "apply_mask",
    "enforce_mask",
    "masked_update",
]

def _family_from_dlpack(obj: Any) -> Callable[[Any], Any] | None:
    """The ``from_dlpack`` of ``obj``'s array library, or None."""
    namespace = getattr(obj, "__array_namespace__", None)
    if namespace is not None:
        try:
            ns = namespace()
        except Exception:  # noqa: BLE001 - an optional protocol; fall back below
            ns = None
        if ns is not None and hasattr(ns, "from_dlpack"):
            return ns.from_dlpack
    package = sys.modules.get(type(obj).__module__.split(".")[0])
    return getattr(package, "from_dlpack", None)


def _view(a: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(array sharing ``a``'s memory where possible, its module (numpy or cupy), convert-back).

    :func:`pycusparselt._arrays.namespace` decides what ``a`` is; convert-back turns a NumPy/CuPy result into
    ``a``'s array family (through that family's ``from_dlpack``)."""
    arr, xp = _arrays.namespace(a)
    if arr is a or _arrays.is_cupy(a) or not hasattr(a, "__dlpack__"):
        return arr, xp, lambda r: r
    back = _family_from_dlpack(a)
    return arr, xp, (lambda r: back(r)) if back is not None else (lambda r: r)


def _to_numpy(x: Any, xp: Any) -> np.ndarray:
    return x if xp is np else xp.asnumpy(x)


def _from_numpy(x: np.ndarray, xp: Any) -> Any:
    return x if xp is np else xp.asarray(x)


def _exact_key(a: np.ndarray) -> np.ndarray:
    """An unsigned key that orders like ``|a|`` with NaN above inf, for types the reference lacks."""
    if a.dtype.kind == "f":
        bits = a.astype(np.float64).view(np.uint64) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)
        inf = np.uint64(0x7FF0_0000_0000_0000)
        return np.where(bits > inf, inf + np.uint64(1), bits)
    if a.dtype.kind == "b":
        return a.astype(np.uint8)
    if a.dtype.kind == "u":
        return a.astype(np.uint64)
    # |int64 min| overflows to itself, whose uint64 view is 2**63: still the right order
    return np.abs(a.astype(np.int64)).view(np.uint64)


def _axis(axis: Any, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimension(s)")
    return int(axis) % ndim


def _mask(a: np.ndarray, axis: int, method: str) -> np.ndarray:
    """The keep-mask of ``reference.mask_2to4`` for any real dtype (host arrays)."""
    if a.dtype in reference.SUPPORTED_DTYPES:
        return reference.mask_2to4(a, axis=axis, method=method)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"weight must be real (float, integer or bool), got dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError("weight must have at least one dimension")
    if method not in ("strip", "tile"):
        raise ValueError(f"method must be 'strip' or 'tile', got {method!r}")
    # the reference's own selection: strip ranks the exact keys (ties to the lower index), tile sums the
    # float64 magnitudes (NaN and infinities first)
    scores = _exact_key(a) if method == "strip" else np.abs(a.astype(np.float64))
    return reference.mask_from_scores(scores, axis=axis, method=method)


def compute_mask(weight: Any, *, method: str = "strip", permutation: Any = None, axis: int = -1) -> Any:
    """The 2:4 keep-mask of ``weight``: True where pruning keeps the element.

    Parameters
    ----------
    weight : array
        NumPy or CuPy array, or any DLPack object (e.g. a PyTorch tensor); any real dtype (see the
        module's selection rules). The size of ``axis`` must be a multiple of 4 (``"tile"``: both
        of the last two axes).
    method : {"strip", "tile"}
        ``"strip"``: the two largest magnitudes of every group of four along ``axis``
        (cuSPARSELt's ``CUSPARSELT_PRUNE_SPMMA_STRIP``). ``"tile"``: the best pattern with two
        per row and column of every 4x4 tile of the last two axes
        (``CUSPARSELT_PRUNE_SPMMA_TILE``). As :func:`pycusparselt.reference.mask_2to4`.
    permutation : array_like of int, optional
        A channel permutation along ``axis`` (e.g. from
        :func:`pycusparselt.nn.permutation.find_permutation`). The mask is chosen for the permuted
        weight ``take(weight, permutation, axis)`` and returned in ``weight``'s own channel
        order: ``compute_mask(w, permutation=p)[..., p] == compute_mask(w[..., p])``. Such a mask
        is 2:4 only in the permuted order; use it to train in the original layout and permute
        (:func:`pycusparselt.nn.permutation.permute_pair`) before compressing.
    axis : int
        The reduction axis (input channels, K); groups of four run along it. Default -1.

    Returns
    -------
    array of bool
        Same shape as ``weight``, in ``weight``'s array family (a NumPy array for an object whose
        library cannot be found).

    Raises
    ------
    TypeError
        A complex or non-numeric dtype, or a non-integer permutation.
    ValueError
        Sizes not multiples of 4, an unknown ``method``, or ``permutation`` not a permutation of
        ``range(weight.shape[axis])``.
    """
    arr, xp, restore = _view(weight)
    host = _to_numpy(arr, xp)
    if host.ndim == 0:
        raise ValueError("weight must have at least one dimension")
    ax = _axis(axis, host.ndim)
    if permutation is None:
        mask = _mask(host, ax, method)
    else:
        perm = check_permutation(permutation, host.shape[ax], "permutation")
        permuted = _mask(np.take(host, perm, axis=ax), ax, method)
        mask = np.take(permuted, invert_permutation(perm), axis=ax)
    return restore(_from_numpy(np.ascontiguousarray(mask), xp))


def _mask_like(mask: Any, arr: Any, xp: Any) -> Any:
    """``mask`` as a boolean array of ``arr``'s module (numpy or cupy), broadcastable to ``arr``."""
    m, mxp, _ = _view(mask)
    if mxp is not xp:
        m = _from_numpy(_to_numpy(m, mxp), xp)
    if m.dtype != np.bool_:
        m = m.astype(bool)
    if m.shape != arr.shape:
        try:
            np.broadcast_shapes(m.shape, arr.shape)
        except ValueError:
            raise ValueError(f"mask of shape {m.shape} does not fit weight of shape {arr.shape}") from None
    return m


def _writeable(arr: Any, xp: Any, what: str) -> None:
    if xp is np and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only; it cannot be changed in place")


def apply_mask(weight: Any, mask: Any, *, inplace: bool = False) -> Any:
    """Zero ``weight`` where ``mask`` is False (prune it, or mask a gradient).

    Parameters
    ----------
    weight : array
        NumPy, CuPy or DLPack array (weights, gradients, optimizer state ...).
    mask : array of bool
        From :func:`compute_mask` (any array family; broadcastable to ``weight``).
    inplace : bool
        Write into ``weight`` (through the shared memory for DLPack objects) and return it. Default:
        return a new array.

    Returns
    -------
    array
        ``where(mask, weight, 0)``; pruned elements become ``+0`` (NaN and infinities too),
        kept ones are unchanged. The same array family as ``weight``; with ``inplace`` the
        ``weight`` object itself.
    """
    arr, xp, restore = _view(weight)
    m = _mask_like(mask, arr, xp)
    if inplace:
        _writeable(arr, xp, "weight")
        arr[...] = xp.where(m, arr, xp.zeros((), dtype=arr.dtype))
        return weight
    return restore(xp.where(m, arr, xp.zeros((), dtype=arr.dtype)))


def enforce_mask(weight: Any, mask: Any) -> Any:
    """Set the pruned elements of ``weight`` back to zero, in place.

    Call after every optimizer step whose update can move pruned weights (weight decay, momentum,
    an optimizer that is not told about the mask), so the zero pattern of step 2 stays fixed.

    Parameters
    ----------
    weight : array
        NumPy, CuPy or DLPack array, changed in place.
    mask : array of bool
        From :func:`compute_mask`.

    Returns
    -------
    array
        ``weight`` itself.
    """
    return apply_mask(weight, mask, inplace=True)


def masked_update(weight: Any, update: Any, mask: Any) -> Any:
    """``weight += update`` on the kept elements only; pruned elements are left at zero. In place.

    Parameters
    ----------
    weight : array
        NumPy, CuPy or DLPack array, changed in place.
    update : array
        The optimizer's step (e.g. ``-lr * grad``), broadcastable to ``weight``; any array family.
    mask : array of bool
        From :func:`compute_mask`.

    Returns
    -------
    array
        ``weight`` itself: ``where(mask, weight + update, 0)``.
    """
    arr, xp, _ = _view(weight)
    _writeable(arr, xp, "weight")
    m = _mask_like(mask, arr, xp)
    u, uxp, _ = _view(update)
    if uxp is not xp:
        u = _from_numpy(_to_numpy(u, uxp), xp)
    zero = xp.zeros((), dtype=arr.dtype)
    arr[...] = xp.where(m, arr + xp.asarray(u, dtype=arr.dtype), zero)
    return weight

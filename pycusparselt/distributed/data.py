"""Data parallelism for inference: every rank runs the whole model on its share of the batch.

For a model that fits one GPU this is what several GPUs should do: no collective runs between the layers, so
nothing waits on the interconnect, and each rank's products keep the one-GPU shapes (tuned, efficient) at a
fraction of the rows. The only communication is an optional all-gather of the outputs at the end.

- :func:`batch_share`: a rank's rows of the whole batch (:func:`~.sharding.sequence_bounds`: contiguous,
  sizes differing by at most one, the first ranks taking one more).
- :func:`gather_rows`: every rank's rows put back together, on every rank (shares travel padded to the
  largest, so uneven shares are fine).
- :class:`DataParallel`: both around a model: ``y = DataParallel(model, group=group)(x)``.

A rank's outputs are its model's outputs for its rows, bit for bit: a row-wise model computes each row as it
would in the whole batch on the NumPy reference (on GPUs, a GEMM of fewer rows may choose another
configuration and accumulate in another order, within the products' error bound).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .. import _arrays
from .._native.streams import on_device, on_given_stream
from . import sharding
from .groups import Group, as_list

__all__ = ["batch_share", "gather_rows", "DataParallel"]


def _check_group(group: Any) -> Group:
    if not isinstance(group, Group):
        raise TypeError(f"group: expected a pycusparselt.distributed.Group, got {type(group).__name__}")
    group.check_open()
    return group




def batch_share(x: Any, *, group: Group, rank: int | None = None) -> Any:
    """Rank ``rank``'s rows of the whole batch ``x`` (a view).

    Parameters
    ----------
    x : array, shape (batch, ...)
        The whole batch, the same on every rank.
    group : Group
        The ranks the batch is shared across.
    rank : int, optional
        Default: this process's rank (when it holds one).

    Raises
    ------
    ValueError
        ``x`` has fewer rows than the group has ranks, or ``rank`` is not a rank of the group.
    """
    group = _check_group(group)
    rank = group.rank if rank is None else int(rank)
    if not 0 <= rank < group.world_size:
        raise ValueError(f"rank: expected 0 <= rank < {group.world_size}, got {rank}")
    if not hasattr(x, "shape") or len(x.shape) < 1:
        raise ValueError(f"x: expected an array of shape (batch, ...), got {getattr(x, 'shape', type(x).__name__)}")
    start, stop = sharding.sequence_bounds(int(x.shape[0]), group.world_size)[rank]
    return x[start:stop]


def gather_rows(shares: Any, *, group: Group, batch: int, stream: Any = None) -> Any:
    """Every rank's rows (its share of ``batch``, :func:`batch_share`) as the whole batch, on every rank.

    Parameters
    ----------
    shares : array or list of arrays, shape (rows, ...)
        Each local rank's rows: ``sequence_bounds(batch, world_size)[rank]`` of them, the rest of the shape
        and the dtype the same on every rank.
    group : Group
    batch : int
        The whole batch's rows.
    stream : optional
        The stream (a group of one local rank on a GPU).

    Returns
    -------
    array or list of arrays, shape (batch, ...)
        A plain array for a single local rank, else one per local rank; in each share's framework (a CUDA
        tensor for a tensor), NumPy on a host group.

    Raises
    ------
    ValueError
        A share of another number of rows than its rank's.
    """
    group = _check_group(group)
    bounds = sharding.sequence_bounds(batch, group.world_size)
    sizes = sharding.shard_sizes(bounds)
    widest = max(sizes)
    items = as_list(shares, len(group.ranks), "shares")
    sends = []
    for rank, item in zip(group.ranks, items, strict=True):
        if not hasattr(item, "shape") or len(item.shape) < 1 or item.shape[0] != sizes[rank]:
            got = tuple(item.shape) if hasattr(item, "shape") else type(item).__name__
            raise ValueError(f"shares: rank {rank}'s share of {batch} rows is {sizes[rank]} rows, got {got}")
        device = group.device_of(rank)
        with on_device(device), on_given_stream(stream, device):
            array, xp = _arrays.namespace(item)  # a CUDA tensor as a CuPy view, zero-copy
            send = xp.zeros((widest, *array.shape[1:]), dtype=array.dtype)  # shorter shares travel padded
            send[: array.shape[0]] = array
            sends.append(send)
    several = len(group.ranks) > 1
    gathered = group.all_gather(sends if several else sends[0], stream=stream)
    results = []
    for rank, g, item in zip(group.ranks, gathered if several else [gathered], items, strict=True):
        device = group.device_of(rank)
        with on_device(device), on_given_stream(stream, device):
            whole = _arrays.namespace(g)[1].concatenate([g[r, : sizes[r]] for r in range(group.world_size)])
        results.append(whole if isinstance(whole, np.ndarray) else _arrays.like(whole, item))
    return results if isinstance(shares, (list, tuple)) else results[0]


class DataParallel:
    """Inference on every rank's share of the batch with the whole model.

    Parameters
    ----------
    model : callable, or a sequence of callables
        The whole model (for example a chain of :class:`~pycusparselt.nn.linear.SparseLinear` layers), built
        on the rank's device; one per local rank where the process holds several (in rank order).
    group : Group
        The ranks to share the batch across.

    Examples
    --------
    >>> import numpy as np
    >>> from pycusparselt import distributed as dist
    >>> group = dist.HostGroup.local(1)
    >>> dp = dist.DataParallel(lambda x: 2 * x, group=group)
    >>> dp(np.arange(4.0))
    array([0., 2., 4., 6.])
    """

    def __init__(self, model: Callable | Sequence[Callable], *, group: Group) -> None:
        self.group = _check_group(group)
        devices = [group.device_of(rank) for rank in group.ranks]
        if not isinstance(model, (list, tuple)) and len(group.ranks) > 1 and any(d is not None for d in devices):
            raise TypeError(f"model: this process holds {len(group.ranks)} ranks, one per device: expected one "
                            f"model per local rank, each built on its rank's device, got one {type(model).__name__}")
        models = list(model) if isinstance(model, (list, tuple)) else [model] * len(group.ranks)  # host ranks
        if len(models) != len(group.ranks):
            raise ValueError(f"model: expected one model per local rank ({len(group.ranks)}), got {len(models)}")
        for item in models:
            if not callable(item):
                raise TypeError(f"model: expected a callable, got {type(item).__name__}")
        self.models = models

    def __call__(self, x: Any, *, gather: bool = True, stream: Any = None) -> Any:
        """The model's output for the whole batch ``x``: each rank runs its share.

        Parameters
        ----------
        x : array, or list of arrays (one per local rank), shape (batch, ...)
            The whole batch, the same on every rank.
        gather : bool
            True: the whole batch's output on every rank (:func:`gather_rows`); False: each rank's share of
            the output (its rows, :func:`batch_share`).
        stream : optional
            The stream the model and the gather run on (a group of one local rank on a GPU; default: the
            current stream): the model is called with it as CuPy's current stream, so the gather follows a
            CuPy model's work (a PyTorch model runs on PyTorch's current stream: make it the same one).

        Returns
        -------
        array, or list of arrays (one per local rank)
            In the model's output framework (a CUDA tensor for a tensor model); NumPy on a host group.

        Raises
        ------
        ValueError
            Local ranks given batches of different sizes, or a batch that is not an array.
        """
        group = self.group
        group.check_open()
        items = as_list(x, len(group.ranks), "x")
        batch = {int(item.shape[0]) if hasattr(item, "shape") and len(item.shape) else -1 for item in items}
        if len(batch) != 1 or -1 in batch:
            raise ValueError(f"x: expected the same whole batch (batch, ...) on every local rank, got rows {batch}")
        rows = batch.pop()
        outputs = []
        for rank, model, item in zip(group.ranks, self.models, items, strict=True):
            device = group.device_of(rank)
            with on_device(device), on_given_stream(stream, device):  # the gather then follows the model's work
                outputs.append(model(batch_share(item, group=group, rank=rank)))
        several = len(group.ranks) > 1
        if gather:
            outputs = gather_rows(outputs if several else outputs[0], group=group, batch=rows, stream=stream)
            return outputs
        return outputs if several else outputs[0]

    def __repr__(self) -> str:
        return f"DataParallel({self.models[0]!r}, ranks {self.group.ranks} of {self.group.world_size})"

"""PyTorch entry points: a 2:4 sparse ``nn.Module`` and the three-step 2:4 recipe on a model.

:class:`SparseLinear` is an ``nn.Module`` with a 2:4 weight kept compact in its buffers (``state_dict``,
``torch.save``, ``copy.deepcopy`` and ``.to()`` work as for any module); ``sparsify(model, mode)`` puts it in place
of the model's ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers (eager, CUDA graphs, ``torch.compile``).
``prune_trained_model(model, optimizer)`` prunes every eligible ``nn.Linear`` / ``nn.Conv2d`` 2:4 along its
input channels (masks kept as buffers, the optimizer keeps pruned weights at zero), after permuting the
channels of every hidden space the network's torch.fx graph proves permutable (:func:`permute_network`).
PyTorch is an optional dependency (the ``torch`` extra): importing this package imports it.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401 - imported here so that a missing PyTorch fails at import, with the hint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'pycusparselt.torch needs PyTorch, which is not installed: pip install "pycusparselt[torch]"'
    ) from exc

from .channels import ChannelSpace, PermutationPlan, find_channel_spaces, permute_network
from .conversion import SparsifyReport, sparsify
from .modules import SparseLinear, SparseLinearModule
from .pruning import MASK_NAME, PruneReport, load_pruned, prune_trained_model, remove_masks

__all__ = [
    "SparseLinear",
    "SparseLinearModule",
    "prune_trained_model",
    "load_pruned",
    "sparsify",
    "SparsifyReport",
    "remove_masks",
    "permute_network",
    "find_channel_spaces",
    "PruneReport",
    "PermutationPlan",
    "ChannelSpace",
    "MASK_NAME",
]

"""PyTorch entry points: the talk's three-step 2:4 recipe on an ``nn.Module``.

``sparsify(model, mode)`` then runs the model's ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers through
:class:`pycusparselt.SparseLinear` (``modules.SparseLinearModule``; eager, CUDA graphs, ``torch.compile``).
``prune_trained_model(model, optimizer)`` prunes every eligible ``nn.Linear`` / ``nn.Conv2d`` 2:4 along its
input channels (masks kept as buffers, the optimizer keeps pruned weights at zero), after permuting the
channels of every hidden space the network's torch.fx graph proves permutable (:func:`permute_network`).
PyTorch is an optional dependency (the ``torch`` extra): importing this module imports it.
"""

from __future__ import annotations

from .channels import ChannelSpace, PermutationPlan, find_channel_spaces, permute_network
from .modules import SparsifyReport, sparsify
from .pruning import MASK_NAME, PruneReport, prune_trained_model, remove_masks

__all__ = [
    "prune_trained_model",
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

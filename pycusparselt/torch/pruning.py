"""The talk's three-step recipe in PyTorch: train dense, prune 2:4 once (optionally after channel permutations),
retrain with the same recipe while the optimizer keeps the pruned weights at zero."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..nn import masks as _masks_module
from .channels import PermutationPlan, permute_network, shared_weights

__all__ = ["PruneReport", "prune_trained_model", "remove_masks", "load_pruned", "MASK_NAME"]

#: The buffer each pruned layer gets (saved in ``state_dict``): True where the weight is kept.
MASK_NAME = "weight_mask_2to4"


@dataclass
class PruneReport:
    """What :func:`prune_trained_model` did."""

    pruned: list = field(default_factory=list)  # qualified names of the layers pruned 2:4
    skipped: dict = field(default_factory=dict)  # name -> why it stays dense
    permutations: PermutationPlan | None = None

    def __str__(self) -> str:
        lines = [f"pruned 2:4: {', '.join(self.pruned) or 'nothing'}"]
        lines += [f"left dense: {name} ({why})" for name, why in self.skipped.items()]
        if self.permutations is not None:
            lines.append(str(self.permutations))
        return "\n".join(lines)


def _eligible(name: str, mod: Any, layers: tuple, method: str) -> str | None:
    """None if ``mod`` can be pruned 2:4 along its input channels, else why not."""
    import torch

    if not isinstance(mod, layers):
        return "not a layer type asked for"
    if isinstance(mod, torch.nn.Conv2d):
        if mod.groups != 1:
            return "a grouped convolution"
        if method != "strip":
            return "tile pruning is for matrices: use method='strip' for convolutions"
    if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"{type(mod).__name__} is not supported (Linear and Conv2d are)"
    inputs = mod.weight.shape[1]
    if mod.weight.numel() == 0:
        return f"an empty layer (weight of shape {tuple(mod.weight.shape)})"
    if inputs % 4:
        return f"{inputs} input channels: not a multiple of 4"
    if method == "tile" and mod.weight.shape[0] % 4:
        return f"{mod.weight.shape[0]} outputs: tile pruning needs a multiple of 4"
    return None


def _mask_for(weight: Any, method: str) -> Any:
    """The 2:4 keep-mask along the input channels (dimension 1), computed on the host, as a bool tensor on
    the weight's device."""
    import torch

    host = weight.detach().to("cpu", torch.float32).numpy()
    keep = _masks_module.compute_mask(host, method=method, axis=1)
    return torch.from_numpy(keep).to(weight.device)


def prune_trained_model(
    model: Any,
    optimizer: Any = None,
    *,
    permute: bool = True,
    method: str = "strip",
    layers: Sequence[type] | None = None,
    permutation_time_budget: float | None = 1.0,
) -> PruneReport:
    """Prune a trained model 2:4 for retraining: the talk's ``ASP.prune_trained_model(model, optimizer)``.

    Parameters
    ----------
    model : torch.nn.Module
        Pruned in place.
    optimizer : torch.optim.Optimizer, optional
        Every ``step()`` of it afterwards masks the pruned weights' gradients before the update and the
        weights after it, so momentum, Adam's moments and weight decay never revive a pruned weight.
    permute : bool
        First permute the channels of the hidden spaces that provably allow it
        (:func:`pycusparselt.torch.permute_network`), so that pruning keeps more magnitude.
    method : {"strip", "tile"}
        As :func:`pycusparselt.nn.masks.compute_mask`, along the input channels.
    layers : sequence of module types
        The layer types to prune (default ``(nn.Linear, nn.Conv2d)``).
    permutation_time_budget : float or None
        Seconds of permutation search per channel space.

    Returns
    -------
    PruneReport
        The layers pruned, those left dense with the reason, and the permutations.

    Notes
    -----
    Each pruned layer gets a bool buffer ``weight_mask_2to4`` (in ``state_dict``, so checkpoints keep the
    masks). The three lines of the recipe::

        model = train(model)                                  # 1. dense
        pycusparselt.torch.prune_trained_model(model, opt)    # 2. prune (and permute)
        model = train(model)                                  # 3. retrain, same recipe
    """
    import torch

    if method not in ("strip", "tile"):
        raise ValueError(f"method: expected 'strip' or 'tile', got {method!r}")
    layers = tuple(layers) if layers is not None else (torch.nn.Linear, torch.nn.Conv2d)
    report = PruneReport()
    if permute:
        report.permutations = permute_network(model, optimizer=optimizer, time_budget=permutation_time_budget)
    tied = {}  # id(module) -> the modules that also use its weight and are not pruned
    for key, users in shared_weights(model).items():
        eligible = {id(m) for n, m in users if _eligible(n, m, layers, method) is None and id(m.weight) == key}
        others = [n for n, m in users if id(m) not in eligible]
        for _, mod in users:
            if id(mod) in eligible and others:
                tied[id(mod)] = others
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(mod, layers):
            continue
        why = _eligible(name, mod, layers, method)
        if why is None and id(mod) in tied:
            why = f"its weight is also used by {', '.join(tied[id(mod)])}, which is not pruned 2:4"
        if why is not None:
            report.skipped[name] = why
            continue
        mask = _mask_for(mod.weight, method)
        if hasattr(mod, MASK_NAME):
            getattr(mod, MASK_NAME).copy_(mask)
        else:
            mod.register_buffer(MASK_NAME, mask)
        with torch.no_grad():
            mod.weight.mul_(mask)
        report.pruned.append(name)
    if optimizer is not None:
        _mask_optimizer(model, optimizer)
    return report


def _masked_parameters(model: Any) -> list:
    return [(mod.weight, getattr(mod, MASK_NAME)) for mod in model.modules() if hasattr(mod, MASK_NAME)]


def _mask_optimizer(model: Any, optimizer: Any) -> None:
    """Wrap ``optimizer.step`` (once) so that pruned weights and their gradients stay zero."""
    import torch

    if getattr(optimizer, "_pycusparselt_masked", None) is not None:
        optimizer._pycusparselt_masked = model
        return
    step = optimizer.step
    optimizer._pycusparselt_masked = model

    def masked_step(*args: Any, **kwargs: Any) -> Any:
        pairs = _masked_parameters(optimizer._pycusparselt_masked)
        with torch.no_grad():
            for weight, mask in pairs:
                if weight.grad is not None:
                    weight.grad.mul_(mask)
        result = step(*args, **kwargs)
        with torch.no_grad():
            for weight, mask in pairs:
                weight.mul_(mask)
        return result

    masked_step.__wrapped__ = step  # type: ignore[attr-defined]
    optimizer.step = masked_step


def load_pruned(model: Any, state_dict: Any, *, strict: bool = True) -> Any:
    """Load the ``state_dict`` of a model pruned by :func:`prune_trained_model` into a freshly built ``model`` of
    the same class: every layer with a ``weight_mask_2to4`` entry gets the mask buffer first, then the whole
    state is loaded (``load_state_dict(strict=strict)``). Masked optimizer steps need
    :func:`prune_trained_model`'s ``optimizer`` argument, or the masks only. Returns ``model``.
    """
    import torch

    suffix = "." + MASK_NAME
    for key, mask in state_dict.items():
        if not key.endswith(suffix) and key != MASK_NAME:
            continue
        name = key[: -len(suffix)] if key.endswith(suffix) else ""
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise KeyError(f"state_dict: {key!r} names no module of the model") from None
            continue
        if not hasattr(mod, "weight") or tuple(mask.shape) != tuple(mod.weight.shape) or mask.dtype != torch.bool:
            raise ValueError(f"state_dict: {key!r} is not a bool mask of {name!r}'s weight shape "
                             f"{tuple(getattr(mod, 'weight', torch.empty(0)).shape)}; got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not hasattr(mod, MASK_NAME):
            mod.register_buffer(MASK_NAME, torch.ones_like(mask, device=mod.weight.device))
    model.load_state_dict(state_dict, strict=strict)
    return model


def remove_masks(model: Any, optimizer: Any = None) -> Any:
    """Drop the mask buffers (the weights stay pruned) and, with ``optimizer``, undo the masked step.
    Returns ``model``."""
    for mod in model.modules():
        if hasattr(mod, MASK_NAME):
            delattr(mod, MASK_NAME)
    if optimizer is not None and getattr(optimizer, "_pycusparselt_masked", None) is not None:
        optimizer.step = optimizer.step.__wrapped__
        optimizer._pycusparselt_masked = None
    return model

"""Sibling projections: ``nn.Linear`` layers of one parent that read one input (Q, K and V of attention; gate
and up of a SiLU-gated MLP), which :func:`pycusparselt.torch.sparsify` with ``merge_siblings=True`` runs as
one product over their concatenated weights, each sibling's output a column slice of it.

Groups are found from the module structure alone (the children's attribute names, :data:`SIBLING_GROUPS`), so
that a freshly built model finds the same groups as the one a checkpoint was saved from. Whether the siblings
really read the same tensor is not assumed: the merged module remembers its last product with the input it
was made from (``pycusparselt.torch.SparseLinear.forward_shared``), and a sibling called on another tensor
computes the merged product of that tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Container, Mapping

import torch

from .channels import shared_weights

__all__ = ["SIBLING_GROUPS", "SiblingGroup", "SiblingProjection", "find_sibling_groups", "merged_name"]

#: The attribute names that make a group of siblings, each group in the order its slices take in the merged
#: product. A parent's Linear children named by every name of one group are merged.
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q", "k", "v"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def merged_name(children: tuple[str, ...]) -> str:
    """The parent's attribute (and ``state_dict`` prefix) of the module merged from ``children``:
    ``merged_q_proj_k_proj_v_proj`` for Q, K and V projections."""
    return "merged_" + "_".join(children)


@dataclass
class SiblingGroup:
    """Linear children of ``parent`` to be merged, in :data:`SIBLING_GROUPS` order."""

    parent_name: str
    parent: Any
    children: tuple[str, ...]
    modules: tuple[Any, ...]

    @property
    def names(self) -> list[str]:
        """The members' full names in the model."""
        return [self.full(child) for child in self.children]

    @property
    def merged(self) -> str:
        """The merged module's full name in the model."""
        return self.full(merged_name(self.children))

    @property
    def label(self) -> str:
        """How the report names the group: ``attn.{q_proj,k_proj,v_proj}``."""
        return self.full("{" + ",".join(self.children) + "}")

    def full(self, child: str) -> str:
        return f"{self.parent_name}.{child}" if self.parent_name else child


def find_sibling_groups(model: Any, candidates: Mapping[int, tuple[str, Any]], names: Mapping[int, list],
                        fused: Container[str]) -> tuple[list[SiblingGroup], dict[str, str]]:
    """The groups of ``model`` that can be merged, and the groups found but refused, with the reason.

    Parameters
    ----------
    model : torch.nn.Module
    candidates : mapping
        ``{id(module): (name, module)}`` of the layers about to be made sparse.
    names : mapping
        ``{id(module): [every name it is registered under]}``.
    fused : container of str
        Names of the layers whose activation is fused into their product.

    Returns
    -------
    (list of SiblingGroup, dict)
        The groups, and ``{group label: why it is not merged}``.
    """
    tied = {id(mod): [n for n, _ in users] for users in shared_weights(model).values() for _, mod in users}
    groups, refused = [], {}
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for group in SIBLING_GROUPS:
            mods = tuple(children.get(child) for child in group)
            if not all(isinstance(mod, torch.nn.Linear) for mod in mods):
                continue
            found = SiblingGroup(parent_name, parent, group, mods)
            why = _why_not(found, candidates, names, fused, tied)
            if why is None:
                groups.append(found)
            else:
                refused[found.label] = why
    return groups, refused


def _why_not(group: SiblingGroup, candidates: Mapping, names: Mapping, fused: Container[str],
             tied: Mapping) -> str | None:
    for full, mod in zip(group.names, group.modules, strict=True):
        if id(mod) not in candidates:
            return f"{full} stays dense"
        if len(names[id(mod)]) > 1:
            # a merge would replace it under one name only, or change every other user's output
            return f"{full} is registered under several names ({', '.join(names[id(mod)])})"
        if id(mod) in tied:
            return f"{full} shares a parameter with {', '.join(n for n in tied[id(mod)] if n != full)}"
        if full in fused:
            return f"{full} has its activation fused into its product; the others would get it too"
    if hasattr(group.parent, merged_name(group.children)):
        return f"the parent already has an attribute {merged_name(group.children)!r}"
    for what, get in (("in_features", lambda m: m.in_features), ("dtype", lambda m: m.weight.dtype),
                      ("device", lambda m: m.weight.device), ("bias", lambda m: m.bias is not None)):
        values = [get(mod) for mod in group.modules]
        if len(set(values)) > 1:
            given = ", ".join(f"{child} {value}" for child, value in zip(group.children, values, strict=True))
            return f"one input needs one {what}; got {given}"
    return None


class SiblingProjection(torch.nn.Module):
    """One sibling of a merged group: output features ``start`` to ``stop`` of the merged module's product.

    It has no state of its own: the weight and bias are the merged module's, saved once under the parent's
    ``merged_...`` entry. It refers to the merged module by an attribute that is not a child (``merged``), so
    that ``state_dict`` does not hold the merged weight once per sibling; ``copy.deepcopy``, ``pickle`` and
    ``torch.save`` of the model keep one merged module shared by the siblings, and ``.to()`` of the model moves
    it through the parent.

    Parameters
    ----------
    merged : pycusparselt.torch.SparseLinear
        The module of the group's concatenated weights, registered as a child of the siblings' parent.
    start, stop : int
        This sibling's output features in the merged product.
    """

    def __init__(self, merged: Any, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop <= merged.out_features:
            raise ValueError(f"start, stop: expected 0 <= start < stop <= {merged.out_features} (the merged "
                             f"module's out_features), got {start}, {stop}")
        object.__setattr__(self, "merged", merged)  # a reference, not a child: see the class docstring
        self.start, self.stop = int(start), int(stop)
        self.in_features, self.out_features = merged.in_features, self.stop - self.start

    @property
    def weight(self) -> torch.Tensor:
        """This sibling's rows of the merged module's dense 2:4 weight (a new tensor)."""
        return self.merged.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        """This sibling's part of the merged module's bias (a view), or None."""
        bias = self.merged.bias
        return None if bias is None else bias[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output features ``start:stop`` of the merged product of ``x``: a view of the product a sibling
        already made from this tensor, unchanged since, or of a product made now."""
        return self.merged.forward_shared(x, self.start)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"features {self.start}:{self.stop} of a merged product")

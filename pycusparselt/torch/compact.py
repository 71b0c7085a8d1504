"""The compact form a 2:4 weight is kept in by :class:`pycusparselt.torch.SparseLinear`: the two kept values of
every group of four along the input features, and their positions, in tensors PyTorch knows.

For a weight ``W`` of shape (out, in), ``in`` a multiple of 4, grouped as ``W.view(out, in // 4, 4)``:

- ``values``, shape (out, in // 2), the weight's dtype: the kept values of each group, in ascending position;
- ``indices``, shape (out, ceil(in / 8)), uint8: each group's two positions ``p0 < p1`` (0..3) as the four bits
  ``p0 | p1 << 2``; group ``2j`` in the low nibble of byte ``j``, group ``2j + 1`` in the high nibble (a last
  odd group leaves the high nibble 0).

A group with fewer than two non-zeros keeps zeros at its lowest free positions, so every group has exactly
two (position, value) pairs and the form is unique. 16-bit weights take 0.5625 of the dense bytes (0.5 for
the values, 0.0625 for the positions): what cuSPARSELt's compressed form takes. Packing and unpacking are
plain tensor operations: they run wherever the tensors live, CPU or GPU.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["pack", "unpack", "check_pair"]

#: Integer dtypes of each item size: positions are scattered in the bits, whatever the values' dtype (PyTorch
#: scatters no FP8).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack(weight: torch.Tensor, *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of a 2:4 ``weight`` of shape (out, in) (see the module docstring).

    Raises ValueError, naming ``name``, if ``in`` is not a multiple of 4 or a group of four holds more than two
    non-zeros.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    if inp % 4:
        raise ValueError(f"{name}: {inp} input features: 2:4 needs a multiple of 4")
    groups = inp // 4
    weight = weight.detach().contiguous()
    g = weight.view(_BITS[weight.element_size()]).view(out, groups, 4)
    nonzero = weight.view(out, groups, 4) != 0
    counts = nonzero.sum(-1)
    if bool((counts > 2).any()):
        row, group = (counts > 2).nonzero()[0].tolist()
        raise ValueError(f"{name}: not 2:4 along in_features (row {row}, inputs {4 * group}..{4 * group + 3} hold "
                         f"{int(counts[row, group])} non-zeros)")
    # non-zeros first, then the lowest free positions; the two chosen in ascending order
    rank = (~nonzero).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8, device=weight.device)
    positions = rank.argsort(dim=-1)[..., :2].sort(dim=-1).values
    values = g.gather(2, positions).view(weight.dtype).reshape(out, inp // 2)
    nibble = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    if groups % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    pairs = nibble.view(out, -1, 2)
    indices = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return values.contiguous(), indices


def _nibbles(indices: torch.Tensor, out: int, groups: int) -> torch.Tensor:
    """Each group's four position bits, (out, groups): low nibble of a byte first."""
    return torch.stack([indices & 0xF, indices >> 4], dim=-1).reshape(out, -1)[:, :groups]


def unpack(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in_features) weight of a compact pair, on the values' device and in their dtype."""
    out = values.shape[0]
    groups = in_features // 4
    nibbles = _nibbles(indices, out, groups).to(torch.int64)
    positions = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    bits = _BITS[values.element_size()]
    dense = torch.zeros((out, groups, 4), dtype=bits, device=values.device)
    dense.scatter_(2, positions, values.contiguous().view(bits).view(out, groups, 2))
    return dense.view(values.dtype).reshape(out, in_features)


def check_pair(values: Any, indices: Any, out_features: int, in_features: int, where: str) -> None:
    """Raise ValueError (naming ``where``) unless ``values`` and ``indices`` have the compact form's shapes and
    the positions of every group are two distinct ones in ascending order."""
    want_v, want_i = (out_features, in_features // 2), (out_features, -(-in_features // 8))
    if tuple(values.shape) != want_v:
        raise ValueError(f"{where}.values: expected shape {want_v}, got {tuple(values.shape)}")
    if tuple(indices.shape) != want_i or indices.dtype != torch.uint8:
        raise ValueError(f"{where}.indices: expected a uint8 tensor of shape {want_i}, got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    nibbles = _nibbles(indices, out_features, in_features // 4)
    if not bool(((nibbles & 3) < (nibbles >> 2)).all()):
        raise ValueError(f"{where}.indices: every group needs two distinct positions in ascending order")

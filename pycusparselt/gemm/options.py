"""A plan's options as one small, frozen, validated object: :class:`PlanOptions`.

:class:`~pycusparselt.SparseMatmulPlan` takes them as ``options=`` (a PlanOptions or a dict of its fields) or
as keyword arguments; :func:`plan_options` turns either into one checked object. What can be checked
without the operands is checked here; what depends on their types (which activations a type takes, for one)
is checked by :mod:`pycusparselt.gemm.problem`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["PlanOptions", "plan_options", "ACTIVATIONS", "COMPUTE_TYPES"]

#: The fused activations cuSPARSELt offers.
ACTIVATIONS = (None, "relu", "gelu")
#: Compute types by name ("16F": FP16 inputs only; "32I": int8).
COMPUTE_TYPES = (None, "32F", "16F", "32I")


@dataclass(frozen=True)
class PlanOptions:
    """What a plan computes beyond its operands' shapes and types (see :class:`~pycusparselt.SparseMatmulPlan`
    for each field's meaning). Made with keyword arguments; checked when made; ``replace(**changes)`` gives a
    checked copy."""

    sparse: str = "a"
    out_dtype: Any = None
    compute: str | None = None
    activation: str | None = None
    relu_upper_bound: float = math.inf
    relu_threshold: float = 0.0
    gelu_scaling: float = 1.0
    bias: bool = False
    alpha_vector: bool = False
    input_dtype: Any = None

    def __post_init__(self) -> None:
        if self.sparse not in ("a", "b"):
            raise ValueError(f"sparse: expected 'a' or 'b', got {self.sparse!r}")
        if self.compute not in COMPUTE_TYPES:
            raise ValueError(f"compute: expected None, '32F', '16F' or '32I', got {self.compute!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {self.activation!r}")
        for name in ("relu_upper_bound", "relu_threshold", "gelu_scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if math.isnan(value):
                raise ValueError(f"{name}: expected a number, got NaN")
            object.__setattr__(self, name, float(value))
        if self.activation != "relu" and (self.relu_upper_bound != math.inf or self.relu_threshold != 0.0):
            raise ValueError("relu_upper_bound and relu_threshold need activation='relu'")
        if self.activation != "gelu" and self.gelu_scaling != 1.0:
            raise ValueError("gelu_scaling needs activation='gelu'")
        for name in ("bias", "alpha_vector"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in ("out_dtype", "input_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, np.dtype(value))
                except TypeError:
                    raise TypeError(f"{name}: expected a dtype or None, got {value!r}") from None

    def replace(self, **changes: Any) -> PlanOptions:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


_FIELDS = tuple(f.name for f in dataclasses.fields(PlanOptions))
_DEFAULTS = PlanOptions()


def plan_options(options: PlanOptions | Mapping[str, Any] | None = None, **keywords: Any) -> PlanOptions:
    """One checked :class:`PlanOptions` from ``options`` (an instance, a dict of its fields, or None) and the
    plan's keyword arguments. Keywords left at their defaults are ignored; a keyword given with ``options`` is
    refused (one place says each option)."""
    unknown = sorted(set(keywords) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown plan option(s): {', '.join(unknown)}; the options are {', '.join(_FIELDS)}")
    given = {name: value for name, value in keywords.items() if not _same(value, getattr(_DEFAULTS, name))}
    if options is None:
        return PlanOptions(**given)
    if given:
        raise TypeError(f"options= and keyword options together ({', '.join(sorted(given))}): pass each option "
                        f"once, in options or as a keyword")
    if isinstance(options, PlanOptions):
        return options
    if isinstance(options, Mapping):
        unknown = sorted(set(options) - set(_FIELDS))
        if unknown:
            raise TypeError(f"options: unknown key(s) {', '.join(map(repr, unknown))}; the options are "
                            f"{', '.join(_FIELDS)}")
        return PlanOptions(**options)
    raise TypeError(f"options: expected a PlanOptions, a dict or None, got {type(options).__name__}")


def _same(value: Any, default: Any) -> bool:
    """Whether a keyword still has its default (``value is default`` for None, equality for the rest)."""
    if default is None or value is None:
        return value is default
    try:
        return bool(value == default) and type(value) is type(default)
    except (TypeError, ValueError):
        return False

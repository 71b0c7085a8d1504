"""How a :class:`~pycusparselt.SparseLinear` layer readies the plan of an input shape: the configuration it runs
(one stored for this GPU, library version and input shape, else tuned on the first input) and the weight
compressed for that configuration.

The layer keeps one plan per input shape (its own: a tuned plan shared by several weights gave every weight
after the first the first one's product) and passes its tables in: the stored configurations
(:attr:`~pycusparselt.SparseLinear.tuned_configs`, keyed as :func:`pycusparselt.nn.layer_files.config_key`
keys them) and the compressed weights by :attr:`~pycusparselt.SparseMatmulPlan.compressed_key`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from .._native import gpu
from ..tuning import PlanConfig, tuning_is_safe_on
from .layer_files import config_key, find_config

__all__ = ["device_identity", "tune_plan", "compressed_for"]


def device_identity(device: int) -> tuple:
    """This GPU and library, as stored configurations are keyed: ``(GPU name, compute capability, cuSPARSELt
    version)``."""
    cupy = gpu.cupy()

    from .._native.library import library_version

    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = cupy.cuda.Device(device).compute_capability
    return (name, str(cc), ".".join(map(str, library_version())))


def tune_plan(plan: Any, key: tuple, configs: dict, autotune: bool | Mapping[str, Any], xq: Any, wt: Any,
              args: dict) -> None:
    """Give ``plan`` (a :class:`~pycusparselt.SparseMatmulPlan`) the configuration stored in ``configs`` for
    this GPU, library and input shape, or tune it on ``xq`` and the dense weight ``wt`` (``autotune``: the
    layer's option, True or the keyword arguments of :meth:`~pycusparselt.SparseMatmulPlan.autotune`) and store
    the winner in ``configs``. ``key`` is the layer's key of the input shape: ``(shape, dtype string, device,
    ...)``; ``args`` the product's alpha, bias and stream. Before compressing: the compressed form depends on
    the configuration."""
    ident = device_identity(key[2]) + (list(key[0]), key[1])
    # off device 0 only the default configuration runs (tuning.TUNING_OFF_DEVICE_0): configurations stored
    # or tuned elsewhere are neither applied nor recorded there
    safe = tuning_is_safe_on(plan.device)
    stored = find_config(configs, ident) if safe else None
    if stored is not None:
        try:
            if plan.config != PlanConfig(**stored):  # re-initialising costs ~0.2 s: only on a change
                plan.config = PlanConfig(**stored)
            return
        except Exception as exc:  # noqa: BLE001 - any stale configuration: tune again instead
            warnings.warn(f"SparseLinear: the stored configuration {stored} was not accepted ({exc}); "
                          f"tuning again", RuntimeWarning, stacklevel=3)
    if autotune:
        options = dict(autotune) if isinstance(autotune, Mapping) else {}
        # on the dense weight: the tuner compresses it for each configuration it tries
        config = plan.autotune(xq, wt, **args, **options)
        if safe:
            configs[config_key(ident)] = dict(config._asdict())


def compressed_for(compressed: dict, plan: Any, wt: Any, stream: Any) -> Any:
    """The compressed weight for ``plan`` under its configuration, made once and kept in ``compressed`` (by
    :attr:`SparseMatmulPlan.compressed_key <pycusparselt.SparseMatmulPlan.compressed_key>`: a compressed form is
    never shared across dense shapes)."""
    key = plan.compressed_key
    held = compressed.get(key)
    if held is None or held.closed:
        held = compressed[key] = plan.compress(wt, stream=stream)
    return held

"""The tuning layer: the auto-tuner (``pycusparselt.tuning.tuner``), CUDA-event timing
(``pycusparselt.tuning.timing``) and the winners on disk (:mod:`pycusparselt.tuning.cache`).

This layer sits below the plans: the tuner works on a :class:`Tunable`, which the plan layer provides
(:class:`~pycusparselt.gemm.plan.TuningTarget`), and imports nothing of it.
"""

from __future__ import annotations

from . import tuner
from .tuner import (
    Candidate,
    PlanConfig,
    Tunable,
    TuningReport,
    autotune,
    tuning_is_safe_on,
    tuning_key,
)

# The public classes' home is pycusparselt.tuning: their documented names, reprs and pickles use it.
for _public in (PlanConfig, Candidate, TuningReport, Tunable):
    _public.__module__ = __name__
del _public

#: Why configurations other than the default are tried on device 0 only (see :func:`tuning_is_safe_on`).
TUNING_OFF_DEVICE_0 = tuner.TUNING_OFF_DEVICE_0

__all__ = ["PlanConfig", "Candidate", "TuningReport", "Tunable", "tuning_key", "autotune", "tuning_is_safe_on",
           "TUNING_OFF_DEVICE_0"]

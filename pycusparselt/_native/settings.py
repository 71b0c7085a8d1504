"""The environment variables pycusparselt reads, parsed one way everywhere.

============================== =========== ===========================================================
variable                       kind        meaning
============================== =========== ===========================================================
``PYCUSPARSELT_LIBRARY``       path        the cuSPARSELt shared library to load (else found by cuda-pathfinder)
``PYCUSPARSELT_CACHE_DIR``     path        the tuning cache's directory (else the user cache directory)
``PYCUSPARSELT_TUNING_CACHE``  flag        0 disables the tuning cache (default 1)
``PYCUSPARSELT_FAST_CALL``     flag        0 makes product calls go through cffi's ABI mode (default 1)
``PYCUSPARSELT_DECODE_KERNEL`` choice      ``auto`` (default): layers time the decode kernel against
                                           cuSPARSELt for 1-16 rows; ``on``: use it wherever it can serve;
                                           ``off``: cuSPARSELt only (``pycusparselt.nn.small_batch``)
============================== =========== ===========================================================

A *flag* is ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case, blanks around it
ignored); anything else raises ``ValueError`` naming the variable, instead of being taken for either. A
*path* has ``~`` and ``$VARS`` expanded; an empty value counts as unset. A *choice* is one of the values
named (any case, blanks around it ignored; empty counts as unset); anything else raises ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Mapping

__all__ = ["LIBRARY", "CACHE_DIR", "TUNING_CACHE", "FAST_CALL", "DECODE_KERNEL", "flag", "path", "integer", "choice",
           "parse_flag"]

LIBRARY = "PYCUSPARSELT_LIBRARY"
CACHE_DIR = "PYCUSPARSELT_CACHE_DIR"
TUNING_CACHE = "PYCUSPARSELT_TUNING_CACHE"
FAST_CALL = "PYCUSPARSELT_FAST_CALL"
DECODE_KERNEL = "PYCUSPARSELT_DECODE_KERNEL"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_flag(name: str, value: str) -> bool:
    """``value`` of the flag ``name`` as a bool; ValueError for anything that is not a flag value."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off)")


def flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """The flag ``name`` from the environment; ``default`` when unset or empty."""
    value = (os.environ if env is None else env).get(name)
    if value is None or not value.strip():
        return default
    return parse_flag(name, value)


def choice(name: str, choices: tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
    """The variable ``name``, one of ``choices`` (lower case); ``choices[0]`` when unset or empty; ValueError
    naming the variable for anything else."""
    value = (os.environ if env is None else env).get(name, "").strip().lower()
    if not value:
        return choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def path(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The path ``name`` from the environment, ``~`` and ``$VARS`` expanded; None when unset or empty."""
    value = (os.environ if env is None else env).get(name)
    if value is None or not value.strip():
        return None
    return os.path.expanduser(os.path.expandvars(value.strip()))


def integer(name: str, default: int | None = None, env: Mapping[str, str] | None = None) -> int | None:
    """The integer variable ``name`` (``RANK``, ``WORLD_SIZE``, a launcher's ...); ``default`` when unset or
    empty; ValueError naming the variable for anything that is not an integer."""
    value = (os.environ if env is None else env).get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None

"""A persistent cache of tuned configurations, so a new process gets a tuned plan without timing anything.

Each entry is one small JSON file named by the SHA-256 of its key: the GPU's name and compute capability,
the cuSPARSELt version and the full problem signature. Writes go to a temporary file in the same directory
and are renamed into place (``os.replace`` is atomic), so concurrent processes never see half an entry;
the last writer wins. An entry that cannot be read, or whose stored key is not the one asked for (a file
copied from another GPU or library version, say), is ignored with a warning, never an exception.

Location: ``$PYCUSPARSELT_CACHE_DIR``, else ``$XDG_CACHE_HOME/pycusparselt``, else
``~/.cache/pycusparselt``. ``PYCUSPARSELT_TUNING_CACHE=0`` disables reading and writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TuningCache", "TuningCacheWarning", "default_cache_dir", "cache_enabled", "FORMAT_VERSION"]

#: Bumped whenever the entry format changes; entries of another format are ignored.
FORMAT_VERSION = 1


class TuningCacheWarning(UserWarning):
    """A cache entry was unreadable or belonged to another key; it was ignored."""


def default_cache_dir() -> Path:
    """Where entries live by default (see the module docstring)."""
    if os.environ.get("PYCUSPARSELT_CACHE_DIR"):
        return Path(os.environ["PYCUSPARSELT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pycusparselt"


def cache_enabled() -> bool:
    """False when ``PYCUSPARSELT_TUNING_CACHE`` is 0, off, false or no."""
    return os.environ.get("PYCUSPARSELT_TUNING_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def _canonical(key: Mapping[str, Any]) -> str:
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(f"key: every value must be JSON-serialisable ({exc})") from None


class TuningCache:
    """Tuned configurations on disk, keyed by a JSON-serialisable mapping.

    Parameters
    ----------
    directory : path, optional
        Where to keep entries (default: :func:`default_cache_dir`).
    enabled : bool, optional
        Default: :func:`cache_enabled`. A disabled cache stores nothing and finds nothing.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, enabled: bool | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.enabled = cache_enabled() if enabled is None else bool(enabled)

    def path_for(self, key: Mapping[str, Any]) -> Path:
        """The file that holds ``key``'s entry."""
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()
        return self.directory / f"{digest}.json"

    def get(self, key: Mapping[str, Any]) -> dict | None:
        """The stored value for ``key``, or None (missing, disabled, unreadable or foreign: warned)."""
        if not self.enabled:
            return None
        path = self.path_for(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            warnings.warn(f"tuning cache entry {path} could not be read ({exc}); ignored", TuningCacheWarning,
                          stacklevel=2)
            return None
        try:
            entry = json.loads(text)
            stored_key, value, version = entry["key"], entry["value"], entry["format"]
        except (ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"tuning cache entry {path} is corrupt ({type(exc).__name__}); ignored",
                          TuningCacheWarning, stacklevel=2)
            return None
        if version != FORMAT_VERSION or _canonical(stored_key) != _canonical(key):
            warnings.warn(f"tuning cache entry {path} belongs to another key (another GPU, library version or "
                          f"format); ignored", TuningCacheWarning, stacklevel=2)
            return None
        if not isinstance(value, dict):
            warnings.warn(f"tuning cache entry {path} holds no mapping; ignored", TuningCacheWarning, stacklevel=2)
            return None
        return value

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> Path | None:
        """Store ``value`` (a JSON-serialisable mapping) for ``key``, atomically. Returns the file, or None
        when the cache is disabled or the directory cannot be written (warned: tuning still works)."""
        if not self.enabled:
            return None
        path = self.path_for(key)
        text = json.dumps({"format": FORMAT_VERSION, "key": dict(key), "value": dict(value)}, sort_keys=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            warnings.warn(f"tuning cache {self.directory} could not be written ({exc}); entry not kept",
                          TuningCacheWarning, stacklevel=2)
            return None
        return path

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        removed = 0
        for path in self.directory.glob("*.json"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

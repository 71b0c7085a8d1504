"""A persistent cache of tuned configurations, so a new process gets a tuned plan without timing anything.

Each entry is one small JSON file named by the SHA-256 of its key: the GPU's name and compute capability,
the cuSPARSELt version and the full problem signature. Writes go to a temporary file in the same directory
and are renamed into place (``os.replace`` is atomic), so concurrent processes never see half an entry;
the last writer wins. Entries are untrusted input: only regular files of at most ``MAX_ENTRY_BYTES``
are read (never a FIFO or a device a link points at), and an entry that cannot be read or decoded, or whose
stored key is not the one asked for (a file copied from another GPU or library version, say), is ignored with
a warning, never an exception.

Location: ``$PYCUSPARSELT_CACHE_DIR`` (``~`` expanded), else the user cache directory of this OS
(platformdirs: ``~/.cache/pycusparselt`` on Linux, honouring ``XDG_CACHE_HOME``).
``PYCUSPARSELT_TUNING_CACHE=0`` disables reading and writing (see ``pycusparselt._native.settings``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

from .._native import settings

__all__ = ["TuningCache", "TuningCacheWarning", "default_cache_dir", "cache_enabled", "FORMAT_VERSION",
           "MAX_ENTRY_BYTES"]

#: Bumped whenever the entry format changes; entries of another format are ignored.
FORMAT_VERSION = 1
#: Larger files are not entries of ours (a real one is a few hundred bytes).
MAX_ENTRY_BYTES = 64 << 10
_ENTRY_NAME = re.compile(r"^(?:[0-9a-f]{64}|\.tmp-[A-Za-z0-9_]+)\.json$")


class TuningCacheWarning(UserWarning):
    """A cache entry was unreadable or belonged to another key; it was ignored."""


def default_cache_dir() -> Path:
    """Where entries live by default (see the module docstring)."""
    given = settings.path(settings.CACHE_DIR)
    if given is not None:
        return Path(given)
    import platformdirs

    return Path(platformdirs.user_cache_dir("pycusparselt", appauthor=False))


def cache_enabled() -> bool:
    """The flag ``PYCUSPARSELT_TUNING_CACHE`` (default on); a value that is not a flag raises ValueError."""
    return settings.flag(settings.TUNING_CACHE, True)


def _read_entry(path: Path) -> str | None:
    """The text of a regular file of at most MAX_ENTRY_BYTES; None if there is none. Raises OSError or
    ValueError (not a regular file, too large, not UTF-8)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_ENTRY_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than an entry's {MAX_ENTRY_BYTES}")
        data = f.read(MAX_ENTRY_BYTES + 1)
    if len(data) > MAX_ENTRY_BYTES:
        raise ValueError(f"more than an entry's {MAX_ENTRY_BYTES} bytes")
    return data.decode("utf-8")


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
            text = _read_entry(path)
            if text is None:
                return None
            entry = json.loads(text)
            stored_key, value, version = entry["key"], entry["value"], entry["format"]
        except OSError as exc:
            warnings.warn(f"tuning cache entry {path} could not be read ({exc}); ignored", TuningCacheWarning,
                          stacklevel=2)
            return None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            warnings.warn(f"tuning cache entry {path} is corrupt ({type(exc).__name__}: {exc}); ignored",
                          TuningCacheWarning, stacklevel=2)
            return None
        try:
            foreign = version != FORMAT_VERSION or _canonical(stored_key) != _canonical(key)
        except (TypeError, ValueError, RecursionError):
            foreign = True
        if foreign:
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
        """Delete this cache's entries (files named as :meth:`path_for` names them, and temporary files of
        interrupted writes; nothing else in the directory); returns how many."""
        removed = 0
        try:
            candidates = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        for path in candidates:
            if _ENTRY_NAME.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

"""The on-disk tuning cache: round trips, atomic concurrent writes, corrupt and foreign entries, switches."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from pycusparselt.tuning.cache import FORMAT_VERSION, TuningCache, TuningCacheWarning, default_cache_dir

KEY = {"gpu": "NVIDIA H100 80GB HBM3", "cc": "9.0", "cusparselt": "0.8.0",
       "problem": {"a": [[4096, 4096], "float16", "row"], "b": [[4096, 1024], "float16", "col"], "sparse": "a"}}
VALUE = {"alg_id": 7, "split_k": 1, "split_k_mode": 1, "split_k_buffers": 0}


def test_round_trip_and_key_order(tmp_path):
    cache = TuningCache(tmp_path, enabled=True)
    assert cache.get(KEY) is None
    path = cache.put(KEY, VALUE)
    assert path is not None and path.parent == tmp_path
    assert cache.get(KEY) == VALUE
    reordered = dict(reversed(list(KEY.items())))
    assert cache.get(reordered) == VALUE  # the key is canonical JSON
    other = dict(KEY, problem=dict(KEY["problem"], sparse="b"))
    assert cache.get(other) is None
    assert not list(tmp_path.glob(".tmp-*"))  # no temporaries left behind


def test_a_new_cache_object_reads_what_another_wrote(tmp_path):
    TuningCache(tmp_path, enabled=True).put(KEY, VALUE)
    assert TuningCache(tmp_path, enabled=True).get(KEY) == VALUE


_WRITER = """
import sys
from pycusparselt.tuning.cache import TuningCache
key, value, directory, worker = eval(sys.argv[1]), eval(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cache = TuningCache(directory, enabled=True)
for i in range(50):
    cache.put(key, dict(value, alg_id=worker * 1000 + i))
"""


def test_concurrent_processes_never_leave_a_broken_entry(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-P", "-c", _WRITER, repr(KEY), repr(VALUE), str(tmp_path), str(w)])
             for w in range(4)]
    reader = TuningCache(tmp_path, enabled=True)
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn entry, read while the writers write, would warn: an error here
        while any(p.poll() is None for p in procs):
            seen += reader.get(KEY) is not None
        value = reader.get(KEY)
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert value["alg_id"] % 1000 == 49  # some writer's last entry, whole
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_corrupt_entry_is_ignored_with_a_warning(tmp_path):
    cache = TuningCache(tmp_path, enabled=True)
    cache.path_for(KEY).write_text('{"format": 1, "key": ')
    with pytest.warns(TuningCacheWarning, match="corrupt"):
        assert cache.get(KEY) is None
    cache.put(KEY, VALUE)  # and it is repaired by the next write
    assert cache.get(KEY) == VALUE


@pytest.mark.parametrize("field, value", [("key", dict(KEY, gpu="NVIDIA A100")), ("format", FORMAT_VERSION + 1)])
def test_foreign_entry_is_ignored_with_a_warning(tmp_path, field, value):
    cache = TuningCache(tmp_path, enabled=True)
    entry = {"format": FORMAT_VERSION, "key": KEY, "value": VALUE, field: value}
    cache.path_for(KEY).write_text(json.dumps(entry))  # e.g. copied from another machine
    with pytest.warns(TuningCacheWarning, match="another key"):
        assert cache.get(KEY) is None


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYCUSPARSELT_TUNING_CACHE", "0")
    cache = TuningCache(tmp_path)
    assert not cache.enabled
    assert cache.put(KEY, VALUE) is None and cache.get(KEY) is None
    assert not list(tmp_path.iterdir())


def test_relocated_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("PYCUSPARSELT_TUNING_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / "elsewhere"
    cache = TuningCache()
    assert cache.enabled and cache.put(KEY, VALUE).parent == tmp_path / "elsewhere"
    monkeypatch.delenv("PYCUSPARSELT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pycusparselt"


def test_unwritable_directory_warns_instead_of_failing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = TuningCache(blocker / "cache", enabled=True)
    with pytest.warns(TuningCacheWarning, match="could not be written"):
        assert cache.put(KEY, VALUE) is None


def test_keys_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        TuningCache(tmp_path, enabled=True).put({"gpu": object()}, VALUE)


def test_clear(tmp_path):
    cache = TuningCache(tmp_path, enabled=True)
    cache.put(KEY, VALUE)
    cache.put(dict(KEY, cc="8.0"), VALUE)
    assert cache.clear() == 2 and cache.get(KEY) is None


# -- entries as untrusted input ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00 not utf-8",
    b"[" * 100_000 + b"]" * 100_000,  # deep enough to exhaust the parser's recursion
    json.dumps({"format": FORMAT_VERSION, "key": [[[[1]]]], "value": {}}).encode(),
    json.dumps({"format": FORMAT_VERSION, "key": KEY, "value": [1]}).encode(),
])
def test_undecodable_entries_warn_and_count_as_absent(tmp_path, content):
    cache = TuningCache(tmp_path, enabled=True)
    cache.path_for(KEY).write_bytes(content)
    with pytest.warns(TuningCacheWarning):
        assert cache.get(KEY) is None


def test_an_entry_linked_to_a_fifo_or_a_device_is_not_read(tmp_path):
    import os
    import time

    cache = TuningCache(tmp_path, enabled=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cache.path_for(KEY).symlink_to(fifo)
    began = time.perf_counter()
    with pytest.warns(TuningCacheWarning, match="not a regular file"):
        assert cache.get(KEY) is None
    assert time.perf_counter() - began < 5
    cache.path_for(KEY).unlink()
    cache.path_for(KEY).symlink_to("/dev/zero")
    with pytest.warns(TuningCacheWarning, match="not a regular file"):
        assert cache.get(KEY) is None


def test_an_oversized_entry_is_not_read(tmp_path):
    from pycusparselt.tuning.cache import MAX_ENTRY_BYTES

    cache = TuningCache(tmp_path, enabled=True)
    cache.path_for(KEY).write_bytes(b" " * (MAX_ENTRY_BYTES + 1))
    with pytest.warns(TuningCacheWarning, match="bytes"):
        assert cache.get(KEY) is None


def test_clear_deletes_only_our_entries(tmp_path):
    cache = TuningCache(tmp_path, enabled=True)
    cache.put(KEY, VALUE)
    (tmp_path / "config.json").write_text("{}")  # a project's own file where the variable pointed
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / ("a" * 64 + ".json")).mkdir()  # a directory with an entry's name is not an entry
    (tmp_path / ".tmp-abc123.json").write_text("half written")
    assert cache.clear() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", "notes.txt", "a" * 64 + ".json"])
    assert TuningCache(tmp_path / "absent", enabled=True).clear() == 0


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), (" FALSE ", False), ("no", False),
                                            ("1", True), ("on", True), ("Yes", True), ("", True)])
def test_flag_values(monkeypatch, tmp_path, value, enabled):
    monkeypatch.setenv("PYCUSPARSELT_TUNING_CACHE", value)
    assert TuningCache(tmp_path).enabled is enabled


@pytest.mark.parametrize("name, value", [("PYCUSPARSELT_TUNING_CACHE", "disabled"),
                                         ("PYCUSPARSELT_FAST_CALL", "nope")])
def test_values_that_are_not_flags_are_refused(monkeypatch, tmp_path, name, value):
    from pycusparselt._native import settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}': expected one of"):
        settings.flag(name, True)
    if name == "PYCUSPARSELT_TUNING_CACHE":
        with pytest.raises(ValueError, match=name):
            TuningCache(tmp_path)


def test_the_cache_directory_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", "~/x")
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.setenv("PYCUSPARSELT_CACHE_DIR", "  ")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pycusparselt"  # platformdirs honours XDG

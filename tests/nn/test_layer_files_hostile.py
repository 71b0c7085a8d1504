"""Hostile layer files: every malformed file raises LayerFileError (or the file system's own OSError) within
1 s and 100 MB; a FIFO is refused, not waited on; a failed save leaves the old file as it was."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from pycusparselt import SparseLinear
from pycusparselt.errors import LayerFileError
from pycusparselt.nn import layer_files
from layer_file_members import read_members


def _layer(mode=None):
    rng = np.random.default_rng(3)
    layer = SparseLinear(rng.standard_normal((32, 64)).astype(np.float16), rng.standard_normal(32).astype(np.float16),
                         mode=mode)
    if mode == "int8":
        layer.calibrate([rng.standard_normal((16, 64)).astype(np.float16)])
    return layer


def _refused(path, match=None, *, seconds=1.0, megabytes=100):
    """Loading ``path`` raises LayerFileError, within ``seconds`` and ``megabytes`` of traced allocations."""
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(LayerFileError, match=match) as info:
            SparseLinear.load(path, on_device=False)
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"{elapsed:.2f} s"
    assert peak < megabytes << 20, f"{peak / 2**20:.0f} MB"
    return info.value


def _npy_header(shape, descr="<f2"):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _saved(tmp_path, mode=None):
    path = tmp_path / "layer.npz"
    _layer(mode).save(path)
    return path


def _rawmembers(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


# -- declared shapes and sizes ----------------------------------------------------------------------


def test_an_npy_header_declaring_a_huge_shape_is_refused_before_reading(tmp_path):
    members = _rawmembers(_saved(tmp_path))
    # the member's size fits the meta, its header declares 2**40 elements
    good = members["weight.npy"]
    members["weight.npy"] = _npy_header((2**40,)).ljust(len(good), b"\0")
    _refused(_zip(tmp_path / "a.npz", members), "member 'weight': expected shape \\(32, 64\\) float16, the file "
                                                 "holds \\(1099511627776,\\)")
    # a small member whose header declares 2**40 elements
    members["weight.npy"] = _npy_header((2**40,)) + b"\0" * 64
    _refused(_zip(tmp_path / "b.npz", members), "member 'weight' declares")


def test_meta_dimensions_far_beyond_the_members_are_refused(tmp_path):
    path = _saved(tmp_path)
    meta, arrays = read_members(path)
    meta.update(in_features=2**20, out_features=2**20)
    members = _rawmembers(path)
    members["meta.npy"] = _rawmembers(_zip_meta(tmp_path, meta))["meta.npy"]
    members["weight.npy"] = _npy_header((2**20, 2**20)) + b"\0" * 64
    del members["bias.npy"]
    _refused(_zip(tmp_path / "c.npz", members), "member 'weight' declares")


def _zip_meta(tmp_path, meta):
    path = tmp_path / "meta_only.npz"
    np.savez(path, meta=np.array(json.dumps(meta)))
    return path


# -- damaged or foreign compression -----------------------------------------------------------------


def _member_data_span(path, name):
    """Where ``name``'s compressed bytes lie in the archive."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    start = info.header_offset + 30 + struct.unpack_from("<H", local, 26)[0] + struct.unpack_from("<H", local, 28)[0]
    return start, start + info.compress_size


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA])
def test_bit_flips_in_compressed_members_raise_layer_file_errors(tmp_path, compression):
    rng = np.random.default_rng(0)
    path = _zip(tmp_path / "packed.npz", _rawmembers(_saved(tmp_path)), compression)
    data = bytearray(path.read_bytes())
    start, end = _member_data_span(path, "weight.npy")
    bad = tmp_path / "flipped.npz"
    for position in rng.integers(start, end, 40):
        flipped = data.copy()
        flipped[position] ^= 1 << int(rng.integers(8))
        bad.write_bytes(flipped)
        _refused(bad)


def test_encrypted_members_and_unknown_compression_methods_are_refused(tmp_path):
    data = bytearray(_saved(tmp_path).read_bytes())
    directory = data.index(b"PK\x01\x02")  # the first member's directory entry (the meta)
    local = data.index(b"PK\x03\x04")
    encrypted = data.copy()
    encrypted[directory + 8] |= 1  # general-purpose flag, bit 0: encrypted
    encrypted[local + 6] |= 1
    (tmp_path / "e.npz").write_bytes(encrypted)
    _refused(tmp_path / "e.npz", "member 'meta.npy' is encrypted")
    unknown = data.copy()
    unknown[directory + 10: directory + 12] = struct.pack("<H", 99)  # compression method
    unknown[local + 8: local + 10] = struct.pack("<H", 99)
    (tmp_path / "u.npz").write_bytes(unknown)
    _refused(tmp_path / "u.npz", "compression method 99")


# -- the meta --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, text", [
    ("input_scale", "1" + "0" * 400),
    ("input_scale", "Infinity"),
    ("relu_upper_bound", "1" + "0" * 400),
    ("relu_threshold", "-Infinity"),
    ("configs", '[{"gpu": "g", "cc": "90", "cusparselt": "0.8.0", "x_shape": [16, 64], "x_dtype": "<f2", '
                '"config": {"alg_id": Infinity}}]'),
    ("configs", '[{"gpu": "g", "cc": "90", "cusparselt": "0.8.0", "x_shape": [Infinity, 64], "x_dtype": "<f2", '
                '"config": {"alg_id": 1}}]'),
    ("in_features", "1" + "0" * 400),
])
def test_json_numbers_beyond_float_are_refused(tmp_path, field, text):
    path = _saved(tmp_path, "int8")
    meta, arrays = read_members(path)
    meta[field] = "PLACEHOLDER"
    raw = json.dumps(meta).replace('"PLACEHOLDER"', text)
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(raw), **arrays)
    _refused(path, f"meta field '{field}'")


@pytest.mark.parametrize("field", layer_files.META_FIELDS)
def test_every_missing_meta_field_is_refused(tmp_path, field):
    for mode in (None, "int8"):
        path = _saved(tmp_path, mode)
        meta, arrays = read_members(path)
        del meta[field]
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        _refused(path, f"meta field\\(s\\) \\['{field}'\\] missing")


# -- archives of many members ------------------------------------------------------------------------


def _many_emptymembers(path, count):
    """A zip of ``count`` empty stored members, written directly (zipfile takes far longer)."""
    local, directory, offset = [], [], 0
    for i in range(count):
        name = f"m{i}.npy".encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        directory.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0,
                                     0, 0, 0, offset) + name)
        local.append(header)
        offset += len(header)
    body, cd = b"".join(local), b"".join(directory)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), len(cd), len(body), 0)
    path.write_bytes(body + cd + end)
    return path


def test_an_archive_of_many_members_is_refused_before_its_directory_is_read(tmp_path):
    path = _many_emptymembers(tmp_path / "many.npz", 60_000)
    # zipfile's own reading of this directory costs about 40 MB; the end record alone says enough
    _refused(path, "declares 60000 members", seconds=0.5, megabytes=5)
    # a directory larger than its end record admits to is refused by its size
    data = bytearray(path.read_bytes())
    data[-22 + 8: -22 + 12] = struct.pack("<2H", 3, 3)
    path.write_bytes(data)
    _refused(path, "declares 3 members in a [0-9]+-byte directory", seconds=0.5, megabytes=5)


# -- not regular files -----------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        from pycusparselt import SparseLinear
        from pycusparselt.errors import LayerFileError
        try:
            SparseLinear.load({str(fifo)!r}, on_device=False)
        except LayerFileError as exc:
            print("refused:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "not a regular file" in result.stdout


# -- atomic saves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_save_that_fails_part_way_leaves_the_old_file(tmp_path, monkeypatch, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = tmp_path / f"layer{suffix}"
    _layer().save(path)
    before = path.read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    def failing_save_file(tensors, name, metadata=None):
        with open(name, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError(28, "No space left on device")

    if suffix == ".npz":
        monkeypatch.setattr(np, "savez", failing_savez)
    else:
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        _layer("int8").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    assert SparseLinear.load(path, on_device=False).mode is None


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_a_save_past_the_file_size_limit_leaves_the_old_file(tmp_path):
    path = tmp_path / "layer.npz"
    _layer().save(path)
    before = path.read_bytes()
    code = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from pycusparselt import SparseLinear
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 1000}, {len(before) + 1000}))
        w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float16)
        try:
            SparseLinear(w).save({str(path)!r})
        except OSError as exc:
            print("failed:", exc.errno)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "failed: 27" in result.stdout  # EFBIG
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    SparseLinear.load(path, on_device=False)


def test_a_saved_file_has_the_usual_permissions(tmp_path):
    path = tmp_path / "layer.npz"
    _layer().save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

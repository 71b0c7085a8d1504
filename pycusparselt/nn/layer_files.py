"""Saved :class:`~pycusparselt.SparseLinear` layers on disk, read as untrusted input.

Two containers hold the same content: NumPy's ``.npz`` (a zip of ``.npy`` members) and ``.safetensors`` (the
format model tools exchange; read lazily, tensor by tensor). The content: a JSON *meta* (the layer's options,
shapes and tuned configurations) and up to five arrays:

============== ============================================ ================================================
member         shape                                         stored as
============== ============================================ ================================================
weight         (out_features, in_features)                   the float layers' pruned weight: float16,
                                                              float32, or bfloat16 as its uint16 bits
weight_q       (out_features, in_features)                   the quantized layers' weight: int8, or FP8 bits
                                                              as uint8
weight_scale   (out_features,) per channel, () per tensor    float32
bias           (out_features,)                               the weight's type (float layers), float32
permutation    (in_features,)                                int64
============== ============================================ ================================================

:func:`read` checks the container before it reads an array: only these members, each member's declared size
against what the meta says it holds, then each array's shape and dtype; nothing is unpickled. What the arrays
*mean* (2:4 structure, valid permutation, finite positive scales) is checked by the layer that loads them.
Every failure is a :class:`~pycusparselt.errors.LayerFileError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from ..errors import LayerFileError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MEMBERS", "CONTAINERS", "container_of", "expected_arrays", "read",
           "write"]

#: The meta's ``format`` and ``version``: what :func:`read` accepts.
FORMAT_NAME = "pycusparselt.SparseLinear"
FORMAT_VERSION = 1
#: The arrays a layer file may hold (see the table above).
MEMBERS = ("weight", "weight_q", "weight_scale", "bias", "permutation")
#: The containers :func:`read` and :func:`write` know.
CONTAINERS = ("npz", "safetensors")

#: Largest meta accepted (its tuned configurations included), and room for a .npy member's header.
META_LIMIT = 16 << 20
_NPY_HEADER_ROOM = 4096
_MAX_FEATURES = 1 << 31

_STORAGE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}
_SAFETENSORS_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "U16": np.dtype("<u2"),
                       "I8": np.dtype("i1"), "U8": np.dtype("u1"), "I64": np.dtype("<i8")}


def _fail(path: Any, message: str) -> LayerFileError:
    return LayerFileError(f"{os.fspath(path)!r}: {message}")


def container_of(path: str | os.PathLike, container: str | None = None) -> str:
    """The container of ``path``: ``container`` if given, else by suffix (``.safetensors``; anything else
    ``.npz``)."""
    if container is not None:
        if container not in CONTAINERS:
            raise ValueError(f"container: expected one of {', '.join(CONTAINERS)}, got {container!r}")
        return container
    return "safetensors" if os.fspath(path).endswith(".safetensors") else "npz"


def expected_arrays(meta: dict, path: Any = "<meta>") -> tuple[dict[str, tuple[tuple, np.dtype]], set[str]]:
    """From a meta: each member it allows -> (shape, stored dtype), and the members it requires."""

    def integer(name: str) -> int:
        value = meta.get(name)
        if type(value) is not int or not 0 < value < _MAX_FEATURES:
            raise _fail(path, f"meta field {name!r}: expected a positive integer, got {value!r}")
        return value

    out, inp = integer("out_features"), integer("in_features")
    dtype = meta.get("dtype")
    if dtype not in _STORAGE:
        raise _fail(path, f"meta field 'dtype': expected one of {', '.join(_STORAGE)}, got {dtype!r}")
    fmt = meta.get("quant_format")
    members: dict[str, tuple[tuple, np.dtype]] = {"permutation": ((inp,), np.dtype("<i8"))}
    if fmt is None:
        members["weight"] = ((out, inp), _STORAGE[dtype])
        members["bias"] = ((out,), _STORAGE[dtype])
        return members, {"weight"}
    if fmt not in ("int8", "e4m3", "e5m2"):
        raise _fail(path, f"meta field 'quant_format': expected None, 'int8', 'e4m3' or 'e5m2', got {fmt!r}")
    granularity = meta.get("weight_granularity")
    if granularity not in ("channel", "tensor"):
        raise _fail(path, f"meta field 'weight_granularity': expected 'channel' or 'tensor', got {granularity!r}")
    members["weight_q"] = ((out, inp), np.dtype("i1") if fmt == "int8" else np.dtype("u1"))
    members["weight_scale"] = ((out,) if granularity == "channel" else (), np.dtype("<f4"))
    members["bias"] = ((out,), np.dtype("<f4"))
    return members, {"weight_q", "weight_scale"}


def _parse_meta(text: str, path: Any) -> dict:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the meta is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"the meta is not a JSON object (got {type(meta).__name__})")
    if meta.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a pycusparselt layer file (format {meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise _fail(path, f"layer file version {meta.get('version')!r}; this pycusparselt reads {FORMAT_VERSION}")
    return meta


def _check_array(array: np.ndarray, name: str, shape: tuple, dtype: np.dtype, path: Any) -> np.ndarray:
    if array.shape != shape or array.dtype != dtype:
        raise _fail(path, f"member {name!r}: expected shape {shape} {dtype}, the file holds {array.shape} "
                          f"{array.dtype}")
    return array


def _check_members(names: list[str], allowed: dict, required: set, path: Any) -> None:
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise _fail(path, f"unknown member(s) {unknown}: this layer type holds {sorted(allowed)}")
    missing = sorted(required - set(names))
    if missing:
        raise _fail(path, f"member(s) {missing} missing")


def _read_npz(path: Any) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise _fail(path, f"not a pycusparselt layer file (not an .npz archive: {exc})") from None
    with archive:
        entries = {info.filename: info for info in archive.infolist()}
        if "meta.npy" not in entries:
            raise _fail(path, "not a pycusparselt layer file (no 'meta' member)")
        if entries["meta.npy"].file_size > META_LIMIT:
            raise _fail(path, f"member 'meta' declares {entries['meta.npy'].file_size} bytes (at most {META_LIMIT})")
        meta_array = _read_npy(archive, "meta.npy", path)
        if meta_array.ndim != 0 or meta_array.dtype.kind != "U":
            raise _fail(path, f"member 'meta': expected a JSON string, got {meta_array.shape} {meta_array.dtype}")
        meta = _parse_meta(str(meta_array), path)
        allowed, required = expected_arrays(meta, path)
        if len(entries) != len(archive.infolist()):
            raise _fail(path, "corrupt: a member appears twice")
        others = [n for n in entries if n != "meta.npy"]
        if any(not n.endswith(".npy") for n in others):
            raise _fail(path, f"unknown member(s) {sorted(n for n in others if not n.endswith('.npy'))}")
        names = [n[: -len(".npy")] for n in others]
        _check_members(names, allowed, required, path)
        arrays = {}
        for name in names:
            shape, dtype = allowed[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            declared = entries[name + ".npy"].file_size
            if declared > nbytes + _NPY_HEADER_ROOM:
                raise _fail(path, f"member {name!r} declares {declared} bytes; the meta says it holds {shape} {dtype} "
                                  f"({nbytes} bytes)")
            arrays[name] = _check_array(_read_npy(archive, name + ".npy", path), name, shape, dtype, path)
    return meta, arrays


def _read_npy(archive: zipfile.ZipFile, member: str, path: Any) -> np.ndarray:
    try:
        with archive.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
        name = member[: -len(".npy")]
        if "pickle" in str(exc):  # NumPy's hint would suggest unsafe loading
            raise _fail(path, f"member {name!r} is corrupt: it holds Python objects, which are never loaded") from None
        raise _fail(path, f"member {name!r} is corrupt ({type(exc).__name__}: {exc})") from None


def _read_safetensors(path: Any) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading .safetensors layer files needs safetensors: pip install safetensors") from None
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            text = (f.metadata() or {}).get("pycusparselt")
            if text is None:
                raise _fail(path, "not a pycusparselt layer file (no 'pycusparselt' metadata)")
            if len(text) > META_LIMIT:
                raise _fail(path, f"the meta has {len(text)} characters (at most {META_LIMIT})")
            meta = _parse_meta(text, path)
            allowed, required = expected_arrays(meta, path)
            names = list(f.keys())
            _check_members(names, allowed, required, path)
            arrays = {}
            for name in names:
                shape, dtype = allowed[name]
                view = f.get_slice(name)
                stored, held = _SAFETENSORS_DTYPES.get(view.get_dtype()), tuple(view.get_shape())
                held = () if shape == () and held == (1,) else held  # a scalar comes back as one element
                if held != shape or stored != dtype:
                    raise _fail(path, f"member {name!r}: expected shape {shape} {dtype}, the file holds "
                                      f"{held} {view.get_dtype()}")
                arrays[name] = _check_array(np.asarray(f.get_tensor(name)).reshape(shape), name, shape, dtype, path)
    except (LayerFileError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for a malformed file
        raise _fail(path, f"not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    return meta, arrays


def read(path: str | os.PathLike, container: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta and the arrays of a layer file, their structure checked (see the module docstring).

    Raises
    ------
    LayerFileError
        Not a layer file, corrupt, or arrays that disagree with the meta.
    FileNotFoundError, PermissionError
        As ``open`` does.
    """
    if container_of(path, container) == "safetensors":
        return _read_safetensors(path)
    if not os.path.isfile(path):
        open(path, "rb").close()  # raises the usual OSError for a missing file or a directory
        raise _fail(path, "not a regular file")
    return _read_npz(path)


def write(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray], container: str | None = None) -> None:
    """Write a layer file: ``meta`` (JSON-serialisable) and ``arrays`` (members of ``MEMBERS``, stored as
    :func:`expected_arrays` says)."""
    meta = {**meta, "format": FORMAT_NAME, "version": FORMAT_VERSION}
    allowed, _ = expected_arrays(meta)
    for name, array in arrays.items():
        if name not in allowed:
            raise ValueError(f"arrays: {name!r} is not a member of this layer type ({sorted(allowed)})")
        _check_array(array, name, *allowed[name], "<arrays>")
    text = json.dumps(meta)
    if container_of(path, container) == "safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ImportError("writing .safetensors layer files needs safetensors: pip install safetensors") from None
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.fspath(path),
                  metadata={"pycusparselt": text})
        return
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(text), **arrays)

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

:func:`read` reads regular files only (never waits on a FIFO or a device) and checks the container before
it reads an array: the number of members and the size of the zip directory (from the archive's end record,
before the directory is parsed), only these members, stored or deflated and not encrypted, each member's
declared size against what the meta says it holds, then each ``.npy`` header's shape and dtype before its
data; nothing is unpickled, and nothing larger than the meta's arrays is allocated. What the content *means* (known
options, 2:4 structure, a valid permutation, finite positive scales, stored configurations) is checked by
:func:`layer_fields`, as the layer's constructor checks its arguments; :func:`layer_contents` is what
:meth:`~pycusparselt.SparseLinear.save` stores. Every failure is a :class:`~pycusparselt.errors.LayerFileError`
naming the file and the field, or an :class:`OSError` from the file system itself.

:func:`write` is atomic: it writes a temporary file in the target's directory, flushes it to the disk and
renames it over the target, so a failed save (disk full, a file size limit) leaves an existing file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import lzma
import math
import os
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np

from .. import _arrays, types
from ..tuning import PlanConfig
from . import layer_values, quantization
from ..errors import LayerFileError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MEMBERS", "CONTAINERS", "META_FIELDS", "MAX_ARCHIVE_MEMBERS",
           "container_of", "expected_arrays", "read", "write", "layer_contents", "layer_fields", "bits", "json_float",
           "dtype_named", "load_target", "config_key", "entry_ident", "config_entry", "find_config"]

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
#: Most members an .npz layer file holds (the meta and the arrays), and the largest zip directory read.
MAX_ARCHIVE_MEMBERS = 1 + len(MEMBERS)
_MAX_DIRECTORY_BYTES = 64 << 10
#: deflate expands at most about 1032-fold: a member declaring more than this per compressed byte is a lie.
_MAX_DEFLATE_RATIO = 1100
#: The fields every layer file's meta holds (:meth:`pycusparselt.SparseLinear.save` writes them all).
META_FIELDS = ("mode", "dtype", "quant_format", "weight_granularity", "activation", "relu_upper_bound",
               "relu_threshold", "out_dtype", "input_scale", "output_scale", "in_features", "out_features",
               "configs")

# files are little-endian whatever the machine: the element types of pycusparselt.types in that byte order
_STORAGE = {"float16": types.F16.newbyteorder("<"), "float32": types.F32.newbyteorder("<"),
            "bfloat16": types.U16.newbyteorder("<")}
_SAFETENSORS_DTYPES = {"F16": _STORAGE["float16"], "F32": _STORAGE["float32"], "U16": _STORAGE["bfloat16"],
                       "I8": types.I8, "U8": types.U8, "I64": types.I64.newbyteorder("<")}


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
    missing = [name for name in META_FIELDS if name not in meta]
    if missing:
        raise _fail(path, f"meta field(s) {missing} missing")
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


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _directory_size(f: Any, path: Any) -> tuple[int, int]:
    """``(members, directory bytes)`` from a zip's end record (zip64 too), read before the directory is."""
    size = f.seek(0, os.SEEK_END)
    tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the record, then a comment of at most 64 KiB
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _fail(path, "not a pycusparselt layer file (not an .npz archive: no zip end record)")
    _, _, _, _, members, directory, _, _ = _EOCD.unpack_from(tail, at)
    if (members == 0xFFFF or directory == 0xFFFFFFFF) and at >= _ZIP64_LOCATOR.size:
        sig, _, offset, _ = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
        if sig == b"PK\x06\x07" and offset + _ZIP64_EOCD.size <= size:
            f.seek(offset)
            record = f.read(_ZIP64_EOCD.size)
            if record[:4] == b"PK\x06\x06":
                members, directory = _ZIP64_EOCD.unpack(record)[7:9]
    return members, directory


def _open_archive(f: Any, path: Any) -> zipfile.ZipFile:
    members, directory = _directory_size(f, path)
    if members > MAX_ARCHIVE_MEMBERS or directory > _MAX_DIRECTORY_BYTES:
        raise _fail(path, f"the archive declares {members} members in a {directory}-byte directory; a layer file "
                          f"holds at most {MAX_ARCHIVE_MEMBERS} members")
    f.seek(0)
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise _fail(path, f"not a pycusparselt layer file (not an .npz archive: {exc})") from None
    size = f.seek(0, os.SEEK_END)
    for info in archive.infolist():
        name = info.filename
        if info.flag_bits & 0x1:
            raise _fail(path, f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(path, f"member {name!r}: compression method {info.compress_type}; layer files are stored "
                              f"or deflated")
        if info.header_offset + info.compress_size > size:
            raise _fail(path, f"member {name!r} declares {info.compress_size} bytes past the end of the file")
        limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO)
        if info.file_size > limit + _NPY_HEADER_ROOM:
            raise _fail(path, f"member {name!r} declares {info.file_size} bytes from {info.compress_size} stored")
    return archive


def _read_npz(path: Any) -> tuple[dict, dict[str, np.ndarray]]:
    with _open_regular(path) as f, _open_archive(f, path) as archive:
        entries = {info.filename: info for info in archive.infolist()}
        if "meta.npy" not in entries:
            raise _fail(path, "not a pycusparselt layer file (no 'meta' member)")
        if entries["meta.npy"].file_size > META_LIMIT:
            raise _fail(path, f"member 'meta' declares {entries['meta.npy'].file_size} bytes (at most {META_LIMIT})")
        meta_array = _read_npy(archive, "meta.npy", path, None, None)
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
            if not nbytes < declared <= nbytes + _NPY_HEADER_ROOM:
                raise _fail(path, f"member {name!r} declares {declared} bytes; the meta says it holds {shape} {dtype} "
                                  f"({nbytes} bytes and a header)")
            arrays[name] = _read_npy(archive, name + ".npy", path, shape, dtype)
    return meta, arrays


def _read_npy(archive: zipfile.ZipFile, member: str, path: Any, shape: tuple | None,
              dtype: np.dtype | None) -> np.ndarray:
    """One .npy member: its header checked against ``shape`` and ``dtype`` (None: the meta's, a string within
    the member's declared size) before any data is read, then exactly that many bytes."""
    name = member[: -len(".npy")]
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            held_shape, fortran, held_dtype = read_header(f, max_header_size=_NPY_HEADER_ROOM)
            if held_dtype.hasobject:
                raise _fail(path, f"member {name!r} is corrupt: it holds Python objects, which are never loaded")
            if shape is None:  # the meta: a unicode scalar no larger than the member
                size = archive.getinfo(member).file_size
                if held_shape != () or held_dtype.kind != "U" or held_dtype.itemsize > size:
                    raise _fail(path, f"member 'meta': expected a JSON string, got {held_shape} {held_dtype}")
                shape, dtype = held_shape, held_dtype
            elif tuple(held_shape) != shape or held_dtype != dtype or (fortran and len(shape) > 1):
                raise _fail(path, f"member {name!r}: expected shape {shape} {dtype}, the file holds "
                                  f"{tuple(held_shape)} {held_dtype}{' (Fortran order)' if fortran else ''}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise EOFError(f"{len(data)} of {nbytes} data bytes")
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    except LayerFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, zlib.error, lzma.LZMAError,
            RuntimeError, NotImplementedError, OverflowError, struct.error) as exc:
        raise _fail(path, f"member {name!r} is corrupt ({type(exc).__name__}: {exc})") from None


def _open_regular(path: Any) -> Any:
    """``path`` opened for reading if it is a regular file: never waits on a FIFO or a device."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise _fail(path, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(path: Any) -> None:
    mode = os.stat(path).st_mode  # the usual OSError for a missing file
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if not stat.S_ISREG(mode):
        raise _fail(path, "not a regular file")


def _read_safetensors(path: Any) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading .safetensors layer files needs safetensors: pip install safetensors") from None
    _check_regular(path)
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

        def fill(f: Any, name: str) -> None:
            f.close()  # safetensors writes by name
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, name, metadata={"pycusparselt": text})
    else:
        def fill(f: Any, name: str) -> None:
            with f:
                np.savez(f, meta=np.array(text), **arrays)
    _replace_atomically(path, fill)


def _replace_atomically(path: str | os.PathLike, fill: Any) -> None:
    """``fill(file, name)`` writes a temporary file beside ``path``, which is then flushed to the disk and
    renamed over ``path``; on any failure the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask) if hasattr(os, "fchmod") else None  # as open() would create it
        fill(os.fdopen(fd, "wb"), temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash once the directory is synced
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


# -- a SparseLinear's content: what save writes and load checks -------------------------------------------


def bits(a: np.ndarray) -> np.ndarray:
    """A host array as savable plain NumPy data (ml_dtypes types as their unsigned-integer bits)."""
    if a.dtype in (types.BF16, types.E4M3, types.E5M2):
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def layer_contents(layer: Any, *, bias: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta and arrays :func:`write` stores for a :class:`~pycusparselt.SparseLinear`
    (:meth:`~pycusparselt.SparseLinear.save`): the pruned (and permuted) weight, or the quantized weight and its
    scales, the bias, the permutation, the scales, the options and the tuned configurations.

    Parameters
    ----------
    layer : SparseLinear
        Read through its public attributes.
    bias : numpy.ndarray or None
        The layer's bias on the host, in its stored type.
    """
    # the attributes are public: what load would refuse is refused here, before anything is written
    relu_upper_bound = layer_values.relu_upper_bound(layer.relu_upper_bound)
    relu_threshold = layer_values.relu_threshold(layer.relu_threshold)
    meta = {
        "mode": layer.mode, "dtype": layer.dtype.name,
        "quant_format": layer.format, "weight_granularity": layer.weight_granularity,
        "activation": layer.activation, "relu_upper_bound": json_float(relu_upper_bound),
        "relu_threshold": relu_threshold, "out_dtype": layer.out_dtype.name,
        "input_scale": layer_values.activation_scale(layer.input_scale, "input_scale"),
        "output_scale": layer_values.activation_scale(layer.output_scale, "output_scale"),
        "in_features": layer.in_features, "out_features": layer.out_features,
        "weight_dtype": layer.dtype.name, "configs": layer.tuned_configs,
    }
    arrays: dict[str, np.ndarray] = {}
    if layer.quantized:
        wq = _arrays.to_numpy(layer.weight_q)
        arrays["weight_q"] = wq if wq.dtype == types.I8 else wq.view(types.U8)
        arrays["weight_scale"] = layer_values.weight_scales(layer.weight_scale)
    else:
        arrays["weight"] = bits(_arrays.to_numpy(layer.weight))
    if bias is not None:
        arrays["bias"] = bits(bias)
    if layer.permutation is not None:
        arrays["permutation"] = layer.permutation.astype(np.int64)
    return meta, arrays




def dtype_named(name: str) -> np.dtype:
    """The dtype a meta names (``"bfloat16"`` is ml_dtypes')."""
    return types.BF16 if name == "bfloat16" else np.dtype(name)


def json_float(v: float) -> Any:
    """``v`` as JSON holds it: infinities as strings."""
    return v if math.isfinite(v) else str(v)


def load_target(on_device: bool | None, device: int | None) -> tuple[bool, int | None]:
    """Where :meth:`SparseLinear.load <pycusparselt.SparseLinear.load>` puts a layer: ``(on_device, device)``.
    ``on_device`` None: the GPU where one is usable, else the reference, with a :class:`RuntimeWarning` saying
    why; ``device`` None on the GPU: CuPy's current device."""
    if on_device is None:
        from .._native.devices import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        on_device = reason is None
        if reason is not None:
            warnings.warn(f"SparseLinear.load: no usable GPU ({reason}); the layer runs on the NumPy reference",
                          RuntimeWarning, stacklevel=3)
    if device is None and on_device:
        from .._native import gpu

        device = gpu.cupy().cuda.Device().id
    return on_device, device if on_device else None


def config_key(ident: tuple) -> tuple:
    """The key a tuned configuration is stored under: GPU, compute capability, library version, input."""
    device_name, cc, version, shape, dtype = ident
    return (device_name, cc, version, tuple(int(s) for s in shape), dtype)


def entry_ident(entry: dict) -> tuple:
    """The identity of a stored configuration entry (what :func:`config_key` keys)."""
    return (entry["gpu"], entry["cc"], entry["cusparselt"], entry["x_shape"], entry["x_dtype"])


def layer_fields(meta: dict, arrays: dict[str, np.ndarray], path: Any) -> dict[str, Any]:
    """A layer file's content checked as the constructor checks its arguments; the keyword arguments of
    the layer's set-up (all but the device ones). Raises LayerFileError naming the field."""

    def fail(message: str) -> Exception:
        return LayerFileError(f"{os.fspath(path)!r}: {message}")

    mode, fmt = meta.get("mode"), meta.get("quant_format")
    if mode is not None and mode not in layer_values.MODES:
        raise fail(f"meta field 'mode': expected None or one of {', '.join(layer_values.MODES)}, got {mode!r}")
    wanted_fmt = {"int8": ("int8",), "fp8": ("e4m3", "e5m2")}.get(mode, (None,))
    if fmt not in wanted_fmt:
        raise fail(f"meta field 'quant_format': a layer of mode {mode!r} has {wanted_fmt}, got {fmt!r}")
    dtype = dtype_named(meta["dtype"])
    if mode in layer_values.MODE_DTYPE and dtype != layer_values.MODE_DTYPE[mode]:
        raise fail(f"meta field 'dtype': a {mode} layer is {layer_values.MODE_DTYPE[mode].name}, got {dtype.name}")
    numbers = {}
    checks = {"relu_upper_bound": layer_values.relu_upper_bound, "relu_threshold": layer_values.relu_threshold,
              "input_scale": functools.partial(layer_values.activation_scale, name="input_scale"),
              "output_scale": functools.partial(layer_values.activation_scale, name="output_scale")}
    for name, check in checks.items():
        try:
            numbers[name] = check(meta.get(name))
        except (TypeError, ValueError) as exc:
            raise fail(f"meta field {name!r}: {str(exc).removeprefix(name + ': ')}") from None
    out_dtype = meta.get("out_dtype")
    if fmt is not None and out_dtype not in {d.name for d in layer_values.OUT_DTYPES[mode]}:
        raise fail(f"meta field 'out_dtype': a {mode} layer outputs {[d.name for d in layer_values.OUT_DTYPES[mode]]}, "
                   f"got {out_dtype!r}")
    permutation = arrays.get("permutation")
    if permutation is not None and not np.array_equal(np.sort(permutation), np.arange(permutation.size)):
        raise fail(f"member 'permutation': not a permutation of range({permutation.size})")
    bias = arrays.get("bias")
    weight_q = weight_scale = None
    if fmt is not None:
        weight_q = arrays["weight_q"]
        if fmt != "int8":
            weight_q = weight_q.view(quantization.FORMATS[fmt][0])
        try:
            weight_scale = layer_values.weight_scales(arrays["weight_scale"])
        except (TypeError, ValueError) as exc:
            raise fail(f"member 'weight_scale': {str(exc).removeprefix('weight_scale: ')}") from None
        weight = quantization.dequantize(weight_q, weight_scale[:, None] if weight_scale.ndim else weight_scale)
    else:
        weight = arrays["weight"].view(dtype)
        bias = None if bias is None else bias.view(dtype)
    if not np.isfinite(weight.astype(np.float32)).all():
        raise fail(f"member {'weight_q' if fmt else 'weight'!r}: NaN or infinite values")
    if bias is not None and not np.isfinite(bias.astype(np.float32)).all():
        raise fail("member 'bias': NaN or infinite values")
    pairs = mode is None and dtype == types.F32
    if not layer_values.is_sparse_host(weight, pairs):
        raise fail(f"member {'weight_q' if fmt else 'weight'!r}: not {'1:2' if pairs else '2:4'} along in_features")
    configs = meta.get("configs")
    try:
        configs = {config_key(entry_ident(e)): {k: None if v is None else int(v)
                                                   for k, v in dict(e["config"]).items()} for e in configs}
        if any(not set(c) <= set(PlanConfig._fields) or "alg_id" not in c for c in configs.values()):
            raise ValueError
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # OverflowError: int(Infinity)
        raise fail("meta field 'configs': expected the entries tuned_configs returns") from None
    return dict(
        mode=mode, dtype=dtype, fmt=fmt, granularity=meta["weight_granularity"] if fmt else None, weight=weight,
        weight_q=weight_q, weight_scale=weight_scale, bias=bias, permutation=permutation,
        activation=meta.get("activation"), relu_upper_bound=numbers["relu_upper_bound"],
        relu_threshold=numbers["relu_threshold"], out_dtype=out_dtype if fmt else None,
        input_scale=numbers["input_scale"], output_scale=numbers["output_scale"], configs=configs,
    )


def config_entry(key: tuple, config: dict) -> dict:
    """A stored configuration as the meta's ``configs`` list holds it."""
    gpu, cc, version, shape, dtype = key
    return {"gpu": gpu, "cc": cc, "cusparselt": version, "x_shape": list(shape), "x_dtype": dtype,
            "config": dict(config)}


def find_config(configs: dict[tuple, dict], ident: tuple) -> dict | None:
    """The configuration stored for exactly this GPU, compute capability, library version and input."""
    return configs.get(config_key(ident))

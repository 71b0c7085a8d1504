"""What kind of array the caller gave, and results in that caller's framework.

The one module that tells NumPy, CuPy, PyTorch and other device arrays (``__cuda_array_interface__`` /
``__dlpack__``) apart. PyTorch is never imported here: a tensor can only exist once the caller imported it.
Results go back in the framework of the array they answer: PyTorch tensors in, PyTorch tensors out (zero-copy,
allocated by PyTorch's allocator, so they take part in its stream and graph-capture bookkeeping); CuPy and
everything else, CuPy.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

from ._native import gpu
from ._native.streams import current_stream  # the call paths ask for it here, with the array they hold

__all__ = [
    "NUMPY", "CUPY", "TORCH", "DEVICE", "DLPACK_CUDA",
    "kind", "is_device", "is_torch", "is_cupy", "namespace", "array_key", "signature", "as_cupy", "to_numpy",
    "dtype_of", "like",
    "as_framework", "host_tensor", "empty", "current_stream", "torch_dtype",
]

NUMPY, CUPY, TORCH, DEVICE = "numpy", "cupy", "torch", "device"

_CUPY_NDARRAY: Any = None  # cupy.ndarray, looked up on first use


def _cupy_ndarray() -> Any:
    global _CUPY_NDARRAY
    if _CUPY_NDARRAY is None:
        cupy = gpu.cupy()

        _CUPY_NDARRAY = cupy.ndarray
    return _CUPY_NDARRAY


def _torch_tensor_type() -> Any:
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def is_torch(obj: Any) -> bool:
    """Whether ``obj`` is a PyTorch tensor (PyTorch is not imported to find out)."""
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(obj, tensor)


def kind(obj: Any) -> str:
    """``"numpy"``, ``"cupy"``, ``"torch"`` (a tensor on any device) or ``"device"`` (another object with
    ``__cuda_array_interface__`` or ``__dlpack__``); TypeError for anything else."""
    if isinstance(obj, np.ndarray):
        return NUMPY
    if type(obj) is _cupy_ndarray_if_loaded():
        return CUPY
    if is_torch(obj):
        return TORCH
    if hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__"):
        return DEVICE
    raise TypeError(f"expected a NumPy, CuPy or PyTorch array (or any DLPack array), got {type(obj).__name__}")


def _cupy_ndarray_if_loaded() -> Any:
    if _CUPY_NDARRAY is not None:
        return _CUPY_NDARRAY
    return _cupy_ndarray() if "cupy" in sys.modules else None


#: DLPack device types of GPU memory: kDLCUDA, kDLCUDAManaged.
DLPACK_CUDA = (2, 13)


def is_cupy(obj: Any) -> bool:
    """Whether ``obj`` is a CuPy array (CuPy is not imported to find out)."""
    cupy_ndarray = _cupy_ndarray_if_loaded()
    return cupy_ndarray is not None and isinstance(obj, cupy_ndarray)


def is_device(obj: Any) -> bool:
    """Whether ``obj`` lives on a GPU: a CuPy array, a CUDA tensor, an object with
    ``__cuda_array_interface__``, or a DLPack array on a CUDA device. A PyTorch CPU tensor, or a CPU DLPack
    array of another framework, is a host array."""
    if isinstance(obj, np.ndarray):
        return False
    if is_torch(obj):
        return bool(obj.is_cuda)
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return obj.__dlpack_device__()[0] in DLPACK_CUDA
    return hasattr(obj, "__dlpack__")  # no device to ask: a device array; the device side refuses it if need be


def namespace(obj: Any) -> tuple[Any, Any]:
    """``(array, xp)``: ``obj`` as a CuPy array over its GPU memory with ``xp`` CuPy (CuPy arrays, CUDA
    tensors and other device arrays, without a copy), or as a NumPy array with ``xp`` NumPy (NumPy arrays,
    PyTorch CPU tensors, host DLPack arrays, lists and scalars)."""
    if isinstance(obj, np.ndarray):
        return obj, np
    if is_device(obj):
        cupy = gpu.cupy()

        return as_cupy(obj), cupy
    if is_torch(obj) or isinstance(obj, (list, tuple)):
        return to_numpy(obj), np
    if hasattr(obj, "__dlpack__") and not hasattr(obj, "__array__"):
        return np.from_dlpack(obj), np
    return np.asarray(obj), np


def array_key(obj: Any) -> tuple | None:
    """For a CuPy array or a CUDA tensor, everything its validity as an operand depends on: address (which
    also fixes the device and the alignment), shape, strides and dtype. None for other objects, which are
    checked in full on every call."""
    t = type(obj)
    if t is _CUPY_NDARRAY or (_CUPY_NDARRAY is None and t is _cupy_ndarray_if_loaded()):
        return (obj.data.ptr, obj.shape, obj.strides, obj.dtype)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor) and obj.is_cuda:
        return (obj.data_ptr(), obj.shape, obj.stride(), obj.dtype)
    return None


def signature(obj: Any) -> tuple | None:
    """:func:`array_key` without the address: shape, strides, dtype, device, framework and whether the address
    is 16-byte aligned. Arrays of one signature are valid operands of the same prepared call with only the
    address changed. None for objects other than CuPy arrays and CUDA tensors."""
    t = type(obj)
    if t is _CUPY_NDARRAY or (_CUPY_NDARRAY is None and t is _cupy_ndarray_if_loaded()):
        return (obj.shape, obj.strides, obj.dtype, obj.device.id, CUPY, obj.data.ptr % 16 == 0)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor) and obj.is_cuda:
        return (obj.shape, obj.stride(), obj.dtype, obj.get_device(), TORCH, obj.data_ptr() % 16 == 0)
    return None


def as_cupy(obj: Any) -> Any:
    """A CuPy array over ``obj``'s device memory, without copying."""
    cupy = gpu.cupy()

    if type(obj) is cupy.ndarray:
        return obj
    if is_torch(obj):
        return _torch_as_cupy(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return cupy.asarray(obj)
    return cupy.from_dlpack(obj)


def _torch_as_cupy(t: Any) -> Any:
    """A CUDA tensor's memory as a CuPy array that keeps the tensor alive. Built from its address rather than
    through DLPack, whose stream handshake makes the legacy stream wait on the tensor's stream: an error
    inside ``torch.cuda.graph`` capture. The caller runs on PyTorch's stream, so no wait is needed."""
    cupy = gpu.cupy()

    if not t.is_cuda:
        raise TypeError("expected a CUDA tensor, got a CPU tensor: move it with .cuda()")
    dt = dtype_of(t)
    storage = np.dtype(np.uint8) if dt.name.startswith("float8") else dt  # CuPy holds FP8 as bytes
    shape, strides = tuple(t.shape), tuple(s * storage.itemsize for s in t.stride())
    span = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + storage.itemsize if t.numel() else 0
    memory = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, t.device.index)
    return cupy.ndarray(shape, storage, cupy.cuda.MemoryPointer(memory, 0), strides=strides)


def to_numpy(obj: Any) -> np.ndarray:
    """A host copy of any array (NumPy arrays are returned as they are; CPU tensors without a copy; Python
    lists and tuples as NumPy arrays)."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, (list, tuple)):
        return np.asarray(obj)
    if is_torch(obj):
        t = obj.detach()
        if t.dtype in _torch_byte_views():
            t = t.view(_torch().uint8)
        if t.dtype == _torch().bfloat16:
            return t.view(_torch().int16).cpu().numpy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy()
    if hasattr(obj, "__cuda_array_interface__") or type(obj) is _cupy_ndarray_if_loaded():
        cupy = gpu.cupy()

        return cupy.asnumpy(cupy.asarray(obj))
    return np.from_dlpack(obj)


def _torch() -> Any:
    return sys.modules["torch"]


def _torch_byte_views() -> tuple:
    torch = _torch()
    return tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


_TORCH_NAMES = {
    "float16": "float16", "float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "int8": "int8",
    "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64", "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2", "bool": "bool",
}


def torch_dtype(dtype: Any) -> Any:
    """The PyTorch dtype of a NumPy / ml_dtypes dtype (float8 included)."""
    name = np.dtype(dtype).name
    try:
        return getattr(_torch(), _TORCH_NAMES[name])
    except KeyError:
        raise TypeError(f"dtype {name} has no PyTorch equivalent") from None


def dtype_of(obj: Any) -> np.dtype:
    """The NumPy (or ml_dtypes) dtype of any array, PyTorch's bfloat16 and float8 tensors included."""
    if is_torch(obj):
        name = str(obj.dtype).rpartition(".")[2]
        return np.dtype(getattr(ml_dtypes, name) if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else name)
    return np.dtype(obj.dtype)


def like(result: Any, template: Any, dtype: Any = None) -> Any:
    """``result`` (a CuPy array) in ``template``'s framework, zero-copy: a PyTorch tensor for a tensor
    template, else ``result`` itself. ``dtype`` names the values' real type where CuPy holds other storage
    (FP8 as bytes): the tensor is then viewed as that type."""
    return as_framework(result, TORCH if is_torch(template) else CUPY, dtype)


def as_framework(result: Any, framework: str, dtype: Any = None) -> Any:
    """``result`` (a CuPy array) as a PyTorch tensor (``framework="torch"``, zero-copy) or as it is."""
    if framework != TORCH:
        return result
    tensor = _torch().from_dlpack(result)
    if dtype is not None:
        want = torch_dtype(dtype)
        if tensor.dtype != want:
            tensor = tensor.view(want)
    return tensor


def host_tensor(array: np.ndarray) -> Any:
    """A NumPy array (ml_dtypes bfloat16 and FP8 included) as a PyTorch CPU tensor sharing its memory."""
    torch = _torch()
    special = {"bfloat16": ("int16", torch.bfloat16), "float8_e4m3fn": ("uint8", torch.float8_e4m3fn),
               "float8_e5m2": ("uint8", torch.float8_e5m2)}.get(array.dtype.name)
    array = np.ascontiguousarray(array)
    if special is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(special[0])).view(special[1])


def empty(template: Any, shape: tuple, dtype: Any, device: int, *, order: str = "C") -> Any:
    """A new uninitialised device array in ``template``'s framework (PyTorch's allocator for a tensor, so the
    array is legal inside ``torch.cuda.graph`` capture; CuPy's otherwise). ``order="F"`` gives the
    column-major layout (the last two dimensions). FP8 arrays are PyTorch float8 tensors, CuPy bytes."""
    dtype = np.dtype(dtype)
    if order == "F":
        flipped = tuple(shape[:-2]) + (shape[-1], shape[-2])
        return empty(template, flipped, dtype, device).swapaxes(-1, -2) if not is_torch(template) else \
            empty(template, flipped, dtype, device).transpose(-1, -2)
    if is_torch(template):
        return _torch().empty(shape, dtype=torch_dtype(dtype), device=template.device if template.is_cuda
                              else f"cuda:{device}")
    cupy = gpu.cupy()

    storage = np.dtype(np.uint8) if dtype.name.startswith("float8") else dtype
    with cupy.cuda.Device(device):
        return cupy.empty(shape, dtype=storage)

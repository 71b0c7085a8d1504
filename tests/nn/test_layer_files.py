"""Layer files as untrusted input: every file the loader refuses, with the field it names, on the CPU."""

from __future__ import annotations

import io
import json
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import SparseLinear
from pycusparselt._native import devices
from pycusparselt.nn import layer_files
from pycusparselt.errors import LayerFileError
from layer_file_members import read_members


def _layer(mode=None, **kw):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 64)).astype(np.float16)
    b = rng.standard_normal(32).astype(np.float16)
    layer = SparseLinear(w, b, mode=mode, **kw)
    if mode in ("int8", "fp8"):
        layer.calibrate([rng.standard_normal((16, 64)).astype(np.float16)])
    return layer


def _write(path, meta, arrays, **raw):
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays, **raw)
    return path


def _tampered(tmp_path, layer, meta_change=None, array_change=None):
    path = tmp_path / "layer.npz"
    layer.save(path)
    meta, arrays = read_members(path)
    meta.update(meta_change or {})
    arrays.update(array_change or {})
    return _write(path, meta, {k: v for k, v in arrays.items() if v is not None})


def _load(path, **kw):
    return SparseLinear.load(path, on_device=False, **kw)


@pytest.mark.parametrize("change, message", [
    ({"mode": "garbage"}, "meta field 'mode'"),
    ({"relu_upper_bound": "nan"}, "meta field 'relu_upper_bound'"),
    ({"relu_threshold": "inf"}, "meta field 'relu_threshold'"),
    ({"activation": "swish"}, "activation: expected None, 'relu' or 'gelu'"),
    ({"in_features": -3}, "meta field 'in_features'"),
    ({"dtype": "float64"}, "meta field 'dtype'"),
    ({"quant_format": "int8"}, "meta field"),
    ({"configs": [{"gpu": "x"}]}, "meta field 'configs'"),
    ({"configs": [{"gpu": "g", "cc": "90", "cusparselt": "0.8.0", "x_shape": [16, 64], "x_dtype": "<f2",
                   "config": {"alg_id": 1, "evil": 2}}]}, "meta field 'configs'"),
    ({"version": 99}, "version 99"),
])
def test_meta_fields_are_checked(tmp_path, change, message):
    with pytest.raises(LayerFileError, match=message):
        _load(_tampered(tmp_path, _layer(activation="relu"), meta_change=change))


def test_weights_that_are_not_two_to_four_are_refused(tmp_path):
    layer = _layer()
    dense = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
    with pytest.raises(LayerFileError, match="member 'weight': not 2:4"):
        _load(_tampered(tmp_path, layer, array_change={"weight": dense}))
    nan = layer.weight.copy()
    nan[0, np.flatnonzero(nan[0])[0]] = np.nan
    with pytest.raises(LayerFileError, match="member 'weight': NaN"):
        _load(_tampered(tmp_path, layer, array_change={"weight": nan}))
    q = _layer("int8")
    dense_q = np.ones((32, 64), np.int8)
    with pytest.raises(LayerFileError, match="member 'weight_q': not 2:4"):
        _load(_tampered(tmp_path, q, array_change={"weight_q": dense_q}))


@pytest.mark.parametrize("value", [np.nan, -1.0, 0.0, np.inf])
def test_weight_scales_must_be_finite_and_positive(tmp_path, value):
    layer = _layer("int8")
    scale = layer.weight_scale.copy()
    scale[3] = value
    with pytest.raises(LayerFileError, match="member 'weight_scale': expected finite positive"):
        _load(_tampered(tmp_path, layer, array_change={"weight_scale": scale}))


@pytest.mark.parametrize("scale", [float("nan"), -0.5, 0.0])
def test_activation_scales_must_be_finite_and_positive(tmp_path, scale):
    with pytest.raises(LayerFileError, match="input_scale"):
        _load(_tampered(tmp_path, _layer("int8"), meta_change={"input_scale": scale}))


def test_a_permutation_must_be_one(tmp_path):
    layer = _layer(permutation=np.random.default_rng(1).permutation(64))
    with pytest.raises(LayerFileError, match="member 'permutation': not a permutation"):
        _load(_tampered(tmp_path, layer, array_change={"permutation": np.zeros(64, np.int64)}))
    with pytest.raises(LayerFileError, match="member 'permutation': expected shape \\(64,\\)"):
        _load(_tampered(tmp_path, layer, array_change={"permutation": np.arange(63)}))


def test_arrays_must_match_the_meta(tmp_path):
    layer = _layer()
    with pytest.raises(LayerFileError, match="member 'bias': expected shape \\(32,\\) float16"):
        _load(_tampered(tmp_path, layer, array_change={"bias": np.zeros(32, np.float32)}))
    with pytest.raises(LayerFileError, match="member\\(s\\) \\['weight'\\] missing"):
        _load(_tampered(tmp_path, layer, array_change={"weight": None}))


def test_unknown_members_are_refused_without_being_read(tmp_path):
    layer = _layer()
    path = tmp_path / "layer.npz"
    layer.save(path)
    meta, arrays = read_members(path)
    big = np.zeros(64 << 20, np.uint8)  # 64 MiB of zeros, a few hundred KiB compressed
    with open(path, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), junk=big, **arrays)
    del big
    began = time.perf_counter()
    with pytest.raises(LayerFileError, match="unknown member\\(s\\) \\['junk'\\]"):
        _load(path)
    assert time.perf_counter() - began < 1.0  # refused from the directory, not decompressed


def test_a_member_larger_than_its_meta_says_is_refused_before_reading(tmp_path):
    layer = _layer()
    path = tmp_path / "layer.npz"
    layer.save(path)
    meta, arrays = read_members(path)
    arrays["weight"] = np.zeros((32 * 1024, 64), np.float16)  # what a hostile file could hold, compressed
    with open(path, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(LayerFileError, match="member 'weight' declares .* bytes; the meta says it holds"):
        _load(path)


@pytest.mark.parametrize("content, message", [
    (b"not a zip at all", "not an .npz archive"),
    (b"PK\x03\x04" + b"\0" * 40, "not an .npz archive"),
])
def test_files_that_are_not_layer_files(tmp_path, content, message):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(LayerFileError, match=message):
        _load(path)


def test_corrupt_or_foreign_archives(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, data=np.arange(3))
    with pytest.raises(LayerFileError, match="no 'meta' member"):
        _load(path)
    np.savez(path, meta=np.array("{not json"))
    with pytest.raises(LayerFileError, match="not valid JSON"):
        _load(path)
    np.savez(path, meta=np.array("[1, 2]"))
    with pytest.raises(LayerFileError, match="not a JSON object"):
        _load(path)
    np.savez(path, meta=np.array([{"format": "x"}], dtype=object))  # a pickled member: never unpickled
    with pytest.raises(LayerFileError, match="member 'meta' is corrupt") as info:
        _load(path)
    assert "allow_pickle" not in str(info.value)
    # a truncated archive
    good = tmp_path / "good.npz"
    _layer().save(good)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerFileError):
        _load(path)
    # a member whose bytes are damaged inside the archive
    buffer = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            raw = src.read(info.filename)
            dst.writestr(info, raw[:20] if info.filename == "weight.npy" else raw)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(LayerFileError, match="member 'weight'"):
        _load(path)


def test_missing_files_raise_the_usual_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "absent.npz")
    with pytest.raises(IsADirectoryError):
        _load(tmp_path)


@pytest.mark.parametrize("mode", [None, "bf16", "int8", "fp8"])
def test_safetensors_round_trip_and_checks(tmp_path, mode):
    pytest.importorskip("safetensors", reason="the safetensors container needs the safetensors package")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64)).astype(np.float32 if mode is None else np.float16)
    layer = SparseLinear(w, rng.standard_normal(32).astype(w.dtype), mode=mode,
                         permutation=rng.permutation(64), activation="relu")
    x = rng.standard_normal((8, 64)).astype(np.float16 if mode != "bf16" else ml_dtypes.bfloat16)
    if mode is None:
        x = x.astype(np.float32)
    if layer.quantized:
        layer.calibrate([x])
    path = tmp_path / "layer.safetensors"
    layer.save(path)
    loaded = _load(path)
    assert np.array_equal(loaded(x).view(np.uint8), layer(x).view(np.uint8))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) <= set(layer_files.MEMBERS) and "pycusparselt" in f.metadata()
    # the same checks as the .npz container
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["extra"] = np.zeros(4, np.float32)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(LayerFileError, match="unknown member\\(s\\) \\['extra'\\]"):
        _load(path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(LayerFileError, match="not a readable .safetensors file"):
        _load(path)


def test_a_layer_loads_on_the_reference_where_no_gpu_is_usable(tmp_path, monkeypatch):
    path = tmp_path / "layer.npz"
    _layer().save(path)
    monkeypatch.setattr(devices, "gpu_unavailable_reason", lambda: "no GPU here (test)")
    with pytest.warns(RuntimeWarning, match="no usable GPU \\(no GPU here \\(test\\)\\); the layer runs on the NumPy"):
        layer = SparseLinear.load(path)
    assert layer.on_device is False
    assert psl.LayerFileError is LayerFileError and issubclass(LayerFileError, ValueError)

"""The choice of kernel for small batches (pycusparselt.nn.small_batch) without a GPU: the setting, the
buckets, which layers the decode kernel can serve, and cache entries read as untrusted input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from pycusparselt.gemm import decode
from pycusparselt.nn import small_batch
from pycusparselt.tuning.cache import TuningCache, TuningCacheWarning


def test_the_setting_defaults_to_auto_and_refuses_other_values():
    assert small_batch.policy({}) == "auto"
    assert small_batch.policy({small_batch.SETTING: " "}) == "auto"
    assert small_batch.policy({small_batch.SETTING: " On "}) == "on"
    assert small_batch.policy({small_batch.SETTING: "off"}) == "off"
    with pytest.raises(ValueError, match=small_batch.SETTING + ".*'yes'.*auto, on, off"):
        small_batch.policy({small_batch.SETTING: "yes"})


def test_buckets_follow_the_kernel_forms():
    assert [small_batch.bucket_of(r) for r in (1, 8, 9, 16)] == [0, 0, 1, 1]
    for rows in (0, 17, -1):
        with pytest.raises(ValueError, match=f"rows: expected 1..16, got {rows}"):
            small_batch.bucket_of(rows)


def test_which_layers_the_decode_kernel_can_serve():
    common = dict(on_device=True, quantized=False, dtype=np.float16, post=False, device=0)
    assert "reference" in small_batch.unsupported_reason(**dict(common, on_device=False))
    assert "quantized" in small_batch.unsupported_reason(**dict(common, quantized=True))
    assert "float32" in small_batch.unsupported_reason(**dict(common, dtype=np.float32))
    assert "GELU" in small_batch.unsupported_reason(**dict(common, post=True))
    # a supported layer: the kernel's own availability decides (here: no GPU)
    assert small_batch.unsupported_reason(**common) == decode.unavailable_reason(0)


def test_cache_keys_name_the_problem_and_the_bucket():
    key = small_batch.cache_key(("H100", "90", "0.8.0"), 4096, 11008, np.float16, "relu", True, 1)
    assert key == {"kind": "small-batch kernel", "gpu": "H100", "cc": "90", "cusparselt": "0.8.0", "n": 4096,
                   "k": 11008, "dtype": "float16", "activation": "relu", "bias": True, "rows": "9-16"}


def test_valid_entries_give_their_choice():
    found = small_batch.choice_from_entry({"backend": "decode", "splits": 8, "decode_us": 10.5,
                                           "cusparselt_us": 12.0}, 16)
    assert found == small_batch.Choice("decode", 8, 10.5, 12.0, "cache")
    found = small_batch.choice_from_entry({"backend": "cusparselt", "splits": None, "decode_us": 13,
                                           "cusparselt_us": 12.0}, 16)
    assert found == small_batch.Choice("cusparselt", None, 13, 12.0, "cache")


@pytest.mark.parametrize("value", [
    {"backend": "cublas", "splits": None, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 0, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 17, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": True, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 2.0, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": None, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "cusparselt", "splits": 4, "decode_us": 1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 4, "decode_us": -1.0, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 4, "decode_us": math.nan, "cusparselt_us": 2.0},
    {"backend": "decode", "splits": 4, "decode_us": "fast", "cusparselt_us": 2.0},
    {"backend": "decode"},
    ["decode", 4],
    "decode",
])
def test_invalid_entries_are_ignored_with_a_warning(value):
    with pytest.warns(TuningCacheWarning, match="small-batch kernel entry holds no valid choice"):
        assert small_batch.choice_from_entry(value, 16) is None


def test_entries_survive_the_tuning_cache(tmp_path):
    cache = TuningCache(tmp_path, enabled=True)
    key = small_batch.cache_key(("GPU", "90", "0.8.0"), 64, 256, np.float16, None, False, 0)
    cache.put(key, {"backend": "decode", "splits": 1, "decode_us": 3.5, "cusparselt_us": 7.25})
    assert small_batch.choice_from_entry(cache.get(key), 1) == small_batch.Choice("decode", 1, 3.5, 7.25, "cache")
    other = dict(key, rows="9-16")
    assert cache.get(other) is None


def test_a_launcher_packs_the_kernel_arguments_in_the_kernel_order():
    """DecodeLauncher writes the arguments by position: the names and C types it packs must be the kernel's."""
    signature = re.search(r"decode_gemm\((.*?)\)\s*\{", decode._SOURCE, re.S).group(1)
    params = [p.split()[-1].lstrip("*") for p in signature.replace("\n", " ").split(",")]
    types = [" ".join(p.split()[:-1]) for p in signature.replace("\n", " ").split(",")]
    assert tuple(params) == decode._PARAMS
    for name, ctype in zip(params, types, strict=True):
        if name in decode._INT32:
            assert ctype == "int", name
        elif name in decode._FLOAT32:
            assert ctype == "float", name
        else:
            assert "*" in ctype or ctype == "long long", name
    assert decode._PARAMS.index("x") == 1 and decode._PARAMS.index("y") == 3 and decode._PARAMS.index("x_vec") == 15

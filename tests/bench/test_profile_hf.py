"""The Hugging Face profile's arithmetic on the CPU: which kernels count as GEMMs, and the bound they give."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports bench_hf, which imports its sibling
    spec = importlib.util.spec_from_file_location("profile_hf", ROOT / "benchmarks" / "profile_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, gemm", [
    ("nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_TNN", True),  # cuBLAS
    ("nvjet_hsh_128x256_64x5_2x1_h_bx_coopA_sp_TNT", True),  # cuSPARSELt
    ("sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256", True),
    ("void decode_gemm<0, 1, 1>(uint4 const*, unsigned short const*)", True),  # the decode kernel
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half, false, float>", True),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob", False),  # attention
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add>", False),
    ("Memset (Device)", False),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", False),
])
def test_gemm_kernels_are_told_from_the_rest(profile, name, gemm):
    assert profile.is_gemm(name) is gemm


def test_the_bound_keeps_the_rest_as_dense_ran_it(profile):
    dense = {"gpu_ms": 8.0, "gemm_ms": 6.0, "other_ms": 2.0}
    assert profile.bound(dense, 2.0) == pytest.approx(8.0 / 5.0, abs=1e-3)
    assert profile.bound(dense, 1.0) == 1.0
    assert profile.bound({"gpu_ms": 8.0, "gemm_ms": 0.0, "other_ms": 8.0}, 2.0) == 1.0  # no GEMM: no gain


def test_the_bound_of_a_generation_counts_the_idle_time_as_the_rest(profile):
    # 10 ms of wall time, of which 4 ms GEMMs: GEMMs twice as fast give 10 / 8, whatever the kernels' sum
    dense = {"wall_ms": 10.0, "gpu_ms": 6.0, "gemm_ms": 4.0, "other_ms": 2.0}
    assert profile.bound(dense, 2.0) == pytest.approx(1.25, abs=1e-3)
    assert profile.bound({**dense, "wall_ms": 6.0}, 2.0) == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("case, want", [
    ("bert:eager:1,8", ("bert", "eager", (1, 8))),
    ("bert:compile:32", ("bert", "compile", (32,))),
    ("llama:generate-compiled:1", ("llama", "generate-compiled", (1,))),
])
def test_cases_are_read_as_model_mode_and_sizes(profile, case, want):
    assert profile.parse_case(case) == want


@pytest.mark.parametrize("case", ["bert:eager", "gpt:eager:1", "bert:graph:1", "bert:generate-compiled:1",
                                  "llama:eager:one", "llama:eager:1:2", "bert:eager:0", "llama:eager:16,-1"])
def test_a_case_that_is_not_model_mode_sizes_names_what_it_expected(profile, case):
    with pytest.raises(ValueError, match="case: expected") as info:
        profile.parse_case(case)
    assert repr(case) in str(info.value)


def test_the_default_cases_are_valid(profile):
    assert [profile.parse_case(case)[:2] for case in profile.CASES] == [
        ("bert", "eager"), ("bert", "compile"), ("llama", "eager"), ("llama", "generate-compiled")]


def test_enqueue_samples_alternate_between_the_models(profile):
    calls = []
    fake_torch = type("T", (), {"cuda": type("C", (), {"synchronize": staticmethod(lambda: None)})})
    models = {"dense": lambda ids: calls.append("dense"), "sparse": lambda ids: calls.append("sparse")}
    found = profile._enqueue_ms(fake_torch, models, ids=None, samples=3)
    assert calls == ["dense", "sparse"] * 3
    assert set(found) == {"dense", "sparse"}


class _Event:
    def __init__(self, name, us, cuda=True):
        self.name, self.device_time = name, us
        self.device_type = "cuda" if cuda else "cpu"


def test_kernel_times_split_gemms_from_the_rest_per_run(profile):
    fake_torch = type("T", (), {"autograd": type("A", (), {"DeviceType": type("D", (), {"CUDA": "cuda"})})})
    events = [_Event("nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", 3000.0),
              _Event("void cublasLt::splitKreduce_kernel<32, 16>", 1000.0),
              _Event("triton_per_fused_add_native_layer_norm", 500.0),
              _Event("nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", 3000.0),
              _Event("aten::linear", 99999.0, cuda=False)]  # a host event: not counted
    prof = type("P", (), {"events": lambda self: events})()
    found = profile._kernel_times(fake_torch, prof, 2)
    assert found["gemm_ms"] == pytest.approx(3.5) and found["other_ms"] == pytest.approx(0.25)
    assert found["gpu_ms"] == pytest.approx(3.75) and found["kernels"] == 2
    assert found["top"][0] == ["nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", 3.0]


def test_a_generation_s_idle_time_is_its_wall_time_less_its_kernels(profile):
    kernels = {"gpu_ms": 30.0, "gemm_ms": 23.0, "other_ms": 7.0, "kernels": 100, "top": []}
    found = profile.generation_figures(kernels, wall=58.0, steps=32)
    assert found["idle_ms"] == pytest.approx(28.0) and found["ms_per_step"] == pytest.approx(58.0 / 32, abs=1e-4)
    assert found["wall_ms"] == 58.0 and found["gemm_ms"] == 23.0

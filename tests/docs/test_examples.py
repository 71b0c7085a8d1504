"""Every example runs: the CPU ones everywhere, the GPU ones where a GPU is usable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    # -P: the installed package, not the checkout
    return subprocess.run([sys.executable, "-P", str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300)


def test_reference_example():
    result = _run("reference_2to4.py")
    assert result.returncode == 0, result.stderr
    assert "magnitude lost: 140.0" in result.stdout and "lost: 100.0" in result.stdout
    assert "0.5625 of the dense size" in result.stdout


@pytest.mark.gpu
def test_raw_bindings_example():
    result = _run("raw_bindings_fp16.py")
    assert result.returncode == 0, result.stderr
    assert "matches the NumPy reference" in result.stdout


@pytest.mark.gpu
def test_bert_ffn_example():
    result = _run("bert_ffn.py", "--batches", "1", "--repeat", "5")
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout


@pytest.mark.gpu
def test_torch_linear_example():
    pytest.importorskip("torch")
    result = _run("torch_linear.py")
    assert result.returncode == 0, result.stderr
    assert "relative error" in result.stdout


@pytest.mark.parametrize("name", ["int8_linear.py", "fp8_linear.py"])
def test_quantized_examples_on_the_reference(name):
    result = _run(name, "--cpu")
    assert result.returncode == 0, result.stderr
    assert "relative error vs float32" in result.stdout
    if name == "int8_linear.py":
        assert "hidden activations: int8" in result.stdout and "identical outputs" in result.stdout
        assert "quantized weights 2:4: True" in result.stdout
    else:
        assert "tensor weight scales" in result.stdout and "channel weight scales" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8_linear.py", "fp8_linear.py"])
def test_quantized_examples_on_the_gpu(name):
    result = _run(name)
    assert result.returncode == 0, result.stderr
    assert "running on the NumPy reference" not in result.stdout
    assert "relative error vs float32" in result.stdout
    if name == "int8_linear.py":
        assert "tuned configuration(s) kept" in result.stdout


@pytest.mark.gpu
def test_tuned_graph_example():
    result = _run("tuned_graph.py", "--m", "512", "--n", "1024", "--k", "1024")
    assert result.returncode == 0, result.stderr
    for name in ("matmul", "bound call", "graph replay"):
        assert f"{name:12s}: relative error" in result.stdout
    assert "per GEMM: matmul" in result.stdout


def test_torch_sparse_model_example():
    pytest.importorskip("torch", reason="the example needs PyTorch")
    result = _run("torch_sparse_model.py")
    assert result.returncode == 0, result.stderr
    assert "fused: 0 + 1" in result.stdout
    assert "a fresh model loaded from the sparse state dict gives identical outputs" in result.stdout
    assert "after a 4-row input the sparse layers hold 0 bytes beside their state" in result.stdout
    assert "input shapes the first sparse layer launches directly: [" in result.stdout


def test_every_example_is_tested():
    tested = {"reference_2to4.py", "raw_bindings_fp16.py", "bert_ffn.py", "torch_linear.py", "recipe_digits.py",
              "torch_sparse_model.py",
              "int8_linear.py", "fp8_linear.py", "tuned_graph.py", "torch_recipe.py",
              "tensor_parallel_mlp.py"}  # the last in test_distributed_engines.py (CPU) and test_distributed_gpu.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("command", [
    ["examples/raw_bindings_fp16.py"],
    ["examples/bert_ffn.py"],
    ["examples/tuned_graph.py"],
    ["examples/torch_linear.py"],
    ["examples/tensor_parallel_mlp.py", "--backend", "nccl"],
    ["-m", "pycusparselt", "demo", "--path", "gpu"],
    ["-c", "import pycusparselt as psl; psl.require_gpu()"],
    ["-c", "from pycusparselt import distributed as d; d.init_process_group('nccl')"],
])
def test_without_a_usable_gpu_one_line_says_so(command):
    """No GPU visible (CUDA_VISIBLE_DEVICES=''): one line naming the reason and what runs without a GPU, not
    a CUDA traceback."""
    import os

    root = EXAMPLES.parent
    if command[0] == "examples/torch_linear.py":
        pytest.importorskip("torch", reason="the example needs PyTorch")
    argv = [str(root / command[0]), *command[1:]] if command[0].endswith(".py") else command
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-P", *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "no usable GPU" in result.stderr
    if command[0] != "-c":  # scripts: one line, no traceback
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    else:  # a library call raises GpuUnavailableError: its message is one line
        assert result.stderr.strip().splitlines()[-1].startswith("pycusparselt.errors.GpuUnavailableError: ")
    if "init_process_group" in command[-1]:
        assert "init_process_group('host')" in result.stderr
    else:
        assert "the NumPy reference runs" in result.stderr


@pytest.mark.parametrize("cuda_visible", ["", None])
def test_require_gpu_for_scripts_prints_one_line_and_exits_non_zero(cuda_visible):
    """``psl.require_gpu(exit=True)``: where no GPU is usable, one line on stderr (no traceback) and status 1;
    where one is, nothing."""
    import os

    env = dict(os.environ)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    code = "import pycusparselt as psl; psl.require_gpu(exit=True); print('a GPU is usable')"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, env=env)
    import pycusparselt as psl

    if cuda_visible is None and psl.gpu_unavailable_reason() is None:
        assert result.returncode == 0 and result.stdout == "a GPU is usable\n" and result.stderr == ""
        return
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python: no usable GPU: "), result.stderr
    assert "the NumPy reference runs" in lines[0] and "Traceback" not in result.stderr


def test_torch_recipe_example_quick(tmp_path):
    """A smoke run prints the page's table, and runs again bit for bit: the same seed, the same numbers."""
    pytest.importorskip("torch", reason="the example needs PyTorch")
    pytest.importorskip("sklearn", reason="the example needs scikit-learn")
    import json

    runs, outputs = [], []
    for i, seeds in enumerate((["0", "1"], ["1"])):
        run = _run("torch_recipe.py", "--quick", "--seeds", *seeds, "--rst", "--json", str(tmp_path / f"{i}.json"))
        assert run.returncode == 0, run.stderr
        runs.append(json.loads((tmp_path / f"{i}.json").read_text()))
        outputs.append(run.stdout)
    result = outputs[0]
    assert "   * - CNN (" in result and "   * - transformer (" in result and " ± " in result
    assert len(runs[0]["rows"]) == 4 and runs[0]["rows"][2:] == runs[1]["rows"]  # seed 1, run twice
    for row in runs[0]["rows"]:
        assert row["permuted_kept_magnitude"] >= row["naive_kept_magnitude"]
    again = _run("torch_recipe.py", "--from-json", str(tmp_path / "0.json"), "--rst")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == result[result.index(".. list-table::"):].strip()


def test_every_example_is_listed_in_the_docs():
    listed = (EXAMPLES.parent / "docs" / "examples.rst").read_text()
    missing = [p.name for p in EXAMPLES.glob("*.py") if f"``{p.name}``" not in listed]
    assert missing == []


def test_the_base_install_brings_nothing_cuda():
    """`pip install .` on a machine without a GPU: CuPy and NVIDIA's wheels come only with the extras."""
    import re

    text = (EXAMPLES.parent / "pyproject.toml").read_text()
    base = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    names = [re.match(r"[A-Za-z0-9_.-]+", req).group(0) for req in re.findall(r'^\s*"([^"]+)"', base, re.M)]
    assert "cffi" in names and not [n for n in names if n.startswith(("cupy", "nvidia", "torch"))]


def _code_block_after(page: str, heading: str) -> str:
    import re
    import textwrap

    text = (EXAMPLES.parent / "docs" / page).read_text()
    section = text[text.index(heading):]
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section).group(1)
    return textwrap.dedent(block)


def test_the_quick_starts_cpu_step_runs_on_a_cpu_only_install(tmp_path):
    """The CPU snippet stands alone (it makes the layer it loads) and needs no GPU; the GPU snippet calls
    require_gpu before importing CuPy."""
    import os

    code = _code_block_after("quickstart.rst", "The same on the CPU")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-P", "-W", "ignore::RuntimeWarning", "-c", code + "\nprint(y.shape)"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 4096)"
    gpu = _code_block_after("quickstart.rst", "A layer on the GPU")
    assert gpu.index("psl.require_gpu(exit=True)") < gpu.index("import cupy")


def test_the_installation_page_lists_every_extra():
    import re

    extras = re.findall(r"^([a-z0-9]+) = \[", (EXAMPLES.parent / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], re.M)
    page = (EXAMPLES.parent / "docs" / "installation.rst").read_text()
    paragraph = page[page.index("Extras (as ``pyproject.toml`` lists them)"):].split("\n\n")[0]
    assert len(extras) >= 8 and [e for e in extras if f"``{e}``" not in paragraph] == []


def test_the_api_page_documents_public_modules_only():
    page = (EXAMPLES.parent / "docs" / "api.rst").read_text()
    assert "pycusparselt._native" not in page
    assert page.count("autofunction:: pycusparselt.require_gpu") == 1

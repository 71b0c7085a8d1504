"""Command line: ``python -m pycusparselt info | demo | bench``.

- ``info`` prints the loaded library (path, version), the versions of cffi, NumPy and CuPy, how products
  call the library (``matmul call``: the compiled shim or cffi's ABI mode), and each CUDA device with its
  compute capability and whether it has Sparse Tensor Cores, or plainly that there is no GPU.
- ``demo`` runs a small 2:4 sparse GEMM end to end: on a GPU through cuSPARSELt, otherwise on the NumPy
  reference, and says which.
- ``bench`` benchmarks 2:4 sparse GEMMs against dense cuBLAS and PyTorch (:mod:`pycusparselt.bench`).
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

import numpy as np

from ._native import gpu

__all__ = ["main"]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cupy_version() -> str:
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        version = _version(dist)
        if version != "not installed":
            return f"{version} ({dist})"
    return "not installed"


def source_checkout_note(package_dir: str | None = None) -> str | None:
    """A line for ``info`` where the package runs from a source checkout (a ``pyproject.toml`` beside it)
    without its build-time modules; None otherwise."""
    from pathlib import Path

    package = Path(package_dir or Path(__file__).resolve().parent)
    if not (package.parent / "pyproject.toml").is_file() or not (package.parent / "build_ffi.py").is_file():
        return None
    missing = [name for name in ("_cusparselt_cffi", "_fastcall")
               if not any(package.glob(f"{name}.py")) and not any(package.glob(f"{name}*.so"))
               and not any(package.glob(f"{name}*.pyd"))]
    if not missing:
        return None
    return (f"the source checkout at {package.parent} (it comes first on sys.path from that directory), without "
            f"its build-time module(s) {', '.join('pycusparselt.' + m for m in missing)}: run "
            f"`pip install -e .` there, or run from another directory (or with python -P) to use the installed "
            f"package")


def cmd_info(_args: argparse.Namespace) -> int:
    from . import __version__
    from . import bindings
    from ._native.library import load
    from ._native.devices import cuda_devices
    from .errors import LibraryNotFoundError

    print(f"pycusparselt {__version__} on Python {platform.python_version()} ({platform.machine()})")
    checkout = source_checkout_note()
    if checkout:
        print(f"source       {checkout}")
    try:
        loaded = load()
        print(f"cuSPARSELt   {'.'.join(map(str, loaded.version))} at {loaded.path} (found via {loaded.found_via})")
    except LibraryNotFoundError as exc:
        print(f"cuSPARSELt   not available: {exc}")
    print(f"cffi         {_version('cffi')}")
    print(f"matmul call  {bindings.matmul_call_path()}")
    print(f"NumPy        {np.__version__}")
    print(f"ml_dtypes    {_version('ml_dtypes')}")
    print(f"CuPy         {_cupy_version()}")
    devices, reason = cuda_devices()
    if reason:
        print(f"GPU          none: {reason}")
    for dev in devices:
        major, minor = dev.compute_capability
        sparse = "yes" if dev.sparse_tensor_cores else "no (needs SM 8.0+)"
        print(
            f"GPU {dev.index}        {dev.name}, SM {major}.{minor}, {dev.total_memory / 2**30:.1f} GiB, "
            f"Sparse Tensor Cores: {sparse}"
        )
    from .gemm import decode

    reason = decode.unavailable_reason() if devices else reason
    print(f"decode       {'available' if reason is None else f'not available: {reason}'} "
          f"(2:4 kernel for 1-16 rows, pycusparselt.gemm.decode)")
    return 0


def _demo_inputs(m: int, n: int, k: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return a, b


def _demo_reference(m: int, n: int, k: int) -> np.ndarray:
    from . import reference

    a, b = _demo_inputs(m, n, k, np.float16)
    a_sparse = reference.prune_2to4(a, axis=1)
    values, indices = reference.compress(a_sparse, axis=1)
    assert np.array_equal(reference.decompress(values, indices, axis=1), a_sparse)
    print(
        f"pruned A ({m}x{k}, float16) to 2:4 along K: {np.count_nonzero(a_sparse)} of {a.size} values kept; "
        f"compressed to {values.nbytes + indices.nbytes // 4} bytes of values and 2-bit metadata "
        f"(dense: {a.nbytes} bytes)"
    )
    return reference.matmul(a_sparse, b, out_dtype=np.float16)


def _demo_gpu(m: int, n: int, k: int) -> np.ndarray:
    """The raw call sequence through the thin bindings, on CuPy device memory."""
    cp = gpu.cupy()

    from . import bindings as b
    from .enums import ComputeType, DataType, MatmulDescAttribute, Operation, Order, PruneAlg
    from .gemm.plan import COMPRESSED_SLACK

    a_host, b_host = _demo_inputs(m, n, k, np.float16)
    a_dev, b_dev = cp.asarray(a_host), cp.asarray(b_host)
    d_dev = cp.empty((m, n), dtype=cp.float16)
    valid = cp.zeros(1, dtype=cp.int32)  # the check writes only on failure
    stream = cp.cuda.get_current_stream().ptr

    handle = b.RawHandle()
    mat_a, mat_b, mat_d = b.RawMatDescriptor(), b.RawMatDescriptor(), b.RawMatDescriptor()
    desc, selection, plan = b.RawMatmulDescriptor(), b.RawAlgSelection(), b.RawPlan()
    b.init(handle)
    try:
        b.structured_descriptor_init(handle, mat_a, m, k, k, 16, DataType.R_16F, Order.ROW)
        b.dense_descriptor_init(handle, mat_b, k, n, n, 16, DataType.R_16F, Order.ROW)
        b.dense_descriptor_init(handle, mat_d, m, n, n, 16, DataType.R_16F, Order.ROW)
        b.matmul_descriptor_init(
            handle, desc, Operation.NON_TRANSPOSE, Operation.NON_TRANSPOSE, mat_a, mat_b, mat_d, mat_d,
            ComputeType.COMPUTE_32F,
        )
        b.matmul_desc_set_attribute(handle, desc, MatmulDescAttribute.SPARSE_MAT_POINTER, a_dev.data.ptr)
        b.matmul_alg_selection_init(handle, selection, desc)
        b.matmul_plan_init(handle, plan, desc, selection)
        b.spmma_prune(handle, desc, a_dev.data.ptr, a_dev.data.ptr, PruneAlg.SPMMA_STRIP, stream)
        b.spmma_prune_check(handle, desc, a_dev.data.ptr, valid.data.ptr, stream)
        if int(valid.get()[0]) != 0:
            raise RuntimeError("cusparseLtSpMMAPruneCheck reports the pruned matrix is not 2:4")
        size, scratch_size = b.spmma_compressed_size(handle, plan)
        compressed = cp.empty(size + COMPRESSED_SLACK, dtype=cp.uint8)  # the kernels read past `size`
        scratch = cp.empty(max(scratch_size, 1), dtype=cp.uint8)
        b.spmma_compress(handle, plan, a_dev.data.ptr, compressed.data.ptr, scratch.data.ptr, stream)
        workspace = cp.empty(max(b.matmul_get_workspace(handle, plan), 1), dtype=cp.uint8)
        b.matmul(
            handle, plan, 1.0, compressed.data.ptr, b_dev.data.ptr, 0.0, d_dev.data.ptr, d_dev.data.ptr,
            workspace.data.ptr, [stream],
        )
        a_pruned = a_dev.get()
        print(
            f"pruned A ({m}x{k}, float16) to 2:4 on the GPU: {np.count_nonzero(a_pruned)} of {a_host.size} values "
            f"kept; compressed to {size} bytes (dense: {a_host.nbytes} bytes)"
        )
        result = d_dev.get()
    finally:
        for destroy, obj in (
            (b.matmul_plan_destroy, plan),
            (b.matmul_alg_selection_destroy, selection),
            (b.mat_descriptor_destroy, mat_a),
            (b.mat_descriptor_destroy, mat_b),
            (b.mat_descriptor_destroy, mat_d),
        ):
            if obj.initialized:
                destroy(obj)
        desc.release()
        b.destroy(handle)
    # Check against float64 products of the rounded, pruned inputs.
    expected = a_pruned.astype(np.float64) @ b_host.astype(np.float64)
    error = np.linalg.norm(result.astype(np.float64) - expected) / np.linalg.norm(expected)
    print(f"relative error against the float64 product of the pruned inputs: {error:.2e}")
    if not error < 1e-3:
        raise RuntimeError(f"GPU result is wrong: relative error {error:.2e}")
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    from ._native.devices import gpu_unavailable_reason

    m, n, k = args.m, args.n, args.k
    reason = None if args.path == "reference" else gpu_unavailable_reason()
    if args.path == "gpu" and reason:
        from ._native.devices import WITHOUT_GPU

        print(f"demo --path gpu: no usable GPU: {reason}; {WITHOUT_GPU}", file=sys.stderr)
        return 1
    if args.path == "reference" or reason:
        why = "as asked" if args.path == "reference" else f"no GPU path: {reason}"
        print(f"Running the 2:4 sparse GEMM D = A @ B ({m}x{k} @ {k}x{n}) on the NumPy reference ({why}).")
        result = _demo_reference(m, n, k)
    else:
        from ._native.library import load

        version = ".".join(map(str, load().version))
        print(f"Running the 2:4 sparse GEMM D = A @ B ({m}x{k} @ {k}x{n}) on the GPU through cuSPARSELt {version}.")
        result = _demo_gpu(m, n, k)
    print(f"D[:2, :4] =\n{result[:2, :4]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pycusparselt`` and the ``pycusparselt`` command."""
    parser = argparse.ArgumentParser(prog="pycusparselt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="library, package and GPU information").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="run a small 2:4 sparse GEMM end to end")
    demo.add_argument("--path", choices=("auto", "gpu", "reference"), default="auto",
                      help="where to run it (default: the GPU if one is usable, else the reference)")
    demo.add_argument("-m", type=int, default=256)
    demo.add_argument("-n", type=int, default=256)
    demo.add_argument("-k", type=int, default=256)
    demo.set_defaults(func=cmd_demo)
    from . import bench as _bench  # NumPy only at import: CuPy and PyTorch are imported when it runs

    bench = sub.add_parser("bench", help="benchmark 2:4 sparse GEMMs against dense cuBLAS and PyTorch")
    _bench.add_arguments(bench)
    bench.set_defaults(func=_bench.cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

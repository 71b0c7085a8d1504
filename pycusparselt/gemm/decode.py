"""A 2:4 sparse GEMM for decode: ``y[M, N] = act(alpha * x[M, K] @ W[N, K].T + b)`` for 1 to 16 rows of x.

At decode a GEMM reads its whole weight once, so its time is the weight's bytes over memory bandwidth. This
kernel streams the compressed weight (0.5625 of the dense FP16 bytes) once, in the layout of
``pycusparselt.gemm.decode_layout``, with 16-byte loads that hand each lane its registers for the Sparse
Tensor Core instruction ``mma.sp.m16n8k32`` (FP32 accumulation). It is CUDA C++ compiled at run time by
NVRTC through ``cupy.RawModule`` (cached by CuPy), so it needs no compiler.

Work split: a block of 4 warps owns 64 rows of W (one 16-row tile per warp) and one slice of K (``splits``
slices in all). It stages its slice of x in shared memory in the instruction's B-fragment order (16-byte
reads, no bank conflicts), then each warp streams its tile's chunks of the slice with the next chunk's loads
in flight while the current one is multiplied. With one slice the block applies the epilogue itself; with
several, each block writes its FP32 partial sums to a workspace and the last block of a row group (an atomic
ticket) adds the slices in a fixed order, applies the epilogue and resets its ticket, so results are
deterministic and the call needs no memset.

Epilogue (in FP32, then one rounding to the output type), as :func:`pycusparselt.reference.matmul` defines it
for ``D^T = W @ x^T`` with a per-output-feature bias: ``v = alpha * acc + bias``; ReLU
``v <= relu_threshold ? 0 : min(v, relu_upper_bound)``; GELU (tanh form) ``alpha * gelu(v / alpha) *
gelu_scaling`` with ``gelu(z) = z / (1 + exp(-2 * sqrt(2/pi) * (z + 0.044715 z^3)))``.

API
---
``DecodeGemm(weight, bias=None, *, activation=None, alpha=1.0, relu_threshold=0.0,
relu_upper_bound=inf, gelu_scaling=1.0, splits=None, device=None)``: packs a pruned weight once (only the
packed form stays on the GPU). ``gemm(x, out=None, stream=None)`` runs ``x`` of 1..16 rows (any row stride,
unit stride along K; CuPy arrays or PyTorch CUDA tensors) on ``stream`` (default: the current stream of x's
framework) and returns ``out`` (or a new array in x's framework). A call allocates nothing when ``out`` is
given and never synchronises the host, so it can be captured in a CUDA graph (after one call outside the
capture, or after :meth:`DecodeGemm.warm_up`). One instance serves one stream at a time (its split-K
workspace is shared by its calls). :func:`available` says whether it can run here; :func:`time_call` times
one configuration with CUDA events, for a tuner.

``DecodeGemm.from_compact(values, indices, bias=None, ...)`` reads a weight kept in the compact form of
``pycusparselt.torch.compact`` (the kept values and their positions, row-major; K a multiple of 256) where it
is, packing nothing: a lane loads 16-byte pieces of two rows and picks its registers from them, which reads
the weight's columns in the order ``decode_layout.compact_columns`` gives; the kernel stages x in that order
too, so the product is the same.

``gemm.launcher(m)`` gives a :class:`DecodeLauncher` for callers that checked their arrays once (a layer's
prepared call): ``launcher(x_ptr, y_ptr, stream_ptr)`` on raw addresses, one ``cuLaunchKernel`` with the other
arguments packed once. ``gemm.set_splits(s)`` changes the split of K (a tuner's choice), ``gemm.close()``
releases the packed weight (launchers then raise :class:`~pycusparselt.errors.ClosedError`).
:class:`~pycusparselt.SparseLinear` uses the kernel for inputs of 1 to 16 rows where it measures faster than
cuSPARSELt (:mod:`pycusparselt.nn.small_batch`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._native import gpu
from .._native.devices import SPARSE_MIN_CC, cuda_devices
from .._native.streams import call_stream
from .. import _arrays
from ..errors import ClosedError
from . import decode_layout as layout

__all__ = ["DecodeGemm", "DecodeLauncher", "available", "unavailable_reason", "time_call", "ACTIVATIONS", "WARPS",
           "COMPACT_K_MULTIPLE"]

#: The epilogue activations (None: none).
ACTIVATIONS = (None, "relu", "gelu")
#: Warps per block; each owns one 16-row tile of W.
WARPS = 4
#: The compact form (:meth:`DecodeGemm.from_compact`) is read in whole 256-column blocks.
COMPACT_K_MULTIPLE = 256
_ACT_CODE = {None: 0, "relu": 1, "gelu": 2}
#: Shared memory for the x slice, at most: 4 KiB per k-block and 8 rows of x.
_MAX_SMEM = 64 * 1024
#: Launchers a DecodeGemm keeps for its own calls (one per rows and strides).
_MAX_LAUNCHERS = 64
#: The kernel's arguments, in order, with the C type of each (what a launcher packs once).
_PARAMS = ("w", "x", "ldx", "y", "ldy", "bias", "ws", "tickets", "M", "N", "K", "NT", "KB", "KSL", "S", "x_vec",
           "alpha", "act", "p0", "p1", "wi")
_INT32 = frozenset(("M", "N", "K", "NT", "KB", "KSL", "S", "x_vec", "act"))
_FLOAT32 = frozenset(("alpha", "p0", "p1"))

_SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define CHUNK_U4 288   // 4608 bytes: 32 uint4 of metadata, 256 of values
#define WARPS 4

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

template <int BF16> __device__ __forceinline__ float to_f32(u16 h);
template <> __device__ __forceinline__ float to_f32<0>(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
template <> __device__ __forceinline__ float to_f32<1>(u16 h) { return __uint_as_float(((u32)h) << 16); }

template <int BF16> __device__ __forceinline__ u16 from_f32(float f);
template <> __device__ __forceinline__ u16 from_f32<0>(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
template <> __device__ __forceinline__ u16 from_f32<1>(float f) {
    u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}

template <int BF16, int SEL>
__device__ __forceinline__ void mma_sp(float* c, const uint4& a, const uint4& b, u32 e) {
    if (BF16) {
        asm volatile("mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w),
                       "r"(e), "n"(SEL));
    } else {
        asm volatile("mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w),
                       "r"(e), "n"(SEL));
    }
}

// x[0:M, k0 : k0 + nkb * 256] -> xs in B-fragment order: uint4 index (step * MB + mb) * 32 + (lane ^ (step & 7)),
// word j of lane (g, t) = x[8 mb + g][k0 + 32 step + 2 t + 8 j .. + 1]; zeros past M and K.
// COMPACT: the weight's columns are read in the order of decode_layout.compact_columns, so x is staged in it:
// segment sg (8 columns, groups 2 sg and 2 sg + 1 of its 256-column block) is logical step
// 2 ((sg & 31) >> 3) + (sg & 1), slots t' and t' + 4 (t' = (sg >> 1) & 3).
template <int MB, int COMPACT>
__device__ __forceinline__ void stage_x(u32* xs, const u16* __restrict__ x, long long ldx, int M, int K,
                                        int k0, int nkb, int vec) {
    const int segs_per_row = nkb * 32;             // 8-element segments per row of the slice
    const int total = MB * 8 * segs_per_row;
#pragma unroll 4
    for (int id = threadIdx.x; id < total; id += WARPS * 32) {
        const int m = id / segs_per_row, sg = id - m * segs_per_row;
        const int k = k0 + sg * 8;
        u32 w[4] = {0u, 0u, 0u, 0u};
        if (m < M) {
            const u16* row = x + (long long)m * ldx;
            if (vec && k + 8 <= K) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + k));
                w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const u32 h = (k + e < K) ? (u32)__ldg(row + k + e) : 0u;
                    w[e >> 1] |= h << (16 * (e & 1));
                }
            }
        }
        const int mb = m >> 3, g = m & 7;
        if (COMPACT) {
            const int sgb = sg & 31, tp = (sgb >> 1) & 3;
            const int step = (sg >> 5) * 8 + 2 * (sgb >> 3) + (sgb & 1);
            const int lane = g * 4 + 2 * (tp & 1), j = tp >> 1;
            u32* base = xs + ((step * MB + mb) * 32) * 4;
#pragma unroll
            for (int p = 0; p < 4; ++p)
                base[((lane + (p & 1)) ^ (step & 7)) * 4 + j + 2 * (p >> 1)] = w[p];
        } else {
            const int step = sg >> 2, j = sg & 3;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int lane = g * 4 + p;
                xs[(((step * MB + mb) * 32) + (lane ^ (step & 7))) * 4 + j] = w[p];
            }
        }
    }
}

__device__ __forceinline__ u32 word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One 16-row by 256-column chunk of W as a lane holds it.
// Packed (decode_layout's chunks): the metadata words and the 8 steps' A fragments, loaded as they are.
// Compact (pycusparselt.torch.compact's values and indices, row-major): lane (g, t) loads 16-byte pieces
// 4q + t (q = 0..3) of rows g and g + 8 of the block's values, and 16 of the 64 bytes of both rows' positions
// (shared by shuffles); step s takes words 2 (s & 1) and 2 (s & 1) + 1 of piece s >> 1 (the column order of
// decode_layout.compact_columns), and metadata word J takes nibble t of each byte pair of words 2J, 2J + 1.
template <int COMPACT> struct Chunk;

template <> struct Chunk<0> {
    uint4 m, v[8];
    __device__ __forceinline__ void load(const uint4* p) {
        m = ld_stream(p);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = ld_stream(p + 32 + 32 * i);
    }
    __device__ __forceinline__ uint4 frag(int st) const { return v[st]; }
    __device__ __forceinline__ u32 meta(int j, int) const { return word_of(m, j); }
};

__device__ __forceinline__ u32 nibbles_of(u32 a, u32 b, int t) {
    const int s = 4 * t;
    return ((a >> s) & 0xFu) | (((a >> (16 + s)) & 0xFu) << 4) | (((b >> s) & 0xFu) << 8) |
           (((b >> (16 + s)) & 0xFu) << 12);
}

// The 64 bytes of positions of rows g and g + 8 are loaded once by the four lanes of g (lane t: row
// g + 8 (t >> 1), half t & 1) and handed round by shuffles, so a lane keeps 16 bytes of them, not 64.
template <> struct Chunk<1> {
    uint4 v[8], m;
    __device__ __forceinline__ void load(const uint4* v0, const uint4* v1, const uint4* mi) {
#pragma unroll
        for (int q = 0; q < 4; ++q) { v[q] = ld_stream(v0 + 4 * q); v[4 + q] = ld_stream(v1 + 4 * q); }
        m = __ldg(mi);
    }
    __device__ __forceinline__ uint4 frag(int st) const {
        const int q = st >> 1, h = 2 * (st & 1);
        return make_uint4(word_of(v[q], h), word_of(v[4 + q], h), word_of(v[q], h + 1), word_of(v[4 + q], h + 1));
    }
    // word j: words 2j, 2j + 1 of each row (in half j >> 1 of its 32 bytes); call with the whole warp
    __device__ __forceinline__ u32 meta(int j, int lane) const {
        const int h = 2 * (j & 1), g0 = (lane & ~3) | (j >> 1), g8 = g0 | 2, t = lane & 3;
        const u32 a0 = __shfl_sync(~0u, word_of(m, h), g0), a1 = __shfl_sync(~0u, word_of(m, h + 1), g0);
        const u32 c0 = __shfl_sync(~0u, word_of(m, h), g8), c1 = __shfl_sync(~0u, word_of(m, h + 1), g8);
        return nibbles_of(a0, a1, t) | (nibbles_of(c0, c1, t) << 16);
    }
};

template <int BF16>
__device__ __forceinline__ float epilogue(float acc, float alpha, const u16* __restrict__ bias, int n, int act,
                                          float p0, float p1) {
    float v = alpha * acc;
    if (bias) v += to_f32<BF16>(bias[n]);
    if (act == 1) {            // ReLU: p0 threshold, p1 upper bound
        v = (v <= p0) ? 0.0f : v;
        v = (v > p1) ? p1 : v;
    } else if (act == 2) {     // GELU (tanh form): p0 scaling
        const float z = v / alpha;
        const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
        v = alpha * (z / (1.0f + expf(-2.0f * u))) * p0;
    }
    return v;
}

template <int BF16, int MB, int COMPACT>
__global__ void __launch_bounds__(WARPS * 32)
decode_gemm(const uint4* __restrict__ w, const u16* __restrict__ x, long long ldx, u16* __restrict__ y,
            long long ldy, const u16* __restrict__ bias, float* __restrict__ ws, u32* __restrict__ tickets,
            int M, int N, int K, int NT, int KB, int KSL, int S, int x_vec, float alpha, int act, float p0,
            float p1, const uint4* __restrict__ wi) {
    extern __shared__ uint4 xs[];
    __shared__ int s_last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = blockIdx.x, s = blockIdx.y;
    const int kb0 = s * KSL;
    const int nkb = min(KB, kb0 + KSL) - kb0;
    const int nt = group * WARPS + warp;
    const bool active = nt < NT;

    const int g = lane >> 2, t = lane & 3;
    // packed: this warp's chunks; compact: its rows g and g + 8 (rows past N read row N - 1, never written)
    const uint4* wp = w + ((long long)(active ? nt : 0) * KB + kb0) * CHUNK_U4 + lane;
    const long long r0 = min(nt * 16 + g, N - 1), r1 = min(nt * 16 + g + 8, N - 1);
    const uint4* v0 = w + r0 * (K >> 4) + kb0 * 16 + t;
    const uint4* v1 = w + r1 * (K >> 4) + kb0 * 16 + t;
    const uint4* mi = wi + ((t >> 1) ? r1 : r0) * (K >> 7) + kb0 * 2 + (t & 1);
    Chunk<COMPACT> cur;
    if (active) {
        if constexpr (COMPACT) cur.load(v0, v1, mi); else cur.load(wp);
    }
    stage_x<MB, COMPACT>(reinterpret_cast<u32*>(xs), x, ldx, M, K, kb0 * 256, nkb, x_vec);
    __syncthreads();

    float acc[MB][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) acc[mb][0] = acc[mb][1] = acc[mb][2] = acc[mb][3] = 0.0f;

    if (active) {
        for (int c = 0; c < nkb; ++c) {
            Chunk<COMPACT> nxt;
            const bool more = c + 1 < nkb;
            if (more) {
                if constexpr (COMPACT)
                    nxt.load(v0 + (c + 1) * 16, v1 + (c + 1) * 16, mi + (c + 1) * 2);
                else
                    nxt.load(wp + (c + 1) * CHUNK_U4);
            }
            const uint4* xc = xs + c * 8 * MB * 32;
            u32 e4[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) e4[j] = cur.meta(j, lane);
#pragma unroll
            for (int st = 0; st < 8; ++st) {
                const u32 e = e4[st >> 1];
                const uint4 a = cur.frag(st);
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    const uint4 b = xc[(st * MB + mb) * 32 + (lane ^ st)];
                    if (st & 1) mma_sp<BF16, 1>(acc[mb], a, b, e);
                    else        mma_sp<BF16, 0>(acc[mb], a, b, e);
                }
            }
            if (more) cur = nxt;
        }
    }

    const int Np = NT * 16;
    if (S > 1) {
        // this slice's partial sums -> the workspace; the last slice of the row group finishes
        if (active) {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int m = mb * 8 + 2 * t;
                if (m < M) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int n = nt * 16 + g + 8 * h;
                        float2 v = make_float2(acc[mb][2 * h], acc[mb][2 * h + 1]);
                        *reinterpret_cast<float2*>(ws + ((long long)s * Np + n) * 16 + m) = v;
                    }
                }
            }
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) s_last = (atomicAdd(tickets + group, 1u) == (u32)(S - 1));
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        if (active) {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int m = mb * 8 + 2 * t;
                acc[mb][0] = acc[mb][1] = acc[mb][2] = acc[mb][3] = 0.0f;
                if (m < M) {
                    for (int ss = 0; ss < S; ++ss) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int n = nt * 16 + g + 8 * h;
                            const float2* src = reinterpret_cast<const float2*>(ws + ((long long)ss * Np + n) * 16 + m);
                            const float2 v = __ldcg(src);
                            acc[mb][2 * h] += v.x;
                            acc[mb][2 * h + 1] += v.y;
                        }
                    }
                }
            }
        }
        if (threadIdx.x == 0) tickets[group] = 0u;
    }
    if (!active) return;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = nt * 16 + g + 8 * (i >> 1);
            const int m = mb * 8 + 2 * t + (i & 1);
            if (n < N && m < M)
                y[(long long)m * ldy + n] = from_f32<BF16>(epilogue<BF16>(acc[mb][i], alpha, bias, n, act, p0, p1));
        }
    }
}
"""

_NAMES = [f"decode_gemm<{bf},{mb},{c}>" for bf in (0, 1) for mb in (1, 2) for c in (0, 1)]
_modules: dict[int, Any] = {}


def _module(device: int) -> Any:
    """The compiled module for ``device`` (NVRTC, once per process and device; CuPy caches the binary on disk)."""
    mod = _modules.get(device)
    if mod is None:
        cupy = gpu.cupy()

        with cupy.cuda.Device(device):
            mod = cupy.RawModule(code=_SOURCE, options=("-std=c++17",), name_expressions=_NAMES)
            mod.compile()
        _modules[device] = mod
    return mod


def unavailable_reason(device: int = 0) -> str | None:
    """None where the kernel can run on ``device`` (CuPy, a GPU of SM 8.0 or newer); else why not."""
    devices, reason = cuda_devices()
    if reason:
        return reason
    if device >= len(devices):
        return f"no GPU {device} (this machine has {len(devices)})"
    if devices[device].compute_capability < SPARSE_MIN_CC:
        major, minor = devices[device].compute_capability
        return f"GPU {device} is SM {major}.{minor}; mma.sp needs SM 8.0 or newer"
    return None


def available(device: int = 0) -> bool:
    """Whether the decode kernel can run on ``device``."""
    return unavailable_reason(device) is None


def _view(a: Any, what: str) -> tuple[int, tuple[int, ...], tuple[int, ...], np.dtype, int]:
    """``(address, shape, strides in elements, dtype, device)`` of a CuPy array or a CUDA tensor, no copy."""
    dt = _arrays.dtype_of(a)
    if _arrays.is_torch(a):
        if not a.is_cuda:
            raise TypeError(f"{what}: expected a CUDA tensor, got a CPU tensor")
        return int(a.data_ptr()), tuple(a.shape), tuple(a.stride()), dt, int(a.device.index)
    if not _arrays.is_device(a):
        raise TypeError(f"{what}: expected a CuPy array or a CUDA tensor, got {type(a).__name__}")
    c = _arrays.as_cupy(a)
    return (int(c.data.ptr), tuple(c.shape), tuple(s // c.itemsize for s in c.strides), dt,
            int(c.device.id))


def _bits_on_device(a: Any, dtype: np.dtype) -> Any:
    """A 16-bit weight's bit patterns as a uint16 CuPy array on the current device (packing runs there)."""
    cupy = gpu.cupy()

    if _arrays.is_torch(a):
        import torch

        return _arrays.as_cupy(a.detach().contiguous().view(torch.int16)).view(cupy.uint16)
    if _arrays.is_device(a):
        return cupy.ascontiguousarray(_arrays.as_cupy(a)).view(cupy.uint16)
    return cupy.asarray(np.ascontiguousarray(np.asarray(a, dtype=dtype)).view(np.uint16))


def _default_splits(nt: int, kb: int, sms: int) -> int:
    """Slices of K that give about 4 blocks (16 warps) per multiprocessor."""
    groups = -(-nt // WARPS)
    return max(1, min(kb, round(4 * sms / groups)))


class DecodeGemm:
    """``y = act(alpha * x @ W.T + b)`` for 1 to 16 rows of x, with W 2:4 along K, on the decode kernel.

    Parameters
    ----------
    weight : array, shape (N, K), float16 or bfloat16
        The pruned weight (at most two non-zeros in every four consecutive elements of a row), as a CuPy
        array, a PyTorch tensor or a NumPy array. It is packed once (on the host) and only the packed form
        (``decode_layout.packed_nbytes(N, K)`` bytes) is kept on the GPU.
    bias : array, shape (N,), optional
        One value per output feature, of the weight's dtype.
    activation : {None, "relu", "gelu"}
    alpha : float
        Scale of the product (rounded to float32). Non-zero with GELU.
    relu_threshold, relu_upper_bound : float
        ReLU zeroes ``v <= relu_threshold`` and clips at ``relu_upper_bound``.
    gelu_scaling : float
        GELU's output is multiplied by this.
    splits : int, optional
        Slices of K (split-K across blocks); default: about 4 blocks per multiprocessor. A tuner may try
        others (:meth:`split_choices`).
    device : int, optional
        The GPU (default: the weight's for a device array, else the current one).

    Raises
    ------
    TypeError
        A dtype other than float16 / bfloat16, a bias of another dtype, an unknown activation.
    ValueError
        A weight that is not 2:4 along K (the first bad group is named), bad shapes, bad epilogue parameters.
    """

    def __init__(self, weight: Any, bias: Any = None, *, activation: str | None = None, alpha: float = 1.0,
                 relu_threshold: float = 0.0, relu_upper_bound: float = math.inf, gelu_scaling: float = 1.0,
                 splits: int | None = None, device: int | None = None) -> None:
        cupy = gpu.cupy()

        if device is None:
            device = _view(weight, "weight")[4] if _arrays.is_device(weight) else cupy.cuda.runtime.getDevice()
        wdt = _arrays.dtype_of(weight) if hasattr(weight, "dtype") else np.asarray(weight).dtype
        if wdt not in layout.DTYPES:
            raise TypeError(f"weight: expected float16 or bfloat16, got {wdt}")
        wshape = tuple(weight.shape) if hasattr(weight, "shape") else np.shape(weight)
        if len(wshape) != 2 or 0 in wshape:
            raise ValueError(f"weight: expected a non-empty (N, K) matrix, got shape {wshape}")
        self._setup(wshape, wdt, int(device), activation, alpha, relu_threshold, relu_upper_bound, gelu_scaling)
        with cupy.cuda.Device(self.device):
            self.packed = layout.pack_bits(_bits_on_device(weight, self.dtype), cupy)
        self.layout, self._weight = "packed", (self.packed,)
        self._finish(bias, splits)

    @classmethod
    def from_compact(cls, values: Any, indices: Any, bias: Any = None, *, activation: str | None = None,
                     alpha: float = 1.0, relu_threshold: float = 0.0, relu_upper_bound: float = math.inf,
                     gelu_scaling: float = 1.0, splits: int | None = None) -> DecodeGemm:
        """The kernel on a weight kept in the compact form of ``pycusparselt.torch.compact`` (a 2:4 weight's
        kept values and their positions, row-major), read where it is: nothing is packed or copied, so the
        weight's GPU memory is that form's alone (0.5625 of the dense bytes).

        Parameters
        ----------
        values : CUDA tensor or CuPy array, shape (N, K / 2), float16 or bfloat16
        indices : CUDA tensor or CuPy array, shape (N, K / 8), uint8
            C-contiguous, 16-byte aligned, on one GPU; ``K`` a multiple of 256 (``COMPACT_K_MULTIPLE``).
            They are read, not validated (the caller's form is valid by construction), and must outlive this
            object unchanged in place: a later edit is read by the next call.
        bias, activation, alpha, relu_threshold, relu_upper_bound, gelu_scaling, splits
            As the constructor; the device is the values'.

        Raises
        ------
        TypeError, ValueError
            Arrays not on a GPU, of other dtypes, shapes, strides or alignment (the argument is named).
        """
        vp, vshape, vstrides, vdt, vdev = _view(values, "values")
        ip, ishape, istrides, idt, idev = _view(indices, "indices")
        if vdt not in layout.DTYPES:
            raise TypeError(f"values: expected float16 or bfloat16, got {vdt}")
        if idt != np.uint8:
            raise TypeError(f"indices: expected uint8, got {idt}")
        if len(vshape) != 2 or 0 in vshape:
            raise ValueError(f"values: expected a non-empty (N, K / 2) matrix, got shape {vshape}")
        n, k = vshape[0], 2 * vshape[1]
        if k % COMPACT_K_MULTIPLE:
            raise ValueError(f"values: the compact kernel needs K (2 x {vshape[1]} = {k}) to be a multiple of "
                             f"{COMPACT_K_MULTIPLE}")
        if ishape != (n, k // 8):
            raise ValueError(f"indices: expected shape {(n, k // 8)} for values of shape {vshape}, got {ishape}")
        if idev != vdev:
            raise ValueError(f"indices: on device {idev}, values on device {vdev}")
        for name, ptr, shape, strides in (("values", vp, vshape, vstrides), ("indices", ip, ishape, istrides)):
            if strides != (shape[1], 1) or ptr % 16:
                raise ValueError(f"{name}: expected a C-contiguous, 16-byte aligned array, got strides {strides} "
                                 f"(elements) at address {ptr:#x}")
        self = cls.__new__(cls)
        self._setup((n, k), vdt, int(vdev), activation, alpha, relu_threshold, relu_upper_bound, gelu_scaling)
        self.packed = None
        self.layout, self._weight = "compact", (values, indices)
        self._pointers = (vp, ip)
        self._finish(bias, splits)
        return self

    def _setup(self, shape: tuple, dtype: np.dtype, device: int, activation: str | None, alpha: float,
               relu_threshold: float, relu_upper_bound: float, gelu_scaling: float) -> None:
        """The epilogue, checked, and the weight's facts."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {activation!r}")
        if activation != "relu" and (relu_threshold != 0.0 or relu_upper_bound != math.inf):
            raise ValueError("relu_threshold and relu_upper_bound need activation='relu'")
        if activation != "gelu" and gelu_scaling != 1.0:
            raise ValueError("gelu_scaling needs activation='gelu'")
        self.alpha = float(np.float32(alpha))
        if activation == "gelu" and self.alpha == 0.0:
            raise ValueError("alpha: must be non-zero with activation='gelu' (GELU acts on x / alpha)")
        self.device = device
        self.dtype = np.dtype(dtype)
        self.out_features, self.in_features = shape
        self.activation = activation
        self.relu_threshold = float(np.float32(relu_threshold))
        self.relu_upper_bound = float(np.float32(relu_upper_bound))
        self.gelu_scaling = float(np.float32(gelu_scaling))
        self.tiles, self.k_blocks = layout.packed_shape(*shape)[:2]

    def _finish(self, bias: Any, splits: int | None) -> None:
        """The bias, the split-K tickets and the compiled kernels."""
        cupy = gpu.cupy()

        props = cupy.cuda.runtime.getDeviceProperties(self.device)
        self._sms = int(props["multiProcessorCount"])
        with cupy.cuda.Device(self.device):
            self.bias = None
            if bias is not None:
                b = _arrays.to_numpy(bias)
                if b.dtype != self.dtype:
                    raise TypeError(f"bias: expected {self.dtype.name} (the weight's dtype), got {b.dtype}")
                if b.shape != (self.out_features,):
                    raise ValueError(f"bias: expected shape ({self.out_features},), got {b.shape}")
                self.bias = cupy.asarray(np.ascontiguousarray(b).view(np.uint16))
            self._tickets = cupy.zeros(-(-self.tiles // WARPS), np.uint32)
        self._launchers: dict[tuple, DecodeLauncher] = {}
        self._kernels = {}
        mod = _module(self.device)
        compact = int(self.layout == "compact")
        for mb in (1, 2):
            kernel = mod.get_function(f"decode_gemm<{int(self.dtype != np.float16)},{mb},{compact}>")
            kernel.max_dynamic_shared_size_bytes = _MAX_SMEM  # any split's slice of x fits
            self._kernels[mb] = kernel
        self.set_splits(_default_splits(self.tiles, self.k_blocks, self._sms) if splits is None else splits)

    @property
    def weight_pointers(self) -> tuple[int, int]:
        """The device addresses the kernel reads the weight from: ``(packed, 0)`` or ``(values, indices)``."""
        if self._weight is None:
            raise ClosedError("the decode kernel's weight was closed")
        if self.layout == "packed":
            return int(self.packed.data.ptr), 0
        return self._pointers

    def set_splits(self, splits: int) -> None:
        """Run on ``splits`` slices of K from now on (a tuner's choice; :meth:`split_choices` lists the ones
        worth trying). Launchers made before keep the slices they were made with."""
        cupy = gpu.cupy()

        splits = int(splits)
        if not 1 <= splits <= self.k_blocks:
            raise ValueError(f"splits: expected 1..{self.k_blocks} (the weight's 256-column blocks), got {splits}")
        per_split = -(-self.k_blocks // splits)
        if per_split * 8 * 2 * 512 > _MAX_SMEM:  # the slice of 16 rows of x must fit in shared memory
            per_split = _MAX_SMEM // (8 * 2 * 512)
        self.blocks_per_split = per_split
        self.splits = -(-self.k_blocks // per_split)
        size = self.splits * self.tiles * 16 * 16 if self.splits > 1 else 1
        if getattr(self, "_workspace", None) is None or self._workspace.size < size:
            with cupy.cuda.Device(self.device):
                self._workspace = cupy.empty(size, np.float32)
        self._grid = (-(-self.tiles // WARPS), self.splits, 1)
        self._launchers.clear()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has released the weight."""
        return self._weight is None

    def close(self) -> None:
        """Drop this object's packed weight and buffers (the garbage collector would too); launchers made from it
        then raise :class:`~pycusparselt.errors.ClosedError` instead of launching, and the memory returns to
        CuPy's pool once they are dropped as well (each keeps the buffers its arguments point at)."""
        self.packed = self._weight = self.bias = self._workspace = self._tickets = None
        self._launchers.clear()

    def __enter__(self) -> DecodeGemm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _smem(self, mb: int) -> int:
        return self.blocks_per_split * 8 * mb * 512

    def launcher(self, m: int, ldx: int | None = None, ldy: int | None = None) -> DecodeLauncher:
        """The kernel on ``m`` rows (1..16) with row strides ``ldx`` and ``ldy`` (elements; default K and N) and
        this object's splits, as ``launcher(x_ptr, y_ptr, stream_ptr)`` on raw addresses: for a caller that
        checked its arrays once (a layer's prepared call). Nothing is checked per call but that this object is
        open."""
        m = int(m)
        ldx = self.in_features if ldx is None else int(ldx)
        ldy = self.out_features if ldy is None else int(ldy)
        if not 1 <= m <= layout.MAX_ROWS:
            raise ValueError(f"m: expected 1..{layout.MAX_ROWS} rows, got {m}")
        if ldx < self.in_features or ldy < self.out_features:
            raise ValueError(f"ldx, ldy: expected at least {self.in_features} and {self.out_features}, got "
                             f"{ldx} and {ldy}")
        if self.closed:
            raise ClosedError("the decode kernel's weight was closed")
        return DecodeLauncher(self, m, ldx, ldy)

    @staticmethod
    def split_choices(out_features: int, in_features: int) -> list[int]:
        """The ``splits`` worth trying for a weight of this shape (for a tuner): powers of two up to its
        number of 256-column blocks."""
        kb = layout.packed_shape(out_features, in_features)[1]
        return [s for s in (1, 2, 4, 8, 16, 32) if s <= kb]

    @property
    def nbytes(self) -> int:
        """Bytes of the weight the kernel reads (the packed buffer, or the compact form's two arrays)."""
        if self.layout == "packed":
            return int(self.packed.nbytes)
        return self.out_features * self.in_features * self.dtype.itemsize // 2 + self.out_features * (
            self.in_features // 8)

    def warm_up(self) -> None:
        """Compile and load the kernel now (outside any CUDA graph capture); the constructor already does."""
        _module(self.device)

    def __call__(self, x: Any, out: Any = None, stream: Any = None) -> Any:
        """``act(alpha * x @ W.T + b)``.

        Parameters
        ----------
        x : CuPy array or CUDA tensor, shape (M, K) or (K,), the weight's dtype
            1 to 16 rows, any positive row stride, unit stride along K, on the layer's device.
        out : CuPy array or CUDA tensor, shape (M, N) (or (N,) for a vector x), optional
            Written in place (any row stride, unit stride along N); nothing is allocated.
        stream : optional
            A CuPy stream, an object with ``__cuda_stream__``, or a raw handle; default: the current stream of
            x's framework.

        Returns
        -------
        ``out``, or a new array in x's framework.
        """
        if self.closed:
            raise ClosedError("the decode kernel's weight was closed")
        vector = len(getattr(x, "shape", ())) == 1
        xp_, xshape, xstrides, xdt, xdev = _view(x, "x")
        if vector:
            xshape, xstrides = (1,) + xshape, (xshape[0],) + xstrides
        if len(xshape) != 2:
            raise ValueError(f"x: expected shape (M, K) or (K,), got {xshape}")
        m, k = xshape
        if k != self.in_features:
            raise ValueError(f"x: expected {self.in_features} columns (in_features), got {k}")
        if not 1 <= m <= layout.MAX_ROWS:
            raise ValueError(f"x: expected 1..{layout.MAX_ROWS} rows, got {m}")
        if xdt != self.dtype:
            raise TypeError(f"x: expected {self.dtype.name} (the weight's dtype), got {xdt}")
        if xdev != self.device:
            raise ValueError(f"x: on device {xdev}, the weight on device {self.device}")
        if xstrides[1] != 1 or (m > 1 and xstrides[0] < k):
            raise ValueError(f"x: expected unit stride along K and a row stride >= K, got strides {xstrides} "
                             f"(elements)")
        ldx = xstrides[0] if m > 1 else k
        n = self.out_features
        if out is None:
            out = _arrays.empty(x, (n,) if vector else (m, n), self.dtype, self.device)
        yp, yshape, ystrides, ydt, ydev = _view(out, "out")
        if tuple(yshape) != ((n,) if vector else (m, n)):
            raise ValueError(f"out: expected shape {(n,) if vector else (m, n)}, got {tuple(yshape)}")
        if ydt != self.dtype:
            raise TypeError(f"out: expected {self.dtype.name}, got {ydt}")
        if ydev != self.device:
            raise ValueError(f"out: on device {ydev}, the weight on device {self.device}")
        if ystrides[-1] != 1 or (not vector and m > 1 and ystrides[0] < n):
            raise ValueError(f"out: expected unit stride along N and a row stride >= N, got strides {ystrides}")
        ldy = ystrides[0] if not vector and m > 1 else n
        sp = call_stream(stream, x, self.device)
        self._launch(xp_, ldx, m, yp, ldy, sp)
        return out

    def _launch(self, xp_: int, ldx: int, m: int, yp: int, ldy: int, sp: int) -> None:
        key = (m, ldx, ldy)
        launch = self._launchers.get(key)
        if launch is None:
            if len(self._launchers) >= _MAX_LAUNCHERS:
                self._launchers.clear()
            launch = self._launchers[key] = self.launcher(m, ldx, ldy)
        launch(xp_, yp, sp)

    def __repr__(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (f"DecodeGemm({self.out_features} x {self.in_features}, {self.dtype.name}{act}, {self.layout}, "
                f"splits={self.splits}, {self.nbytes} bytes)")


class DecodeLauncher:
    """:class:`DecodeGemm`'s kernel on fixed rows and strides: ``launcher(x_ptr, y_ptr, stream_ptr)`` launches
    it on raw device addresses (x: ``m`` rows of stride ``ldx``; y: ``m`` rows of stride ``ldy``) through the
    CUDA driver, with every other argument packed once. Made by :meth:`DecodeGemm.launcher`. A call checks that
    the weight is open and the device current (switching to it if not), nothing else; it allocates nothing and
    never synchronises, so it can be captured in a CUDA graph. Its argument block and its kernel's split-K
    workspace are shared by its calls: one thread and one stream at a time."""

    __slots__ = ("gemm", "m", "ldx", "ldy", "device", "_values", "_ints", "_params", "_fn", "_dims", "_get_device",
                 "_vec_rows", "_keep", "_launch", "_params_at")

    def __init__(self, gemm: DecodeGemm, m: int, ldx: int, ldy: int) -> None:
        cupy = gpu.cupy()

        self.gemm, self.m, self.ldx, self.ldy, self.device = gemm, m, ldx, ldy, gemm.device
        mb = 1 if m <= 8 else 2
        p0, p1 = ((gemm.relu_threshold, gemm.relu_upper_bound) if gemm.activation == "relu"
                  else (gemm.gelu_scaling, 0.0))
        w_ptr, wi_ptr = gemm.weight_pointers
        given = {"w": w_ptr, "wi": wi_ptr, "x": 0, "ldx": ldx, "y": 0, "ldy": ldy,
                 "bias": 0 if gemm.bias is None else gemm.bias.data.ptr, "ws": gemm._workspace.data.ptr,
                 "tickets": gemm._tickets.data.ptr, "M": m, "N": gemm.out_features, "K": gemm.in_features,
                 "NT": gemm.tiles, "KB": gemm.k_blocks, "KSL": gemm.blocks_per_split, "S": gemm.splits, "x_vec": 0,
                 "alpha": gemm.alpha, "act": _ACT_CODE[gemm.activation], "p0": p0, "p1": p1}
        # one 8-byte slot per argument (pointers, int64); int32 and float32 values sit in a slot's low half
        self._values = np.zeros(len(_PARAMS), np.uint64)
        self._ints = self._values.view(np.int32)
        floats = self._values.view(np.float32)
        for i, name in enumerate(_PARAMS):
            if name in _INT32:
                self._ints[2 * i] = given[name]
            elif name in _FLOAT32:
                floats[2 * i] = given[name]
            else:
                self._values[i] = given[name]
        base = self._values.ctypes.data
        self._params = np.array([base + 8 * i for i in range(len(_PARAMS))], np.uint64)
        self._params_at = self._params.ctypes.data
        # 16-byte loads of x need 16-byte aligned rows: the row stride here, the address per call
        self._vec_rows = ldx % 8 == 0
        with cupy.cuda.Device(self.device):
            self._fn = gemm._kernels[mb].kernel.ptr
        grid = gemm._grid
        self._dims = (grid[0], grid[1], 1, WARPS * 32, 1, 1, gemm._smem(mb))
        self._get_device = cupy.cuda.runtime.getDevice
        # the buffers its arguments point at stay alive with it (a later set_splits may allocate others)
        self._keep = (gemm._weight, gemm.bias, gemm._workspace, gemm._tickets)
        from cupy_backends.cuda.api import driver

        self._launch = driver.launchKernel  # cuLaunchKernel; raises on a failed launch

    def __call__(self, x_ptr: int, y_ptr: int, stream_ptr: int) -> None:
        """Launch on input ``x_ptr`` and output ``y_ptr`` (device addresses) on stream ``stream_ptr``."""
        if self.gemm._weight is None:
            raise ClosedError("the decode kernel's weight was closed")
        values = self._values
        values[1] = x_ptr
        values[3] = y_ptr
        self._ints[30] = self._vec_rows and x_ptr % 16 == 0  # x_vec: argument 15
        if self._get_device() != self.device:
            cupy = gpu.cupy()

            with cupy.cuda.Device(self.device):
                self._launch(self._fn, *self._dims, stream_ptr, self._params_at, 0)
        else:
            self._launch(self._fn, *self._dims, stream_ptr, self._params_at, 0)

    def __repr__(self) -> str:
        return f"<DecodeLauncher of {self.m} rows on {self.gemm!r}>"


def time_call(gemm: DecodeGemm, x: Any, out: Any, *, repeats: int = 50, warmup: int = 5) -> float:
    """The median time in microseconds of ``gemm(x, out)`` on CuPy's current stream, by CUDA events around each
    call (for a tuner comparing it with cuSPARSELt's configurations on the same inputs)."""
    cupy = gpu.cupy()

    for _ in range(warmup):
        gemm(x, out)
    stream = cupy.cuda.get_current_stream()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        gemm(x, out, stream=stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))

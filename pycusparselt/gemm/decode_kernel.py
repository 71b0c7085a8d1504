"""The decode kernel's CUDA C++ source (compiled at run time by NVRTC through CuPy, in
:mod:`pycusparselt.gemm.decode`): a 2:4 skinny GEMM on ``mma.sp.m16n8k32`` reading the packed layout of
:mod:`pycusparselt.gemm.decode_layout` or the compact form of :mod:`pycusparselt.torch.compact`, with split-K
by tickets and programmatic dependent launch (SM 9.0+). :mod:`pycusparselt.gemm.decode` documents the work
split, the epilogue and the launch."""

from __future__ import annotations

__all__ = ["SOURCE", "NAMES"]

#: The kernel template's instantiations: ``decode_gemm<BF16, MB, COMPACT>`` (MB: 8-row blocks of x, 1 or 2).
NAMES = [f"decode_gemm<{bf},{mb},{c}>" for bf in (0, 1) for mb in (1, 2) for c in (0, 1)]

SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define CHUNK_U4 288   // 4608 bytes: 32 uint4 of metadata, 256 of values
#define WARPS 4
#define PREFETCH_CHUNKS 4  // chunks of its slice a warp asks L2 for before its inputs are ready

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// Programmatic dependent launch (SM 9.0+; no-ops where the launch made no programmatic edge): what runs before
// inputs_ready() overlaps the previous kernel's tail and may touch nothing that kernel writes.
__device__ __forceinline__ void inputs_ready() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void next_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
// A hint that brings [p, p + bytes) into L2 (16-byte aligned, a multiple of 16): L2 is coherent with every
// writer, so it is safe before inputs_ready().
__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
#endif
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
    if (active) {
        const int pf = min(nkb, PREFETCH_CHUNKS);
        if constexpr (COMPACT) {
            // lanes 0-15: the values of row 16 nt + lane; lanes 16-31: that row's positions
            const long long r = min(nt * 16 + (lane & 15), N - 1);
            if (lane < 16) prefetch_l2(w + r * (K >> 4) + kb0 * 16, pf * 256);
            else           prefetch_l2(wi + r * (K >> 7) + kb0 * 2, pf * 32);
        } else if (lane == 0) {
            prefetch_l2(w + ((long long)nt * KB + kb0) * CHUNK_U4, pf * CHUNK_U4 * 16);
        }
    }
    next_may_launch();
    inputs_ready();  // x, the bias, y, the workspace and the weight's registers only from here on

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

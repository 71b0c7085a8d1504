/* Host time per cusparseLtMatmul call, measured in C: the floor that pycusparselt's Python calls are
 * compared against (benchmarks/host_overhead.py builds and runs this program).
 *
 *   host_overhead ITERS REPEATS MxNxK [MxNxK ...]
 *
 * For each problem: D (M, N) = A (M, K) @ B (K, N), FP16 in and out, FP32 compute, A 2:4 sparse, every matrix
 * row-major, the library's default configuration: the same plan as pycusparselt's
 * SparseMatmulPlan(a, b) on C-contiguous float16 arrays. After warm-up it times REPEATS loops of ITERS calls
 * on the legacy default stream, with no synchronisation inside a loop: wall-clock time around the enqueue loop
 * (host time per call) and CUDA events around it (GPU time per call; it equals the host time where the GPU
 * waits on the host). Prints one JSON object per problem with the medians and minima over the repeats.
 *
 * Plain C apart from the header, which is C++ in cuSPARSELt 0.8 (<cstddef>): hence a .cu file.
 * Build: nvcc -O2 -o host_overhead host_overhead.cu -I<cusparseLt include> <libcusparseLt.so.0> -lcudart
 */
#include <cuda_runtime.h>
#include <cusparseLt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK_CUDA(call)                                                                              \
    do {                                                                                              \
        cudaError_t err_ = (call);                                                                    \
        if (err_ != cudaSuccess) {                                                                    \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_));  \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

#define CHECK_LT(call)                                                                                \
    do {                                                                                              \
        cusparseStatus_t st_ = (call);                                                                \
        if (st_ != CUSPARSE_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #call,                       \
                    cusparseLtGetErrorName(st_), cusparseLtGetErrorString(st_));                      \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int count) {
    qsort(values, (size_t)count, sizeof(double), compare);
    return count % 2 ? values[count / 2] : 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

/* FP16 bit patterns of magnitudes 0.5 .. 2 with random signs (a small LCG: the values do not matter). */
static void fill_half(uint16_t *data, size_t count, uint32_t seed) {
    uint32_t state = seed * 2654435761u + 1u;
    for (size_t i = 0; i < count; ++i) {
        state = state * 1664525u + 1013904223u;
        uint16_t sign = (uint16_t)((state >> 31) << 15);
        uint16_t exponent = (uint16_t)(14 + ((state >> 20) & 1)) << 10;
        uint16_t mantissa = (uint16_t)((state >> 8) & 0x3FF);
        data[i] = sign | exponent | mantissa;
    }
}

static void run(const cusparseLtHandle_t *handle, int64_t m, int64_t n, int64_t k, int iters, int repeats) {
    const size_t a_count = (size_t)(m * k), b_count = (size_t)(k * n), d_count = (size_t)(m * n);
    uint16_t *host = (uint16_t *)malloc((a_count > b_count ? a_count : b_count) * sizeof(uint16_t));
    void *d_a, *d_b, *d_d, *d_compressed, *d_scratch = NULL, *d_workspace = NULL;
    int *d_valid;
    CHECK_CUDA(cudaMalloc(&d_a, a_count * 2));
    CHECK_CUDA(cudaMalloc(&d_b, b_count * 2));
    CHECK_CUDA(cudaMalloc(&d_d, d_count * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_valid, sizeof(int)));
    fill_half(host, a_count, 1);
    CHECK_CUDA(cudaMemcpy(d_a, host, a_count * 2, cudaMemcpyHostToDevice));
    fill_half(host, b_count, 2);
    CHECK_CUDA(cudaMemcpy(d_b, host, b_count * 2, cudaMemcpyHostToDevice));
    free(host);

    cusparseLtMatDescriptor_t mat_a, mat_b, mat_d;
    cusparseLtMatmulDescriptor_t matmul;
    cusparseLtMatmulAlgSelection_t selection;
    cusparseLtMatmulPlan_t plan;
    cudaStream_t stream = 0;
    CHECK_LT(cusparseLtStructuredDescriptorInit(handle, &mat_a, m, k, k, 16, CUDA_R_16F, CUSPARSE_ORDER_ROW,
                                                CUSPARSELT_SPARSITY_50_PERCENT));
    CHECK_LT(cusparseLtDenseDescriptorInit(handle, &mat_b, k, n, n, 16, CUDA_R_16F, CUSPARSE_ORDER_ROW));
    CHECK_LT(cusparseLtDenseDescriptorInit(handle, &mat_d, m, n, n, 16, CUDA_R_16F, CUSPARSE_ORDER_ROW));
    CHECK_LT(cusparseLtMatmulDescriptorInit(handle, &matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                            CUSPARSE_OPERATION_NON_TRANSPOSE, &mat_a, &mat_b, &mat_d, &mat_d,
                                            CUSPARSE_COMPUTE_32F));
    CHECK_LT(cusparseLtMatmulDescSetAttribute(handle, &matmul, CUSPARSELT_MATMUL_SPARSE_MAT_POINTER, &d_a,
                                              sizeof(d_a)));
    CHECK_LT(cusparseLtMatmulAlgSelectionInit(handle, &selection, &matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    CHECK_LT(cusparseLtMatmulPlanInit(handle, &plan, &matmul, &selection));

    CHECK_LT(cusparseLtSpMMAPrune(handle, &matmul, d_a, d_a, CUSPARSELT_PRUNE_SPMMA_STRIP, stream));
    CHECK_LT(cusparseLtSpMMAPruneCheck(handle, &matmul, d_a, d_valid, stream));
    int valid = 1;
    CHECK_CUDA(cudaMemcpy(&valid, d_valid, sizeof(int), cudaMemcpyDeviceToHost));
    if (valid != 0) {
        fprintf(stderr, "the pruned matrix is not 2:4\n");
        exit(1);
    }
    size_t compressed_size, scratch_size, workspace_size;
    CHECK_LT(cusparseLtSpMMACompressedSize(handle, &plan, &compressed_size, &scratch_size));
    CHECK_CUDA(cudaMalloc(&d_compressed, compressed_size));
    CHECK_CUDA(cudaMalloc(&d_scratch, scratch_size ? scratch_size : 16));
    CHECK_LT(cusparseLtSpMMACompress(handle, &plan, d_a, d_compressed, d_scratch, stream));
    CHECK_LT(cusparseLtMatmulGetWorkspace(handle, &plan, &workspace_size));
    CHECK_CUDA(cudaMalloc(&d_workspace, workspace_size ? workspace_size : 16));

    float alpha = 1.0f, beta = 0.0f;
    for (int i = 0; i < 20; ++i)
        CHECK_LT(cusparseLtMatmul(handle, &plan, &alpha, d_compressed, d_b, &beta, d_d, d_d, d_workspace,
                                  &stream, 1));
    CHECK_CUDA(cudaDeviceSynchronize());

    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    double *host_us = (double *)malloc(sizeof(double) * (size_t)repeats);
    double *gpu_us = (double *)malloc(sizeof(double) * (size_t)repeats);
    for (int r = 0; r < repeats; ++r) {
        CHECK_CUDA(cudaEventRecord(start, stream));
        double t0 = now_us();
        for (int i = 0; i < iters; ++i)
            cusparseLtMatmul(handle, &plan, &alpha, d_compressed, d_b, &beta, d_d, d_d, d_workspace, &stream, 1);
        double t1 = now_us();
        CHECK_CUDA(cudaEventRecord(stop, stream));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms = 0.0f;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        host_us[r] = (t1 - t0) / iters;
        gpu_us[r] = (double)ms * 1e3 / iters;
    }
    /* the loop's calls were not checked one by one (that would add to the time): check the last one now */
    CHECK_LT(cusparseLtMatmul(handle, &plan, &alpha, d_compressed, d_b, &beta, d_d, d_d, d_workspace, &stream, 1));
    CHECK_CUDA(cudaDeviceSynchronize());
    double host_median = median(host_us, repeats), host_min = host_us[0];
    double gpu_median = median(gpu_us, repeats), gpu_min = gpu_us[0];
    printf("{\"m\": %lld, \"n\": %lld, \"k\": %lld, \"iters\": %d, \"repeats\": %d, \"host_us\": %.3f, "
           "\"host_us_min\": %.3f, \"gpu_us\": %.3f, \"gpu_us_min\": %.3f, \"workspace_bytes\": %zu}\n",
           (long long)m, (long long)n, (long long)k, iters, repeats, host_median, host_min, gpu_median, gpu_min,
           workspace_size);
    fflush(stdout);

    free(host_us);
    free(gpu_us);
    CHECK_CUDA(cudaEventDestroy(start));
    CHECK_CUDA(cudaEventDestroy(stop));
    CHECK_LT(cusparseLtMatmulPlanDestroy(&plan));
    CHECK_LT(cusparseLtMatmulAlgSelectionDestroy(&selection));
    CHECK_LT(cusparseLtMatDescriptorDestroy(&mat_a));
    CHECK_LT(cusparseLtMatDescriptorDestroy(&mat_b));
    CHECK_LT(cusparseLtMatDescriptorDestroy(&mat_d));
    CHECK_CUDA(cudaFree(d_a));
    CHECK_CUDA(cudaFree(d_b));
    CHECK_CUDA(cudaFree(d_d));
    CHECK_CUDA(cudaFree(d_valid));
    CHECK_CUDA(cudaFree(d_compressed));
    CHECK_CUDA(cudaFree(d_scratch));
    CHECK_CUDA(cudaFree(d_workspace));
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ITERS REPEATS MxNxK [MxNxK ...]\n", argv[0]);
        return 2;
    }
    int iters = atoi(argv[1]), repeats = atoi(argv[2]);
    if (iters < 1 || repeats < 1) {
        fprintf(stderr, "ITERS and REPEATS must be positive, got %s and %s\n", argv[1], argv[2]);
        return 2;
    }
    cusparseLtHandle_t handle;
    CHECK_LT(cusparseLtInit(&handle));
    for (int i = 3; i < argc; ++i) {
        long long m, n, k;
        if (sscanf(argv[i], "%lldx%lldx%lld", &m, &n, &k) != 3 || m < 1 || n < 1 || k < 1) {
            fprintf(stderr, "problem %d: expected MxNxK with positive integers, got %s\n", i - 2, argv[i]);
            return 2;
        }
        run(&handle, m, n, k, iters, repeats);
    }
    CHECK_LT(cusparseLtDestroy(&handle));
    return 0;
}

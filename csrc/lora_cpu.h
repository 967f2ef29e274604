// CPU kernels of the LoRA dropout-masked rank-r projection (OpenMP + SIMD).
//
// Layouts: x [M, K] with row stride ldx and unit column stride; A [R, K] contiguous; xa, g [M, R]
// contiguous; B [N, R] contiguous; y, dy [M, N] with row strides ldy / lddy; dx [M, K] with row
// stride lddx; dA [R, K] and dB [N, R] contiguous.  keep(m, k) comes from rng.h; kept elements
// are scaled by `scale` = 1 / (1 - p).  T is float or double.
//
// Each call is one OpenMP parallel region.  On a machine whose cores are shared, every fork/join
// can wait a scheduler tick for a preempted worker, so the LoRA extras of a pass are fused into
// one region each instead of a handful of small torch GEMMs.
#pragma once

#include <cstdint>

#include "cpu_common.h"  // set_num_threads, get_num_threads, has_openmp, simd_name

namespace peftcore {
namespace cpu {

// xa[m, r] = scale * sum_k keep(m, k) * x[m, k] * A[r, k]
// and, when y != nullptr, y[m, n] += scaling * sum_r xa[m, r] * B[n, r]   (B [N, R]).
template <typename T>
void down_fwd(const T* x, int64_t ldx, const T* a, T* xa, int64_t M, int64_t K, int64_t R,
              uint32_t seed, uint32_t threshold, double scale, int nthreads, T* y = nullptr,
              int64_t ldy = 0, const T* b = nullptr, int64_t N = 0, double scaling = 1.0);

// Given g [M, R]:
// dx[m, k] += keep(m, k) * scale * sum_r g[m, r] * A[r, k]     (skipped when dx == nullptr)
// dA[r, k]  = sum_m g[m, r] * keep(m, k) * scale * x[m, k]      (skipped when da == nullptr)
template <typename T>
void down_bwd(const T* g, const T* a, const T* x, int64_t ldx, T* dx, int64_t lddx, T* da,
              int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t threshold, double scale,
              int nthreads);

// The whole LoRA-side backward in one pass over row chunks, g = scaling * dy B never leaving
// the chunk's cache:
//   dx[m, k] += keep * scale * sum_r g[m, r] A[r, k]             (dx != nullptr)
//   dA[r, k]  = sum_m g[m, r] keep * scale * x[m, k]             (da != nullptr)
//   dB[n, r]  = scaling * sum_m dy[m, n] xa[m, r]                (db != nullptr)
// Partial sums live per row chunk, and the chunks depend on the shape alone and are summed in a
// fixed order: results do not depend on the number of threads.
template <typename T>
void lora_bwd(const T* dy, int64_t lddy, const T* b, const T* xa, const T* a, const T* x,
              int64_t ldx, T* dx, int64_t lddx, T* da, T* db, int64_t M, int64_t N, int64_t K,
              int64_t R, uint32_t seed, uint32_t threshold, double scale, double scaling,
              int nthreads);

// out[m, k] = keep(m, k) as 0/1 bytes, [M, K] contiguous.  For tests.
void keep_mask(uint8_t* out, int64_t M, int64_t K, uint32_t seed, uint32_t threshold, int nthreads);

}  // namespace cpu
}  // namespace peftcore

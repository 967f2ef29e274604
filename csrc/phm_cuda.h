// CUDA kernels of the PHM linear.  Same math and layouts as phm_cpu.h, plus: inputs are float,
// half or bfloat16 (DType of lora_cuda.h) with fp32 accumulation; W_l comes transposed to
// [n, k, P] (w_left_t, so every kernel reads it with unit stride); y, t, dx [M, ...] are
// contiguous; every launch goes on `stream` (a cudaStream_t as an integer) of the current device.
//
// The planning below is header-only so that the argument checks (compiled with or without CUDA)
// and the kernels agree on tile sizes, chunks and the workspace.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora_cuda.h"  // DType, compiled()

namespace peftcore {
namespace cuda {

// A block works on tiles of phm_tile_rows(n, k) rows whose per-row intermediates (t, du, dt, u:
// 4 x n x n*k floats) and the rule (plus the drule partial: 2 x n^3 floats) sit in shared memory.
constexpr int64_t kPhmSmemFloats = 12288;  // 48 KiB, the limit without an opt-in attribute

inline int64_t phm_base_floats(int64_t n, int64_t k, int64_t rows) {
  return 2 * n * n * n + 4 * rows * n * n * k;
}

// Rows per tile (16, 8, 4, 2 or 1), or 0 when even one row does not fit: n or k too large.
inline int phm_tile_rows(int64_t n, int64_t k) {
  if (n < 1 || k < 1 || n > 64 || k > kPhmSmemFloats) return 0;
  for (int rows = 16; rows >= 1; rows /= 2)
    if (phm_base_floats(n, k, rows) <= kPhmSmemFloats) return rows;
  return 0;
}

// Row chunks of the backward: one block each, its weight-gradient partials in the workspace, the
// partials summed in chunk order.  A function of the shape alone, so results are the same on every
// GPU and every run.
struct PhmChunks {
  int64_t rows;   // rows per chunk, a multiple of the tile rows
  int64_t count;  // chunks (0 when M == 0)
  int64_t stride; // floats per chunk: [drule n^3][dW_l^T nk*P][dW_r nk*Q][dbias n*Q]
};

inline PhmChunks phm_chunks(int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k) {
  const int64_t stride = n * n * n + n * k * (P + Q) + n * Q;
  const int64_t bm = std::max(phm_tile_rows(n, k), 1);
  if (M <= 0) return {0, 0, stride};
  // Enough blocks to fill a large GPU, but the partials (written once, read once by the
  // reduction) stay under half the elements of x and dy, and under 64 MiB.
  int64_t c = std::min<int64_t>(264, std::max<int64_t>(1, M / 16));
  c = std::min<int64_t>(c, std::max<int64_t>(1, M * n * (P + Q) / (2 * std::max<int64_t>(stride, 1))));
  c = std::min<int64_t>(c, std::max<int64_t>(1, (int64_t(64) << 20) / (4 * std::max<int64_t>(stride, 1))));
  const int64_t per = (M + c - 1) / c;
  const int64_t rows = (per + bm - 1) / bm * bm;
  return {rows, (M + rows - 1) / rows, stride};
}

inline int64_t phm_bwd_workspace(int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k) {
  const PhmChunks ch = phm_chunks(M, n, P, Q, k);
  return ch.count * ch.stride * int64_t(sizeof(float));
}

void phm_fwd(DType dt, const void* x, int64_t ldx, const void* rule, const void* w_left_t,
             const void* w_right, const void* bias, void* y, void* t, int64_t M, int64_t n,
             int64_t P, int64_t Q, int64_t k, uintptr_t stream);

// Null outputs are skipped.  workspace: phm_bwd_workspace(M, n, P, Q, k) bytes.
void phm_bwd(DType dt, const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* t,
             const void* rule, const void* w_left_t, const void* w_right, void* dx, void* drule,
             void* dw_left, void* dw_right, void* dbias, int64_t M, int64_t n, int64_t P,
             int64_t Q, int64_t k, float* workspace, uintptr_t stream);

}  // namespace cuda
}  // namespace peftcore

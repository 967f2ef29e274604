// CUDA kernels of mixed-adapter LoRA.  See lora_mixed_cuda.h for the contract.
//
// Two launches over the tile table (a tile: up to BM rows of one segment, one adapter):
// * shrink: a block per (tile, 32-rank block, K split) computes the fp32 partial x A[j]^T of its
//   rows over its K range into the workspace.  The K split gives a decode batch (a few one-row
//   tiles) enough blocks to fill the GPU; a prefill batch has enough tiles and gets one split.
// * expand: a block per (tile, 64-column block) sums the partials in split order, scales by
//   scaling[j] and adds xa B[j]^T into y (load, add in fp32, store).
// The adapter index is read from the tile table per block, so a batch of any mix of adapters is
// one pair of launches.  CUDA cores, shared-memory tiles, fp32 accumulation: the rank is small
// and both products are bound by reading x, A[j], B[j] and y, not by FLOPs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "lora_mixed_cuda.h"

#include "cuda_common.cuh"

namespace peftcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBR = 32;  // shrink: ranks per block
constexpr int kBK = 64;  // shrink: K step
constexpr int kBN = 64;  // expand: columns per block
constexpr int kRC = 32;  // expand: rank step
constexpr int64_t kMaxGridYZ = 65535;

struct Splits {
  int64_t count;  // K splits
  int64_t k_per;  // columns of K per split (a multiple of kBK)
};

// Enough shrink blocks for a few waves on a large GPU, each split at least 256 columns of K.  A
// function of the shape alone, so the partials (and y) are the same on every device.
Splits k_splits(int64_t num_tiles, int64_t K, int64_t R) {
  constexpr int64_t kTargetBlocks = 512, kMinK = 256;
  const int64_t blocks = std::max<int64_t>(1, num_tiles * ceil_div(R, kBR));
  int64_t n = ceil_div(kTargetBlocks, blocks);
  n = std::min(n, std::max<int64_t>(1, K / kMinK));
  n = std::max<int64_t>(1, std::min(n, kMaxGridYZ));
  const int64_t k_per = ceil_div(ceil_div(std::max<int64_t>(K, 1), n), kBK) * kBK;
  return {ceil_div(std::max<int64_t>(K, 1), k_per), k_per};
}

// Entry t of the tile table (first row, end row, adapter): rows [m0, m0 + rows) use adapter j.
struct Tile {
  int64_t m0;
  int rows;
  int64_t j;
};

// The table is device data the binding cannot read, so the kernels keep every access in bounds
// themselves: a tile outside rows [0, M) or adapters [0, J), or taller than BM, is skipped (it
// reads adapter 0 and writes nothing).  plan() never makes one.
__device__ __forceinline__ Tile tile_at(const int32_t* __restrict__ tiles, int64_t t, int64_t M, int64_t J,
                                        int bm) {
  const int64_t m0 = tiles[3 * t], m1 = tiles[3 * t + 1], j = tiles[3 * t + 2];
  if (m0 < 0 || m1 < m0 || m1 > M || m1 - m0 > bm || j < 0 || j >= J) return {0, 0, 0};
  return {m0, static_cast<int>(m1 - m0), j};
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads)
    lora_mixed_shrink_kernel(const T* __restrict__ x,  // [M, K], row stride ldx
                             int64_t ldx,
                             const T* __restrict__ a,          // [J, R, K]
                             const int32_t* __restrict__ tiles,  // [num_tiles, 3]
                             float* __restrict__ part,  // [splits, num_tiles, BM, R]
                             int64_t num_tiles, int64_t K, int R, int64_t k_per, int64_t M, int64_t J) {
  constexpr int RPT = BM * kBR / kThreads;  // rows per thread
  __shared__ float xs[BM][kBK + 1];
  __shared__ float as[kBR][kBK + 1];
  const int tid = threadIdx.x;
  const int64_t t = blockIdx.x;
  const auto [m0, rows, j] = tile_at(tiles, t, M, J, BM);
  const int r0 = blockIdx.y * kBR;
  const int64_t k_lo = static_cast<int64_t>(blockIdx.z) * k_per;
  const int64_t k_hi = min(K, k_lo + k_per);
  const T* aj = a + j * R * K;
  const int tr = tid % kBR;  // rank r0 + tr
  const int tm = tid / kBR;  // rows tm + 8 i of the tile
  float acc[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) acc[i] = 0.f;
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kBK) {
    __syncthreads();  // previous tile consumed
    for (int e = tid; e < BM * kBK; e += kThreads) {
      const int i = e / kBK, c = e % kBK;
      const int64_t k = k0 + c;
      xs[i][c] = (i < rows && k < k_hi) ? to_f(x[(m0 + i) * ldx + k]) : 0.f;
    }
    for (int e = tid; e < kBR * kBK; e += kThreads) {
      const int i = e / kBK, c = e % kBK;
      const int r = r0 + i;
      const int64_t k = k0 + c;
      as[i][c] = (r < R && k < k_hi) ? to_f(aj[static_cast<int64_t>(r) * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kBK; ++c) {
      const float av = as[tr][c];
#pragma unroll
      for (int i = 0; i < RPT; ++i) acc[i] += xs[tm + 8 * i][c] * av;
    }
  }
  const int r = r0 + tr;
  if (r >= R) return;
  float* out = part + (static_cast<int64_t>(blockIdx.z) * num_tiles + t) * BM * R;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int row = tm + 8 * i;
    if (row < rows) out[static_cast<int64_t>(row) * R + r] = acc[i];
  }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads)
    lora_mixed_expand_kernel(const float* __restrict__ part,  // [splits, num_tiles, BM, R]
                             int64_t splits,
                             const T* __restrict__ b,            // [J, N, R]
                             const float* __restrict__ scaling,  // [J]
                             const int32_t* __restrict__ tiles,  // [num_tiles, 3]
                             T* __restrict__ y,                  // [M, N], row stride ldy
                             int64_t ldy, int64_t num_tiles, int64_t N, int R, int64_t M, int64_t J) {
  constexpr int RPT = BM * kBN / kThreads;  // rows per thread
  __shared__ float xs[BM][kRC + 1];
  __shared__ float bs[kRC][kBN + 1];
  const int tid = threadIdx.x;
  const int64_t t = blockIdx.x;
  const auto [m0, rows, j] = tile_at(tiles, t, M, J, BM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const float s = scaling[j];
  const T* bj = b + j * N * R;
  const int64_t split_stride = num_tiles * BM * R;
  const float* pt = part + t * BM * R;
  const int tn = tid % kBN;  // column n0 + tn
  const int tm = tid / kBN;  // rows tm + 4 i of the tile
  float acc[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) acc[i] = 0.f;
  for (int rc = 0; rc < R; rc += kRC) {
    __syncthreads();  // previous chunk consumed
    for (int e = tid; e < BM * kRC; e += kThreads) {
      const int i = e / kRC, c = e % kRC;
      const int r = rc + c;
      float v = 0.f;
      if (i < rows && r < R) {
        const float* p = pt + static_cast<int64_t>(i) * R + r;
        for (int64_t sp = 0; sp < splits; ++sp) v += p[sp * split_stride];
      }
      xs[i][c] = v * s;
    }
    for (int e = tid; e < kBN * kRC; e += kThreads) {
      const int nn = e / kRC, c = e % kRC;
      const int64_t n = n0 + nn;
      const int r = rc + c;
      bs[c][nn] = (n < N && r < R) ? to_f(bj[n * R + r]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kRC; ++c) {
      const float bv = bs[c][tn];
#pragma unroll
      for (int i = 0; i < RPT; ++i) acc[i] += xs[tm + 4 * i][c] * bv;
    }
  }
  const int64_t n = n0 + tn;
  if (n >= N) return;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int row = tm + 4 * i;
    if (row >= rows) continue;
    T* p = y + (m0 + row) * ldy + n;
    *p = from_f<T>(to_f(*p) + acc[i]);
  }
}

template <typename T, int BM>
void launch(const void* x, int64_t ldx, const void* a, const void* b, const float* scaling,
            const int32_t* tiles, int64_t num_tiles, void* y, int64_t ldy, int64_t M, int64_t K, int64_t N,
            int64_t R, int64_t J, float* part, cudaStream_t st) {
  const Splits sp = k_splits(num_tiles, K, R);
  if (ceil_div(R, kBR) > kMaxGridYZ || ceil_div(N, kBN) > kMaxGridYZ)
    throw std::invalid_argument("lora_mixed_fwd: R or N too large for the grid");
  const dim3 g1(static_cast<unsigned>(num_tiles), static_cast<unsigned>(ceil_div(R, kBR)),
                static_cast<unsigned>(sp.count));
  lora_mixed_shrink_kernel<T, BM><<<g1, kThreads, 0, st>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(a), tiles, part, num_tiles, K,
      static_cast<int>(R), sp.k_per, M, J);
  check(cudaGetLastError(), "lora_mixed_shrink_kernel launch");
  const dim3 g2(static_cast<unsigned>(num_tiles), static_cast<unsigned>(ceil_div(N, kBN)));
  lora_mixed_expand_kernel<T, BM><<<g2, kThreads, 0, st>>>(
      part, sp.count, static_cast<const T*>(b), scaling, tiles, static_cast<T*>(y), ldy,
      num_tiles, N, static_cast<int>(R), M, J);
  check(cudaGetLastError(), "lora_mixed_expand_kernel launch");
}

template <typename T>
void dispatch_bm(int64_t block_m, const void* x, int64_t ldx, const void* a, const void* b,
                 const float* scaling, const int32_t* tiles, int64_t num_tiles, void* y,
                 int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R, int64_t J, float* part,
                 cudaStream_t st) {
  if (block_m == 16)
    return launch<T, 16>(x, ldx, a, b, scaling, tiles, num_tiles, y, ldy, M, K, N, R, J, part, st);
  if (block_m == 64)
    return launch<T, 64>(x, ldx, a, b, scaling, tiles, num_tiles, y, ldy, M, K, N, R, J, part, st);
  throw std::invalid_argument("lora_mixed_fwd: block_m must be 16 or 64");
}

}  // namespace

bool lora_mixed_block_m_ok(int64_t block_m) { return block_m == 16 || block_m == 64; }

int64_t lora_mixed_workspace(int64_t num_tiles, int64_t block_m, int64_t K, int64_t R) {
  if (num_tiles <= 0 || K <= 0 || R <= 0) return 0;
  return k_splits(num_tiles, K, R).count * num_tiles * block_m * R *
         static_cast<int64_t>(sizeof(float));
}

void lora_mixed_fwd(DType dt, const void* x, int64_t ldx, const void* a, const void* b,
                    const float* scaling, const int32_t* tiles, int64_t num_tiles,
                    int64_t block_m, void* y, int64_t ldy, int64_t M, int64_t K, int64_t N,
                    int64_t R, int64_t J, void* workspace, int64_t workspace_bytes, uintptr_t stream) {
  if (num_tiles <= 0 || N == 0 || K == 0 || R == 0) return;
  if (workspace_bytes < lora_mixed_workspace(num_tiles, block_m, K, R))
    throw std::invalid_argument("lora_mixed_fwd: workspace smaller than lora_mixed_workspace()");
  float* part = static_cast<float*>(workspace);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      return dispatch_bm<float>(block_m, x, ldx, a, b, scaling, tiles, num_tiles, y, ldy, M, K, N,
                                R, J, part, st);
    case DType::kFloat16:
      return dispatch_bm<__half>(block_m, x, ldx, a, b, scaling, tiles, num_tiles, y, ldy, M, K, N,
                                 R, J, part, st);
    case DType::kBFloat16:
      return dispatch_bm<__nv_bfloat16>(block_m, x, ldx, a, b, scaling, tiles, num_tiles, y, ldy,
                                        M, K, N, R, J, part, st);
  }
  throw std::invalid_argument("lora_mixed_fwd: unknown dtype");
}

}  // namespace cuda
}  // namespace peftcore

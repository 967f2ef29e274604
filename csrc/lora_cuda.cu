// CUDA kernels of the LoRA dropout-masked projection.  See lora_cuda.h for the contract.
//
// Shared-memory tiled kernels on CUDA cores with fp32 accumulation: the rank r is small (4..64),
// so the projection is bound by reading x and the mask hash, not by FLOPs, and tensor cores would
// buy little.  The mask is regenerated per element from (seed, m, k) at tile-load time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "lora_cuda.h"
#include "rng.h"

#include "cuda_common.cuh"

namespace peftcore {
namespace cuda {
namespace {


inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

// ---------------------------------------------------------------------------------------------
// forward: a block computes xa[m0:m0+64, r0:r0+32]; each thread 8 rows of one rank.

constexpr int kFwdBM = 64, kFwdBR = 32, kFwdBK = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_fwd_kernel(const T* __restrict__ x,   // [M, K], row stride ldx
                         int64_t ldx,
                         const T* __restrict__ a,   // [R, K]
                         T* __restrict__ xa,        // [M, R]
                         int64_t M, int64_t K, int R, uint32_t sk, uint32_t thr, float scale) {
  __shared__ float xs[kFwdBM][kFwdBK + 1];
  __shared__ float as[kFwdBR][kFwdBK + 1];
  __shared__ uint32_t rks[kFwdBM];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFwdBM;
  const int r0 = blockIdx.y * kFwdBR;
  if (tid < kFwdBM) rks[tid] = row_key(sk, m0 + tid);
  const int tr = tid % kFwdBR;  // rank r0 + tr
  const int tm = tid / kFwdBR;  // rows m0 + tm + 8 i
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kFwdBK) {
    __syncthreads();  // rks ready; previous tile consumed
    for (int e = tid; e < kFwdBM * kFwdBK; e += kThreads) {
      const int i = e / kFwdBK, j = e % kFwdBK;
      const int64_t m = m0 + i, k = k0 + j;
      float v = 0.f;
      if (m < M && k < K) {
        v = to_f(x[m * ldx + k]);
        if (thr != 0u && !keep(rks[i], k, thr)) v = 0.f;
      }
      xs[i][j] = v;
    }
    for (int e = tid; e < kFwdBR * kFwdBK; e += kThreads) {
      const int i = e / kFwdBK, j = e % kFwdBK;
      const int r = r0 + i;
      const int64_t k = k0 + j;
      as[i][j] = (r < R && k < K) ? to_f(a[static_cast<int64_t>(r) * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kFwdBK; ++kk) {
      const float av = as[tr][kk];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += xs[tm + 8 * i][kk] * av;
    }
  }
  const int r = r0 + tr;
  if (r >= R) return;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + tm + 8 * i;
    if (m < M) xa[m * R + r] = from_f<T>(acc[i] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// backward dx: a block owns dx[m0:m0+32, k0:k0+64]; each thread 8 rows of one column.  The mask
// comes from the indices alone, so this kernel never reads x.

constexpr int kDxBM = 32, kDxBK = 64, kDxRC = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_bwd_dx_kernel(const T* __restrict__ g,  // [M, R]
                            const T* __restrict__ a,  // [R, K]
                            T* __restrict__ dx,       // [M, K], row stride lddx
                            int64_t lddx, int64_t M, int64_t K, int R, uint32_t sk, uint32_t thr,
                            float scale) {
  __shared__ float gs[kDxBM][kDxRC + 1];
  __shared__ float as[kDxRC][kDxBK + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDxBM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDxBK;
  const int tk = tid % kDxBK;  // column k0 + tk
  const int tm = tid / kDxBK;  // rows m0 + tm + 4 i
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int rc = 0; rc < R; rc += kDxRC) {
    __syncthreads();
    for (int e = tid; e < kDxBM * kDxRC; e += kThreads) {
      const int i = e / kDxRC, j = e % kDxRC;
      const int64_t m = m0 + i;
      const int r = rc + j;
      gs[i][j] = (m < M && r < R) ? to_f(g[m * R + r]) : 0.f;
    }
    for (int e = tid; e < kDxRC * kDxBK; e += kThreads) {
      const int i = e / kDxBK, j = e % kDxBK;
      const int r = rc + i;
      const int64_t k = k0 + j;
      as[i][j] = (r < R && k < K) ? to_f(a[static_cast<int64_t>(r) * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kDxRC; ++j) {
      const float av = as[j][tk];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += gs[tm + 4 * i][j] * av;
    }
  }
  const int64_t k = k0 + tk;
  if (k >= K) return;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + tm + 4 * i;
    if (m >= M) continue;
    if (thr != 0u && !keep(row_key(sk, m), k, thr)) continue;
    T* p = dx + m * lddx + k;
    *p = from_f<T>(to_f(*p) + acc[i] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// backward dA: a block sums dA[r0:r0+32, k0:k0+64] over one chunk of rows into out[chunk];
// each thread 8 ranks of one column.

constexpr int kDaBM = 32, kDaBR = 32, kDaBK = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_bwd_da_kernel(const T* __restrict__ g,  // [M, R]
                            const T* __restrict__ x,  // [M, K], row stride ldx
                            int64_t ldx,
                            float* __restrict__ out,  // [chunks, R, K]
                            int64_t M, int64_t K, int R, int64_t rows_per_chunk, uint32_t sk,
                            uint32_t thr, float scale) {
  __shared__ float xs[kDaBM][kDaBK + 1];
  __shared__ float gs[kDaBM][kDaBR + 1];
  __shared__ uint32_t rks[kDaBM];
  const int tid = threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDaBK;
  const int r0 = blockIdx.y * kDaBR;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_chunk;
  const int64_t m_end = min(M, m_begin + rows_per_chunk);
  const int tk = tid % kDaBK;  // column k0 + tk
  const int tr = tid / kDaBK;  // ranks r0 + tr + 4 i
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kDaBM) {
    __syncthreads();  // previous tile consumed
    if (tid < kDaBM) rks[tid] = row_key(sk, m0 + tid);
    __syncthreads();
    for (int e = tid; e < kDaBM * kDaBK; e += kThreads) {
      const int i = e / kDaBK, j = e % kDaBK;
      const int64_t m = m0 + i, k = k0 + j;
      float v = 0.f;
      if (m < m_end && k < K) {
        v = to_f(x[m * ldx + k]);
        if (thr != 0u && !keep(rks[i], k, thr)) v = 0.f;
      }
      xs[i][j] = v;
    }
    for (int e = tid; e < kDaBM * kDaBR; e += kThreads) {
      const int i = e / kDaBR, j = e % kDaBR;
      const int64_t m = m0 + i;
      const int r = r0 + j;
      gs[i][j] = (m < m_end && r < R) ? to_f(g[m * R + r]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < kDaBM; ++mm) {
      const float xv = xs[mm][tk];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += gs[mm][tr + 4 * i] * xv;
    }
  }
  const int64_t k = k0 + tk;
  if (k >= K) return;
  float* o = out + static_cast<int64_t>(blockIdx.z) * R * K;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = r0 + tr + 4 * i;
    if (r < R) o[static_cast<int64_t>(r) * K + k] = acc[i] * scale;
  }
}

// da[i] = sum over chunks c, in order, of ws[c, i].
__global__ void lora_sum_chunks_kernel(const float* __restrict__ ws, float* __restrict__ da,
                                       int64_t n, int64_t chunks) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t c = 0; c < chunks; ++c) acc += ws[c * n + i];
    da[i] = acc;
  }
}

__global__ void lora_keep_mask_kernel(uint8_t* __restrict__ out, int64_t M, int64_t K,
                                      uint32_t sk, uint32_t thr) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M * K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    out[i] = keep(row_key(sk, m), k, thr) ? 1 : 0;
  }
}

// dA row chunks: enough blocks to fill a large GPU, at least 256 rows each.  A function of the
// shape alone, so the summation order (and the result) is the same on every device.
struct Chunks {
  int64_t rows;
  int64_t count;
};

Chunks da_chunks(int64_t M, int64_t K, int64_t R) {
  if (M <= 0) return {0, 0};
  const int64_t tiles = ceil_div(K, kDaBK) * ceil_div(R, kDaBR);
  constexpr int64_t kTargetBlocks = 1024, kMinRows = 256;
  int64_t n = ceil_div(kTargetBlocks, std::max<int64_t>(tiles, 1));
  n = std::min(n, std::max<int64_t>(1, M / kMinRows));
  n = std::max<int64_t>(1, std::min(n, kMaxGridYZ));
  const int64_t rows = ceil_div(ceil_div(M, n), kDaBM) * kDaBM;
  return {rows, ceil_div(M, rows)};
}

int grid_1d(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 65536)));
}

template <typename T>
void down_fwd_t(const void* x, int64_t ldx, const void* a, void* xa, int64_t M, int64_t K,
                int64_t R, uint32_t seed, uint32_t thr, float scale, cudaStream_t st) {
  if (ceil_div(R, kFwdBR) > kMaxGridYZ) throw std::invalid_argument("down_fwd: rank too large");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kFwdBM)),
                  static_cast<unsigned>(ceil_div(R, kFwdBR)));
  lora_down_fwd_kernel<T><<<grid, kThreads, 0, st>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(a), static_cast<T*>(xa), M, K,
      static_cast<int>(R), seed_key(seed), thr, scale);
  check(cudaGetLastError(), "lora_down_fwd_kernel launch");
}

template <typename T>
void down_bwd_t(const void* g, const void* a, const void* x, int64_t ldx, void* dx, int64_t lddx,
                float* da, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr,
                float scale, void* ws, int64_t ws_bytes, cudaStream_t st) {
  const uint32_t sk = seed_key(seed);
  if (dx != nullptr) {
    if (ceil_div(K, kDxBK) > kMaxGridYZ) throw std::invalid_argument("down_bwd: K too large");
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kDxBM)),
                    static_cast<unsigned>(ceil_div(K, kDxBK)));
    lora_down_bwd_dx_kernel<T><<<grid, kThreads, 0, st>>>(
        static_cast<const T*>(g), static_cast<const T*>(a), static_cast<T*>(dx), lddx, M, K,
        static_cast<int>(R), sk, thr, scale);
    check(cudaGetLastError(), "lora_down_bwd_dx_kernel launch");
  }
  if (da != nullptr) {
    const Chunks ch = da_chunks(M, K, R);
    if (ch.count > 1 && ws_bytes < ch.count * R * K * static_cast<int64_t>(sizeof(float)))
      throw std::invalid_argument("down_bwd: workspace smaller than down_bwd_workspace()");
    if (ceil_div(R, kDaBR) > kMaxGridYZ) throw std::invalid_argument("down_bwd: rank too large");
    float* out = ch.count > 1 ? static_cast<float*>(ws) : da;
    const dim3 grid(static_cast<unsigned>(ceil_div(K, kDaBK)),
                    static_cast<unsigned>(ceil_div(R, kDaBR)), static_cast<unsigned>(ch.count));
    lora_down_bwd_da_kernel<T><<<grid, kThreads, 0, st>>>(
        static_cast<const T*>(g), static_cast<const T*>(x), ldx, out, M, K,
        static_cast<int>(R), ch.rows, sk, thr, scale);
    check(cudaGetLastError(), "lora_down_bwd_da_kernel launch");
    if (ch.count > 1) {
      lora_sum_chunks_kernel<<<grid_1d(R * K), kThreads, 0, st>>>(out, da, R * K, ch.count);
      check(cudaGetLastError(), "lora_sum_chunks_kernel launch");
    }
  }
}

}  // namespace

bool compiled() { return true; }

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error state of this runtime
    return -static_cast<int>(e);
  }
  return n;
}

void down_fwd(DType dt, const void* x, int64_t ldx, const void* a, void* xa, int64_t M, int64_t K,
              int64_t R, uint32_t seed, uint32_t threshold, float scale, uintptr_t stream) {
  if (M == 0 || R == 0) return;
  const cudaStream_t st = as_stream(stream);
  switch (dt) {
    case DType::kFloat32:
      return down_fwd_t<float>(x, ldx, a, xa, M, K, R, seed, threshold, scale, st);
    case DType::kFloat16:
      return down_fwd_t<__half>(x, ldx, a, xa, M, K, R, seed, threshold, scale, st);
    case DType::kBFloat16:
      return down_fwd_t<__nv_bfloat16>(x, ldx, a, xa, M, K, R, seed, threshold, scale, st);
  }
  throw std::invalid_argument("down_fwd: unknown dtype");
}

int64_t down_bwd_workspace(int64_t M, int64_t K, int64_t R) {
  const Chunks ch = da_chunks(M, K, R);
  return ch.count > 1 ? ch.count * R * K * static_cast<int64_t>(sizeof(float)) : 0;
}

void down_bwd(DType dt, const void* g, const void* a, const void* x, int64_t ldx, void* dx,
              int64_t lddx, float* da, int64_t M, int64_t K, int64_t R, uint32_t seed,
              uint32_t threshold, float scale, void* workspace, int64_t workspace_bytes,
              uintptr_t stream) {
  if (R == 0 || K == 0) return;
  const cudaStream_t st = as_stream(stream);
  if (M == 0) {
    if (da != nullptr)
      check(cudaMemsetAsync(da, 0, R * K * sizeof(float), st), "cudaMemsetAsync");
    return;
  }
  switch (dt) {
    case DType::kFloat32:
      return down_bwd_t<float>(g, a, x, ldx, dx, lddx, da, M, K, R, seed, threshold, scale,
                               workspace, workspace_bytes, st);
    case DType::kFloat16:
      return down_bwd_t<__half>(g, a, x, ldx, dx, lddx, da, M, K, R, seed, threshold, scale,
                                workspace, workspace_bytes, st);
    case DType::kBFloat16:
      return down_bwd_t<__nv_bfloat16>(g, a, x, ldx, dx, lddx, da, M, K, R, seed, threshold,
                                       scale, workspace, workspace_bytes, st);
  }
  throw std::invalid_argument("down_bwd: unknown dtype");
}

void keep_mask(uint8_t* out, int64_t M, int64_t K, uint32_t seed, uint32_t threshold,
               uintptr_t stream) {
  if (M == 0 || K == 0) return;
  lora_keep_mask_kernel<<<grid_1d(M * K), kThreads, 0, as_stream(stream)>>>(out, M, K,
                                                                            seed_key(seed),
                                                                            threshold);
  check(cudaGetLastError(), "lora_keep_mask_kernel launch");
}

}  // namespace cuda
}  // namespace peftcore

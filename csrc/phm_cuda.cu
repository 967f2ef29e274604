// CUDA kernels of the PHM linear.  See phm_cuda.h (and phm_cpu.h for the math).
//
// Same factorization as the CPU kernels: H [in, out] is never formed.  A block of 256 threads
// works through tiles of `bm` rows (phm_tile_rows); the per-row intermediates t, u, du, dt
// ([bm, n, n*k] fp32 each) and the rule live in shared memory, and so do W_l^T [n*k, P] and
// W_r [n*k, Q] when they fit beside them (else they are read through the read-only cache).
//   contractions over P or Q (t, du):  a warp per (row, segment), lanes stride the segment with
//                                      coalesced loads, 8 outputs per pass, warp-shuffle sums;
//   expansions over P or Q (y, dx):    a warp per (row, segment), a lane per output element;
//   weight gradients:                  each thread owns a fixed set of (j, p) / (j, q) elements
//                                      of its block's row chunk and accumulates them over the
//                                      chunk's tiles in the fp32 workspace; a second kernel sums
//                                      the chunks in order (deterministic, no atomics).
// Accumulation is fp32 throughout; inputs and outputs are in the input dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "phm_cuda.h"

#include "cuda_common.cuh"

namespace peftcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kJ = 8;  // outputs per warp pass of a contraction
constexpr int kMaxFwdBlocks = 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A factor [rows, ld] read from shared memory when staged, else from global memory.
template <typename T>
struct Factor {
  const T* g;
  const float* s;
  int ld;
  __device__ __forceinline__ float operator()(int j, int p) const {
    const int64_t e = static_cast<int64_t>(j) * ld + p;
    return s ? s[e] : to_f(__ldg(g + e));
  }
};

// Stage `count` elements of src into dst as fp32 (all threads of the block).
template <typename T>
__device__ void stage(float* dst, const T* __restrict__ src, int64_t count) {
  for (int64_t e = threadIdx.x; e < count; e += kThreads) dst[e] = to_f(src[e]);
}

// out[o * nk + j] = sum_p v[p] f(j, p) for one segment v [len] and every j < nk: called by one
// whole warp (the shuffles need every lane), lane 0 writes.
template <typename T>
__device__ void warp_contract(const T* __restrict__ v, int len, const Factor<T>& f, int nk,
                              float* out) {
  const int lane = threadIdx.x & 31;
  for (int j0 = 0; j0 < nk; j0 += kJ) {
    float acc[kJ];
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) acc[jj] = 0.f;
    for (int p = lane; p < len; p += 32) {
      const float xv = to_f(v[p]);
#pragma unroll
      for (int jj = 0; jj < kJ; ++jj)
        if (j0 + jj < nk) acc[jj] += xv * f(j0 + jj, p);
    }
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) {
      const float s = warp_sum(acc[jj]);
      if (lane == 0 && j0 + jj < nk) out[j0 + jj] = s;
    }
  }
}

// out[p] = init[p] + sum_j coef[j] f(j, p) for one segment (one warp, a lane per element).
template <typename T>
__device__ void warp_expand(const float* coef, const Factor<T>& f, int nk, int len,
                            const T* __restrict__ init, T* __restrict__ out) {
  for (int p = threadIdx.x & 31; p < len; p += 32) {
    float acc = init ? to_f(init[p]) : 0.f;
    for (int j = 0; j < nk; ++j) acc += coef[j] * f(j, p);
    out[p] = from_f<T>(acc);
  }
}

struct Shape {
  int64_t M;
  int n, P, Q, k, nk, bm;
};

// ---------------------------------------------------------------------------------------------
// forward

template <typename T>
__global__ void __launch_bounds__(kThreads)
    phm_fwd_kernel(const T* __restrict__ x,     // [M, n*P], row stride ldx
                   int64_t ldx,
                   const T* __restrict__ rule,  // [n, n, n]
                   const T* __restrict__ wlt,   // [n*k, P]
                   const T* __restrict__ wr,    // [n*k, Q]
                   const T* __restrict__ bias,  // [n*Q] or null
                   T* __restrict__ y,           // [M, n*Q]
                   T* __restrict__ t,           // [M, n, n*k]
                   Shape s, int stage_l, int stage_r) {
  extern __shared__ float sm[];
  const int n = s.n, nk = s.nk, tn = n * nk, n3 = n * n * n;
  float* rule_s = sm;
  float* t_s = rule_s + 2 * n3;  // the backward's layout: a drule slot, unused here
  float* u_s = t_s + s.bm * tn;
  float* wl_s = t_s + 4 * s.bm * tn;
  float* wr_s = wl_s + (stage_l ? nk * s.P : 0);
  stage(rule_s, rule, n3);
  if (stage_l) stage(wl_s, wlt, static_cast<int64_t>(nk) * s.P);
  if (stage_r) stage(wr_s, wr, static_cast<int64_t>(nk) * s.Q);
  const Factor<T> fl{wlt, stage_l ? wl_s : nullptr, s.P};
  const Factor<T> fr{wr, stage_r ? wr_s : nullptr, s.Q};
  const int warp = threadIdx.x / 32;
  __syncthreads();
  for (int64_t m0 = static_cast<int64_t>(blockIdx.x) * s.bm; m0 < s.M;
       m0 += static_cast<int64_t>(gridDim.x) * s.bm) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(s.bm), s.M - m0));
    for (int task = warp; task < rows * n; task += kWarps) {
      const int r = task / n, a = task % n;
      warp_contract(x + (m0 + r) * ldx + static_cast<int64_t>(a) * s.P, s.P, fl, nk,
                    t_s + task * nk);
    }
    __syncthreads();
    // u[r][b][j] = sum_a rule[i][a][b] t[r][a][j]; t goes out in the same [r][a][j] order
    for (int e = threadIdx.x; e < rows * tn; e += kThreads) {
      const int r = e / tn, b = (e / nk) % n, j = e % nk, i = j / s.k;
      float acc = 0.f;
      for (int a = 0; a < n; ++a) acc += rule_s[(i * n + a) * n + b] * t_s[(r * n + a) * nk + j];
      u_s[e] = acc;
      t[m0 * tn + e] = from_f<T>(t_s[e]);
    }
    __syncthreads();
    for (int task = warp; task < rows * n; task += kWarps) {
      const int r = task / n, b = task % n;
      warp_expand(u_s + task * nk, fr, nk, s.Q, bias ? bias + static_cast<int64_t>(b) * s.Q : nullptr,
                  y + (m0 + r) * n * s.Q + static_cast<int64_t>(b) * s.Q);
    }
    __syncthreads();  // t_s and u_s are rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------
// backward

enum : int { kDx = 1, kRule = 2, kWl = 4, kWr = 8, kBias = 16 };

// A weight gradient's chunk partial over one tile of rows (all threads of the block):
//   part[j][p] += sum_{r < rows, c < n} coef[r][c][j] v[m0 + r][c*len + p]   (j < nk, p < len)
// with v [M, n*len] (row stride ld) the tile's x or dy and coef [rows, n, nk] its dt or u in
// shared memory; the first tile of a chunk overwrites part.  A thread per (j chunk, p): v loads
// coalesced over p, coef broadcast from shared memory.
template <typename T>
__device__ __forceinline__ void accum_weight_grad(float* part, const T* __restrict__ v,
                                                  int64_t ld, int64_t m0, int rows,
                                                  const float* coef, int n, int nk, int len,
                                                  bool first) {
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>((nk + kJ - 1) / kJ) * len; e += kThreads) {
    const int j0 = static_cast<int>(e / len) * kJ, p = static_cast<int>(e % len);
    float acc[kJ];
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj)
      acc[jj] = (first || j0 + jj >= nk) ? 0.f : part[static_cast<int64_t>(j0 + jj) * len + p];
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < n; ++c) {
        const float xv = to_f(v[(m0 + r) * ld + static_cast<int64_t>(c) * len + p]);
        const float* d = coef + (r * n + c) * nk + j0;
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj)
          if (j0 + jj < nk) acc[jj] += d[jj] * xv;
      }
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj)
      if (j0 + jj < nk) part[static_cast<int64_t>(j0 + jj) * len + p] = acc[jj];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    phm_bwd_kernel(const T* __restrict__ dy,    // [M, n*Q], row stride lddy
                   int64_t lddy,
                   const T* __restrict__ x,     // [M, n*P], row stride ldx
                   int64_t ldx,
                   const T* __restrict__ t,     // [M, n, n*k]
                   const T* __restrict__ rule,  // [n, n, n]
                   const T* __restrict__ wlt,   // [n*k, P]
                   const T* __restrict__ wr,    // [n*k, Q]
                   T* __restrict__ dx,          // [M, n*P] or null
                   float* __restrict__ ws,      // [chunks, stride]
                   Shape s, int64_t chunk_rows, int64_t stride, int needs, int stage_l,
                   int stage_r) {
  extern __shared__ float sm[];
  const int n = s.n, nk = s.nk, tn = n * nk, n3 = n * n * n, P = s.P, Q = s.Q;
  const bool need_dt = needs & (kDx | kWl), need_du = need_dt || (needs & kRule);
  const bool need_t = needs & (kRule | kWr);
  float* rule_s = sm;
  float* drule_s = rule_s + n3;
  float* t_s = drule_s + n3;
  float* du_s = t_s + s.bm * tn;
  float* dt_s = du_s + s.bm * tn;
  float* u_s = dt_s + s.bm * tn;
  float* wl_s = u_s + s.bm * tn;
  float* wr_s = wl_s + (stage_l ? nk * P : 0);
  // W_l^T serves dx only, W_r the du contraction only: stage (and read) each only when needed
  const bool use_l = stage_l && (needs & kDx), use_r = stage_r && need_du;
  if (need_dt || (needs & kWr)) stage(rule_s, rule, n3);  // drule alone never reads the rule
  for (int e = threadIdx.x; e < n3; e += kThreads) drule_s[e] = 0.f;
  if (use_l) stage(wl_s, wlt, static_cast<int64_t>(nk) * P);
  if (use_r) stage(wr_s, wr, static_cast<int64_t>(nk) * Q);
  const Factor<T> fl{wlt, use_l ? wl_s : nullptr, P};
  const Factor<T> fr{wr, use_r ? wr_s : nullptr, Q};
  float* part = ws + static_cast<int64_t>(blockIdx.x) * stride;
  float* p_wl = part + n3;
  float* p_wr = p_wl + static_cast<int64_t>(nk) * P;
  float* p_b = p_wr + static_cast<int64_t>(nk) * Q;
  const int warp = threadIdx.x / 32;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.x) * chunk_rows;
  const int64_t m_end = min(s.M, m_begin + chunk_rows);
  __syncthreads();
  for (int64_t m0 = m_begin; m0 < m_end; m0 += s.bm) {
    const bool first = m0 == m_begin;
    const int rows = static_cast<int>(min(static_cast<int64_t>(s.bm), m_end - m0));
    if (need_t)
      for (int e = threadIdx.x; e < rows * tn; e += kThreads) t_s[e] = to_f(t[m0 * tn + e]);
    if (need_du)
      for (int task = warp; task < rows * n; task += kWarps) {
        const int r = task / n, b = task % n;
        warp_contract(dy + (m0 + r) * lddy + static_cast<int64_t>(b) * Q, Q, fr, nk, du_s + task * nk);
      }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * tn; e += kThreads) {
      const int r = e / tn, c = (e / nk) % n, j = e % nk, i = j / s.k;
      if (need_dt) {  // dt[r][a = c][j] = sum_b rule[i][a][b] du[r][b][j]
        float acc = 0.f;
        for (int b = 0; b < n; ++b) acc += rule_s[(i * n + c) * n + b] * du_s[(r * n + b) * nk + j];
        dt_s[e] = acc;
      }
      if (needs & kWr) {  // u[r][b = c][j] = sum_a rule[i][a][b] t[r][a][j]
        float acc = 0.f;
        for (int a = 0; a < n; ++a) acc += rule_s[(i * n + a) * n + c] * t_s[(r * n + a) * nk + j];
        u_s[e] = acc;
      }
    }
    if (needs & kRule)  // drule[i][a][b] += sum_{r, rr} t[r][a][i*k + rr] du[r][b][i*k + rr]
      for (int e = threadIdx.x; e < n3; e += kThreads) {
        const int i = e / (n * n), a = (e / n) % n, b = e % n;
        float acc = drule_s[e];
        for (int r = 0; r < rows; ++r)
          for (int rr = 0; rr < s.k; ++rr) {
            const int j = i * s.k + rr;
            acc += t_s[(r * n + a) * nk + j] * du_s[(r * n + b) * nk + j];
          }
        drule_s[e] = acc;
      }
    __syncthreads();
    if (needs & kDx)
      for (int task = warp; task < rows * n; task += kWarps) {
        const int r = task / n, a = task % n;
        warp_expand<T>(dt_s + task * nk, fl, nk, P, nullptr,
                       dx + (m0 + r) * n * P + static_cast<int64_t>(a) * P);
      }
    // dW_l^T[j][p] += sum_{r, a} dt[r][a][j] x[r][a*P + p]
    if (needs & kWl) accum_weight_grad(p_wl, x, ldx, m0, rows, dt_s, n, nk, P, first);
    // dW_r[j][q] += sum_{r, b} u[r][b][j] dy[r][b*Q + q], and dbias[b*Q + q] += sum_r dy[r][b*Q + q]
    if (needs & kWr) accum_weight_grad(p_wr, dy, lddy, m0, rows, u_s, n, nk, Q, first);
    if (needs & kBias)
      for (int64_t e = threadIdx.x; e < static_cast<int64_t>(n) * Q; e += kThreads) {
        float acc = first ? 0.f : p_b[e];
        for (int r = 0; r < rows; ++r) acc += to_f(dy[(m0 + r) * lddy + e]);
        p_b[e] = acc;
      }
    __syncthreads();  // the tile's shared arrays are rewritten by the next one
  }
  if (needs & kRule)
    for (int e = threadIdx.x; e < n3; e += kThreads) part[e] = drule_s[e];
}

// Sums the chunk partials in chunk order into the gradients, in their own layouts and dtype;
// with no chunks (M == 0) the gradients come out zero.
template <typename T>
__global__ void phm_bwd_reduce_kernel(const float* __restrict__ ws, int64_t chunks, int64_t stride,
                                      T* __restrict__ drule,  // [n, n, n]
                                      T* __restrict__ dwl,    // [n, P, k]
                                      T* __restrict__ dwr,    // [n, k, Q]
                                      T* __restrict__ dbias,  // [n*Q]
                                      int n, int P, int Q, int k) {
  const int64_t n3 = static_cast<int64_t>(n) * n * n, nwl = static_cast<int64_t>(n) * k * P;
  const int64_t nwr = static_cast<int64_t>(n) * k * Q, total = n3 + nwl + nwr + static_cast<int64_t>(n) * Q;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T* out;
    int64_t src, f = e;
    if (f < n3) {
      out = drule ? drule + f : nullptr;
      src = f;
    } else if ((f -= n3) < nwl) {  // f indexes dW_l [i][p][r]; the partial holds [i*k + r][p]
      out = dwl ? dwl + f : nullptr;
      const int64_t i = f / (static_cast<int64_t>(P) * k), p = (f / k) % P, r = f % k;
      src = n3 + (i * k + r) * P + p;
    } else if ((f -= nwl) < nwr) {
      out = dwr ? dwr + f : nullptr;
      src = n3 + nwl + f;
    } else {
      f -= nwr;
      out = dbias ? dbias + f : nullptr;
      src = n3 + nwl + nwr + f;
    }
    if (!out) continue;
    float acc = 0.f;
    for (int64_t c = 0; c < chunks; ++c) acc += ws[c * stride + src];
    *out = from_f<T>(acc);
  }
}

inline cudaStream_t as_stream(uintptr_t st) { return reinterpret_cast<cudaStream_t>(st); }

// Which factors fit in shared memory beside the tile arrays (W_l^T first: x is the wider side
// in the down projection, whose dots reread it per output chunk).
struct Plan {
  Shape s;
  int stage_l, stage_r;
  size_t smem;
};

Plan plan(int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k) {
  Plan p{};
  p.s = Shape{M, static_cast<int>(n), static_cast<int>(P), static_cast<int>(Q), static_cast<int>(k),
              static_cast<int>(n * k), phm_tile_rows(n, k)};
  if (p.s.bm == 0) throw std::invalid_argument("phm: phm_dim and rank too large for the CUDA kernels");
  int64_t floats = phm_base_floats(n, k, p.s.bm);
  p.stage_l = floats + n * k * P <= kPhmSmemFloats;
  if (p.stage_l) floats += n * k * P;
  p.stage_r = floats + n * k * Q <= kPhmSmemFloats;
  if (p.stage_r) floats += n * k * Q;
  p.smem = static_cast<size_t>(floats) * sizeof(float);
  return p;
}

template <typename T>
void fwd_t(const void* x, int64_t ldx, const void* rule, const void* wlt, const void* wr,
           const void* bias, void* y, void* t, const Plan& p, cudaStream_t st) {
  const int64_t tiles = ceil_div(p.s.M, p.s.bm);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, kMaxFwdBlocks));
  phm_fwd_kernel<T><<<grid, kThreads, p.smem, st>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(rule), static_cast<const T*>(wlt),
      static_cast<const T*>(wr), static_cast<const T*>(bias), static_cast<T*>(y), static_cast<T*>(t),
      p.s, p.stage_l, p.stage_r);
  check(cudaGetLastError(), "phm_fwd_kernel launch");
}

template <typename T>
void bwd_t(const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* t,
           const void* rule, const void* wlt, const void* wr, void* dx, void* drule, void* dwl,
           void* dwr, void* dbias, const Plan& p, float* ws, cudaStream_t st) {
  const Shape& s = p.s;
  const PhmChunks ch = phm_chunks(s.M, s.n, s.P, s.Q, s.k);
  const int needs = (dx ? kDx : 0) | (drule ? kRule : 0) | (dwl ? kWl : 0) | (dwr ? kWr : 0) |
                    (dbias ? kBias : 0);
  if (ch.count > 0) {
    const int64_t tiles = ceil_div(s.M, s.bm);
    // Without weight gradients there is nothing to reduce: any tiling will do, and the
    // workspace (none was asked for) is never touched.
    const bool weights = needs & (kRule | kWl | kWr | kBias);
    const int64_t chunk_rows = weights ? ch.rows : s.bm;
    const int64_t blocks = weights ? ch.count : tiles;
    if (blocks > 0x7fffffff) throw std::invalid_argument("phm_bwd: too many rows");
    phm_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, p.smem, st>>>(
        static_cast<const T*>(dy), lddy, static_cast<const T*>(x), ldx, static_cast<const T*>(t),
        static_cast<const T*>(rule), static_cast<const T*>(wlt), static_cast<const T*>(wr),
        static_cast<T*>(dx), ws, s, chunk_rows, ch.stride, needs, p.stage_l, p.stage_r);
    check(cudaGetLastError(), "phm_bwd_kernel launch");
  }
  if (needs & (kRule | kWl | kWr | kBias)) {
    const int64_t total = ch.stride;  // one thread per gradient element (the partial's layout)
    const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), 4096)));
    phm_bwd_reduce_kernel<T><<<grid, kThreads, 0, st>>>(
        ws, ch.count, ch.stride, static_cast<T*>(drule), static_cast<T*>(dwl), static_cast<T*>(dwr),
        static_cast<T*>(dbias), s.n, s.P, s.Q, s.k);
    check(cudaGetLastError(), "phm_bwd_reduce_kernel launch");
  }
}

}  // namespace

void phm_fwd(DType dt, const void* x, int64_t ldx, const void* rule, const void* w_left_t,
             const void* w_right, const void* bias, void* y, void* t, int64_t M, int64_t n,
             int64_t P, int64_t Q, int64_t k, uintptr_t stream) {
  if (M == 0) return;
  const Plan p = plan(M, n, P, Q, k);
  const cudaStream_t st = as_stream(stream);
  switch (dt) {
    case DType::kFloat32:
      return fwd_t<float>(x, ldx, rule, w_left_t, w_right, bias, y, t, p, st);
    case DType::kFloat16:
      return fwd_t<__half>(x, ldx, rule, w_left_t, w_right, bias, y, t, p, st);
    case DType::kBFloat16:
      return fwd_t<__nv_bfloat16>(x, ldx, rule, w_left_t, w_right, bias, y, t, p, st);
  }
  throw std::invalid_argument("phm_fwd: unknown dtype");
}

void phm_bwd(DType dt, const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* t,
             const void* rule, const void* w_left_t, const void* w_right, void* dx, void* drule,
             void* dw_left, void* dw_right, void* dbias, int64_t M, int64_t n, int64_t P,
             int64_t Q, int64_t k, float* workspace, uintptr_t stream) {
  if (!dx && !drule && !dw_left && !dw_right && !dbias) return;
  const Plan p = plan(M, n, P, Q, k);
  const cudaStream_t st = as_stream(stream);
  switch (dt) {
    case DType::kFloat32:
      return bwd_t<float>(dy, lddy, x, ldx, t, rule, w_left_t, w_right, dx, drule, dw_left,
                          dw_right, dbias, p, workspace, st);
    case DType::kFloat16:
      return bwd_t<__half>(dy, lddy, x, ldx, t, rule, w_left_t, w_right, dx, drule, dw_left,
                           dw_right, dbias, p, workspace, st);
    case DType::kBFloat16:
      return bwd_t<__nv_bfloat16>(dy, lddy, x, ldx, t, rule, w_left_t, w_right, dx, drule,
                                  dw_left, dw_right, dbias, p, workspace, st);
  }
  throw std::invalid_argument("phm_bwd: unknown dtype");
}

}  // namespace cuda
}  // namespace peftcore

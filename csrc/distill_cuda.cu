// CUDA kernel of the distillation loss.  See distill_cuda.h for the contract and distill_cpu.cpp
// for the math (the same formulas, in the same variables).
//
// One block per row (grid-stride over rows).  Pass A streams s and t once with an online max and
// sum-exp per stream (maxima in logit units, rescaled once per VEC-element chunk rather than per
// element, rescale factors in fp64); the block merges the per-thread (max, sum) pairs.  Pass B
// re-reads the row (from L2 for vocabularies up to ~100k) with the final maxima: it sums the loss
// terms and, for forward KL (gradient q - p needs no loss), writes the gradient.  For reverse KL
// and JSD the gradient needs the row's loss sum, so a pass C writes it.  Loads and stores are
// 16-byte vectors when every row is aligned.
//
// xs = (s - max s) / T is computed with non-contracting intrinsics, so it is exactly 0 at the max
// and every pass sees the same rounded values: where q is nearly one-hot, the reverse-KL/JSD
// gradient there is a difference of nearly equal sums that cancels cleanly only then.
//
// UNTESTED ON A GPU: compiled for sm_80/sm_90 by CI; tests/test_native_distill.py -m gpu checks it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "distill_cuda.h"

#include "cuda_common.cuh"

namespace peftcore {
namespace cuda {
namespace {


constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

enum Kind : int { kForward = 0, kReverse = 1, kJsd = 2 };

struct Params {
  float inv_t;
  double t, beta;
  float lb_hi, lb_lo, l1b_hi, l1b_lo;  // log(beta), log(1 - beta) as fp32 hi + lo
};

// Running max (logit units) and sum of e^((x - max) / T) of one stream.  The sum is fp64: in a
// near-uniform row (high T) KL is a small difference of log Zt - log Zs ~ log V, so Z needs more
// than fp32's precision; each thread adds fp32 chunk sums of VEC elements into it.
struct Stat {
  float m;
  double z;
};

// e^((m_old - m_new) / T) in fp64, so a rescaled partial sum keeps its precision.  It runs once
// per merge and each time a thread's running max rises (rarely after its first chunks).
__device__ __forceinline__ double rescale(float m_old, float m_new, float inv_t) {
  return exp((static_cast<double>(m_old) - static_cast<double>(m_new)) * inv_t);
}

__device__ __forceinline__ Stat merge(Stat x, Stat y, float inv_t) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return {m, 0.0};
  const double zx = x.m == -INFINITY ? 0.0 : x.z * rescale(x.m, m, inv_t);
  const double zy = y.m == -INFINITY ? 0.0 : y.z * rescale(y.m, m, inv_t);
  return {m, zx + zy};
}

__device__ __forceinline__ Stat warp_merge(Stat v, float inv_t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Stat u{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.z, o)};
    v = merge(v, u, inv_t);
  }
  return v;
}

// Merges s and t over the block; the result is valid in thread 0.  blockDim.x % 32 == 0.
__device__ void block_merge(Stat& s, Stat& t, float inv_t, Stat* sh /* [2 * kMaxWarps] */) {
  s = warp_merge(s, inv_t);
  t = warp_merge(t, inv_t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // sh is free: every thread is past its previous use
  if (lane == 0) {
    sh[warp] = s;
    sh[kMaxWarps + warp] = t;
  }
  __syncthreads();
  if (warp == 0) {
    const Stat none{-INFINITY, 0.0};
    s = warp_merge(lane < nw ? sh[lane] : none, inv_t);
    t = warp_merge(lane < nw ? sh[kMaxWarps + lane] : none, inv_t);
  }
}

// Sums a and b over the block; the result is valid in thread 0.
__device__ void block_sum2(double& a, double& b, double* sh /* [2 * kMaxWarps] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(kFull, a, o);
    b += __shfl_xor_sync(kFull, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sh[warp] = a;
    sh[kMaxWarps + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nw ? sh[lane] : 0.0;
    b = lane < nw ? sh[kMaxWarps + lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_xor_sync(kFull, a, o);
      b += __shfl_xor_sync(kFull, b, o);
    }
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// x[j] = row[k0 + j] as float, -inf past V.  VEC > 1 only when the host checked 16-byte alignment.
template <typename T, int VEC>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int64_t k0, int64_t V,
                                         float (&x)[VEC]) {
  if (VEC > 1 && k0 + VEC <= V) {
    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + k0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = to_f(p.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = k0 + j < V ? to_f(row[k0 + j]) : -INFINITY;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row(T* __restrict__ row, int64_t k0, int64_t V,
                                          const float (&g)[VEC]) {
  if (VEC > 1 && k0 + VEC <= V) {
    Pack<T, VEC> p;
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = from_f<T>(g[j]);
    *reinterpret_cast<Pack<T, VEC>*>(row + k0) = p;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (k0 + j < V) row[k0 + j] = from_f<T>(g[j]);
  }
}

// (x - m) / T, rounded step by step (never fused): exactly 0 at the max, the same in every pass.
__device__ __forceinline__ float centered(float x, float m, float inv_t) {
  return __fmul_rn(__fsub_rn(x, m), inv_t);
}

// Raise a stream's running max to cover the chunk x, rescaling its sum once.
template <int VEC>
__device__ __forceinline__ void raise_max(Stat& st, const float (&x)[VEC], float inv_t) {
  float cm = -INFINITY;
#pragma unroll
  for (int j = 0; j < VEC; ++j) cm = fmaxf(cm, x[j]);
  if (cm > st.m) {
    st.z = st.m == -INFINITY ? 0.0 : st.z * rescale(st.m, cm, inv_t);
    st.m = cm;
  }
}

// The per-element JSD terms A = log m - log p, B = log m - log q from d = log((1-b) q / (b p)).
__device__ __forceinline__ void jsd_terms(float d, const Params& c, float& a, float& b) {
  const float lp = log1pf(expf(-fabsf(d)));
  a = __fadd_rn(__fadd_rn(__fadd_rn(lp, c.lb_hi), fmaxf(d, 0.f)), c.lb_lo);
  b = __fadd_rn(__fadd_rn(__fadd_rn(lp, c.l1b_hi), fmaxf(-d, 0.f)), c.l1b_lo);
}

__device__ __forceinline__ float2 split(double x) {
  const float hi = static_cast<float>(x);
  const float lo = (isfinite(x) && isfinite(hi)) ? static_cast<float>(x - hi) : 0.f;
  return make_float2(hi, lo);
}

template <typename T, int VEC, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
    distill_fwd_kernel(const T* __restrict__ s,  // [N, V], row stride lds
                       int64_t lds,
                       const T* __restrict__ t,  // [N, V], row stride ldt
                       int64_t ldt,
                       const float* __restrict__ row_weight,  // [N]
                       float* __restrict__ loss,              // [N]
                       T* __restrict__ grad,                  // [N, V] or nullptr
                       int64_t N, int64_t V, Params c) {
  __shared__ Stat sh[2 * kMaxWarps];
  __shared__ float bc[12];  // row constants from thread 0
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const float inv_t = c.inv_t;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float w = row_weight[row];
    T* g = grad != nullptr ? grad + row * V : nullptr;
    if (w == 0.f) {  // masked row: no work at all
      if (threadIdx.x == 0) loss[row] = 0.f;
      if (g != nullptr)
        for (int64_t k = threadIdx.x; k < V; k += blockDim.x) g[k] = from_f<T>(0.f);
      continue;
    }
    const T* sr = s + row * lds;
    const T* tr = t + row * ldt;

    // Pass A: online max / sum-exp of both streams.
    Stat ss{-INFINITY, 0.0}, st{-INFINITY, 0.0};
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
      raise_max<VEC>(ss, xs, inv_t);
      raise_max<VEC>(st, xt, inv_t);
      float zs = 0.f, zt = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        zs += xs[j] == -INFINITY ? 0.f : expf(centered(xs[j], ss.m, inv_t));
        zt += xt[j] == -INFINITY ? 0.f : expf(centered(xt[j], st.m, inv_t));
      }
      ss.z += zs;
      st.z += zt;
    }
    block_merge(ss, st, inv_t, sh);
    double lzs = 0.0, lzt = 0.0, zs = 0.0, zt = 0.0;  // meaningful in thread 0
    if (threadIdx.x == 0) {
      zs = ss.z;
      zt = st.z;
      lzs = log(zs);
      lzt = log(zt);
      const double tw = c.t * w;
      bc[0] = ss.m;
      bc[1] = st.m;
      bc[2] = static_cast<float>(tw / zs);
      bc[3] = static_cast<float>(tw / zt);
      bc[4] = static_cast<float>(1.0 / zs);
      bc[5] = static_cast<float>(1.0 / zt);
      const double l1b = double(c.l1b_hi) + c.l1b_lo, lb = double(c.lb_hi) + c.lb_lo;
      const float2 cd = split((lzt - lzs) + l1b - lb);  // JSD: log((1-b) q / (b p)) = xs - xt + cd
      bc[6] = cd.x;
      bc[7] = cd.y;
    }
    __syncthreads();
    const float ms = bc[0], mt = bc[1], cq = bc[2], cp = bc[3], inv_zs = bc[4], inv_zt = bc[5];
    const float cd_hi = bc[6], cd_lo = bc[7];

    // Pass B: the loss sums with the final maxima (forward KL: and the gradient).
    double sa = 0.0, sb = 0.0;
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC], gv[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
      float ca = 0.f, cb = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float ys = centered(xs[j], ms, inv_t), yt = centered(xt[j], mt, inv_t);
        const float d = __fsub_rn(ys, yt);
        const float es = expf(ys), et = expf(yt);
        if (KIND == kForward) {
          if (et > 0.f) ca += et * d;  // KL = -sum(et d) / Zt + log Zs - log Zt
          gv[j] = es * cq - et * cp;
        } else if (KIND == kReverse) {
          if (es > 0.f) ca += es * d;  // KL = sum(es d) / Zs + log Zt - log Zs
        } else {
          const float q = es * inv_zs, p = et * inv_zt;
          float a, b;
          jsd_terms(__fadd_rn(__fadd_rn(d, cd_hi), cd_lo), c, a, b);
          if (p > 0.f) ca += p * a;
          if (q > 0.f) cb += q * b;
        }
      }
      if (KIND == kForward && g != nullptr) store_row<T, VEC>(g, k0, V, gv);
      sa += ca;
      sb += cb;
    }
    block_sum2(sa, sb, reinterpret_cast<double*>(sh));
    if (threadIdx.x == 0) {
      double div;
      if (KIND == kForward) {
        div = -sa / zt + (lzs - lzt);
      } else if (KIND == kReverse) {
        div = sa / zs + (lzt - lzs);
        const float2 off = split((lzt - lzs) - div);  // D - KL = (xs - xt) + off
        bc[8] = off.x;
        bc[9] = off.y;
      } else {
        div = -c.beta * sa - (1.0 - c.beta) * sb;
        // T w q (h - sum(q h)) = -(1-b) T w q (B - sum(q B))
        bc[8] = static_cast<float>(-(1.0 - c.beta) * c.t * w);
        const float2 cb = split(sb);
        bc[9] = cb.x;
        bc[10] = cb.y;
      }
      loss[row] = static_cast<float>(c.t * c.t * div);
    }
    if (KIND == kForward || g == nullptr) continue;
    __syncthreads();
    const float k8 = bc[8], k9 = bc[9], k10 = bc[10];

    // Pass C (reverse KL, JSD): the gradient.
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC], gv[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float ys = centered(xs[j], ms, inv_t), yt = centered(xt[j], mt, inv_t);
        const float d = __fsub_rn(ys, yt);
        const float es = expf(ys);
        if (KIND == kReverse) {
          gv[j] = es > 0.f ? es * cq * __fadd_rn(__fadd_rn(d, k8), k9) : 0.f;
        } else {
          const float q = es * inv_zs;
          float a, b;
          jsd_terms(__fadd_rn(__fadd_rn(d, cd_hi), cd_lo), c, a, b);
          gv[j] = q > 0.f ? q * k8 * __fsub_rn(__fsub_rn(b, k9), k10) : 0.f;
        }
      }
      store_row<T, VEC>(g, k0, V, gv);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int KIND>
void launch(const void* s, int64_t lds, const void* t, int64_t ldt, const float* w, float* loss,
            void* grad, int64_t N, int64_t V, const Params& c, cudaStream_t st) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  constexpr int64_t kBytes = static_cast<int64_t>(sizeof(T));
  const bool vec = aligned16(s) && aligned16(t) && (grad == nullptr || aligned16(grad)) &&
                   (N == 1 || ((lds * kBytes) % 16 == 0 && (ldt * kBytes) % 16 == 0 &&
                               (grad == nullptr || (V * kBytes) % 16 == 0)));
  const int vec_n = vec ? kVec : 1;
  // About four chunks per thread, whole warps, 64..1024 threads.
  int64_t threads = ceil_div(ceil_div(V, vec_n), 4);
  threads = std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, ceil_div(threads, 32) * 32));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, int64_t(1) << 20));
  const dim3 block(static_cast<unsigned>(threads));
  if (vec)
    distill_fwd_kernel<T, kVec, KIND><<<grid, block, 0, st>>>(
        static_cast<const T*>(s), lds, static_cast<const T*>(t), ldt, w, loss,
        static_cast<T*>(grad), N, V, c);
  else
    distill_fwd_kernel<T, 1, KIND><<<grid, block, 0, st>>>(
        static_cast<const T*>(s), lds, static_cast<const T*>(t), ldt, w, loss,
        static_cast<T*>(grad), N, V, c);
  check(cudaGetLastError(), "distill_fwd_kernel launch");
}

template <typename T>
void launch_kind(int kind, const void* s, int64_t lds, const void* t, int64_t ldt, const float* w,
                 float* loss, void* grad, int64_t N, int64_t V, const Params& c, cudaStream_t st) {
  switch (kind) {
    case kForward:
      return launch<T, kForward>(s, lds, t, ldt, w, loss, grad, N, V, c, st);
    case kReverse:
      return launch<T, kReverse>(s, lds, t, ldt, w, loss, grad, N, V, c, st);
    case kJsd:
      return launch<T, kJsd>(s, lds, t, ldt, w, loss, grad, N, V, c, st);
  }
  throw std::invalid_argument("distill_fwd: unknown kind");
}

}  // namespace

void distill_fwd(DType dt, const void* s, int64_t lds, const void* t, int64_t ldt,
                 const float* row_weight, float* loss, void* grad, int64_t N, int64_t V,
                 double temperature, int kind, double beta, uintptr_t stream) {
  if (N <= 0 || V <= 0) return;
  Params c;
  c.inv_t = static_cast<float>(1.0 / temperature);
  c.t = temperature;
  c.beta = beta;
  const double lb = kind == kJsd ? std::log(beta) : 0.0;
  const double l1b = kind == kJsd ? std::log1p(-beta) : 0.0;
  c.lb_hi = static_cast<float>(lb);
  c.lb_lo = static_cast<float>(lb - c.lb_hi);
  c.l1b_hi = static_cast<float>(l1b);
  c.l1b_lo = static_cast<float>(l1b - c.l1b_hi);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      return launch_kind<float>(kind, s, lds, t, ldt, row_weight, loss, grad, N, V, c, st);
    case DType::kFloat16:
      return launch_kind<__half>(kind, s, lds, t, ldt, row_weight, loss, grad, N, V, c, st);
    case DType::kBFloat16:
      return launch_kind<__nv_bfloat16>(kind, s, lds, t, ldt, row_weight, loss, grad, N, V, c, st);
  }
  throw std::invalid_argument("distill_fwd: unknown dtype");
}

}  // namespace cuda
}  // namespace peftcore

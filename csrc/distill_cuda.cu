// CUDA kernel of the distillation loss.  See distill_cuda.h for the contract and distill_cpu.cpp
// for the math (the same formulas, in the same variables).
//
// One block per row (grid-stride over rows).  Pass A streams s and t once with online maxima and
// fp64 sums Zs, Zt and Y = Zt - Zs (maxima in logit units, rescaled once per VEC-element chunk
// rather than per element, rescale factors in fp64); the block merges the per-thread stats.
// Pass B re-reads the row (from L2 for vocabularies up to ~100k) with the final maxima: it sums
// the non-negative loss terms and, for forward KL (gradient q - p needs no loss), writes the
// gradient.  For reverse KL and JSD the gradient needs the row's sums, so a pass C writes it.
// A row with a NaN or +inf logit, or only -inf ones, gets a NaN loss and NaN gradient.  Loads
// and stores are 16-byte vectors when every row is aligned.
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

// Running maxima (logit units) of both streams, fp64 sums Zs = sum e^((s - ms) / T), Zt likewise,
// and Y = Zt - Zs, summed as es expm1(u) (u = xt - xs) where |u| <= 0.5 so that log(Zt / Zs) =
// log1p(Y / Zs) keeps the relative precision of u at a high T (see distill_cpu.cpp).  In a
// near-uniform row (high T) the divergence is O(1/T^2): the sums need more than fp32's precision.
struct Stat {
  float ms, mt;
  double zs, zt, y;
};

// e^((m_old - m_new) / T) in fp64, so a rescaled partial sum keeps its precision; 0 for a stream
// that has seen only -inf (its sum is 0).  It runs once per merge and each time a running max rises.
__device__ __forceinline__ double rescale(float m_old, float m_new, float inv_t) {
  if (m_old == -INFINITY) return 0.0;
  return exp((static_cast<double>(m_old) - static_cast<double>(m_new)) * inv_t);
}

// x's sums carried to the maxima (ms, mt) >= x's: Zs, Zt scale by their factors, and
// Y = Zt - Zs by Y a_t + Zs (a_t - a_s).
__device__ __forceinline__ void carry(const Stat& x, float ms, float mt, float inv_t, double& zs,
                                      double& zt, double& y) {
  const double as = rescale(x.ms, ms, inv_t), at = rescale(x.mt, mt, inv_t);
  zs = x.zs * as;
  zt = x.zt * at;
  y = x.y * at + x.zs * (at - as);
}

__device__ __forceinline__ Stat merge(const Stat& x, const Stat& y, float inv_t) {
  Stat r;
  r.ms = fmaxf(x.ms, y.ms);
  r.mt = fmaxf(x.mt, y.mt);
  double zs1, zt1, y1, zs2, zt2, y2;
  carry(x, r.ms, r.mt, inv_t, zs1, zt1, y1);
  carry(y, r.ms, r.mt, inv_t, zs2, zt2, y2);
  r.zs = zs1 + zs2;
  r.zt = zt1 + zt2;
  r.y = y1 + y2;
  return r;
}

__device__ __forceinline__ Stat warp_merge(Stat v, float inv_t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stat u;
    u.ms = __shfl_xor_sync(kFull, v.ms, o);
    u.mt = __shfl_xor_sync(kFull, v.mt, o);
    u.zs = __shfl_xor_sync(kFull, v.zs, o);
    u.zt = __shfl_xor_sync(kFull, v.zt, o);
    u.y = __shfl_xor_sync(kFull, v.y, o);
    v = merge(v, u, inv_t);
  }
  return v;
}

// Merges the threads' stats over the block; the result is valid in thread 0.  blockDim.x % 32 == 0.
__device__ void block_merge(Stat& st, float inv_t, Stat* sh /* [kMaxWarps] */) {
  st = warp_merge(st, inv_t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // sh is free: every thread is past its previous use
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const Stat none{-INFINITY, -INFINITY, 0.0, 0.0, 0.0};
    st = warp_merge(lane < nw ? sh[lane] : none, inv_t);
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

// Raise the running maxima to cover the chunk (xs, xt), rescaling the sums once.
template <int VEC>
__device__ __forceinline__ void raise_max(Stat& st, const float (&xs)[VEC], const float (&xt)[VEC],
                                          float inv_t) {
  float cs = -INFINITY, ct = -INFINITY;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    cs = fmaxf(cs, xs[j]);
    ct = fmaxf(ct, xt[j]);
  }
  if (cs > st.ms || ct > st.mt) {
    const float ms = fmaxf(cs, st.ms), mt = fmaxf(ct, st.mt);
    double zs, zt, y;
    carry(st, ms, mt, inv_t, zs, zt, y);
    st = Stat{ms, mt, zs, zt, y};
  }
}

// (P(x), P(-x)) with P(x) = e^x - 1 - x to x^8 (< 1 ulp for |x| <= 0.5): even and odd parts.
__device__ __forceinline__ void p_series(float x, float& pp, float& pn) {
  const float y = x * x;
  const float e = y * (0.5f + y * (1.0f / 24 + y * (1.0f / 720 + y * (1.0f / 40320))));
  const float o = x * y * (1.0f / 6 + y * (1.0f / 120 + y * (1.0f / 5040)));
  pp = e + o;
  pn = e - o;
}
constexpr float kSeriesMax = 0.5f;  // |r| at or below which the terms use the series

__device__ __forceinline__ float2 split(double x) {
  const float hi = static_cast<float>(x);
  const float lo = (isfinite(x) && isfinite(hi)) ? static_cast<float>(x - hi) : 0.f;
  return make_float2(hi, lo);
}

// Per element (the math of distill_cpu.cpp / peftcore/reference/distill.py distill_terms): from
// ys = (s - ms) / T, yt likewise, gives q and the loss term(s), each >= 0:
//   forward  t1 = p psi(r), t2 = q - p                     (psi(x) = x + e^-x - 1)
//   reverse  t1 = q psi(-r), t2 = r
//   jsd      t1 = p psi(A), t2 = q psi(B), b = B           (A = log p - log m, B = log q - log m)
// with r = log p - log q = (yt - ys) - log(Zt / Zs); series where |r| <= 0.5, closed forms (with
// their p -> 0 / q -> 0 limits) elsewhere.
struct Consts {
  float inv_zs, inv_zt, lr_hi, lr_lo, cd_hi, cd_lo;
};
template <int KIND>
__device__ __forceinline__ void terms(float ys, float yt, const Consts& k, const Params& c, float& q,
                                      float& t1, float& t2, float& bb) {
  const float es = expf(ys), et = expf(yt);
  q = es * k.inv_zs;
  const float p = et * k.inv_zt;
  const float r = __fsub_rn(__fsub_rn(__fsub_rn(yt, ys), k.lr_hi), k.lr_lo);
  const bool small = fabsf(r) <= kSeriesMax;
  const float rs = small ? r : 0.f;
  float pp, pn;
  p_series(rs, pp, pn);  // P(r), P(-r)
  bb = 0.f;
  if (KIND == kForward) {
    t1 = p > 0.f ? (small ? p * pn : p * r + (q - p)) : q;
    t2 = small ? -q * (rs + pp) : q - p;
  } else if (KIND == kReverse) {
    t1 = q > 0.f ? (small ? q * pp : (p - q) - q * r) : p;
    t2 = r;
  } else {
    const float b = static_cast<float>(c.beta), omb = static_cast<float>(1.0 - c.beta);
    float av, bv, tp, tq;
    if (small) {  // A = -log1p((1-b) expm1(-r)), B = -log1p(b expm1(r)), both O(r)
      av = -log1pf(omb * (pn - rs));
      bv = -log1pf(b * (pp + rs));
      float ap, an, bp2, bn;
      p_series(av, ap, an);
      p_series(bv, bp2, bn);
      tp = p * an;
      tq = q * bn;
    } else {  // d = log((1-b) q / (b p)) = -r + log(1-b) - log b, Lp = log1p(e^-|d|)
      const float d = __fadd_rn(__fsub_rn(k.cd_hi, r), k.cd_lo);
      const float lp = log1pf(expf(-fabsf(d)));
      av = -__fadd_rn(__fadd_rn(__fadd_rn(lp, c.lb_hi), fmaxf(d, 0.f)), c.lb_lo);
      bv = -__fadd_rn(__fadd_rn(__fadd_rn(lp, c.l1b_hi), fmaxf(-d, 0.f)), c.l1b_lo);
      tp = p * av + omb * (q - p);
      tq = q * bv + b * (p - q);
    }
    t1 = p > 0.f ? tp : omb * q;
    t2 = q > 0.f ? tq : b * p;
    bb = q > 0.f ? bv : 0.f;
  }
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
  __shared__ Stat sh[kMaxWarps];
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

    // Pass A: online maxima and the sums Zs, Zt, Y of both streams.
    Stat st{-INFINITY, -INFINITY, 0.0, 0.0, 0.0};
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
      raise_max<VEC>(st, xs, xt, inv_t);
      float zs = 0.f, zt = 0.f, y = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // -inf entries (and the padding past V) give 0 without an inf - inf; a NaN or +inf logit
        // gives a NaN that reaches Z (the row has no softmax).
        const float ys = xs[j] == -INFINITY ? -INFINITY : centered(xs[j], st.ms, inv_t);
        const float yt = xt[j] == -INFINITY ? -INFINITY : centered(xt[j], st.mt, inv_t);
        const float es = xs[j] == -INFINITY ? 0.f : expf(ys);
        const float et = xt[j] == -INFINITY ? 0.f : expf(yt);
        zs += es;
        zt += et;
        const float u = __fsub_rn(yt, ys);
        if (es > 0.f && et > 0.f && fabsf(u) <= kSeriesMax) {
          float pu, pn;
          p_series(u, pu, pn);
          y += es * (u + pu);
        } else {
          y += et - es;
        }
      }
      st.zs += zs;
      st.zt += zt;
      st.y += y;
    }
    block_merge(st, inv_t, sh);
    if (threadIdx.x == 0) {
      // The max element gives e^0 = 1, so a row with a softmax has 1 <= Z <= V.
      const bool valid = st.zs >= 1.0 && st.zt >= 1.0 && isfinite(st.zs) && isfinite(st.zt);
      bc[0] = st.ms;
      bc[1] = st.mt;
      bc[2] = valid ? static_cast<float>(1.0 / st.zs) : 0.f;
      bc[3] = valid ? static_cast<float>(1.0 / st.zt) : 0.f;
      const float2 lr = split(valid ? log1p(st.y / st.zs) : 0.0);  // log(Zt / Zs)
      bc[4] = lr.x;
      bc[5] = lr.y;
      const double l1b = double(c.l1b_hi) + c.l1b_lo, lb = double(c.lb_hi) + c.lb_lo;
      const float2 cd = split(l1b - lb);  // JSD: d = log((1-b) q / (b p)) = -r + cd
      bc[6] = cd.x;
      bc[7] = cd.y;
      bc[11] = valid ? 1.f : 0.f;
    }
    __syncthreads();
    const float ms = bc[0], mt = bc[1];
    const Consts k{bc[2], bc[3], bc[4], bc[5], bc[6], bc[7]};
    const float gscale = static_cast<float>(c.t * w);  // d(T^2 L)/ds = T dL/d(s/T), times w
    if (bc[11] == 0.f) {  // no softmax: NaN loss and gradient, as torch's log_softmax
      if (threadIdx.x == 0) loss[row] = NAN;
      if (g != nullptr)
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = from_f<T>(NAN);
      __syncthreads();  // bc is rewritten by the next row's thread 0
      continue;
    }

    // Pass B: the loss sums with the final maxima (forward KL: and the gradient).
    double sa = 0.0, sb = 0.0;
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC], gv[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
      float ca = 0.f, cb = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gv[j] = 0.f;
        if (k0 + j >= V) continue;
        const float ys = centered(xs[j], ms, inv_t), yt = centered(xt[j], mt, inv_t);
        float q, t1, t2, bb;
        terms<KIND>(ys, yt, k, c, q, t1, t2, bb);
        ca += t1;
        if (KIND == kJsd) cb += t2;
        if (KIND == kForward) gv[j] = t2 * gscale;
      }
      if (KIND == kForward && g != nullptr) store_row<T, VEC>(g, k0, V, gv);
      sa += ca;
      sb += cb;
    }
    block_sum2(sa, sb, reinterpret_cast<double*>(sh));
    if (threadIdx.x == 0) {
      double div;
      if (KIND == kJsd) {
        div = c.beta * sa + (1.0 - c.beta) * sb;
        const float2 kl = split(sb);  // sum(q B) = KL(q || m)
        bc[8] = kl.x;
        bc[9] = kl.y;
      } else {
        div = sa;
        const float2 kl = split(sa);
        bc[8] = kl.x;
        bc[9] = kl.y;
      }
      loss[row] = static_cast<float>(c.t * c.t * div);
    }
    if (KIND == kForward || g == nullptr) {
      __syncthreads();  // bc is rewritten by the next row's thread 0
      continue;
    }
    __syncthreads();
    const float kl_hi = bc[8], kl_lo = bc[9];
    const float omb = static_cast<float>(1.0 - c.beta);

    // Pass C (reverse KL, JSD): T w q (-r - KL), T w (1-b) q (B - sum(q B)).
    for (int64_t k0 = first; k0 < V; k0 += step) {
      float xs[VEC], xt[VEC], gv[VEC];
      load_row<T, VEC>(sr, k0, V, xs);
      load_row<T, VEC>(tr, k0, V, xt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gv[j] = 0.f;
        if (k0 + j >= V) continue;
        const float ys = centered(xs[j], ms, inv_t), yt = centered(xt[j], mt, inv_t);
        float q, t1, t2, bb;
        terms<KIND>(ys, yt, k, c, q, t1, t2, bb);
        if (KIND == kReverse)
          gv[j] = q > 0.f ? q * __fsub_rn(__fsub_rn(-t2, kl_hi), kl_lo) * gscale : 0.f;
        else
          gv[j] = q > 0.f ? omb * q * __fsub_rn(__fsub_rn(bb, kl_hi), kl_lo) * gscale : 0.f;
      }
      store_row<T, VEC>(g, k0, V, gv);
    }
    __syncthreads();  // bc is rewritten by the next row's thread 0
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

// CPU kernel of the distillation loss.  See distill_cpu.h for the contract.
//
// The math is the reference's (distill_terms in peftcore/reference/distill.py), per row:
// with xs = (s - max s) / T, es = e^xs, Zs = sum(es), likewise xt, et, Zt, and u = xt - xs,
//   r = log p - log q = u - log(Zt / Zs),   log(Zt / Zs) = log1p(Y / Zs),  Y = sum(es expm1(u))
// (Y = Zt - Zs in fp64, or, when every |u| <= 0.5, summed as es (u + P(u)), P(x) = e^x - 1 - x,
// so that at a high T, where every u is O(1/T), r keeps its relative precision), then the
// non-negative terms:
//   forward  KL = sum(p psi(r)),  psi(x) = x + e^-x - 1,   dKL/d(s/T) = q - p = -q expm1(r)
//   reverse  KL = sum(q psi(-r)),                          dKL/d(s/T) = q (-r - KL)
//   jsd      beta sum(p psi(A)) + (1-beta) sum(q psi(B)),  A = log p - log m, B = log q - log m,
//            dJSD/d(s/T) = (1-beta) q (B - sum(q B))
// psi, expm1 and A, B by series (|r| <= 0.5; A = -log1p((1-b) expm1(-r)), B likewise) or by
// closed forms (p psi(r) = p r + q - p, ...) elsewhere: no term is a difference of O(1) numbers
// that cancel to O(1/T^2), so the loss is never negative and stays accurate at any T.  A row
// holding a NaN or +inf logit, or only -inf ones, gives a NaN loss and a NaN gradient row.
//
// Fast path: where the classic sums (forward sum(et u)/Zt - log(Zt/Zs), JSD sum(p A) ...) give a
// divergence >= 1e4 times a bound of their rounding (moderate T, most training rows), they are
// used as they are (and the gradients q - p, q (D - KL) formed directly); only the other rows (a
// high T, near-equal rows) pay for the cancellation-free terms.  Both agree to ~1e-7.  The KLs'
// rounding bound is per row, from the row ranges (max - min) / T of pass (1) (no per-element work
// in pass (2)); JSD's is summed per element in its terms pass, over es and et (not p and q).
//
// Passes over a row while it sits in the core's L2: (1) max and min of s and t; (2) es, et, u and
// the sums, of es/et/u only what the fast path reads kept in a per-thread scratch (forward +
// gradient: es, et; reverse + gradient: es, u; JSD: all three; a row that leaves the fast path
// refills all three); (3) the loss terms (and the forward gradient); (4) the reverse / JSD
// gradient.  Row sums run in fp32 lanes over chunks of kChunk elements and in fp64 lanes across
// chunks.  Row constants subtracted from per-element terms go in as fp32 hi + lo pairs so their
// rounding does not bias every element the same way.
//
// Speed (2-core AVX-512 machine shared with another job, 2 threads, [4096, 32000] fp32, T = 2,
// randn * 2 logits, kernel only, median of per-round ratios over 11 interleaved rounds
// (7 for the CPU-time and one-pass columns) vs the kernel before this change, 312699f):
//   mode       before    after   after/before (2 thr wall; 1 thr CPU)   after/one-pass (6238eeb)
//   fwd        152 ms    136 ms  0.914; 0.950                           1.08
//   fwd+grad   192 ms    176 ms  0.918; 0.957                           1.06
//   rev        140 ms    136 ms  0.969; 0.963                           1.07
//   rev+grad   185 ms    164 ms  0.872; 0.876                           0.93
//   jsd        288 ms    244 ms  0.836; 0.819                           1.04
//   jsd+grad   328 ms    268 ms  0.840; 0.860                           1.02
// (wall times ~2x a quiet machine's).  Most of the gain: no per-element rounding bound for the
// KLs, fewer scratch writes, no lane masks in the KLs' sums on rows without -inf, JSD's row constant
// folded into d and its sums over es, et.
#include "distill_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"  // get_num_threads(): the module-wide default thread count
#include "cpu_simd.h"

namespace peftcore {
namespace cpu {
namespace {

using VF = simd::Vec<float>::V;
using VI = simd::Vec<float>::Mk;
using VD = simd::Vec<double>::V;                                          // L / 2 doubles
typedef float VH __attribute__((vector_size(simd::kVecBytes / 2)));  // L / 2 floats
constexpr int L = simd::Vec<float>::L;
// Row sums: fp32 lanes over kChunk elements, then fp64 lanes.  In a near-uniform row (high T)
// KL is a small difference of log Zt - log Zs ~ log V, so Z needs more than fp32's precision.
constexpr int64_t kChunk = 4 * L;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline VF splat(float x) { return simd::splat<VF>(x); }
inline VF load(const float* p) { return simd::load<VF>(p); }
inline void store(float* p, VF v) { simd::store(p, v); }
// The first n (< L) elements at p; the other lanes hold `fill`.
inline VF load_part(const float* p, int64_t n, float fill) {
  VF v = splat(fill);
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}
inline void store_part(float* p, VF v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
}
inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VF keep_if(VI m, VF x) { return m ? x : splat(0.f); }
inline VF pos(VF x) { return keep_if(x > splat(0.f), x); }  // max(x, 0); 0 for NaN
inline VF vabs(VF x) { return (VF)((VI)x & 0x7fffffff); }  // |x|, by the sign bit
// The two fp64 accumulators of a row sum, and their total.
struct Wide {
  VD lo = simd::splat<VD>(0.0), hi = simd::splat<VD>(0.0);
  void add(VF x) {
    VH a, b;
    std::memcpy(&a, &x, sizeof a);
    std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof a, sizeof b);
    lo += __builtin_convertvector(a, VD);
    hi += __builtin_convertvector(b, VD);
  }
  double sum() const {
    const VD v = lo + hi;
    double s = 0;
    for (int l = 0; l < L / 2; ++l) s += v[l];
    return s;
  }
};
inline float hmax(VF v) {
  float m = v[0];
  for (int l = 1; l < L; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// e^x for x <= 0 (a rounding error above 0 is fine), -inf and NaN included.  Cephes' expf
// reduction and polynomial, ~1 ulp; results below 2^-126 (x < -87.34) are flushed to 0: such
// probabilities are far below what an fp32 row sum can see.
inline VF exp_neg(VF x) {
  const float kLo = -87.33654475f;  // log(2^-126)
  const VI tiny = x < splat(kLo);  // false for NaN: NaN flows through
  x = tiny ? splat(kLo) : x;
  const VF magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VF fx = x * splat(1.44269504088896341f) + magic;
  const VF n = fx - magic;
  const VI ni = (VI)fx - (VI)magic;  // n as an integer, from the bits
  VF r = x - n * splat(0.693359375f);
  r = r + n * splat(2.12194440e-4f);
  VF p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const VF y = p * (r * r) + r + splat(1.0f);
  const VF scale = (VF)((ni + 127) << 23);  // 2^n, n in [-126, 0]
  return tiny ? splat(0.f) : y * scale;
}

// log(1 + e) for e in [-0.4, 1]: 2 atanh(z), z = e / (2 + e) in [-1/4, 1/3], by its series to z^15
// (truncation < 2e-9 relative).  No rounding of 1 + e, so small e keeps its relative accuracy.
inline VF log1p01(VF e) {
  const VF z = e / (e + splat(2.0f));
  const VF w = z * z;
  VF p = splat(1.0f / 15);
  p = p * w + splat(1.0f / 13);
  p = p * w + splat(1.0f / 11);
  p = p * w + splat(1.0f / 9);
  p = p * w + splat(1.0f / 7);
  p = p * w + splat(1.0f / 5);
  p = p * w + splat(1.0f / 3);
  p = p * w + splat(1.0f);
  return (z + z) * p;
}

// For x in [-0.4, 0.65]: -log1p(x) and psi(-log1p(x)) = x - log1p(x), psi(a) = a + e^-a - 1.
// With z = x / (2 + x) and w = z^2, log1p(x) = 2 z (1 + w S(w)), S = 1/3 + w/5 + ... + w^6/15, and
// x - log1p(x) = z^2 ((2 + x) - 2 z S(w)) (x - 2z = x z = z^2 (2 + x)): no cancellation at small x.
inline void neg_log1p_psi(VF x, VF& neg_log1p, VF& psi) {
  const VF two = splat(2.0f);
  const VF z = x / (x + two);
  const VF w = z * z;
  VF sv = splat(1.0f / 15);
  sv = sv * w + splat(1.0f / 13);
  sv = sv * w + splat(1.0f / 11);
  sv = sv * w + splat(1.0f / 9);
  sv = sv * w + splat(1.0f / 7);
  sv = sv * w + splat(1.0f / 5);
  sv = sv * w + splat(1.0f / 3);
  const VF zs = z * sv;
  neg_log1p = -(z + z) * (w * sv + splat(1.0f));
  psi = w * ((two + x) - (zs + zs));
}

struct Split {
  float hi, lo;
};
// x as fp32 hi + lo (lo = 0 where x is not finite).
inline Split split(double x) {
  const float hi = static_cast<float>(x);
  const float lo = (std::isfinite(x) && std::isfinite(hi)) ? static_cast<float>(x - hi) : 0.f;
  return {hi, lo};
}

struct Params {
  float inv_t;
  double t;
  double beta;
  Split log_b, log_1mb;  // log(beta), log(1 - beta)
};

// (P(x), P(-x)) with P(x) = e^x - 1 - x = x^2/2 + x^3/6 + ... to x^8 (< 1 ulp for |x| <= 0.5),
// from one even and one odd polynomial.
inline void p_series(VF x, VF& pp, VF& pn) {
  const VF y = x * x;
  VF e = splat(1.0f / 40320);
  e = e * y + splat(1.0f / 720);
  e = e * y + splat(1.0f / 24);
  e = e * y + splat(0.5f);
  e = e * y;
  VF o = splat(1.0f / 5040);
  o = o * y + splat(1.0f / 120);
  o = o * y + splat(1.0f / 6);
  o = o * (x * y);
  pp = e + o;
  pn = e - o;
}
constexpr float kSeriesMax = 0.5f;  // |r| at or below which the terms use the series

// Loss of one row (T^2 * divergence); writes grad[0:V] (already scaled by T * w) when GRAD.
// bq, bp, bd: scratch of round_up(V, L) floats each.
template <DistillKind K, bool GRAD>
float distill_row(const float* s, const float* t, int64_t V, double w, float* grad, const Params& c,
                  float* bq, float* bp, float* bd) {
  const int64_t Vf = V - V % L;
  const int64_t Vp = simd::round_up(V, L);
  const bool tail = Vf < V;

  // (1) row maxima
  // and, for the KLs' fast path, row minima over the elements above -inf (pad lanes load +inf
  // there; a row holding a -inf finds them in a second, masked pass; a NaN makes Z NaN).
  constexpr bool kMin = K != DistillKind::kJsd;
  VF msv = splat(-kInf), mtv = splat(-kInf), nsv = splat(kInf), ntv = splat(kInf);
  for (int64_t k = 0; k < Vf; k += L) {
    const VF sv = load(s + k), tv = load(t + k);
    msv = vmax(sv, msv);
    mtv = vmax(tv, mtv);
    if (kMin) {
      nsv = sv < nsv ? sv : nsv;
      ntv = tv < ntv ? tv : ntv;
    }
  }
  if (tail) {
    msv = vmax(load_part(s + Vf, V - Vf, -kInf), msv);
    mtv = vmax(load_part(t + Vf, V - Vf, -kInf), mtv);
    if (kMin) {
      const VF sv = load_part(s + Vf, V - Vf, kInf), tv = load_part(t + Vf, V - Vf, kInf);
      nsv = sv < nsv ? sv : nsv;
      ntv = tv < ntv ? tv : ntv;
    }
  }
  const bool has_ninf = kMin && (hmax(-nsv) == kInf || hmax(-ntv) == kInf);
  if (has_ninf) {  // a -inf: minima over the others
    nsv = ntv = splat(kInf);
    const VF ninf = splat(-kInf);
    for (int64_t k = 0; k < Vp; k += L) {
      const VF sv = k < Vf ? load(s + k) : load_part(s + k, V - k, kInf);
      const VF tv = k < Vf ? load(t + k) : load_part(t + k, V - k, kInf);
      nsv = (sv < nsv) & (sv > ninf) ? sv : nsv;
      ntv = (tv < ntv) & (tv > ninf) ? tv : ntv;
    }
  }
  const VF inv_t = splat(c.inv_t);
  // xs = (s - max s) / T: exactly 0 at the max (es = 1 exactly), and (s - max s) is exact near it.
  const VF ms = splat(hmax(msv)), mt = splat(hmax(mtv));
  const VF half = splat(kSeriesMax);

  // One element vector's xs, xt, es, et and u = xt - xs, the same code wherever it runs (so the
  // compiler rounds, and contracts, it the same way: a refill of the scratch is bit-identical).
  auto element = [&](int64_t k, VF& xs, VF& xt, VF& es, VF& et, VF& u) {
    VF sv, tv;
    if (k < Vf) {
      sv = load(s + k);
      tv = load(t + k);
    } else {
      sv = load_part(s + k, V - k, -kInf);
      tv = load_part(t + k, V - k, -kInf);
    }
    xs = (sv - ms) * inv_t;
    xt = (tv - mt) * inv_t;
    es = exp_neg(xs);
    et = exp_neg(xt);
    u = xt - xs;
  };
  // The scratch es, et, u: written by pass (2) when the gradient or JSD's terms need it, else
  // only if the row leaves the fast path (a loss-only KL at moderate T never writes it).
  // Pass (2) writes only what the fast path reads: forward + gradient es, et; reverse + gradient
  // es, u; JSD all three.  A row that leaves the fast path refills the whole scratch.
  constexpr bool kStoreQ = GRAD || K == DistillKind::kJsd;
  constexpr bool kStoreP = K == DistillKind::kJsd || (GRAD && K == DistillKind::kForward);
  constexpr bool kStoreD = K == DistillKind::kJsd || (GRAD && K == DistillKind::kReverse);
  bool stored = K == DistillKind::kJsd;
  auto refill = [&]() {
    for (int64_t k = 0; k < Vp; k += L) {
      VF xs, xt, es, et, u;
      element(k, xs, xt, es, et, u);
      store(bq + k, es);
      store(bp + k, et);
      store(bd + k, u);
    }
    stored = true;
  };

  // (2) exps and row sums.  Pad lanes load -inf: es = et = 0 and u = xt - xs = NaN.  A NaN or
  // +inf logit, or a row of -inf, makes Z NaN or 0.
  // The classic one-pass divergence sums (see the fast path) mask the lanes whose weight e^x is 0,
  // where u may be +-inf or NaN; a chunk of full vectors in a row without a -inf and whose
  // (max - min) / T is finite in fp32 has a finite u everywhere (e * u = 0 exactly where e = 0),
  // so there the mask is left out.
  bool dense = false;
  if (kMin && !has_ninf) {
    const double ds = double(hmax(msv)) - double(-hmax(-nsv)), dt = double(hmax(mtv)) - double(-hmax(-ntv));
    dense = ds < 1e38 && dt < 1e38 && ds * c.inv_t < 1e38 && dt * c.inv_t < 1e38;  // false for NaN
  }
  Wide wzs, wzt, wa;
  auto chunk = [&](int64_t k0, int64_t k1, auto masked) {
    VF azs = splat(0.f), azt = splat(0.f), aa = splat(0.f);
    for (int64_t k = k0; k < k1; k += L) {
      VF xs, xt, es, et, u;
      element(k, xs, xt, es, et, u);
      azs += es;
      azt += et;
      if (K == DistillKind::kForward) aa += decltype(masked)::value ? keep_if(et > splat(0.f), et * u) : et * u;
      if (K == DistillKind::kReverse) aa += decltype(masked)::value ? keep_if(es > splat(0.f), es * u) : es * u;
      if (kStoreQ) store(bq + k, es);
      if (kStoreP) store(bp + k, et);
      if (kStoreD) store(bd + k, u);
    }
    wzs.add(azs);
    wzt.add(azt);
    if (K != DistillKind::kJsd) wa.add(aa);
  };
  for (int64_t k0 = 0; k0 < Vp; k0 += kChunk) {
    const int64_t k1 = std::min(k0 + kChunk, Vp);
    if (kMin && dense && k1 <= Vf)
      chunk(k0, k1, std::false_type{});
    else
      chunk(k0, k1, std::true_type{});
  }
  const double zs = wzs.sum(), zt = wzt.sum();
  // The max element gives e^0 = 1 exactly, so a row with a softmax has 1 <= Z <= V.
  if (!(zs >= 1.0 && zt >= 1.0 && std::isfinite(zs) && std::isfinite(zt))) {
    const float nan = std::numeric_limits<float>::quiet_NaN();  // no softmax: NaN loss and gradient
    if (GRAD) std::fill(grad, grad + V, nan);
    return nan;
  }
  double log_ratio = std::log(zt / zs);  // refined below for the cancellation-free path
  const VF izs = splat(static_cast<float>(1.0 / zs)), izt = splat(static_cast<float>(1.0 / zt));
  const double tw = c.t * w;
  const VF zero = splat(0.f);

  // Fast path (forward, reverse): the classic one-pass divergence, forward sum(et u) / Zt -
  // log(Zt/Zs), reverse -sum(es u) / Zs + log(Zt/Zs), is a difference of O(log V) numbers whose
  // rounding is below err = 4 eps (E|xs| + E|xt| + |log Zs| + |log Zt| + 1) (a bound: the
  // per-element roundings are independent and mostly cancel).  E|xs| + E|xt| (the means under p
  // for forward, q for reverse) are bounded per row by the ranges (max - min) / T of pass (1), each
  // side at most 87.34 where its e^x > 0, so err is only larger.  Where the divergence is >= 1e4 err
  // (low and moderate T: most training rows) it is good to 1e-4 at worst (~1e-7 in practice) and
  // the gradient q - p formed directly to ~eps / sqrt(KL); it is used, and pass (3) only writes
  // the gradient.  Elsewhere (a high T, near-equal distributions) the cancellation-free terms of
  // pass (3) run.
  if (K != DistillKind::kJsd) {
    const double kl_fast = K == DistillKind::kForward ? wa.sum() / zt - log_ratio : -wa.sum() / zs + log_ratio;
    const double inv_t64 = 1.0 / c.t;
    // (max - min) / T of each side; the side whose e^x weighs the mean is below 87.34 there
    double rs = (double(hmax(msv)) - double(-hmax(-nsv))) * inv_t64;
    double rt = (double(hmax(mtv)) - double(-hmax(-ntv))) * inv_t64;
    if (K == DistillKind::kForward) rt = std::min(rt, 87.34);
    if (K == DistillKind::kReverse) rs = std::min(rs, 87.34);
    const double err = 4 * 5.96e-8 * (rs + rt + std::fabs(std::log(zs)) + std::fabs(std::log(zt)) + 1.0);
    if (kl_fast >= 1e4 * err) {  // false for NaN / inf
      if (GRAD) {
        const VF cq = splat(static_cast<float>(tw / zs)), cp = splat(static_cast<float>(tw / zt));
        const Split off = split(log_ratio - kl_fast);  // -r - KL = -u + (log(Zt/Zs) - KL)
        const VF off_hi = splat(off.hi), off_lo = splat(off.lo);
        auto g = [&](int64_t k) {
          const VF es = load(bq + k);
          if (K == DistillKind::kForward) return es * cq - load(bp + k) * cp;
          return keep_if(es > zero, es * cq * ((off_hi - load(bd + k)) + off_lo));
        };
        for (int64_t k = 0; k < Vf; k += L) store(grad + k, g(k));
        if (tail) store_part(grad + Vf, g(Vf), V - Vf);
      }
      return static_cast<float>(c.t * c.t * kl_fast);
    }
  }

  // (3) the loss terms, each >= 0 (see distill_terms in peftcore/reference/distill.py): with
  // r = log p - log q and psi(x) = x + e^-x - 1, forward sum(p psi(r)), reverse sum(q psi(-r)),
  // jsd beta sum(p psi(A)) + (1 - beta) sum(q psi(B)); series where |r| <= 0.5, closed forms
  // (p psi(r) = p r + q - p, whose limit where p = 0 is q) elsewhere.  Forward writes its
  // gradient T w (q - p) here; the others need the row's sums first.
  const float beta = static_cast<float>(c.beta), omb = static_cast<float>(1.0 - c.beta);
  const VF vb = splat(beta), v1b = splat(omb);
  const Split cd = split((double(c.log_1mb.hi) + c.log_1mb.lo) - (double(c.log_b.hi) + c.log_b.lo));
  const VF cd_hi = splat(cd.hi), cd_lo = splat(cd.lo);
  const VF lb_hi = splat(c.log_b.hi), lb_lo = splat(c.log_b.lo);
  const VF l1b_hi = splat(c.log_1mb.hi), l1b_lo = splat(c.log_1mb.lo);
  const VF g_scale = splat(static_cast<float>(tw));
  Wide wsp, wsq;
  double sp_fast = 0, sq_fast = 0;
  bool done = false;
  if (K == DistillKind::kJsd) {
    // Fast path, as for the KLs: the classic sums beta sum(p A) + (1-beta) sum(q B) (A, B by the
    // logaddexp form) cancel to the O(r^2) result from O(r) terms; with their rounding bounded by
    // err = 4 eps (sum(p |A|) + sum(q |B|) + 1), a JSD >= 1e4 err is used as is (B kept for the
    // gradient), else the cancellation-free terms below run.
    // d = log((1-b) q / (b p)) = -u + (log(Zt / Zs) + log(1-b) - log b), the row constant in
    // fp64 (log(Zt / Zs) as good as any where this path is taken) as an fp32 hi + lo pair; the
    // sums run over es, et and are divided by Zs, Zt in fp64.
    const Split d0 = split(log_ratio + ((double(c.log_1mb.hi) + c.log_1mb.lo) - (double(c.log_b.hi) + c.log_b.lo)));
    const VF d0_hi = splat(d0.hi), d0_lo = splat(d0.lo);
    Wide wfp, wfq;
    VF fep = splat(0.f), feq = splat(0.f);  // the bound's sums: fp32 is plenty (see below)
    for (int64_t k0 = 0; k0 < Vp; k0 += kChunk) {
      const int64_t k1 = std::min(k0 + kChunk, Vp);
      VF fp = splat(0.f), fq = splat(0.f);
      for (int64_t k = k0; k < k1; k += L) {
        const VF es = load(bq + k), et = load(bp + k);
        const VF d = (d0_hi - load(bd + k)) + d0_lo;
        const VF lp = log1p01(exp_neg(-vabs(d)));
        const VF a_b = -(((lp + lb_hi) + pos(d)) + lb_lo);
        const VF b_b = -(((lp + l1b_hi) + pos(-d)) + l1b_lo);
        const VI pm = et > zero, qm = es > zero;
        const VF tp = keep_if(pm, et * a_b), tq = keep_if(qm, es * b_b);
        fp += tp;
        fq += tq;
        fep += vabs(tp);
        feq += vabs(tq);
        if (GRAD) store(bd + k, keep_if(qm, b_b));
      }
      wfp.add(fp);
      wfq.add(fq);
    }
    sp_fast = wfp.sum() / zt;
    sq_fast = wfq.sum() / zs;
    const double fast = c.beta * sp_fast + (1.0 - c.beta) * sq_fast;
    // sum(p |A|) + sum(q |B|) from fp32 lane sums of non-negative terms (relative error < V eps / L
    // < 1e-3 for V < 2^20 at L = 16; taken 1.01 times, so the bound is only larger)
    double sep = 0, seq = 0;
    for (int l = 0; l < L; ++l) sep += fep[l], seq += feq[l];
    const double fe = 1.01 * (sep / zt + seq / zs);
    if (fast >= 1e4 * (4 * 5.96e-8 * (fe + 1.0))) {
      done = true;
    } else if (GRAD) {
      refill();  // the scratch u was overwritten by B
    }
  }
  Split lr{0.f, 0.f};  // log(Zt / Zs) of the cancellation-free terms, r = u - lr
  if (!done) {
    if (!stored) refill();
    // Y = Zt - Zs.  When every |u| <= 0.5 (a high T: all of them are O(1/T)), Zt and Zs are nearly
    // equal and Y is summed as es expm1(u) = es (u + P(u)) from the scratch, so that log(Zt / Zs) =
    // log1p(Y / Zs) keeps the relative precision of u (lanes with es = 0 or et = 0 contribute
    // et - es exactly either way).  Otherwise the fp64 ratio of the sums is as good.
    {
      VF umax = splat(0.f);  // max |u| over the lanes where both es and et are > 0
      for (int64_t k = 0; k < Vp; k += L) {
        const VI both = (load(bq + k) > splat(0.f)) & (load(bp + k) > splat(0.f));
        umax = vmax(keep_if(both, vabs(load(bd + k))), umax);
      }
      if (hmax(umax) <= kSeriesMax) {
        Wide wy;
        for (int64_t k0 = 0; k0 < Vp; k0 += kChunk) {
          const int64_t k1 = std::min(k0 + kChunk, Vp);
          VF ay = splat(0.f);
          for (int64_t k = k0; k < k1; k += L) {
            const VF es = load(bq + k), et = load(bp + k), u = load(bd + k);
            const VI both = (es > splat(0.f)) & (et > splat(0.f));
            VF pu, pn;
            p_series(keep_if(both, u), pu, pn);
            ay += both ? es * (u + pu) : et - es;
          }
          wy.add(ay);
        }
        log_ratio = std::log1p(wy.sum() / zs);
      }
    }
    lr = split(log_ratio);
  }
  const VF lr_hi = splat(lr.hi), lr_lo = splat(lr.lo);
  for (int64_t k0 = 0; k0 < (done ? 0 : Vp); k0 += kChunk) {
    const int64_t k1 = std::min(k0 + kChunk, Vp);
    VF asp = splat(0.f), asq = splat(0.f);
    for (int64_t k = k0; k < k1; k += L) {
      const VF q = load(bq + k) * izs, p = load(bp + k) * izt;
      const VF r = (load(bd + k) - lr_hi) - lr_lo;
      const VI small = vabs(r) <= half;
      const VF rs = keep_if(small, r);
      VF pp, pn;
      p_series(rs, pp, pn);  // P(r), P(-r)
      const VI pm = p > zero, qm = q > zero;
      if (K == DistillKind::kForward) {
        const VF term = small ? p * pn : p * r + (q - p);
        asp += pm ? term : q;
        if (GRAD) {
          const VF g = (small ? -q * (rs + pp) : q - p) * g_scale;
          if (k < Vf)
            store(grad + k, g);
          else
            store_part(grad + k, g, V - k);
        }
      } else if (K == DistillKind::kReverse) {
        const VF term = small ? q * pp : (p - q) - q * r;
        asp += qm ? term : p;
      } else {
        // small |r|: A = -log1p(xa), xa = (1-b) expm1(-r), B = -log1p(xb), xb = b expm1(r), both
        // O(r), and psi(A) = xa - log1p(xa), psi(B) likewise, from one atanh series each
        VF a_s, b_s, psa, psb;
        neg_log1p_psi(v1b * (pn - rs), a_s, psa);
        neg_log1p_psi(vb * (pp + rs), b_s, psb);
        // large |r|: with d = log((1-b) q / (b p)) = -r + log(1-b) - log b and Lp = log1p(e^-|d|),
        // A = -log b - max(d, 0) - Lp, B = -log(1-b) - max(-d, 0) - Lp
        const VF d = (cd_hi - r) + cd_lo;
        const VF lp = log1p01(exp_neg(-vabs(d)));
        const VF a_b = -(((lp + lb_hi) + pos(d)) + lb_lo);
        const VF b_b = -(((lp + l1b_hi) + pos(-d)) + l1b_lo);
        const VF bv = small ? b_s : b_b;
        const VF tp = small ? p * psa : p * a_b + v1b * (q - p);
        const VF tq = small ? q * psb : q * b_b + vb * (p - q);
        asp += pm ? tp : v1b * q;
        asq += qm ? tq : vb * p;
        if (GRAD) store(bd + k, keep_if(qm, bv));
      }
    }
    wsp.add(asp);
    wsq.add(asq);
  }
  const double sp = done ? sp_fast : wsp.sum(), sq = done ? sq_fast : wsq.sum();
  if (K == DistillKind::kForward) return static_cast<float>(c.t * c.t * sp);

  if (K == DistillKind::kReverse) {
    // (4) T w q ((log q - log p) - KL) = T w q (-r - KL)
    if (GRAD) {
      const Split kl = split(sp);
      const VF kl_hi = splat(kl.hi), kl_lo = splat(kl.lo);
      auto g = [&](int64_t k) {
        const VF q = load(bq + k) * izs;
        const VF r = (load(bd + k) - lr_hi) - lr_lo;
        return keep_if(q > zero, q * ((-r - kl_hi) - kl_lo) * g_scale);
      };
      for (int64_t k = 0; k < Vf; k += L) store(grad + k, g(k));
      if (tail) store_part(grad + Vf, g(Vf), V - Vf);
    }
    return static_cast<float>(c.t * c.t * sp);
  }

  // (4) JSD gradient: T w q (h - sum(q h)), h = (1 - b) B, sum(q B) = KL(q || m) = sq
  const double jsd = c.beta * sp + (1.0 - c.beta) * sq;
  if (GRAD) {
    const VF cg = splat(static_cast<float>((1.0 - c.beta) * tw));
    const Split cb = split(sq);
    const VF b_hi = splat(cb.hi), b_lo = splat(cb.lo);
    auto g = [&](int64_t k) {
      const VF q = load(bq + k) * izs;
      return keep_if(q > zero, q * cg * ((load(bd + k) - b_hi) - b_lo));
    };
    for (int64_t k = 0; k < Vf; k += L) store(grad + k, g(k));
    if (tail) store_part(grad + Vf, g(Vf), V - Vf);
  }
  return static_cast<float>(c.t * c.t * jsd);
}

struct AlignedFloats {
  float* p;
  explicit AlignedFloats(size_t n)
      : p(static_cast<float*>(::operator new[](n * sizeof(float), std::align_val_t(64)))) {}
  ~AlignedFloats() { ::operator delete[](p, std::align_val_t(64)); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

template <DistillKind K, bool GRAD>
void distill_rows(const float* s, int64_t lds, const float* t, int64_t ldt, const float* row_weight,
                  float* loss, float* grad, int64_t N, int64_t V, const Params& c, int nthreads) {
  int nt = nthreads > 0 ? nthreads : get_num_threads();
#ifndef _OPENMP
  nt = 1;
#endif
  if (nt < 1) nt = 1;
  if (N < nt) nt = static_cast<int>(std::max<int64_t>(N, 1));
  if (N * V < (int64_t(1) << 15)) nt = 1;  // too little work to wake the pool
  // Scratch rows one vector apart from a 4 KiB multiple, so bq[k], bp[k], bd[k] do not share an
  // L1 set when V is a power of two.
  const int64_t ld = simd::round_up(V, L) + L;
  const int64_t per_thread = 3 * ld;
  AlignedFloats buf(static_cast<size_t>(nt * per_thread));  // throws before the region, not in it
  // Rows are independent, so dynamic scheduling (good when a core is shared) keeps the results
  // independent of the thread count; chunks of >= 32k elements keep the scheduler's cost small.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 15) / V);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* bq = buf.p + tid * per_thread;
    float* bp = bq + ld;
    float* bd = bp + ld;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < N; ++i) {
      const double w = row_weight[i];
      float* g = GRAD ? grad + i * V : nullptr;
      if (w == 0.0) {  // masked row: no work at all
        loss[i] = 0.f;
        if (GRAD) std::memset(g, 0, static_cast<size_t>(V) * sizeof(float));
        continue;
      }
      loss[i] = distill_row<K, GRAD>(s + i * lds, t + i * ldt, V, w, g, c, bq, bp, bd);
    }
  }
}

template <DistillKind K>
void dispatch_grad(const float* s, int64_t lds, const float* t, int64_t ldt, const float* w,
                   float* loss, float* grad, int64_t N, int64_t V, const Params& c, int nthreads) {
  if (grad != nullptr)
    distill_rows<K, true>(s, lds, t, ldt, w, loss, grad, N, V, c, nthreads);
  else
    distill_rows<K, false>(s, lds, t, ldt, w, loss, grad, N, V, c, nthreads);
}

}  // namespace

void distill_fwd(const float* s, int64_t lds, const float* t, int64_t ldt, const float* row_weight,
                 float* loss, float* grad, int64_t N, int64_t V, double temperature,
                 DistillKind kind, double beta, int nthreads) {
  if (N <= 0 || V <= 0) return;
  Params c;
  c.inv_t = static_cast<float>(1.0 / temperature);
  c.t = temperature;
  c.beta = beta;
  const bool jsd = kind == DistillKind::kJsd;
  c.log_b = split(jsd ? std::log(beta) : 0.0);
  c.log_1mb = split(jsd ? std::log1p(-beta) : 0.0);
  switch (kind) {
    case DistillKind::kForward:
      return dispatch_grad<DistillKind::kForward>(s, lds, t, ldt, row_weight, loss, grad, N, V, c,
                                                  nthreads);
    case DistillKind::kReverse:
      return dispatch_grad<DistillKind::kReverse>(s, lds, t, ldt, row_weight, loss, grad, N, V, c,
                                                  nthreads);
    case DistillKind::kJsd:
      return dispatch_grad<DistillKind::kJsd>(s, lds, t, ldt, row_weight, loss, grad, N, V, c,
                                              nthreads);
  }
}

}  // namespace cpu
}  // namespace peftcore

// CPU kernels of the PHM linear (their bindings, with the argument checks: bindings_phm.cpp).
// See phm_cpu.h for the contract.
//
// Every pass works on blocks of 4 rows so that a factor vector, loaded once, serves four rows.
// The work is tiny next to a dense layer (n k (in + out) multiply-adds per row forward, twice that
// backward), so the passes are built to read x and dy from memory once each:
//   forward   per block: t = dots of the x segments with W_l^T, u = rule mix of t, y = bias + u W_r.
//   backward  per block: du = dots of the dy segments with W_r and dW_r += u^T dy, dbias += dy
//             (the 4 dy rows are still in L1 for the second sweep), drule += t du;
//             dt = rule mix of du, then one sweep over x computes dx and dW_l += dt^T x.
// Segments whose length is not a whole number of SIMD vectors are copied into zero-padded scratch
// (the factors are padded to match), so no micro-kernel needs a tail loop.
#include "phm_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace peftcore {
namespace cpu {
namespace {

using namespace simd;  // NOLINT: the building blocks of this file

// The factor matrices and weight-gradient partials are [n*k, width] with the row stride of
// skewed_ld (one vector past the padded width): the axpy-style kernels walk all n*k rows at one
// column, and rows 4 KiB apart would all land in one L1 set.

// W_l [n, P, k] -> [n*k, ld]: row j = i*k + r is W_l[i][:, r], zero past P (unit-stride dots).
template <typename T>
std::vector<T> transpose_left(const T* wl, int64_t n, int64_t P, int64_t k, int64_t ld) {
  std::vector<T> out(static_cast<size_t>(n * k * ld), T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t r = 0; r < k; ++r) out[(i * k + r) * ld + p] = wl[(i * P + p) * k + r];
  return out;
}

// u[b][j] = sum_a rule[i][a][b] v[a][j], j = i*k + r; v, u [n][n*k] of one row.
template <typename T>
void mix_over_a(const T* rule, const T* v, T* u, int64_t n, int64_t k) {
  const int64_t nk = n * k;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const T* rc = rule + i * n * n + b;  // rule[i][a][b] = rc[a * n]
      for (int64_t r = 0; r < k; ++r) {
        const int64_t j = i * k + r;
        T s = 0;
        for (int64_t a = 0; a < n; ++a) s += rc[a * n] * v[a * nk + j];
        u[b * nk + j] = s;
      }
    }
}

// dt[a][j] = sum_b rule[i][a][b] du[b][j]; du, dt [n][n*k] of one row.
template <typename T>
void mix_over_b(const T* rule, const T* du, T* dt, int64_t n, int64_t k) {
  const int64_t nk = n * k;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t i = 0; i < n; ++i) {
      const T* rr = rule + (i * n + a) * n;  // rule[i][a][b] = rr[b]
      for (int64_t r = 0; r < k; ++r) {
        const int64_t j = i * k + r;
        T s = 0;
        for (int64_t b = 0; b < n; ++b) s += rr[b] * du[b * nk + j];
        dt[a * nk + j] = s;
      }
    }
}

// One x segment of 4 rows (N whole vectors): dx_i = sum_j coef_i[j] wlt[j] (DX) and
// dwlt[j] += sum_i coef_i[j] x_i (DW), in one sweep so x is read once.
template <typename T, bool DX, bool DW>
void left_bwd4(T* const dxr[4], const T* const xr[4], const T* const coef[4], const T* wlt,
               T* dwlt, int64_t ld, int64_t J, int64_t N) {
  bwd4_rows<T, DX, DW, false>(dxr, xr, coef, wlt, dwlt, ld, J, N);
}

template <typename T>
using LeftFn = void (*)(T* const[4], const T* const[4], const T* const[4], const T*, T*, int64_t,
                        int64_t, int64_t);

template <typename T>
LeftFn<T> left_fn(bool dx, bool dw) {
  if (dx && dw) return &left_bwd4<T, true, true>;
  if (dx) return &left_bwd4<T, true, false>;
  return &left_bwd4<T, false, true>;
}

// acc[0:N] += rows_0..3[0:N] (N whole vectors).
template <typename T>
inline void add4(T* acc, const T* const rows[4], int64_t N) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  for (int64_t q = 0; q < N; q += L)
    store(acc + q, load<V>(acc + q) + ((load<V>(rows[0] + q) + load<V>(rows[1] + q)) +
                                       (load<V>(rows[2] + q) + load<V>(rows[3] + q))));
}

// ---------------------------------------------------------------------------------------------
// forward

template <typename T>
void fwd_impl(const T* x, int64_t ldx, const T* rule, const T* wl, const T* wr, const T* bias,
              T* y, int64_t ldy, T* t, int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k,
              int nthreads) {
  constexpr int L = Vec<T>::L;
  const int64_t nk = n * k, Pp = round_up(P, L), Qp = round_up(Q, L), tn = n * nk;
  const int64_t ldl = skewed_ld<T>(Pp), ldr = skewed_ld<T>(Qp);
  const std::vector<T> wlt = transpose_left(wl, n, P, k, ldl);
  const std::vector<T> wrp = padded_rows(wr, nk, Q, ldr);
  std::vector<T> biasp(static_cast<size_t>(n * Qp), T(0));  // per output segment, padded
  if (bias)
    for (int64_t b = 0; b < n; ++b) std::memcpy(biasp.data() + b * Qp, bias + b * Q, Q * sizeof(T));
  const int64_t nb = ceil_div(M, 4);
  const int nt = pick_threads(nthreads, nb, 2.0 * M * nk * n * (P + Q));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const size_t Pp_ = static_cast<size_t>(Pp), Qp_ = static_cast<size_t>(Qp), tn_ = static_cast<size_t>(tn);
    std::vector<T> xbuf(P != Pp ? 4 * Pp_ : 0), ybuf(4 * Qp_), zero_p(Pp_, T(0));
    std::vector<T> tpad(4 * tn_, T(0)), u(4 * tn_);
    // dynamic: a core taken by another process delays only the blocks it holds, not a fixed half
#pragma omp for schedule(dynamic, 8)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t m0 = blk * 4;
      const int nr = static_cast<int>(std::min<int64_t>(4, M - m0));
      T* tr[4];
      for (int i = 0; i < 4; ++i) tr[i] = i < nr ? t + (m0 + i) * tn : tpad.data() + i * tn;
      for (int64_t a = 0; a < n; ++a) {
        const T* rows[4];
        T* out[4];
        for (int i = 0; i < 4; ++i) {
          rows[i] = i < nr ? segment(x + (m0 + i) * ldx + a * P, P, Pp, xbuf.data() + i * Pp) : zero_p.data();
          out[i] = tr[i] + a * nk;
        }
        dot4_all<T>(rows, wlt.data(), ldl, nk, Pp, T(1), out);
      }
      for (int i = 0; i < nr; ++i) mix_over_a(rule, tr[i], u.data() + i * tn, n, k);
      for (int64_t b = 0; b < n; ++b) {
        T* yr[4];
        const T* coef[4];
        for (int i = 0; i < 4; ++i) {
          // rows past M compute on stale u into scratch: cheaper than a branch per vector
          yr[i] = (i < nr && Q == Qp) ? y + (m0 + i) * ldy + b * Q : ybuf.data() + i * Qp;
          coef[i] = u.data() + i * tn + b * nk;
        }
        axpy4_rows<T>(yr, coef, wrp.data(), ldr, nk, Qp, biasp.data() + b * Qp);
        if (Q != Qp)
          for (int i = 0; i < nr; ++i) std::memcpy(y + (m0 + i) * ldy + b * Q, yr[i], Q * sizeof(T));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward

struct Chunks {
  int64_t rows;   // rows per chunk (a multiple of 4)
  int64_t count;  // chunks
};

// Row chunks of the backward, one work item each.  A function of the shape alone (never of the
// thread count), so the weight-gradient partials are always added in the same order.  The
// partials take count * S elements, kept under about 32 MiB.
Chunks bwd_chunks(int64_t M, int64_t S, int64_t elem) {
  int64_t c = std::min<int64_t>(64, ceil_div(M, 128));
  c = std::min<int64_t>(c, std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(S * elem, 1)));
  c = std::max<int64_t>(c, 1);
  const int64_t rows = round_up(ceil_div(M, c), 4);
  return {rows, ceil_div(M, rows)};
}

template <typename T>
void bwd_impl(const T* dy, int64_t lddy, const T* x, int64_t ldx, const T* t, const T* rule,
              const T* wl, const T* wr, T* dx, int64_t lddx, T* drule, T* dwl, T* dwr, T* dbias,
              int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k, int nthreads) {
  constexpr int L = Vec<T>::L;
  const int64_t nk = n * k, Pp = round_up(P, L), Qp = round_up(Q, L), tn = n * nk, n3 = n * n * n;
  const int64_t ldl = skewed_ld<T>(Pp), ldr = skewed_ld<T>(Qp);
  const bool need_dt = dx || dwl, need_du = need_dt || drule, q_side = need_du || dwr || dbias;
  if (!need_dt && !q_side) return;
  // Per-chunk partial sums: [drule n^3][dW_l^T nk x ldl][dW_r nk x ldr][dbias n x Qp].
  const int64_t off_wl = drule ? n3 : 0;
  const int64_t off_wr = off_wl + (dwl ? nk * ldl : 0);
  const int64_t off_b = off_wr + (dwr ? nk * ldr : 0);
  const int64_t S = off_b + (dbias ? n * Qp : 0);
  if (M == 0) {
    if (drule) std::fill(drule, drule + n3, T(0));
    if (dwl) std::fill(dwl, dwl + nk * P, T(0));
    if (dwr) std::fill(dwr, dwr + nk * Q, T(0));
    if (dbias) std::fill(dbias, dbias + n * Q, T(0));
    return;
  }
  const Chunks ch = bwd_chunks(M, S, sizeof(T));
  std::unique_ptr<T[]> part(S > 0 ? new T[static_cast<size_t>(ch.count * S)] : nullptr);
  std::vector<T> wlt, wrp;
  if (dx) wlt = transpose_left(wl, n, P, k, ldl);
  if (need_du) wrp = padded_rows(wr, nk, Q, ldr);
  const LeftFn<T> left = need_dt ? left_fn<T>(dx != nullptr, dwl != nullptr) : nullptr;
  const double flops = 2.0 * M * nk * n * ((need_du + (dwr != nullptr)) * Q + ((dx != nullptr) + (dwl != nullptr)) * P);
  const int nt = pick_threads(nthreads, ch.count, flops);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const size_t Pp_ = static_cast<size_t>(Pp), Qp_ = static_cast<size_t>(Qp), tn_ = static_cast<size_t>(tn);
    std::vector<T> dybuf(q_side && Q != Qp ? 4 * Qp_ : 0);
    std::vector<T> xbuf(dwl && P != Pp ? 4 * Pp_ : 0), dxbuf(4 * Pp_), zero_q(Qp_, T(0)), zero_p(Pp_, T(0));
    std::vector<T> tz(tn_, T(0)), du(4 * tn_, T(0)), dt(4 * tn_), u(4 * tn_, T(0));
    // dynamic: the partials belong to chunks, not threads, so any assignment sums the same way
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < ch.count; ++c) {
      T* pc = part.get() + c * S;
      std::fill(pc, pc + S, T(0));
      const int64_t m_end = std::min(M, (c + 1) * ch.rows);
      for (int64_t m0 = c * ch.rows; m0 < m_end; m0 += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, m_end - m0));
        const T* tr[4];
        for (int i = 0; i < 4; ++i) tr[i] = i < nr ? t + (m0 + i) * tn : tz.data();
        for (int64_t b = 0; q_side && b < n; ++b) {
          // dy rows past M are zero: their du, dW_r and dbias contributions vanish
          const T* rows[4];
          for (int i = 0; i < 4; ++i)
            rows[i] = i < nr ? segment(dy + (m0 + i) * lddy + b * Q, Q, Qp, dybuf.data() + i * Qp)
                             : zero_q.data();
          if (need_du) {
            T* out[4];
            for (int i = 0; i < 4; ++i) out[i] = du.data() + i * tn + b * nk;
            dot4_all<T>(rows, wrp.data(), ldr, nk, Qp, T(1), out);
          }
          if (dwr) {
            if (b == 0)
              for (int i = 0; i < nr; ++i) mix_over_a(rule, tr[i], u.data() + i * tn, n, k);
            const T* coef[4];
            for (int i = 0; i < 4; ++i) coef[i] = u.data() + i * tn + b * nk;
            rank4_update<T>(pc + off_wr, ldr, coef, rows, nk, Qp);
          }
          if (dbias) add4<T>(pc + off_b + b * Qp, rows, Qp);
        }
        if (drule) {
          T* dr = pc;
          for (int i = 0; i < nr; ++i) {
            const T* ti = tr[i];
            const T* di = du.data() + i * tn;
            for (int64_t ii = 0; ii < n; ++ii)
              for (int64_t a = 0; a < n; ++a)
                for (int64_t b = 0; b < n; ++b) {
                  T s = 0;
                  for (int64_t r = 0; r < k; ++r) s += ti[a * nk + ii * k + r] * di[b * nk + ii * k + r];
                  dr[(ii * n + a) * n + b] += s;
                }
          }
        }
        if (!need_dt) continue;
        for (int i = 0; i < 4; ++i) mix_over_b(rule, du.data() + i * tn, dt.data() + i * tn, n, k);
        for (int64_t a = 0; a < n; ++a) {
          const T* xr[4];
          T* dxr[4];
          const T* coef[4];
          for (int i = 0; i < 4; ++i) {
            const int64_t m = m0 + i;
            xr[i] = (dwl && i < nr) ? segment(x + m * ldx + a * P, P, Pp, xbuf.data() + i * Pp) : zero_p.data();
            dxr[i] = (dx && i < nr && P == Pp) ? dx + m * lddx + a * P : dxbuf.data() + i * Pp;
            coef[i] = dt.data() + i * tn + a * nk;
          }
          left(dxr, xr, coef, wlt.data(), pc + off_wl, ldl, nk, Pp);
          if (dx && P != Pp)
            for (int i = 0; i < nr; ++i) std::memcpy(dx + (m0 + i) * lddx + a * P, dxr[i], P * sizeof(T));
        }
      }
    }
    // (implicit barrier) the chunk partials, added chunk by chunk in order, one row per item
    const int64_t nc = ch.count;
    const T* pbase = part.get();
    std::vector<T> acc(std::max({Pp_, Qp_, static_cast<size_t>(n3)}));
    auto sum_row = [&](int64_t off, int64_t len) {
      std::copy(pbase + off, pbase + off + len, acc.begin());
      for (int64_t cc = 1; cc < nc; ++cc) {
        const T* p = pbase + cc * S + off;
        for (int64_t e = 0; e < len; ++e) acc[e] += p[e];
      }
    };
    const int64_t rows_wl = dwl ? nk : 0, rows_wr = dwr ? nk : 0, rows_b = dbias ? n : 0;
    const int64_t items = (drule ? 1 : 0) + rows_wl + rows_wr + rows_b;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t j = it - (drule ? 1 : 0);
      if (j < 0) {
        sum_row(0, n3);
        std::copy(acc.begin(), acc.begin() + n3, drule);
      } else if (j < rows_wl) {
        sum_row(off_wl + j * ldl, P);
        const int64_t i = j / k, r = j % k;
        for (int64_t p = 0; p < P; ++p) dwl[(i * P + p) * k + r] = acc[p];
      } else if ((j -= rows_wl) < rows_wr) {
        sum_row(off_wr + j * ldr, Q);
        std::copy(acc.begin(), acc.begin() + Q, dwr + j * Q);
      } else {
        j -= rows_wr;
        sum_row(off_b + j * Qp, Q);
        std::copy(acc.begin(), acc.begin() + Q, dbias + j * Q);
      }
    }
  }
}

}  // namespace

template <typename T>
void phm_fwd(const T* x, int64_t ldx, const T* rule, const T* w_left, const T* w_right,
             const T* bias, T* y, int64_t ldy, T* t, int64_t M, int64_t n, int64_t P, int64_t Q,
             int64_t k, int nthreads) {
  if (M == 0) return;
  fwd_impl<T>(x, ldx, rule, w_left, w_right, bias, y, ldy, t, M, n, P, Q, k, nthreads);
}

template <typename T>
void phm_bwd(const T* dy, int64_t lddy, const T* x, int64_t ldx, const T* t, const T* rule,
             const T* w_left, const T* w_right, T* dx, int64_t lddx, T* drule, T* dw_left,
             T* dw_right, T* dbias, int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k,
             int nthreads) {
  bwd_impl<T>(dy, lddy, x, ldx, t, rule, w_left, w_right, dx, lddx, drule, dw_left, dw_right,
              dbias, M, n, P, Q, k, nthreads);
}

#define PEFTCORE_INSTANTIATE(T)                                                                  \
  template void phm_fwd<T>(const T*, int64_t, const T*, const T*, const T*, const T*, T*,        \
                           int64_t, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int);        \
  template void phm_bwd<T>(const T*, int64_t, const T*, int64_t, const T*, const T*, const T*,   \
                           const T*, T*, int64_t, T*, T*, T*, T*, int64_t, int64_t, int64_t,      \
                           int64_t, int64_t, int);
PEFTCORE_INSTANTIATE(float)
PEFTCORE_INSTANTIATE(double)
#undef PEFTCORE_INSTANTIATE

}  // namespace cpu

}  // namespace peftcore

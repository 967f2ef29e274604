// CPU kernels of the LoRA dropout-masked projection.  See lora_cpu.h for the contract.
//
// SIMD building blocks live in cpu_simd.h.  Threads come from OpenMP; peftcore.native loads this
// module after torch so both share torch's libgomp (one pool, one thread count).
#include "lora_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_simd.h"
#include "rng.h"

namespace peftcore {
namespace cpu {
namespace {

using namespace simd;  // NOLINT: the building blocks of this file

std::atomic<int> g_num_threads{0};  // set_num_threads(); 0: OpenMP's default (cpu_common.h)

// ---------------------------------------------------------------------------------------------
// forward

template <typename T, bool DROP>
void down_fwd_impl(const T* x, int64_t ldx, const T* a, T* xa, int64_t M, int64_t K, int64_t R,
                   uint32_t seed, uint32_t threshold, double scale, int nthreads, T* y,
                   int64_t ldy, const T* b, int64_t N, double scaling) {
  constexpr int L = Vec<T>::L;
  const int64_t Kp = round_up(std::max<int64_t>(K, 1), L);
  // A padded to whole vectors so every dot product runs without a tail.
  std::vector<T> ap_buf;
  if (Kp != K) ap_buf = padded_rows(a, R, K, Kp);
  const T* ap = Kp != K ? ap_buf.data() : a;
  const int64_t Np = round_up(std::max<int64_t>(N, 1), L);
  std::vector<T> bt;  // scaling * B^T, [R, Np]
  const int64_t ldb = skewed_ld<T>(Np);
  if (y) bt = transpose_padded<T>(b, N, R, ldb, static_cast<T>(scaling));
  const uint32_t sk = seed_key(seed);
  const T s = static_cast<T>(scale);
  const int64_t nb = ceil_div(M, 4);
  const int nt = pick_threads(nthreads, nb, 2.0 * M * R * (K + (y ? N : 0)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<T> buf(static_cast<size_t>(4 * Kp), T(0));
    std::vector<T> zero_r(static_cast<size_t>(R), T(0)), sink(y ? static_cast<size_t>(Np) : 0);
    const T* xd[4] = {buf.data(), buf.data() + Kp, buf.data() + 2 * Kp, buf.data() + 3 * Kp};
    T* xdw[4] = {buf.data(), buf.data() + Kp, buf.data() + 2 * Kp, buf.data() + 3 * Kp};
    std::vector<T> dummy(static_cast<size_t>(3 * R));  // xa rows past M
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t m0 = blk * 4;
      const int nr = static_cast<int>(std::min<int64_t>(4, M - m0));
      for (int i = 0; i < nr; ++i)
        masked_row<T, DROP>(x + (m0 + i) * ldx, xdw[i], K, Kp, row_key(sk, m0 + i), threshold);
      for (int i = nr; i < 4; ++i) std::fill(xdw[i], xdw[i] + Kp, T(0));
      T* out[4];
      for (int i = 0; i < 4; ++i) out[i] = i < nr ? xa + (m0 + i) * R : dummy.data() + (i - 1) * R;
      dot4_all<T>(xd, ap, Kp, R, Kp, s, out);
      if (y) {
        T* yr[4];
        const T* coef[4];
        for (int i = 0; i < 4; ++i) {
          yr[i] = i < nr ? y + (m0 + i) * ldy : sink.data();
          coef[i] = i < nr ? xa + (m0 + i) * R : zero_r.data();
        }
        axpy4_rows<T>(yr, coef, bt.data(), ldb, R, N);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward

// Four rows of one column tile: dx += ms * (g A) and dA += g^T (ms * x), ms = keep * scale.
// k runs over whole vectors: callers pad partial tiles.
template <typename T, bool DROP, bool DX, bool DA>
void bwd_rows(const T* const gp[4], const T* const xp[4], T* const dxp[4], const uint32_t rk[4],
              const T* at, T* dat, int64_t R, int64_t kt, int64_t k0, int64_t kwp,
              uint32_t threshold, T s) {
  using W = Vec<T>;
  const typename W::V sv = splat<typename W::V>(s);
  const auto ms = [&](int i, int64_t k) {
    return DROP ? W::select(keep_lanes<T>(rk[i], k0 + k, threshold), sv) : sv;
  };
  bwd4_rows<T, DX, DA, true>(dxp, xp, gp, at, dat, kt, R, kwp, ms);
}

template <typename T>
using RowsFn = void (*)(const T* const[4], const T* const[4], T* const[4], const uint32_t[4],
                        const T*, T*, int64_t, int64_t, int64_t, int64_t, uint32_t, T);

template <typename T, bool DROP>
RowsFn<T> rows_fn_drop(bool dx, bool da) {
  if (dx && da) return &bwd_rows<T, DROP, true, true>;
  if (dx) return &bwd_rows<T, DROP, true, false>;
  return &bwd_rows<T, DROP, false, true>;
}

template <typename T>
RowsFn<T> rows_fn(bool drop, bool dx, bool da) {
  return drop ? rows_fn_drop<T, true>(dx, da) : rows_fn_drop<T, false>(dx, da);
}

struct Chunks {
  int64_t rows;   // rows per chunk (a multiple of 4)
  int64_t count;  // chunks
};

// Row chunks of the backward pass, one work item each.  A function of the shape alone (never of
// the thread count), so the partial sums of dA and dB are always added in the same order.  The
// partials take count * R * (K + N) elements, kept under about 32 MiB.
Chunks bwd_chunks(int64_t M, int64_t K, int64_t N, int64_t R, int64_t elem) {
  int64_t n = std::min<int64_t>(64, ceil_div(M, 128));
  const int64_t per_chunk = std::max<int64_t>(R * (K + N) * elem, 1);
  n = std::min<int64_t>(n, std::max<int64_t>(1, (int64_t(32) << 20) / per_chunk));
  n = std::max<int64_t>(n, 1);
  const int64_t rows = round_up(ceil_div(M, n), 4);
  return {rows, ceil_div(M, rows)};
}

// Columns per tile of A and dA: R x kt of each stays in L1 (16 KiB each).
int64_t tile_cols(int64_t K, int64_t R, int64_t elem, int L) {
  int64_t kt = (16384 / (R * elem)) / L * L;
  kt = std::min<int64_t>(std::max<int64_t>(kt, L), 512);
  return std::min<int64_t>(kt, round_up(std::max<int64_t>(K, 1), L));
}

// One row chunk after another; per chunk: g = scaling * dy B (unless given) and dB's partial from
// dy and xa (phase 1), then dx and dA's partial column tile by column tile (phase 2).
template <typename T>
void bwd_impl(const T* dy, int64_t lddy, const T* b, const T* xa, const T* g_in, const T* a,
              const T* x, int64_t ldx, T* dx, int64_t lddx, T* da, T* db, int64_t M, int64_t N,
              int64_t K, int64_t R, uint32_t seed, uint32_t threshold, double scale,
              double scaling, int nthreads) {
  constexpr int L = Vec<T>::L;
  if (M == 0) {
    if (da) std::fill(da, da + R * K, T(0));
    if (db) std::fill(db, db + N * R, T(0));
    return;
  }
  const bool need_g = dx || da;
  const bool make_g = need_g && !g_in;
  const bool phase1 = make_g || db;
  const bool phase2 = need_g && K > 0;
  const int64_t Np = round_up(std::max<int64_t>(N, 1), L);
  const bool pad_dy = phase1 && Np != N;
  const int64_t kt = tile_cols(K, R, sizeof(T), L);
  const int64_t nkt = ceil_div(K, kt);
  const Chunks ch = bwd_chunks(M, K, N, R, sizeof(T));
  std::vector<T> bt;
  const int64_t ldb = skewed_ld<T>(Np);
  if (make_g) bt = transpose_padded<T>(b, N, R, ldb, T(1));
  std::vector<T> part_da, part_db;
  if (da && ch.count > 1) part_da.resize(static_cast<size_t>(ch.count * R * K));
  if (db) part_db.resize(static_cast<size_t>(ch.count * R * N));
  const RowsFn<T> rows = phase2 ? rows_fn<T>(threshold > 0, dx != nullptr, da != nullptr) : nullptr;
  const uint32_t sk = seed_key(seed);
  const T s = static_cast<T>(scale), sc = static_cast<T>(scaling);
  const double flops = 2.0 * M * R * (K * ((dx != nullptr) + (da != nullptr)) + N * (make_g + (db != nullptr)));
  const int nt = pick_threads(nthreads, ch.count, flops);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const size_t R_ = static_cast<size_t>(R), kt_ = static_cast<size_t>(kt), Np_ = static_cast<size_t>(Np);
    std::vector<T> gbuf(make_g ? static_cast<size_t>(ch.rows) * R_ : 0);
    std::vector<T> dbt(db ? R_ * static_cast<size_t>(ldb) : 0), dyb(pad_dy ? 4 * Np_ : 0, T(0));
    std::vector<T> zero_np(phase1 ? Np_ : 0, T(0)), zero_r(R_, T(0)), scratch_r(R_);
    std::vector<T> at(phase2 ? R_ * kt_ : 0), dat(phase2 && da ? R_ * kt_ : 0);
    std::vector<T> xbuf(phase2 ? 4 * kt_ : 0, T(0)), dxbuf(phase2 ? 4 * kt_ : 0);
    std::vector<T> zero_x(phase2 ? kt_ : 0, T(0)), sink(phase2 ? kt_ : 0);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < ch.count; ++c) {
      const int64_t m_begin = c * ch.rows, m_end = std::min(M, m_begin + ch.rows);
      if (phase1) {
        if (db) std::fill(dbt.begin(), dbt.end(), T(0));
        for (int64_t m0 = m_begin; m0 < m_end; m0 += 4) {
          const int nr = static_cast<int>(std::min<int64_t>(4, m_end - m0));
          const T* dyr[4];
          const T* xar[4];
          T* gr[4];
          for (int i = 0; i < 4; ++i) {
            if (i >= nr) {
              dyr[i] = zero_np.data();
              xar[i] = zero_r.data();
              gr[i] = scratch_r.data();
              continue;
            }
            const int64_t m = m0 + i;
            const T* p = dy + m * lddy;
            if (pad_dy) {
              T* q = dyb.data() + i * Np_;
              std::memcpy(q, p, N * sizeof(T));
              p = q;
            }
            dyr[i] = p;
            xar[i] = db ? xa + m * R : zero_r.data();
            gr[i] = make_g ? gbuf.data() + (m - m_begin) * R : scratch_r.data();
          }
          if (make_g) dot4_all<T>(dyr, bt.data(), ldb, R, Np, sc, gr);
          if (db) rank4_update<T>(dbt.data(), ldb, xar, dyr, R, Np);
        }
        if (db)
          for (int64_t r = 0; r < R; ++r)
            std::memcpy(part_db.data() + (c * R + r) * N, dbt.data() + r * ldb, N * sizeof(T));
      }
      if (!phase2) continue;
      const T* gchunk = make_g ? gbuf.data() : g_in + m_begin * R;
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t k0 = t * kt, kw = std::min(kt, K - k0), kwp = round_up(kw, L);
        const bool full = kw == kwp;
        for (int64_t r = 0; r < R; ++r) {
          T* dst = at.data() + r * kt;
          std::memcpy(dst, a + r * K + k0, kw * sizeof(T));
          std::fill(dst + kw, dst + kwp, T(0));
          if (da) std::fill(dat.data() + r * kt, dat.data() + r * kt + kwp, T(0));
        }
        for (int64_t m0 = m_begin; m0 < m_end; m0 += 4) {
          const int nr = static_cast<int>(std::min<int64_t>(4, m_end - m0));
          const T* gp[4];
          const T* xp[4];
          T* dxp[4];
          uint32_t rk[4];
          for (int i = 0; i < 4; ++i) {
            const int64_t m = m0 + i;
            gp[i] = zero_r.data();  // padding rows: g = 0 adds nothing; dx goes to a sink
            xp[i] = zero_x.data();
            dxp[i] = sink.data();
            rk[i] = 0;
            if (i >= nr) continue;
            gp[i] = gchunk + (m - m_begin) * R;
            rk[i] = row_key(sk, m);
            if (da) xp[i] = segment(x + m * ldx + k0, kw, kwp, xbuf.data() + i * kt);
            if (dx) {
              if (full) {
                dxp[i] = dx + m * lddx + k0;
              } else {
                T* q = dxbuf.data() + i * kt;
                std::memcpy(q, dx + m * lddx + k0, kw * sizeof(T));
                dxp[i] = q;
              }
            }
          }
          rows(gp, xp, dxp, rk, at.data(), dat.data(), R, kt, k0, kwp, threshold, s);
          if (dx && !full)
            for (int i = 0; i < nr; ++i)
              std::memcpy(dx + (m0 + i) * lddx + k0, dxbuf.data() + i * kt, kw * sizeof(T));
        }
        if (da) {
          T* out = ch.count > 1 ? part_da.data() + c * R * K : da;
          for (int64_t r = 0; r < R; ++r)
            std::memcpy(out + r * K + k0, dat.data() + r * kt, kw * sizeof(T));
        }
      }
    }
    // (implicit barrier) partial sums, chunk by chunk in order
    if (da && ch.count > 1) {
      const int64_t n = R * K, nc = ch.count;
      const T* p = part_da.data();
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        T acc = p[i];
        for (int64_t c = 1; c < nc; ++c) acc += p[c * n + i];
        da[i] = acc;
      }
    }
    if (db) {
      const int64_t nc = ch.count;
      const T* p = part_db.data();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t r = 0; r < R; ++r) {
          T acc = p[r * N + n];
          for (int64_t c = 1; c < nc; ++c) acc += p[(c * R + r) * N + n];
          db[n * R + r] = sc * acc;
        }
    }
  }
}

}  // namespace

template <typename T>
void down_fwd(const T* x, int64_t ldx, const T* a, T* xa, int64_t M, int64_t K, int64_t R,
              uint32_t seed, uint32_t threshold, double scale, int nthreads, T* y, int64_t ldy,
              const T* b, int64_t N, double scaling) {
  if (M == 0 || R == 0) return;
  if (threshold > 0)
    down_fwd_impl<T, true>(x, ldx, a, xa, M, K, R, seed, threshold, scale, nthreads, y, ldy, b,
                           N, scaling);
  else
    down_fwd_impl<T, false>(x, ldx, a, xa, M, K, R, seed, threshold, scale, nthreads, y, ldy, b,
                            N, scaling);
}

template <typename T>
void down_bwd(const T* g, const T* a, const T* x, int64_t ldx, T* dx, int64_t lddx, T* da,
              int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t threshold, double scale,
              int nthreads) {
  if (R == 0 || (!dx && !da)) return;
  bwd_impl<T>(nullptr, 0, nullptr, nullptr, g, a, x, ldx, dx, lddx, da, nullptr, M, 0, K, R, seed,
              threshold, scale, 1.0, nthreads);
}

template <typename T>
void lora_bwd(const T* dy, int64_t lddy, const T* b, const T* xa, const T* a, const T* x,
              int64_t ldx, T* dx, int64_t lddx, T* da, T* db, int64_t M, int64_t N, int64_t K,
              int64_t R, uint32_t seed, uint32_t threshold, double scale, double scaling,
              int nthreads) {
  if (R == 0 || (!dx && !da && !db)) return;
  bwd_impl<T>(dy, lddy, b, xa, nullptr, a, x, ldx, dx, lddx, da, db, M, N, K, R, seed, threshold,
              scale, scaling, nthreads);
}

#define PEFTCORE_INSTANTIATE(T)                                                                   \
  template void down_fwd<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t, uint32_t, \
                            uint32_t, double, int, T*, int64_t, const T*, int64_t, double);       \
  template void down_bwd<T>(const T*, const T*, const T*, int64_t, T*, int64_t, T*, int64_t,      \
                            int64_t, int64_t, uint32_t, uint32_t, double, int);                  \
  template void lora_bwd<T>(const T*, int64_t, const T*, const T*, const T*, const T*, int64_t,   \
                            T*, int64_t, T*, T*, int64_t, int64_t, int64_t, int64_t, uint32_t,    \
                            uint32_t, double, double, int);
PEFTCORE_INSTANTIATE(float)
PEFTCORE_INSTANTIATE(double)
#undef PEFTCORE_INSTANTIATE

void keep_mask(uint8_t* out, int64_t M, int64_t K, uint32_t seed, uint32_t threshold,
               int nthreads) {
  const uint32_t sk = seed_key(seed);
  const int nt = pick_threads(nthreads, M, 20.0 * M * K);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t rk = row_key(sk, m);
    uint8_t* o = out + m * K;
    for (int64_t k = 0; k < K; ++k) o[k] = keep(rk, k, threshold) ? 1 : 0;
  }
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

int get_num_threads() {
  int n = g_num_threads.load();
#ifdef _OPENMP
  if (n <= 0) n = omp_get_max_threads();
#else
  n = 1;
#endif
  return n;
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

const char* simd_name() { return simd::kSimd; }

}  // namespace cpu
}  // namespace peftcore

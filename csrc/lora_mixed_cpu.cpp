// CPU kernel of mixed-adapter LoRA.  See lora_mixed_cpu.h for the contract.
//
// The segments are cut into work items of at most 32 rows.  One parallel region: first every
// adapter the batch uses gets B[j]^T [R, N] (work items of 64 columns), then the row chunks.  Per
// group of up to four rows: xa = s * x A[j]^T in register blocks of rows x ranks of SIMD dot
// products read straight from x (scalar tail past the last whole vector), then y += xa B[j]^T in
// register blocks of rows x vectors of y.  A group of fewer than four rows (the last of a chunk;
// every row in decode, where segments have one row) runs a kernel of its own height rather than
// padding to four.
#include "lora_mixed_cpu.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace peftcore {
namespace cpu {
namespace {

using namespace simd;  // NOLINT: the building blocks of this file

// out[i][r] = s * dot(rows[i][0:K], A[r][0:K]) for NR rows and all R ranks of A [R, K]: the
// first Kv = K - K % L columns in SIMD blocks of NJ ranks, the rest a scalar tail.
template <typename T, int NR, int NJ>
void shrink_rank_block(const T* const rows[], const T* a, int64_t K, int64_t Kv, int64_t r, T s,
                       T* const out[]) {
  const T* c[NJ];
  for (int q = 0; q < NJ; ++q) c[q] = a + (r + q) * K;
  T sums[NR][NJ];
  dot_block<T, NR, NJ>(rows, c, Kv, sums);
  for (int i = 0; i < NR; ++i)
    for (int q = 0; q < NJ; ++q) {
      T acc = sums[i][q];
      for (int64_t k = Kv; k < K; ++k) acc += rows[i][k] * c[q][k];
      out[i][r + q] = s * acc;
    }
}

template <typename T, int NR>
void shrink_rows(const T* const rows[], const T* a, int64_t K, int64_t Kv, int64_t R, T s,
                 T* const out[]) {
  // One row alone needs more ranks per block to keep enough FMAs in flight.
  constexpr int NJ = NR == 1 ? 8 : 4;
  int64_t r = 0;
  for (; r + NJ <= R; r += NJ) shrink_rank_block<T, NR, NJ>(rows, a, K, Kv, r, s, out);
  for (; r < R; ++r) shrink_rank_block<T, NR, 1>(rows, a, K, Kv, r, s, out);
}

// y_i[0:N] += sum_r xa_i[r] * bt[r][0:N] for NR rows, bt [R, ldb].  Register block of NR rows x
// NV vectors of y, so each B^T load feeds NR FMAs and each broadcast NV of them.
template <typename T, int NR>
void expand_rows(T* const y[], const T* const xa[], const T* bt, int64_t ldb, int64_t R,
                 int64_t N) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  constexpr int NV = kVecBytes >= 64 ? 4 : 2;  // NR * NV accumulators fit the register file
  int64_t n = 0;
  for (; n + NV * L <= N; n += NV * L) {
    V acc[NR][NV];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = load<V>(y[i] + n + v * L);
    for (int64_t r = 0; r < R; ++r) {
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = load<V>(bt + r * ldb + n + v * L);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const V c = splat<V>(xa[i][r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += c * bv[v];
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) store(y[i] + n + v * L, acc[i][v]);
  }
  for (; n + L <= N; n += L) {
    V acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = load<V>(y[i] + n);
    for (int64_t r = 0; r < R; ++r) {
      const V bv = load<V>(bt + r * ldb + n);
      for (int i = 0; i < NR; ++i) acc[i] += splat<V>(xa[i][r]) * bv;
    }
    for (int i = 0; i < NR; ++i) store(y[i] + n, acc[i]);
  }
  for (; n < N; ++n)
    for (int i = 0; i < NR; ++i) {
      T acc = y[i][n];
      for (int64_t r = 0; r < R; ++r) acc += xa[i][r] * bt[r * ldb + n];
      y[i][n] = acc;
    }
}

// NR (1..4) rows of one adapter: xa = s * x A^T, then y += xa B^T.
template <typename T, int NR>
void rows_delta(const T* x, int64_t ldx, T* y, int64_t ldy, const T* a, const T* bt, int64_t ldb,
                int64_t K, int64_t Kv, int64_t N, int64_t R, T s, T* xa) {
  const T* xr[NR];
  T* xo[NR];
  T* yr[NR];
  const T* xc[NR];
  for (int i = 0; i < NR; ++i) {
    xr[i] = x + i * ldx;
    xo[i] = xa + i * R;
    xc[i] = xo[i];
    yr[i] = y + i * ldy;
  }
  shrink_rows<T, NR>(xr, a, K, Kv, R, s, xo);
  expand_rows<T, NR>(yr, xc, bt, ldb, R, N);
}

// bt[r * ldb + n] = B[n, r] for n in [n0, n1).
template <typename T>
void transpose_cols(const T* b, int64_t n0, int64_t n1, int64_t R, int64_t ldb, T* bt) {
  for (int64_t r = 0; r < R; ++r) {
    T* dst = bt + r * ldb;
    for (int64_t n = n0; n < n1; ++n) dst[n] = b[n * R + r];
  }
}

}  // namespace

template <typename T>
void lora_mixed_fwd(const T* x, int64_t ldx, const T* a, const T* b, const float* scaling,
                    const int32_t* seg_adapter, const int64_t* seg_len, int64_t num_segs, T* y,
                    int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R, int64_t J,
                    int nthreads) {
  (void)M;
  if (num_segs <= 0 || N == 0 || K == 0 || R == 0) return;
  constexpr int L = Vec<T>::L;
  constexpr int64_t kTransposeCols = 64;  // B rows per transpose item: they stay in L1
  // Work items: chunks of at most kChunkRows rows of one segment.  Enough rows for the 4-row
  // kernels to run full, few enough that a batch of a few segments still splits over the cores.
  constexpr int64_t kChunkRows = 32;
  struct Item {
    int64_t m0, m1, j;
  };
  std::vector<Item> items;
  // Each adapter the batch uses is transposed once (B[j]^T [R, ldb]); only columns < N are read.
  std::vector<int64_t> slot(static_cast<size_t>(J), -1), used;
  int64_t active = 0;
  for (int64_t sg = 0, m = 0; sg < num_segs; m += seg_len[sg], ++sg) {
    const int64_t j = seg_adapter[sg], len = seg_len[sg];
    if (j < 0) continue;
    for (int64_t c = 0; c < len; c += kChunkRows)
      items.push_back({m + c, m + std::min(len, c + kChunkRows), j});
    if (slot[j] < 0) {
      slot[j] = static_cast<int64_t>(used.size());
      used.push_back(j);
    }
    active += len;
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  if (num_items == 0) return;
  const int64_t Kv = K / L * L;
  const int64_t ldb = skewed_ld<T>(round_up(N, L));
  const int64_t U = static_cast<int64_t>(used.size());
  const int64_t per_adapter = R * ldb;
  std::unique_ptr<T[]> bt(new T[static_cast<size_t>(U * per_adapter)]);
  const int64_t nblk = ceil_div(N, kTransposeCols);
  using RowsFn = void (*)(const T*, int64_t, T*, int64_t, const T*, const T*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, T, T*);
  const RowsFn rows_fn[5] = {nullptr, &rows_delta<T, 1>, &rows_delta<T, 2>, &rows_delta<T, 3>,
                             &rows_delta<T, 4>};
  const int nt = pick_threads(nthreads, std::max(num_items, U * nblk), 2.0 * active * R * (K + N));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static)
    for (int64_t it = 0; it < U * nblk; ++it) {
      const int64_t u = it / nblk, n0 = (it % nblk) * kTransposeCols;
      transpose_cols<T>(b + used[u] * N * R, n0, std::min(N, n0 + kTransposeCols), R, ldb,
                        bt.get() + u * per_adapter);
    }
    // (implicit barrier: every B^T is ready)
    std::vector<T> xa(4 * static_cast<size_t>(R));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < num_items; ++it) {
      const Item w = items[it];
      const T* aj = a + w.j * R * K;
      const T* btj = bt.get() + slot[w.j] * per_adapter;
      const T s = static_cast<T>(scaling[w.j]);
      for (int64_t m = w.m0; m < w.m1; m += 4) {
        const RowsFn fn = rows_fn[std::min<int64_t>(4, w.m1 - m)];
        fn(x + m * ldx, ldx, y + m * ldy, ldy, aj, btj, ldb, K, Kv, N, R, s, xa.data());
      }
    }
  }
}

template void lora_mixed_fwd<float>(const float*, int64_t, const float*, const float*, const float*,
                                    const int32_t*, const int64_t*, int64_t, float*, int64_t,
                                    int64_t, int64_t, int64_t, int64_t, int64_t, int);
template void lora_mixed_fwd<double>(const double*, int64_t, const double*, const double*,
                                     const float*, const int32_t*, const int64_t*, int64_t, double*,
                                     int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);

}  // namespace cpu
}  // namespace peftcore

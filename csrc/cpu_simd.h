// SIMD building blocks of the CPU kernels: vector types sized to the widest ISA the build
// targets, the vectorized mask hash, zero-padded copies, and 4-row micro-kernels (dot products,
// row updates, the two products of a linear map's backward).
//
// GCC/Clang vector extensions instead of intrinsics: the same source compiles to AVX-512, AVX2 or
// SSE/NEON, and the uint32 hash vectorizes like the FMAs.  Included by every *_cpu.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "rng.h"

namespace peftcore {
namespace cpu {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr const char* kSimd = "avx512";
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr const char* kSimd = "avx2";
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr const char* kSimd = "avx";
#elif defined(__ARM_NEON) || defined(__SSE2__)
constexpr int kVecBytes = 16;
constexpr const char* kSimd = "128-bit";
#else
constexpr int kVecBytes = 16;
constexpr const char* kSimd = "generic";
#endif

// V: T lanes; U: uint32 lanes for the hash, one per T lane; Mk: the compare result of U.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int L = kVecBytes / 4;
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef uint32_t U __attribute__((vector_size(kVecBytes)));
  typedef int32_t Mk __attribute__((vector_size(kVecBytes)));
  static V select(Mk m, V v) { return (V)(m & (Mk)v); }
};

template <>
struct Vec<double> {
  static constexpr int L = kVecBytes / 8;
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef uint32_t U __attribute__((vector_size(kVecBytes / 2)));
  typedef int32_t Mk __attribute__((vector_size(kVecBytes / 2)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  static V select(Mk m, V v) { return (V)(__builtin_convertvector(m, I) & (I)v); }
};

template <class V, class T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V, class T>
inline V splat(T s) {
  return V{} + s;
}

template <class U, int L>
inline U iota() {
  U v{};
  for (int i = 0; i < L; ++i) v[i] = static_cast<uint32_t>(i);
  return v;
}

// keep(rk, k0 + lane) as a lane mask, for the L columns starting at k0.
template <typename T>
inline typename Vec<T>::Mk keep_lanes(uint32_t rk, int64_t k0, uint32_t threshold) {
  using W = Vec<T>;
  using U = typename W::U;
  const U k = iota<U, W::L>() + static_cast<uint32_t>(k0);
  const U bits = hash32_lanes<U>(splat<U>(rk) ^ (k * kGolden));
  return (bits >> 8) >= splat<U>(threshold);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Row stride for an R-row scratch matrix swept column-vector by column-vector: one vector more
// than the padded width, so rows whose width is a multiple of 4 KiB do not all fall into one L1
// set (16 rows 4 KiB apart thrash a 12-way L1).
template <typename T>
int64_t skewed_ld(int64_t Np) {
  return Np + Vec<T>::L;
}

// Padded, optionally scaled transpose: out[r * ld + n] = s * b[n][r] for n < N, 0 elsewhere.
template <typename T>
std::vector<T> transpose_padded(const T* b, int64_t N, int64_t R, int64_t ld, T s) {
  std::vector<T> out(static_cast<size_t>(R * ld), T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < R; ++r) out[r * ld + n] = s * b[n * R + r];
  return out;
}

// [R, N] rows (row stride N) copied to row stride ld, zero past N.
template <typename T>
std::vector<T> padded_rows(const T* src, int64_t R, int64_t N, int64_t ld) {
  std::vector<T> out(static_cast<size_t>(R * ld), T(0));
  for (int64_t r = 0; r < R; ++r) std::memcpy(out.data() + r * ld, src + r * N, N * sizeof(T));
  return out;
}

// A segment of len elements readable over lenp (whole vectors): src, or a zero-padded copy in buf.
template <typename T>
inline const T* segment(const T* src, int64_t len, int64_t lenp, T* buf) {
  if (len == lenp) return src;
  std::memcpy(buf, src, len * sizeof(T));
  std::fill(buf + len, buf + lenp, T(0));
  return buf;
}

// dst[0:Kp] = keep(m, k) ? x[k] : 0, zero past K.
template <typename T, bool DROP>
void masked_row(const T* x, T* dst, int64_t K, int64_t Kp, uint32_t rk, uint32_t threshold) {
  using W = Vec<T>;
  using V = typename W::V;
  constexpr int L = W::L;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V v = load<V>(x + k);
    if (DROP) v = W::select(keep_lanes<T>(rk, k, threshold), v);
    store(dst + k, v);
  }
  for (; k < K; ++k) dst[k] = (!DROP || keep(rk, k, threshold)) ? x[k] : T(0);
  for (; k < Kp; ++k) dst[k] = T(0);
}

// sums[i][j] = dot(rows[i], cols[j]) over n (a multiple of L) for NR rows and NJ columns:
// NR * NJ independent vector accumulators, NR + NJ loads per NR * NJ FMAs.
template <typename T, int NR, int NJ>
inline void dot_block(const T* const rows[], const T* const cols[], int64_t n, T sums[][NJ]) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  V acc[NR][NJ];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) acc[i][j] = V{};
  for (int64_t k = 0; k < n; k += L) {
    V cv[NJ];
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) cv[j] = load<V>(cols[j] + k);
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const V rv = load<V>(rows[i] + k);
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) acc[i][j] += rv * cv[j];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) {
      T s = 0;
      for (int l = 0; l < L; ++l) s += acc[i][j][l];
      sums[i][j] = s;
    }
}

// out[i][r] = s * dot(rows[i], cols[r]) for 4 rows and all R columns (row stride ldc, length n).
template <typename T>
inline void dot4_all(const T* const rows[4], const T* cols, int64_t ldc, int64_t R, int64_t n,
                     T s, T* const out[4]) {
  int64_t r = 0;
  for (; r + 2 <= R; r += 2) {
    const T* c[2] = {cols + r * ldc, cols + (r + 1) * ldc};
    T sums[4][2];
    dot_block<T, 4, 2>(rows, c, n, sums);
    for (int i = 0; i < 4; ++i) {
      out[i][r] = s * sums[i][0];
      out[i][r + 1] = s * sums[i][1];
    }
  }
  if (r < R) {
    const T* c[1] = {cols + r * ldc};
    T sums[4][1];
    dot_block<T, 4, 1>(rows, c, n, sums);
    for (int i = 0; i < 4; ++i) out[i][r] = s * sums[i][0];
  }
}

// y_i[0:N] = init_i[0:N] + sum_r coef_i[r] * bt[r][0:N] for 4 rows (bt rows padded to whole
// vectors), where init_i is y_i itself (an update in place) or, when given, `init` for every row.
template <typename T>
inline void axpy4_rows(T* const y[4], const T* const coef[4], const T* bt, int64_t ldb, int64_t R,
                       int64_t N, const T* init = nullptr) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  const T* in[4];
  for (int i = 0; i < 4; ++i) in[i] = init ? init : y[i];
  int64_t n = 0;
  for (; n + L <= N; n += L) {
    V acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[i] = load<V>(in[i] + n);
    for (int64_t r = 0; r < R; ++r) {
      const V bv = load<V>(bt + r * ldb + n);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[i] += splat<V>(coef[i][r]) * bv;
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) store(y[i] + n, acc[i]);
  }
  for (; n < N; ++n)
    for (int i = 0; i < 4; ++i) {
      T acc = in[i][n];
      for (int64_t r = 0; r < R; ++r) acc += coef[i][r] * bt[r * ldb + n];
      y[i][n] = acc;
    }
}

// dbt[r][0:n] += sum_i coef_i[r] * rows_i[0:n] for 4 rows (n a multiple of L).
template <typename T>
inline void rank4_update(T* dbt, int64_t ldd, const T* const coef[4], const T* const rows[4],
                         int64_t R, int64_t n) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  for (int64_t k = 0; k < n; k += L) {
    V rv[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) rv[i] = load<V>(rows[i] + k);
    for (int64_t r = 0; r < R; ++r) {
      T* d = dbt + r * ldd + k;
      V dv = load<V>(d);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) dv += splat<V>(coef[i][r]) * rv[i];
      store(d, dv);
    }
  }
}

// No lane scale in bwd4_rows.
struct NoScale {};

// The backward of a linear map for 4 rows, in one sweep over k in [0, n) (whole vectors) so each
// x_i is read once for both products:
//   DX: dx_i[k] = ms_i * sum_j coef_i[j] * w[j][k]     (added to dx_i when ACC, else stored)
//   DW: dw[j][k] += sum_i coef_i[j] * ms_i * x_i[k]
// w and dw have row stride ld; j runs over [0, J).  ms_i is the vector of lane factors
// scale(i, k) (a dropout mask times its scale), or 1 when Scale is NoScale.  Always inlined: the
// callers pick an instantiation once per call and call it per tile through a function pointer.
template <typename T, bool DX, bool DW, bool ACC, class Scale = NoScale>
[[gnu::always_inline]] inline void bwd4_rows(T* const dx[4], const T* const x[4],
                                             const T* const coef[4], const T* w, T* dw, int64_t ld,
                                             int64_t J, int64_t n, Scale scale = Scale{}) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  constexpr bool kScaled = !std::is_same<Scale, NoScale>::value;
  for (int64_t k = 0; k < n; k += L) {
    V ms[4];
    if constexpr (kScaled) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) ms[i] = scale(i, k);
    }
    V xv[4], acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      if (DW) {
        xv[i] = load<V>(x[i] + k);
        if constexpr (kScaled) xv[i] = xv[i] * ms[i];
      }
      if (DX) acc[i] = V{};
    }
    for (int64_t j = 0; j < J; ++j) {
      V c[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) c[i] = splat<V>(coef[i][j]);
      if (DX) {
        const V wv = load<V>(w + j * ld + k);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) acc[i] += c[i] * wv;
      }
      if (DW) {
        T* d = dw + j * ld + k;
        V dv = load<V>(d);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) dv += c[i] * xv[i];
        store(d, dv);
      }
    }
    if (DX) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        if constexpr (kScaled) acc[i] = ms[i] * acc[i];
        store(dx[i] + k, ACC ? load<V>(dx[i] + k) + acc[i] : acc[i]);
      }
    }
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace peftcore

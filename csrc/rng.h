// Counter-based dropout RNG, bit-for-bit the one of peftcore/reference/rng.py.
//
// The keep decision of element (m, k) of a 2-D input [M, K] depends on (seed, m, k) alone, so no
// mask is ever stored: forward and backward regenerate it.  All arithmetic is uint32 with
// wrap-around; m and k are truncated to 32 bits exactly as the Python reference does.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PC_HD __host__ __device__ __forceinline__
#else
#define PC_HD inline
#endif

namespace peftcore {

constexpr uint32_t kHashC1 = 0x7FEB352Du;
constexpr uint32_t kHashC2 = 0x846CA68Bu;
constexpr uint32_t kGolden = 0x9E3779B1u;
constexpr uint32_t kThresholdMax = 1u << 24;  // threshold = round(p * 2^24) <= 2^24

// Chris Wellons' lowbias32 mixer, for uint32_t and for GCC vectors of uint32_t (cpu_simd.h).
// U must be unsigned: a signed operand would make >> an arithmetic shift.
template <class U>
PC_HD U hash32_lanes(U x) {
  x ^= x >> 16;
  x *= kHashC1;
  x ^= x >> 15;
  x *= kHashC2;
  x ^= x >> 16;
  return x;
}

PC_HD uint32_t hash32(uint32_t x) { return hash32_lanes(x); }

// Per-call key from the user's seed.
PC_HD uint32_t seed_key(uint32_t seed) { return hash32(seed); }

// Per-row key: hash32(m ^ sk).
PC_HD uint32_t row_key(uint32_t sk, int64_t m) { return hash32(static_cast<uint32_t>(m) ^ sk); }

// keep(m, k) given the row key; threshold 0 keeps everything.
PC_HD bool keep(uint32_t rk, int64_t k, uint32_t threshold) {
  return (hash32(rk ^ (static_cast<uint32_t>(k) * kGolden)) >> 8) >= threshold;
}

}  // namespace peftcore

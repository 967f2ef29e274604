// NF4 dequantization of a panel of rows (nf4_cpu.h): what the cpp backend of nf4_lora_linear
// feeds to its panel GEMMs, so the full-precision weight never exists.
#include "nf4_cpu.h"

#include <algorithm>

#include "cpu_common.h"

namespace peftcore {
namespace cpu {

namespace {

// bitsandbytes' NF4 code values (float32), in code order.
constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Flat elements [s, e) into out[0, e - s): a scale per run of one block, two codes per byte.
template <typename T>
inline void dequant_span(const uint8_t* packed, const float* absmax, T* out, int64_t s, int64_t e, int64_t bs) {
  int64_t i = s;
  while (i < e) {
    const int64_t block_end = std::min(e, (i / bs + 1) * bs);
    const float a = absmax[i / bs];
    if (i & 1) {  // a run that starts on a low nibble
      out[i - s] = static_cast<T>(kNF4[packed[i >> 1] & 0xF] * a);
      ++i;
    }
    for (; i + 1 < block_end; i += 2) {
      const uint8_t b = packed[i >> 1];
      out[i - s] = static_cast<T>(kNF4[b >> 4] * a);
      out[i + 1 - s] = static_cast<T>(kNF4[b & 0xF] * a);
    }
    if (i < block_end) {  // a run that ends on a high nibble
      out[i - s] = static_cast<T>(kNF4[packed[i >> 1] >> 4] * a);
      ++i;
    }
  }
}

}  // namespace

template <typename T>
void nf4_dequant_rows(const uint8_t* packed, const float* absmax, T* out, int64_t start, int64_t rows, int64_t K,
                      int64_t blocksize, int nthreads) {
  if (rows <= 0 || K <= 0) return;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 14) / K);  // rows per work item (~16K elements)
  const int64_t items = (rows + chunk - 1) / chunk;
  const int nt = pick_threads(nthreads, items, double(rows) * double(K) * 4.0);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r0 = it * chunk, r1 = std::min(rows, r0 + chunk);
    const int64_t s = (start + r0) * K, e = (start + r1) * K;
    dequant_span(packed, absmax, out + r0 * K, s, e, blocksize);
  }
}

template void nf4_dequant_rows<float>(const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int);
template void nf4_dequant_rows<double>(const uint8_t*, const float*, double*, int64_t, int64_t, int64_t, int64_t,
                                       int);

}  // namespace cpu
}  // namespace peftcore

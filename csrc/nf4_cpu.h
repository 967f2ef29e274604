// NF4 (QLoRA's 4-bit NormalFloat, bitsandbytes' layout) dequantization on the CPU.
//
//   packed  [ceil(N*K / 2)] uint8: element e of the row-major [N, K] weight is the high nibble of
//           byte e/2 when e is even, the low nibble when odd
//   absmax  [ceil(N*K / blocksize)] float32: the scale of flat elements [j*blocksize, (j+1)*blocksize)
//   out     [rows, K] (contiguous) = rows [start, start + rows) of the weight, code[nibble] * absmax
//           computed in float32 (as bitsandbytes and peftcore.quant.nf4), then converted to T
// T is float or double.  One OpenMP region over row chunks.
#pragma once

#include <cstdint>

namespace peftcore {
namespace cpu {

template <typename T>
void nf4_dequant_rows(const uint8_t* packed, const float* absmax, T* out, int64_t start, int64_t rows, int64_t K,
                      int64_t blocksize, int nthreads);

}  // namespace cpu
}  // namespace peftcore

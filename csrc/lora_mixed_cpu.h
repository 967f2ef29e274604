// CPU kernel of mixed-adapter LoRA (one adapter per example, punica's SGMV): the low-rank delta of
// every row added in place into y = x W^T + b, which the caller computed.
//
// Layouts: x [M, K] with row stride ldx and unit column stride; A [J, R, K] and B [J, N, R]
// contiguous stacks; scaling fp32 [J]; y [M, N] with row stride ldy.  The batch is given as its
// segments (runs of rows sharing one adapter index, in order, covering [0, M)): seg_adapter int32
// [num_segs] in [-1, J) (-1: base only, rows left as they are) and seg_len int64 [num_segs] >= 1
// (peftcore/native/lora_mixed.py takes them from torch.unique_consecutive).  T is float or double.
#pragma once

#include <cstdint>

namespace peftcore {
namespace cpu {

// For every row m of a segment with adapter j >= 0:
//   y[m, n] += scaling[j] * sum_r (sum_k x[m, k] A[j, r, k]) B[j, n, r]
// One OpenMP region over (segment, row chunk) work items; each row's result is independent of the
// thread count.
template <typename T>
void lora_mixed_fwd(const T* x, int64_t ldx, const T* a, const T* b, const float* scaling,
                    const int32_t* seg_adapter, const int64_t* seg_len, int64_t num_segs, T* y,
                    int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R, int64_t J,
                    int nthreads);

}  // namespace cpu
}  // namespace peftcore

// CPU kernel of the soft-label distillation loss (OpenMP over rows, SIMD over the vocabulary).
//
// Per row i of s, t [N, V] (row strides lds, ldt, unit column stride), with p = softmax(t / T)
// (teacher) and q = softmax(s / T) (student):
//   kForward  KL(p || q)
//   kReverse  KL(q || p)
//   kJsd      beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
// loss[i] = T^2 * divergence (0 where row_weight[i] == 0) and, when grad != nullptr,
// grad[i, :] = row_weight[i] * d loss[i] / d s[i, :]  (grad [N, V] contiguous).  Rows with weight 0
// are skipped (loss 0, grad 0).  Teacher entries at -inf have p = 0 and contribute nothing.
//
// One call is one OpenMP parallel region; each row is handled by one thread in a few passes over
// the row while it sits in that core's L2 (max, exp + sums, [JSD terms], gradient).  Math is fp32
// with fp64 row sums; the results do not depend on the thread count.
#pragma once

#include <cstdint>

namespace peftcore {
namespace cpu {

enum class DistillKind : int { kForward = 0, kReverse = 1, kJsd = 2 };

void distill_fwd(const float* s, int64_t lds, const float* t, int64_t ldt, const float* row_weight,
                 float* loss, float* grad, int64_t N, int64_t V, double temperature,
                 DistillKind kind, double beta, int nthreads);

}  // namespace cpu
}  // namespace peftcore

// CUDA kernel of the soft-label distillation loss.  Same contract as distill_cpu.h, plus: s and t
// are float, half or bfloat16 (DType of lora_cuda.h) with fp32 math; loss is fp32 [N]; grad [N, V]
// (contiguous, nullptr for none) is in the input dtype; the launch goes on `stream` (a
// cudaStream_t passed as an integer, 0 = legacy default) of the current device, which the caller
// sets.  kind: 0 forward KL(p||q), 1 reverse KL(q||p), 2 generalized JSD with weight beta on p.
#pragma once

#include <cstdint>

#include "lora_cuda.h"  // DType, compiled()

namespace peftcore {
namespace cuda {

void distill_fwd(DType dt, const void* s, int64_t lds, const void* t, int64_t ldt,
                 const float* row_weight, float* loss, void* grad, int64_t N, int64_t V,
                 double temperature, int kind, double beta, uintptr_t stream);

}  // namespace cuda
}  // namespace peftcore

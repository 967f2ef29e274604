// CUDA kernels of the LoRA dropout-masked projection.  Same contract as lora_cpu.h, plus:
// inputs are float, half or bfloat16 (dtype code below) with fp32 accumulation; dA is written as
// fp32; every launch goes on `stream` (a cudaStream_t passed as an integer, 0 = legacy default)
// of the current device, which the caller sets.
#pragma once

#include <cstdint>
#include <string>

namespace peftcore {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Whether this build has the CUDA kernels.
bool compiled();
// Runtime version of the statically linked cudart, 0 without CUDA.
int runtime_version();
// Number of visible devices, or a negative cudaError_t code when the runtime cannot start.
int device_count();

// xa[m, r] = scale * sum_k keep(m, k) x[m, k] A[r, k]; xa [M, R] in the input dtype.
void down_fwd(DType dt, const void* x, int64_t ldx, const void* a, void* xa, int64_t M, int64_t K,
              int64_t R, uint32_t seed, uint32_t threshold, float scale, uintptr_t stream);

// Bytes of scratch down_bwd needs for dA's row-chunk partials (0 when one chunk covers M).
int64_t down_bwd_workspace(int64_t M, int64_t K, int64_t R);

// dx (input dtype, row stride lddx) += keep * scale * g A; da [R, K] fp32 = sum_m g^T (keep * scale
// * x).  g [M, R] and A [R, K] in the input dtype.  Either output may be null.  The dA partials are
// summed in a fixed order (deterministic).
void down_bwd(DType dt, const void* g, const void* a, const void* x, int64_t ldx, void* dx,
              int64_t lddx, float* da, int64_t M, int64_t K, int64_t R, uint32_t seed,
              uint32_t threshold, float scale, void* workspace, int64_t workspace_bytes,
              uintptr_t stream);

// out [M, K] uint8 keep mask on the device, for tests.
void keep_mask(uint8_t* out, int64_t M, int64_t K, uint32_t seed, uint32_t threshold,
               uintptr_t stream);

}  // namespace cuda
}  // namespace peftcore

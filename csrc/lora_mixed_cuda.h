// CUDA kernels of mixed-adapter LoRA (punica's SGMV): the per-row low-rank delta added in place
// into y = x W^T + b (computed by cuBLAS through torch).  Same layouts as lora_mixed_cpu.h, with:
// inputs float, half or bfloat16 (DType of lora_cuda.h), fp32 accumulation, scaling fp32 [J];
// tiles int32 [num_tiles, 3] in device memory, each (first, end, adapter) with
// end - first <= block_m (a tile outside rows [0, M) or adapters [0, J) is skipped); every launch on `stream` (a cudaStream_t as an integer) of the current
// device, which the caller sets.
#pragma once

#include <cstdint>

#include "lora_cuda.h"

namespace peftcore {
namespace cuda {

// Whether the kernels are compiled for this tile height (16: decode-like batches, 64: prefill).
bool lora_mixed_block_m_ok(int64_t block_m);

// Bytes of device scratch lora_mixed_fwd needs: fp32 partial products x A^T of every tile row
// over each K split.  A function of the arguments alone.
int64_t lora_mixed_workspace(int64_t num_tiles, int64_t block_m, int64_t K, int64_t R);

// For every tile (m0, m1, j) and m in [m0, m1):
//   y[m, n] += scaling[j] * sum_r (sum_k x[m, k] A[j, r, k]) B[j, n, r]
// Deterministic: the K-split partials are summed in a fixed order.
void lora_mixed_fwd(DType dt, const void* x, int64_t ldx, const void* a, const void* b,
                    const float* scaling, const int32_t* tiles, int64_t num_tiles,
                    int64_t block_m, void* y, int64_t ldy, int64_t M, int64_t K, int64_t N,
                    int64_t R, int64_t J, void* workspace, int64_t workspace_bytes, uintptr_t stream);

}  // namespace cuda
}  // namespace peftcore

// Stand-in for lora_mixed_cuda.cu in builds without CUDA: same symbols, and they say why.
#include <stdexcept>

#include "lora_mixed_cuda.h"

namespace peftcore {
namespace cuda {

bool lora_mixed_block_m_ok(int64_t block_m) { return block_m == 16 || block_m == 64; }
int64_t lora_mixed_workspace(int64_t, int64_t, int64_t, int64_t) { return 0; }
void lora_mixed_fwd(DType, const void*, int64_t, const void*, const void*, const float*,
                    const int32_t*, int64_t, int64_t, void*, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, void*, int64_t, uintptr_t) {
  throw std::runtime_error("peftcore._C was built without CUDA");
}

}  // namespace cuda
}  // namespace peftcore

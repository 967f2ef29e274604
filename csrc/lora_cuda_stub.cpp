// Stand-in for lora_cuda.cu in builds without CUDA: the module keeps the same symbols and says why.
#include <stdexcept>

#include "lora_cuda.h"

namespace peftcore {
namespace cuda {
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("peftcore._C was built without CUDA"); }
}  // namespace

bool compiled() { return false; }
int runtime_version() { return 0; }
int device_count() { return 0; }
void down_fwd(DType, const void*, int64_t, const void*, void*, int64_t, int64_t, int64_t, uint32_t,
              uint32_t, float, uintptr_t) {
  no_cuda();
}
int64_t down_bwd_workspace(int64_t, int64_t, int64_t) { return 0; }
void down_bwd(DType, const void*, const void*, const void*, int64_t, void*, int64_t, float*,
              int64_t, int64_t, int64_t, uint32_t, uint32_t, float, void*, int64_t, uintptr_t) {
  no_cuda();
}
void keep_mask(uint8_t*, int64_t, int64_t, uint32_t, uint32_t, uintptr_t) { no_cuda(); }

}  // namespace cuda
}  // namespace peftcore

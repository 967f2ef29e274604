// Stand-in for phm_cuda.cu in builds without CUDA: the module keeps the same symbols and says why.
#include <stdexcept>

#include "phm_cuda.h"

namespace peftcore {
namespace cuda {

void phm_fwd(DType, const void*, int64_t, const void*, const void*, const void*, const void*, void*,
             void*, int64_t, int64_t, int64_t, int64_t, int64_t, uintptr_t) {
  throw std::runtime_error("peftcore._C was built without CUDA");
}

void phm_bwd(DType, const void*, int64_t, const void*, int64_t, const void*, const void*,
             const void*, const void*, void*, void*, void*, void*, void*, int64_t, int64_t,
             int64_t, int64_t, int64_t, float*, uintptr_t) {
  throw std::runtime_error("peftcore._C was built without CUDA");
}

}  // namespace cuda
}  // namespace peftcore

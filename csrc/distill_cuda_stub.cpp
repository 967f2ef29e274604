// Stand-in for distill_cuda.cu in builds without CUDA: the module keeps the same symbols and says why.
#include <stdexcept>

#include "distill_cuda.h"

namespace peftcore {
namespace cuda {

void distill_fwd(DType, const void*, int64_t, const void*, int64_t, const float*, float*, void*,
                 int64_t, int64_t, double, int, double, uintptr_t) {
  throw std::runtime_error("peftcore._C was built without CUDA");
}

}  // namespace cuda
}  // namespace peftcore

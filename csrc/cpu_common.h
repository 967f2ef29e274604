// What the CPU kernel files share besides SIMD (cpu_simd.h): the module-wide thread settings and
// the number of threads one call runs on.  The settings are defined in lora_cpu.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

namespace peftcore {
namespace cpu {

// Default thread count for calls that pass nthreads <= 0 (0 = OpenMP's own default).
void set_num_threads(int n);
int get_num_threads();
bool has_openmp();
const char* simd_name();

// Threads for a call: the caller's request, else the module default, else OpenMP's; never more
// than the work items, and one for work too small to amortize waking the pool.
inline int pick_threads(int requested, int64_t items, double flops) {
  int nt = requested > 0 ? requested : get_num_threads();
  if (!has_openmp() || nt < 1) nt = 1;
  if (items < nt) nt = static_cast<int>(std::max<int64_t>(items, 1));
  if (flops < 2.0e5) nt = 1;
  return nt;
}

}  // namespace cpu
}  // namespace peftcore

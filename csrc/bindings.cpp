// peftcore._C: pybind11 bindings of the CPU and CUDA kernels.
//
// Tensors cross as raw addresses (tensor.data_ptr()), sizes and strides, so the module never links
// libtorch.  peftcore/native/lora.py checks dtype, device and layout before it passes an address;
// the checks here catch what an address cannot show (null, misaligned, sizes and strides that do
// not fit) with a ValueError instead of a crash.  The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_common.h"  // thread settings, build description
#include "distill_cpu.h"
#include "distill_cuda.h"
#include "lora_cpu.h"
#include "lora_cuda.h"
#include "lora_mixed_cpu.h"
#include "lora_mixed_cuda.h"
#include "phm_cpu.h"  // phm_linear: checked entry points of both backends
#include "rng.h"

namespace py = pybind11;
using peftcore::cuda::DType;

#ifndef PEFTCORE_CXX_COMPILER
#define PEFTCORE_CXX_COMPILER "unknown"
#endif
#ifndef PEFTCORE_CUDA_ARCHS
#define PEFTCORE_CUDA_ARCHS ""
#endif
#ifndef PEFTCORE_NATIVE_ARCH
#define PEFTCORE_NATIVE_ARCH 0
#endif

namespace {

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw py::value_error("peftcore._C." + fn + ": " + msg);
}

int64_t elem_size(const std::string& dtype) {
  if (dtype == "float32") return 4;
  if (dtype == "float64") return 8;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  return 0;
}

DType cuda_dtype(const std::string& fn, const std::string& dtype) {
  if (dtype == "float32") return DType::kFloat32;
  if (dtype == "float16") return DType::kFloat16;
  if (dtype == "bfloat16") return DType::kBFloat16;
  fail(fn, "CUDA kernels take float32, float16 or bfloat16, got '" + dtype + "'");
}

void check_sizes(const std::string& fn, int64_t M, int64_t K, int64_t R) {
  if (M < 0 || K < 0) fail(fn, "sizes must be >= 0, got M=" + std::to_string(M) + " K=" + std::to_string(K));
  if (R < 1) fail(fn, "rank R must be >= 1, got " + std::to_string(R));
  if (R > (int64_t(1) << 20)) fail(fn, "rank R=" + std::to_string(R) + " is out of range");
}

void check_rng(const std::string& fn, int64_t seed, int64_t threshold, double scale) {
  if (seed < 0 || seed > int64_t(0xFFFFFFFF)) fail(fn, "seed must be in [0, 2**32), got " + std::to_string(seed));
  if (threshold < 0 || threshold > int64_t(peftcore::kThresholdMax))
    fail(fn, "threshold must be in [0, 2**24] (dropout_threshold(p)), got " + std::to_string(threshold));
  if (!std::isfinite(scale)) fail(fn, "scale must be finite");
}

// A pointer an operand of `count` elements may use: non-null when count > 0, aligned to its type.
void check_ptr(const std::string& fn, const char* name, uintptr_t p, int64_t count, int64_t esize,
               bool optional = false) {
  if (p == 0) {
    if (optional || count == 0) return;
    fail(fn, std::string(name) + " is a null pointer");
  }
  if (esize > 0 && p % static_cast<uintptr_t>(esize) != 0)
    fail(fn, std::string(name) + " is not aligned to its element size " + std::to_string(esize));
}

// Row stride of a [M, K] operand with unit column stride; writable rows must not overlap.
void check_ld(const std::string& fn, const char* name, int64_t ld, int64_t M, int64_t K, bool writable) {
  if (ld < 0) fail(fn, std::string(name) + " row stride must be >= 0, got " + std::to_string(ld));
  if (M > 1 && ld < K && (writable || ld != 0))
    fail(fn, std::string(name) + " row stride " + std::to_string(ld) + " is smaller than K=" + std::to_string(K));
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void down_fwd(const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t xa, int64_t M,
              int64_t K, int64_t R, int64_t seed, int64_t threshold, double scale, int nthreads, uintptr_t y,
              int64_t ldy, uintptr_t b, int64_t N, double scaling) {
  const std::string fn = "down_fwd";
  check_sizes(fn, M, K, R);
  check_rng(fn, seed, threshold, scale);
  const int64_t es = elem_size(dtype);
  if (es != 4 && es != 8) fail(fn, "CPU kernels take float32 or float64, got '" + dtype + "'");
  check_ptr(fn, "x", x, M * K, es);
  check_ptr(fn, "a", a, R * K, es);
  check_ptr(fn, "xa", xa, M * R, es);
  check_ld(fn, "x", ldx, M, K, false);
  if (y != 0) {
    if (N < 0) fail(fn, "N must be >= 0, got " + std::to_string(N));
    check_ptr(fn, "y", y, M * N, es);
    check_ptr(fn, "b", b, N * R, es);
    check_ld(fn, "y", ldy, M, N, true);
    if (!std::isfinite(scaling)) fail(fn, "scaling must be finite");
  }
  py::gil_scoped_release nogil;
  if (es == 4)
    peftcore::cpu::down_fwd<float>(ptr<const float>(x), ldx, ptr<const float>(a), ptr<float>(xa), M, K, R,
                                   uint32_t(seed), uint32_t(threshold), scale, nthreads, ptr<float>(y), ldy,
                                   ptr<const float>(b), N, scaling);
  else
    peftcore::cpu::down_fwd<double>(ptr<const double>(x), ldx, ptr<const double>(a), ptr<double>(xa), M, K, R,
                                    uint32_t(seed), uint32_t(threshold), scale, nthreads, ptr<double>(y), ldy,
                                    ptr<const double>(b), N, scaling);
}

void check_bwd(const std::string& fn, int64_t es, uintptr_t g, uintptr_t a, uintptr_t x, int64_t ldx,
               uintptr_t dx, int64_t lddx, uintptr_t da, int64_t M, int64_t K, int64_t R,
               int64_t da_es) {
  check_ptr(fn, "g", g, M * R, es);
  if (dx != 0) {
    check_ptr(fn, "a", a, R * K, es);
    check_ptr(fn, "dx", dx, M * K, es, true);
    check_ld(fn, "dx", lddx, M, K, true);
  }
  if (da != 0) {
    check_ptr(fn, "x", x, M * K, es);
    check_ptr(fn, "da", da, R * K, da_es, true);
    check_ld(fn, "x", ldx, M, K, false);
  }
}

void down_bwd(const std::string& dtype, uintptr_t g, uintptr_t a, uintptr_t x, int64_t ldx, uintptr_t dx,
              int64_t lddx, uintptr_t da, int64_t M, int64_t K, int64_t R, int64_t seed, int64_t threshold,
              double scale, int nthreads) {
  const std::string fn = "down_bwd";
  check_sizes(fn, M, K, R);
  check_rng(fn, seed, threshold, scale);
  const int64_t es = elem_size(dtype);
  if (es != 4 && es != 8) fail(fn, "CPU kernels take float32 or float64, got '" + dtype + "'");
  check_bwd(fn, es, g, a, x, ldx, dx, lddx, da, M, K, R, es);
  py::gil_scoped_release nogil;
  if (es == 4)
    peftcore::cpu::down_bwd<float>(ptr<const float>(g), ptr<const float>(a), ptr<const float>(x), ldx,
                                   ptr<float>(dx), lddx, ptr<float>(da), M, K, R, uint32_t(seed),
                                   uint32_t(threshold), scale, nthreads);
  else
    peftcore::cpu::down_bwd<double>(ptr<const double>(g), ptr<const double>(a), ptr<const double>(x), ldx,
                                    ptr<double>(dx), lddx, ptr<double>(da), M, K, R, uint32_t(seed),
                                    uint32_t(threshold), scale, nthreads);
}

void lora_bwd(const std::string& dtype, uintptr_t dy, int64_t lddy, uintptr_t b, uintptr_t xa, uintptr_t a,
              uintptr_t x, int64_t ldx, uintptr_t dx, int64_t lddx, uintptr_t da, uintptr_t db, int64_t M,
              int64_t N, int64_t K, int64_t R, int64_t seed, int64_t threshold, double scale, double scaling,
              int nthreads) {
  const std::string fn = "lora_bwd";
  check_sizes(fn, M, K, R);
  if (N < 0) fail(fn, "N must be >= 0, got " + std::to_string(N));
  check_rng(fn, seed, threshold, scale);
  if (!std::isfinite(scaling)) fail(fn, "scaling must be finite");
  const int64_t es = elem_size(dtype);
  if (es != 4 && es != 8) fail(fn, "CPU kernels take float32 or float64, got '" + dtype + "'");
  check_ptr(fn, "dy", dy, M * N, es);
  check_ld(fn, "dy", lddy, M, N, false);
  if (dx != 0 || da != 0) check_ptr(fn, "b", b, N * R, es);
  if (dx != 0) {
    check_ptr(fn, "a", a, R * K, es);
    check_ptr(fn, "dx", dx, M * K, es, true);
    check_ld(fn, "dx", lddx, M, K, true);
  }
  if (da != 0) {
    check_ptr(fn, "x", x, M * K, es);
    check_ptr(fn, "da", da, R * K, es, true);
    check_ld(fn, "x", ldx, M, K, false);
  }
  if (db != 0) {
    check_ptr(fn, "xa", xa, M * R, es);
    check_ptr(fn, "db", db, N * R, es, true);
  }
  py::gil_scoped_release nogil;
  if (es == 4)
    peftcore::cpu::lora_bwd<float>(ptr<const float>(dy), lddy, ptr<const float>(b), ptr<const float>(xa),
                                   ptr<const float>(a), ptr<const float>(x), ldx, ptr<float>(dx), lddx,
                                   ptr<float>(da), ptr<float>(db), M, N, K, R, uint32_t(seed),
                                   uint32_t(threshold), scale, scaling, nthreads);
  else
    peftcore::cpu::lora_bwd<double>(ptr<const double>(dy), lddy, ptr<const double>(b), ptr<const double>(xa),
                                    ptr<const double>(a), ptr<const double>(x), ldx, ptr<double>(dx), lddx,
                                    ptr<double>(da), ptr<double>(db), M, N, K, R, uint32_t(seed),
                                    uint32_t(threshold), scale, scaling, nthreads);
}

void keep_mask(uintptr_t out, int64_t M, int64_t K, int64_t seed, int64_t threshold, int nthreads) {
  const std::string fn = "keep_mask";
  check_sizes(fn, M, K, 1);
  check_rng(fn, seed, threshold, 1.0);
  check_ptr(fn, "out", out, M * K, 1);
  py::gil_scoped_release nogil;
  peftcore::cpu::keep_mask(ptr<uint8_t>(out), M, K, uint32_t(seed), uint32_t(threshold), nthreads);
}

void require_cuda(const std::string& fn) {
  if (!peftcore::cuda::compiled()) fail(fn, "peftcore._C was built without CUDA");
}

void cuda_down_fwd(const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t xa, int64_t M,
                   int64_t K, int64_t R, int64_t seed, int64_t threshold, double scale, uintptr_t stream) {
  const std::string fn = "cuda_down_fwd";
  require_cuda(fn);
  check_sizes(fn, M, K, R);
  check_rng(fn, seed, threshold, scale);
  const DType dt = cuda_dtype(fn, dtype);
  const int64_t es = elem_size(dtype);
  check_ptr(fn, "x", x, M * K, es);
  check_ptr(fn, "a", a, R * K, es);
  check_ptr(fn, "xa", xa, M * R, es);
  check_ld(fn, "x", ldx, M, K, false);
  py::gil_scoped_release nogil;
  peftcore::cuda::down_fwd(dt, ptr<const void>(x), ldx, ptr<const void>(a), ptr<void>(xa), M, K, R,
                           uint32_t(seed), uint32_t(threshold), float(scale), stream);
}

void cuda_down_bwd(const std::string& dtype, uintptr_t g, uintptr_t a, uintptr_t x, int64_t ldx, uintptr_t dx,
                   int64_t lddx, uintptr_t da, int64_t M, int64_t K, int64_t R, int64_t seed,
                   int64_t threshold, double scale, uintptr_t workspace, int64_t workspace_bytes,
                   uintptr_t stream) {
  const std::string fn = "cuda_down_bwd";
  require_cuda(fn);
  check_sizes(fn, M, K, R);
  check_rng(fn, seed, threshold, scale);
  const DType dt = cuda_dtype(fn, dtype);
  const int64_t es = elem_size(dtype);
  check_bwd(fn, es, g, a, x, ldx, dx, lddx, da, M, K, R, 4);
  if (da != 0) {
    const int64_t need = peftcore::cuda::down_bwd_workspace(M, K, R);
    if (workspace_bytes < need)
      fail(fn, "workspace of " + std::to_string(workspace_bytes) + " bytes, cuda_down_bwd_workspace(M, K, R) = " +
                   std::to_string(need));
    check_ptr(fn, "workspace", workspace, need, 4);
  }
  py::gil_scoped_release nogil;
  peftcore::cuda::down_bwd(dt, ptr<const void>(g), ptr<const void>(a), ptr<const void>(x), ldx, ptr<void>(dx),
                           lddx, ptr<float>(da), M, K, R, uint32_t(seed), uint32_t(threshold), float(scale),
                           ptr<void>(workspace), workspace_bytes, stream);
}

int64_t cuda_down_bwd_workspace(int64_t M, int64_t K, int64_t R) {
  check_sizes("cuda_down_bwd_workspace", M, K, R);
  return peftcore::cuda::down_bwd_workspace(M, K, R);
}

void cuda_keep_mask(uintptr_t out, int64_t M, int64_t K, int64_t seed, int64_t threshold, uintptr_t stream) {
  const std::string fn = "cuda_keep_mask";
  require_cuda(fn);
  check_sizes(fn, M, K, 1);
  check_rng(fn, seed, threshold, 1.0);
  check_ptr(fn, "out", out, M * K, 1);
  py::gil_scoped_release nogil;
  peftcore::cuda::keep_mask(ptr<uint8_t>(out), M, K, uint32_t(seed), uint32_t(threshold), stream);
}

// ---- distill_kl ---------------------------------------------------------------------------------

peftcore::cpu::DistillKind distill_kind(const std::string& fn, const std::string& kind) {
  if (kind == "forward") return peftcore::cpu::DistillKind::kForward;
  if (kind == "reverse") return peftcore::cpu::DistillKind::kReverse;
  if (kind == "jsd") return peftcore::cpu::DistillKind::kJsd;
  fail(fn, "kind must be 'forward', 'reverse' or 'jsd', got '" + kind + "'");
}

// Checks shared by the CPU and CUDA distill_fwd: s, t [N, V] (row strides lds, ldt, read only),
// row_weight and loss fp32 [N], grad [N, V] contiguous in the input dtype (0: no gradient).
void check_distill(const std::string& fn, int64_t es, uintptr_t s, int64_t lds, uintptr_t t,
                   int64_t ldt, uintptr_t row_weight, uintptr_t loss, uintptr_t grad, int64_t N,
                   int64_t V, double temperature, const std::string& kind, double beta) {
  if (N < 0) fail(fn, "N must be >= 0, got " + std::to_string(N));
  if (V < 1) fail(fn, "V must be >= 1, got " + std::to_string(V));
  if (N > 0 && V > (int64_t(1) << 40) / N) fail(fn, "N * V is out of range");
  if (!std::isfinite(temperature) || !(temperature > 0))
    fail(fn, "temperature must be finite and > 0, got " + std::to_string(temperature));
  if (kind == "jsd" && !(beta > 0.0 && beta < 1.0))
    fail(fn, "beta must be in (0, 1) for kind='jsd', got " + std::to_string(beta));
  check_ptr(fn, "s", s, N * V, es);
  check_ptr(fn, "t", t, N * V, es);
  check_ld(fn, "s", lds, N, V, false);
  check_ld(fn, "t", ldt, N, V, false);
  check_ptr(fn, "row_weight", row_weight, N, 4);
  check_ptr(fn, "loss", loss, N, 4);
  check_ptr(fn, "grad", grad, N * V, es, true);
  if (grad != 0 && (grad == s || grad == t)) fail(fn, "grad must not alias s or t");
}

void distill_fwd(const std::string& dtype, uintptr_t s, int64_t lds, uintptr_t t, int64_t ldt,
                 uintptr_t row_weight, uintptr_t loss, uintptr_t grad, int64_t N, int64_t V,
                 double temperature, const std::string& kind, double beta, int nthreads) {
  const std::string fn = "distill_fwd";
  if (dtype != "float32") fail(fn, "the CPU kernel takes float32, got '" + dtype + "'");
  const auto k = distill_kind(fn, kind);
  check_distill(fn, 4, s, lds, t, ldt, row_weight, loss, grad, N, V, temperature, kind, beta);
  py::gil_scoped_release nogil;
  peftcore::cpu::distill_fwd(ptr<const float>(s), lds, ptr<const float>(t), ldt,
                             ptr<const float>(row_weight), ptr<float>(loss), ptr<float>(grad), N, V,
                             temperature, k, beta, nthreads);
}

void cuda_distill_fwd(const std::string& dtype, uintptr_t s, int64_t lds, uintptr_t t, int64_t ldt,
                      uintptr_t row_weight, uintptr_t loss, uintptr_t grad, int64_t N, int64_t V,
                      double temperature, const std::string& kind, double beta, uintptr_t stream) {
  const std::string fn = "cuda_distill_fwd";
  require_cuda(fn);
  const DType dt = cuda_dtype(fn, dtype);
  const auto k = distill_kind(fn, kind);
  check_distill(fn, elem_size(dtype), s, lds, t, ldt, row_weight, loss, grad, N, V, temperature,
                kind, beta);
  py::gil_scoped_release nogil;
  peftcore::cuda::distill_fwd(dt, ptr<const void>(s), lds, ptr<const void>(t), ldt,
                              ptr<const float>(row_weight), ptr<float>(loss), ptr<void>(grad), N, V,
                              temperature, static_cast<int>(k), beta, stream);
}

// ---- lora_mixed ---------------------------------------------------------------------------------

// Checks shared by the CPU and CUDA lora_mixed_fwd: sizes, pointers and row strides.  Each entry
// point checks its own description of the batch (segments on the CPU, tiles on the GPU).
void check_mixed(const std::string& fn, int64_t es, uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t b,
                 uintptr_t scaling, uintptr_t y, int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R,
                 int64_t J) {
  if (M < 0 || K < 0 || N < 0)
    fail(fn, "sizes must be >= 0, got M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" +
                 std::to_string(N));
  if (R < 1 || R > (int64_t(1) << 20)) fail(fn, "rank R must be in [1, 2**20], got " + std::to_string(R));
  if (J < 1) fail(fn, "adapters J must be >= 1, got " + std::to_string(J));
  check_ptr(fn, "x", x, M * K, es);
  check_ptr(fn, "a", a, J * R * K, es);
  check_ptr(fn, "b", b, J * N * R, es);
  check_ptr(fn, "scaling", scaling, J, 4);
  check_ptr(fn, "y", y, M * N, es);
  check_ld(fn, "x", ldx, M, K, false);
  check_ld(fn, "y", ldy, M, N, true);
}

void lora_mixed_fwd(const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t b,
                    uintptr_t scaling, uintptr_t seg_adapter, uintptr_t seg_len, int64_t num_segs, uintptr_t y,
                    int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R, int64_t J, int nthreads) {
  const std::string fn = "lora_mixed_fwd";
  const int64_t es = elem_size(dtype);
  if (es != 4 && es != 8) fail(fn, "CPU kernels take float32 or float64, got '" + dtype + "'");
  check_mixed(fn, es, x, ldx, a, b, scaling, y, ldy, M, K, N, R, J);
  if (num_segs < 0 || num_segs > M)
    fail(fn, "num_segs must be in [0, M=" + std::to_string(M) + "], got " + std::to_string(num_segs));
  check_ptr(fn, "seg_adapter", seg_adapter, num_segs, 4);
  check_ptr(fn, "seg_len", seg_len, num_segs, 8);
  // The segments are host memory: check them before the kernel indexes x, y and the stacks with them.
  const int32_t* sa = ptr<const int32_t>(seg_adapter);
  const int64_t* sl = ptr<const int64_t>(seg_len);
  int64_t rows = 0;
  for (int64_t sg = 0; sg < num_segs; ++sg) {
    if (sl[sg] < 1 || sl[sg] > M - rows)
      fail(fn, "segment " + std::to_string(sg) + " has length " + std::to_string(sl[sg]) +
                   ": lengths must be >= 1 and add up to M=" + std::to_string(M));
    if (sa[sg] < -1 || sa[sg] >= J)
      fail(fn, "segment " + std::to_string(sg) + " has adapter " + std::to_string(sa[sg]) + ", expected [-1, J=" +
                   std::to_string(J) + ")");
    rows += sl[sg];
  }
  if (rows != M) fail(fn, "segment lengths add up to " + std::to_string(rows) + ", expected M=" + std::to_string(M));
  py::gil_scoped_release nogil;
  if (es == 4)
    peftcore::cpu::lora_mixed_fwd<float>(ptr<const float>(x), ldx, ptr<const float>(a), ptr<const float>(b),
                                         ptr<const float>(scaling), sa, sl, num_segs, ptr<float>(y), ldy, M, K, N,
                                         R, J, nthreads);
  else
    peftcore::cpu::lora_mixed_fwd<double>(ptr<const double>(x), ldx, ptr<const double>(a), ptr<const double>(b),
                                          ptr<const float>(scaling), sa, sl, num_segs, ptr<double>(y), ldy, M, K,
                                          N, R, J, nthreads);
}

int64_t cuda_lora_mixed_workspace(int64_t num_tiles, int64_t block_m, int64_t K, int64_t R) {
  const std::string fn = "cuda_lora_mixed_workspace";
  if (!peftcore::cuda::lora_mixed_block_m_ok(block_m))
    fail(fn, "block_m must be 16 or 64, got " + std::to_string(block_m));
  if (num_tiles < 0 || K < 0 || R < 1)
    fail(fn, "need num_tiles >= 0, K >= 0, R >= 1, got " + std::to_string(num_tiles) + ", " + std::to_string(K) +
                 ", " + std::to_string(R));
  return peftcore::cuda::lora_mixed_workspace(num_tiles, block_m, K, R);
}

void cuda_lora_mixed_fwd(const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t b,
                         uintptr_t scaling, uintptr_t tiles, int64_t num_tiles, int64_t block_m, uintptr_t y,
                         int64_t ldy, int64_t M, int64_t K, int64_t N, int64_t R, int64_t J, uintptr_t workspace,
                         int64_t workspace_bytes, uintptr_t stream) {
  const std::string fn = "cuda_lora_mixed_fwd";
  require_cuda(fn);
  const DType dt = cuda_dtype(fn, dtype);
  check_mixed(fn, elem_size(dtype), x, ldx, a, b, scaling, y, ldy, M, K, N, R, J);
  if (num_tiles < 0 || num_tiles > M)
    fail(fn, "num_tiles must be in [0, M=" + std::to_string(M) + "], got " + std::to_string(num_tiles));
  check_ptr(fn, "tiles", tiles, num_tiles * 3, 4);
  const int64_t need = cuda_lora_mixed_workspace(num_tiles, block_m, K, R);
  if (workspace_bytes < need)
    fail(fn, "workspace of " + std::to_string(workspace_bytes) +
                 " bytes, cuda_lora_mixed_workspace(num_tiles, block_m, K, R) = " + std::to_string(need));
  check_ptr(fn, "workspace", workspace, need, 4);
  py::gil_scoped_release nogil;
  peftcore::cuda::lora_mixed_fwd(dt, ptr<const void>(x), ldx, ptr<const void>(a), ptr<const void>(b),
                                 ptr<const float>(scaling), ptr<const int32_t>(tiles), num_tiles, block_m,
                                 ptr<void>(y), ldy, M, K, N, R, ptr<void>(workspace), workspace_bytes, stream);
}

// The first instruction-set extension this binary was compiled for (-march=native on the build
// machine) that the running CPU lacks, or "" when it has them all.  The loader refuses the module
// with this name instead of letting a kernel die of SIGILL.
std::string missing_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return "avx512f";
#endif
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512bw")) return "avx512bw";
#endif
#if defined(__AVX512VL__)
  if (!__builtin_cpu_supports("avx512vl")) return "avx512vl";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2")) return "avx2";
#endif
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) return "fma";
#endif
#if defined(__AVX__)
  if (!__builtin_cpu_supports("avx")) return "avx";
#endif
#endif
  return "";
}

py::dict build_config() {
  py::dict d;
  d["cxx_compiler"] = PEFTCORE_CXX_COMPILER;
  d["openmp"] = peftcore::cpu::has_openmp();
  d["simd"] = peftcore::cpu::simd_name();
  d["native_arch"] = bool(PEFTCORE_NATIVE_ARCH);
  d["cuda"] = peftcore::cuda::compiled();
  d["cuda_archs"] = std::string(PEFTCORE_CUDA_ARCHS);
  d["cuda_runtime_version"] = peftcore::cuda::runtime_version();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "peftcore native kernels (CPU: OpenMP + SIMD; CUDA when built with nvcc). "
            "Tensors are passed as data_ptr() integers; see peftcore/native/lora.py.";

  m.def("down_fwd", &down_fwd, py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("a"), py::arg("xa"),
        py::arg("M"), py::arg("K"), py::arg("R"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
        py::arg("nthreads") = 0, py::arg("y") = 0, py::arg("ldy") = 0, py::arg("b") = 0, py::arg("N") = 0,
        py::arg("scaling") = 1.0,
        "xa[M,R] = scale * (keep ⊙ x[M,K]) @ A[R,K]^T on the CPU (float32/float64); with y != 0 also "
        "y[M,N] += scaling * xa @ B[N,R]^T in the same pass.");
  m.def("lora_bwd", &lora_bwd, py::arg("dtype"), py::arg("dy"), py::arg("lddy"), py::arg("b"), py::arg("xa"),
        py::arg("a"), py::arg("x"), py::arg("ldx"), py::arg("dx"), py::arg("lddx"), py::arg("da"), py::arg("db"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("R"), py::arg("seed"), py::arg("threshold"),
        py::arg("scale"), py::arg("scaling"), py::arg("nthreads") = 0,
        "The LoRA side of the backward in one pass, g = scaling * dy @ B kept per row chunk: "
        "dx += scale * keep ⊙ (g @ A) (dx != 0), da = scale * g^T @ (keep ⊙ x) (da != 0), "
        "db = scaling * dy^T @ xa (db != 0). CPU, float32/float64.");
  m.def("down_bwd", &down_bwd, py::arg("dtype"), py::arg("g"), py::arg("a"), py::arg("x"), py::arg("ldx"),
        py::arg("dx"), py::arg("lddx"), py::arg("da"), py::arg("M"), py::arg("K"), py::arg("R"), py::arg("seed"),
        py::arg("threshold"), py::arg("scale"), py::arg("nthreads") = 0,
        "dx[M,K] += scale * keep ⊙ (g[M,R] @ A[R,K]) (in place, skipped if dx == 0); "
        "da[R,K] = scale * g^T @ (keep ⊙ x) (overwritten, skipped if da == 0). CPU, float32/float64.");
  m.def("keep_mask", &keep_mask, py::arg("out"), py::arg("M"), py::arg("K"), py::arg("seed"),
        py::arg("threshold"), py::arg("nthreads") = 0, "out[M,K] (uint8) = keep mask, for tests.");
  m.def("cuda_down_fwd", &cuda_down_fwd, py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("a"),
        py::arg("xa"), py::arg("M"), py::arg("K"), py::arg("R"), py::arg("seed"), py::arg("threshold"),
        py::arg("scale"), py::arg("stream"), "CUDA down_fwd (float32/float16/bfloat16, fp32 accumulation).");
  m.def("cuda_down_bwd", &cuda_down_bwd, py::arg("dtype"), py::arg("g"), py::arg("a"), py::arg("x"),
        py::arg("ldx"), py::arg("dx"), py::arg("lddx"), py::arg("da"), py::arg("M"), py::arg("K"), py::arg("R"),
        py::arg("seed"), py::arg("threshold"), py::arg("scale"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"), "CUDA down_bwd; da is float32 [R,K].");
  m.def("cuda_down_bwd_workspace", &cuda_down_bwd_workspace, py::arg("M"), py::arg("K"), py::arg("R"),
        "Bytes of device scratch cuda_down_bwd needs for dA.");
  m.def("cuda_keep_mask", &cuda_keep_mask, py::arg("out"), py::arg("M"), py::arg("K"), py::arg("seed"),
        py::arg("threshold"), py::arg("stream"), "Device keep mask, for tests.");
  m.def("distill_fwd", &distill_fwd, py::arg("dtype"), py::arg("s"), py::arg("lds"), py::arg("t"),
        py::arg("ldt"), py::arg("row_weight"), py::arg("loss"), py::arg("grad"), py::arg("N"), py::arg("V"),
        py::arg("temperature"), py::arg("kind"), py::arg("beta") = 0.5, py::arg("nthreads") = 0,
        "Distillation loss on the CPU (float32): loss[N] = T^2 * divergence(softmax(t/T), softmax(s/T)) "
        "per row (kind 'forward' KL(p||q), 'reverse' KL(q||p), 'jsd' with weight beta on p), 0 where "
        "row_weight is 0; with grad != 0 also grad[N,V] (contiguous) = row_weight * dloss/ds.");
  m.def("cuda_distill_fwd", &cuda_distill_fwd, py::arg("dtype"), py::arg("s"), py::arg("lds"), py::arg("t"),
        py::arg("ldt"), py::arg("row_weight"), py::arg("loss"), py::arg("grad"), py::arg("N"), py::arg("V"),
        py::arg("temperature"), py::arg("kind"), py::arg("beta"), py::arg("stream"),
        "CUDA distill_fwd (float32/float16/bfloat16 inputs, fp32 math, fp32 loss, grad in the input dtype).");
  m.def("lora_mixed_fwd", &lora_mixed_fwd, py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("a"),
        py::arg("b"), py::arg("scaling"), py::arg("seg_adapter"), py::arg("seg_len"), py::arg("num_segs"),
        py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("R"), py::arg("J"),
        py::arg("nthreads") = 0,
        "Mixed-adapter LoRA delta on the CPU (float32/float64), in place: rows come in segments "
        "(seg_adapter int32 [num_segs] in [-1, J), seg_len int64 [num_segs], in order, adding up to M); "
        "for every row m of a segment with adapter j >= 0, y[m] += scaling[j] * (x[m] @ A[j]^T) @ B[j]^T "
        "with A [J,R,K], B [J,N,R] contiguous and scaling float32 [J]. The segments are validated first.");
  m.def("cuda_lora_mixed_workspace", &cuda_lora_mixed_workspace, py::arg("num_tiles"), py::arg("block_m"),
        py::arg("K"), py::arg("R"), "Bytes of device scratch cuda_lora_mixed_fwd needs.");
  m.def("cuda_lora_mixed_fwd", &cuda_lora_mixed_fwd, py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("a"),
        py::arg("b"), py::arg("scaling"), py::arg("tiles"), py::arg("num_tiles"), py::arg("block_m"), py::arg("y"),
        py::arg("ldy"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("R"), py::arg("J"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "CUDA lora_mixed_fwd (float32/float16/bfloat16, fp32 accumulation). tiles lives in device memory and "
        "must come from peftcore.native.lora_mixed.plan (rows per tile <= block_m, 16 or 64).");
  // phm_linear: the entry points check their arguments (csrc/phm_cpu.cpp) without the GIL.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("phm_fwd", &peftcore::phm::cpu_fwd, nogil(), py::arg("dtype"), py::arg("x"), py::arg("ldx"),
        py::arg("rule"), py::arg("w_left"), py::arg("w_right"), py::arg("bias"), py::arg("y"), py::arg("t"),
        py::arg("M"), py::arg("n"), py::arg("P"), py::arg("Q"), py::arg("k"), py::arg("nthreads") = 0,
        "PHM linear forward on the CPU (float32/float64): y[M,n*Q] = x[M,n*P] @ H + bias (bias may be 0) "
        "with H = sum_i kron(rule[i], w_left[i] @ w_right[i]) never formed; t[M,n,n,k] for the backward.");
  m.def("phm_bwd", &peftcore::phm::cpu_bwd, nogil(), py::arg("dtype"), py::arg("dy"), py::arg("lddy"),
        py::arg("x"), py::arg("ldx"), py::arg("t"), py::arg("rule"), py::arg("w_left"), py::arg("w_right"),
        py::arg("dx"), py::arg("drule"), py::arg("dw_left"), py::arg("dw_right"), py::arg("dbias"), py::arg("M"),
        py::arg("n"), py::arg("P"), py::arg("Q"), py::arg("k"), py::arg("nthreads") = 0,
        "PHM linear backward on the CPU; each gradient address may be 0 (not computed). Deterministic.");
  m.def("cuda_phm_fwd", &peftcore::phm::cuda_fwd, nogil(), py::arg("dtype"), py::arg("x"), py::arg("ldx"),
        py::arg("rule"), py::arg("w_left_t"), py::arg("w_right"), py::arg("bias"), py::arg("y"), py::arg("t"),
        py::arg("M"), py::arg("n"), py::arg("P"), py::arg("Q"), py::arg("k"), py::arg("stream"),
        "CUDA phm_fwd (float32/float16/bfloat16, fp32 accumulation); w_left_t is w_left as [n, k, P].");
  m.def("cuda_phm_bwd_workspace", &peftcore::phm::cuda_bwd_workspace, py::arg("M"), py::arg("n"), py::arg("P"),
        py::arg("Q"), py::arg("k"), "Bytes of device scratch cuda_phm_bwd needs for the weight gradients.");
  m.def("cuda_phm_bwd", &peftcore::phm::cuda_bwd, nogil(), py::arg("dtype"), py::arg("dy"), py::arg("lddy"),
        py::arg("x"), py::arg("ldx"), py::arg("t"), py::arg("rule"), py::arg("w_left_t"), py::arg("w_right"),
        py::arg("dx"), py::arg("drule"), py::arg("dw_left"), py::arg("dw_right"), py::arg("dbias"), py::arg("M"),
        py::arg("n"), py::arg("P"), py::arg("Q"), py::arg("k"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"), "CUDA phm_bwd; gradients in the input dtype, summed deterministically.");
  m.def("cuda_device_count", &peftcore::cuda::device_count,
        "Devices visible to the bundled CUDA runtime (negative cudaError_t when it cannot start).");
  m.def("hash32", [](int64_t x) { return peftcore::hash32(uint32_t(x)); }, py::arg("x"),
        "lowbias32 of the low 32 bits of x.");
  m.def("set_num_threads", &peftcore::cpu::set_num_threads, py::arg("n"),
        "Default CPU thread count for calls with nthreads=0 (0: OpenMP's default).");
  m.def("get_num_threads", &peftcore::cpu::get_num_threads);
  m.def("build_config", &build_config, "How this binary was compiled.");
  m.def("missing_isa", &missing_isa,
        "First CPU extension the binary needs that this CPU lacks ('' when none).");
  m.attr("CUDA") = peftcore::cuda::compiled();
}

// peftcore._C: pybind11 bindings of the CPU and CUDA kernels.
//
// Tensors cross as DLPack capsules (torch.utils.dlpack.to_dlpack(t)), so the module links no
// libtorch and still sees every operand's shape, strides, dtype and device.  Each binding derives
// the kernel's sizes from the shapes and checks every operand before a kernel sees a pointer
// (tensor_arg.h): dtype, device, dims, each shape against the others, unit column strides, rows of
// outputs that do not overlap, dense layouts where the kernel indexes densely, alignment, non-null,
// and no output sharing memory with another operand.  A failed check raises TypeError/ValueError
// naming the binding and the argument.  The CUDA bindings check everything before they need the
// CUDA part (a build without it answers only then).  The GIL is released while a kernel runs.
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
#include "rng.h"
#include "tensor_arg.h"

namespace py = pybind11;
using peftcore::arg::Arg;
using peftcore::arg::Call;
using peftcore::arg::str;
using peftcore::cuda::DType;
namespace A = peftcore::arg;

void bind_phm(py::module_& m);  // bindings_phm.cpp
void bind_nf4(py::module_& m);  // bindings_nf4.cpp

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

DType cuda_dtype(unsigned dt) {
  return dt == A::kF32 ? DType::kFloat32 : dt == A::kF16 ? DType::kFloat16 : DType::kBFloat16;
}

void require_cuda(const Call& c) {
  if (!peftcore::cuda::compiled()) c.fail("peftcore._C was built without CUDA");
  c.current_device();
}

void check_rank(const Call& c, int64_t R) {
  if (R < 1 || R > (int64_t(1) << 20)) c.fail("rank R must be in [1, 2**20], got " + str(R));
}

void check_rng(const Call& c, int64_t seed, int64_t threshold, double scale) {
  if (seed < 0 || seed > int64_t(0xFFFFFFFF)) c.fail("seed must be in [0, 2**32), got " + str(seed));
  if (threshold < 0 || threshold > int64_t(peftcore::kThresholdMax))
    c.fail("threshold must be in [0, 2**24] (dropout_threshold(p)), got " + str(threshold));
  if (!std::isfinite(scale)) c.fail("scale must be finite");
}

void check_threads(const Call& c, int nthreads) {
  if (nthreads < 0) c.fail("nthreads must be >= 0 (0: the module default), got " + str(nthreads));
}

void check_finite(const Call& c, const char* name, double v) {
  if (!std::isfinite(v)) c.fail(std::string(name) + " must be finite");
}

// ---- LoRA dropout-masked projection -------------------------------------------------------------

// x [M, K] (rows), a [R, K] (dense), xa [M, R] (dense, written).
struct DownFwd {
  Arg x, a, xa;
  int64_t M, K, R, ldx;
};

DownFwd down_fwd_args(Call& c, py::handle x_, py::handle a_, py::handle xa_, unsigned dts) {
  DownFwd d;
  d.x = c.in("x", x_, 2, dts);
  const unsigned dt = d.x.dt;
  d.M = d.x.size(0);
  d.K = d.x.size(1);
  d.ldx = c.rows(d.x, false);
  d.a = c.in("a", a_, 2, dt);
  d.R = d.a.size(0);
  check_rank(c, d.R);
  c.shape(d.a, {d.R, d.K}, "[R, K]");
  c.contiguous(d.a);
  d.xa = c.out("xa", xa_, 2, dt);
  c.shape(d.xa, {d.M, d.R}, "[M, R]");
  c.contiguous(d.xa);
  c.no_overlap(d.xa, {&d.x, &d.a});
  return d;
}

void down_fwd(py::handle x_, py::handle a_, py::handle xa_, int64_t seed, int64_t threshold, double scale,
              int nthreads, py::handle y_, py::handle b_, double scaling) {
  Call c("down_fwd", false);
  check_rng(c, seed, threshold, scale);
  check_threads(c, nthreads);
  DownFwd d = down_fwd_args(c, x_, a_, xa_, A::kCpuFloat);
  const unsigned dt = d.x.dt;
  Arg y = c.out("y", y_, 2, dt, true);
  Arg b = c.in("b", b_, 2, dt, true);
  if (y.present != b.present) c.fail("y and b go together: pass both or neither");
  int64_t N = 0, ldy = 0;
  if (y.present) {
    N = y.size(1);
    c.shape(y, {d.M, N}, "[M, N]");
    ldy = c.rows(y, true);
    c.shape(b, {N, d.R}, "[N, R]");
    c.contiguous(b);
    check_finite(c, "scaling", scaling);
    c.no_overlap(y, {&d.x, &d.a, &d.xa, &b});
    c.no_overlap(d.xa, {&y, &b});
  }
  py::gil_scoped_release nogil;
  if (dt == A::kF32)
    peftcore::cpu::down_fwd<float>(d.x.ptr<const float>(), d.ldx, d.a.ptr<const float>(), d.xa.ptr<float>(), d.M,
                                   d.K, d.R, uint32_t(seed), uint32_t(threshold), scale, nthreads, y.ptr<float>(),
                                   ldy, b.ptr<const float>(), N, scaling);
  else
    peftcore::cpu::down_fwd<double>(d.x.ptr<const double>(), d.ldx, d.a.ptr<const double>(), d.xa.ptr<double>(),
                                    d.M, d.K, d.R, uint32_t(seed), uint32_t(threshold), scale, nthreads,
                                    y.ptr<double>(), ldy, b.ptr<const double>(), N, scaling);
}

// g [M, R], a [R, K] (dense), x [M, K] (rows); dx [M, K] (rows, added into) and da [R, K] (dense,
// in `da_dts`) optional outputs.
struct DownBwd {
  Arg g, a, x, dx, da;
  int64_t M, K, R, ldx, lddx;
};

DownBwd down_bwd_args(Call& c, py::handle g_, py::handle a_, py::handle x_, py::handle dx_, py::handle da_,
                      unsigned dts, bool da_fp32) {
  DownBwd d;
  d.x = c.in("x", x_, 2, dts);
  const unsigned dt = d.x.dt;
  d.M = d.x.size(0);
  d.K = d.x.size(1);
  d.ldx = c.rows(d.x, false);
  d.a = c.in("a", a_, 2, dt);
  d.R = d.a.size(0);
  check_rank(c, d.R);
  c.shape(d.a, {d.R, d.K}, "[R, K]");
  c.contiguous(d.a);
  d.g = c.in("g", g_, 2, dt);
  c.shape(d.g, {d.M, d.R}, "[M, R]");
  c.contiguous(d.g);
  d.dx = c.out("dx", dx_, 2, dt, true);
  c.shape(d.dx, {d.M, d.K}, "[M, K]");
  d.lddx = d.dx.present ? c.rows(d.dx, true) : d.K;
  d.da = c.out("da", da_, 2, da_fp32 ? unsigned(A::kF32) : dt, true);
  c.shape(d.da, {d.R, d.K}, "[R, K]");
  c.contiguous(d.da);
  c.no_overlap(d.dx, {&d.g, &d.a, &d.x, &d.da});
  c.no_overlap(d.da, {&d.g, &d.a, &d.x});
  return d;
}

void down_bwd(py::handle g_, py::handle a_, py::handle x_, py::handle dx_, py::handle da_, int64_t seed,
              int64_t threshold, double scale, int nthreads) {
  Call c("down_bwd", false);
  check_rng(c, seed, threshold, scale);
  check_threads(c, nthreads);
  DownBwd d = down_bwd_args(c, g_, a_, x_, dx_, da_, A::kCpuFloat, false);
  py::gil_scoped_release nogil;
  if (d.x.dt == A::kF32)
    peftcore::cpu::down_bwd<float>(d.g.ptr<const float>(), d.a.ptr<const float>(), d.x.ptr<const float>(), d.ldx,
                                   d.dx.ptr<float>(), d.lddx, d.da.ptr<float>(), d.M, d.K, d.R, uint32_t(seed),
                                   uint32_t(threshold), scale, nthreads);
  else
    peftcore::cpu::down_bwd<double>(d.g.ptr<const double>(), d.a.ptr<const double>(), d.x.ptr<const double>(),
                                    d.ldx, d.dx.ptr<double>(), d.lddx, d.da.ptr<double>(), d.M, d.K, d.R,
                                    uint32_t(seed), uint32_t(threshold), scale, nthreads);
}

void lora_bwd(py::handle dy_, py::handle b_, py::handle xa_, py::handle a_, py::handle x_, py::handle dx_,
              py::handle da_, py::handle db_, int64_t seed, int64_t threshold, double scale, double scaling,
              int nthreads) {
  Call c("lora_bwd", false);
  check_rng(c, seed, threshold, scale);
  check_finite(c, "scaling", scaling);
  check_threads(c, nthreads);
  Arg x = c.in("x", x_, 2, A::kCpuFloat);
  const unsigned dt = x.dt;
  const int64_t M = x.size(0), K = x.size(1), ldx = c.rows(x, false);
  Arg a = c.in("a", a_, 2, dt);
  const int64_t R = a.size(0);
  check_rank(c, R);
  c.shape(a, {R, K}, "[R, K]");
  c.contiguous(a);
  Arg dy = c.in("dy", dy_, 2, dt);
  const int64_t N = dy.size(1);
  c.shape(dy, {M, N}, "[M, N]");
  const int64_t lddy = c.rows(dy, false);
  Arg b = c.in("b", b_, 2, dt);
  c.shape(b, {N, R}, "[N, R]");
  c.contiguous(b);
  Arg xa = c.in("xa", xa_, 2, dt);
  c.shape(xa, {M, R}, "[M, R]");
  c.contiguous(xa);
  Arg dx = c.out("dx", dx_, 2, dt, true);
  c.shape(dx, {M, K}, "[M, K]");
  const int64_t lddx = dx.present ? c.rows(dx, true) : K;
  Arg da = c.out("da", da_, 2, dt, true);
  c.shape(da, {R, K}, "[R, K]");
  c.contiguous(da);
  Arg db = c.out("db", db_, 2, dt, true);
  c.shape(db, {N, R}, "[N, R]");
  c.contiguous(db);
  for (const Arg* o : {&dx, &da, &db}) c.no_overlap(*o, {&dy, &b, &xa, &a, &x, &dx, &da, &db});
  py::gil_scoped_release nogil;
  if (dt == A::kF32)
    peftcore::cpu::lora_bwd<float>(dy.ptr<const float>(), lddy, b.ptr<const float>(), xa.ptr<const float>(),
                                   a.ptr<const float>(), x.ptr<const float>(), ldx, dx.ptr<float>(), lddx,
                                   da.ptr<float>(), db.ptr<float>(), M, N, K, R, uint32_t(seed), uint32_t(threshold),
                                   scale, scaling, nthreads);
  else
    peftcore::cpu::lora_bwd<double>(dy.ptr<const double>(), lddy, b.ptr<const double>(), xa.ptr<const double>(),
                                    a.ptr<const double>(), x.ptr<const double>(), ldx, dx.ptr<double>(), lddx,
                                    da.ptr<double>(), db.ptr<double>(), M, N, K, R, uint32_t(seed),
                                    uint32_t(threshold), scale, scaling, nthreads);
}

Arg mask_arg(Call& c, py::handle out_, int64_t seed, int64_t threshold) {
  check_rng(c, seed, threshold, 1.0);
  Arg out = c.out("out", out_, 2, A::kU8);
  c.contiguous(out);
  return out;
}

void keep_mask(py::handle out_, int64_t seed, int64_t threshold, int nthreads) {
  Call c("keep_mask", false);
  check_threads(c, nthreads);
  Arg out = mask_arg(c, out_, seed, threshold);
  py::gil_scoped_release nogil;
  peftcore::cpu::keep_mask(out.ptr<uint8_t>(), out.size(0), out.size(1), uint32_t(seed), uint32_t(threshold),
                           nthreads);
}

void cuda_down_fwd(py::handle x_, py::handle a_, py::handle xa_, int64_t seed, int64_t threshold, double scale,
                   uintptr_t stream) {
  Call c("cuda_down_fwd", true);
  check_rng(c, seed, threshold, scale);
  DownFwd d = down_fwd_args(c, x_, a_, xa_, A::kCudaFloat);
  require_cuda(c);
  py::gil_scoped_release nogil;
  peftcore::cuda::down_fwd(cuda_dtype(d.x.dt), d.x.ptr<const void>(), d.ldx, d.a.ptr<const void>(),
                           d.xa.ptr<void>(), d.M, d.K, d.R, uint32_t(seed), uint32_t(threshold), float(scale),
                           stream);
}

void cuda_down_bwd(py::handle g_, py::handle a_, py::handle x_, py::handle dx_, py::handle da_, int64_t seed,
                   int64_t threshold, double scale, py::handle workspace_, uintptr_t stream) {
  Call c("cuda_down_bwd", true);
  check_rng(c, seed, threshold, scale);
  DownBwd d = down_bwd_args(c, g_, a_, x_, dx_, da_, A::kCudaFloat, true);
  Arg ws = c.out("workspace", workspace_, 1, A::kU8, true);
  int64_t need = 0;
  if (d.da.present) {
    need = peftcore::cuda::down_bwd_workspace(d.M, d.K, d.R);
    if (c.bytes(ws) < need)
      c.fail("workspace holds " + str(c.bytes(ws)) + " bytes, cuda_down_bwd_workspace(M, K, R) = " + str(need));
    if (ws.present && reinterpret_cast<uintptr_t>(ws.data) % 4 != 0) c.fail("workspace must be 4-byte aligned");
  }
  c.contiguous(ws);
  c.no_overlap(ws, {&d.g, &d.a, &d.x, &d.dx, &d.da});
  require_cuda(c);
  py::gil_scoped_release nogil;
  peftcore::cuda::down_bwd(cuda_dtype(d.x.dt), d.g.ptr<const void>(), d.a.ptr<const void>(), d.x.ptr<const void>(),
                           d.ldx, d.dx.ptr<void>(), d.lddx, d.da.ptr<float>(), d.M, d.K, d.R, uint32_t(seed),
                           uint32_t(threshold), float(scale), ws.ptr<void>(), c.bytes(ws), stream);
}

int64_t cuda_down_bwd_workspace(int64_t M, int64_t K, int64_t R) {
  Call c("cuda_down_bwd_workspace", true);
  if (M < 0 || K < 0) c.fail("sizes must be >= 0, got M=" + str(M) + " K=" + str(K));
  check_rank(c, R);
  return peftcore::cuda::down_bwd_workspace(M, K, R);
}

void cuda_keep_mask(py::handle out_, int64_t seed, int64_t threshold, uintptr_t stream) {
  Call c("cuda_keep_mask", true);
  Arg out = mask_arg(c, out_, seed, threshold);
  require_cuda(c);
  py::gil_scoped_release nogil;
  peftcore::cuda::keep_mask(out.ptr<uint8_t>(), out.size(0), out.size(1), uint32_t(seed), uint32_t(threshold),
                            stream);
}

// ---- distill_kl ---------------------------------------------------------------------------------

peftcore::cpu::DistillKind distill_kind(const Call& c, const std::string& kind) {
  if (kind == "forward") return peftcore::cpu::DistillKind::kForward;
  if (kind == "reverse") return peftcore::cpu::DistillKind::kReverse;
  if (kind == "jsd") return peftcore::cpu::DistillKind::kJsd;
  c.fail("kind must be 'forward', 'reverse' or 'jsd', got '" + kind + "'");
}

// s, t [N, V] (rows, read only), row_weight and loss fp32 [N] (dense), grad [N, V] dense in s's
// dtype (optional).
struct Distill {
  Arg s, t, w, loss, grad;
  int64_t N, V, lds, ldt;
  peftcore::cpu::DistillKind kind;
};

Distill distill_args(Call& c, py::handle s_, py::handle t_, py::handle w_, py::handle loss_, py::handle grad_,
                     double temperature, const std::string& kind, double beta, unsigned dts) {
  Distill d;
  d.kind = distill_kind(c, kind);
  if (!std::isfinite(temperature) || !(temperature > 0))
    c.fail("temperature must be finite and > 0, got " + std::to_string(temperature));
  if (kind == "jsd" && !(beta > 0.0 && beta < 1.0))
    c.fail("beta must be in (0, 1) for kind='jsd', got " + std::to_string(beta));
  d.s = c.in("s", s_, 2, dts);
  d.N = d.s.size(0);
  d.V = d.s.size(1);
  if (d.V < 1) c.fail("V (s's last dim) must be >= 1, got shape " + d.s.shape_str());
  d.lds = c.rows(d.s, false);
  d.t = c.in("t", t_, 2, d.s.dt);
  c.shape(d.t, {d.N, d.V}, "[N, V]");
  d.ldt = c.rows(d.t, false);
  d.w = c.in("row_weight", w_, 1, A::kF32);
  c.shape(d.w, {d.N}, "[N]");
  c.contiguous(d.w);
  d.loss = c.out("loss", loss_, 1, A::kF32);
  c.shape(d.loss, {d.N}, "[N]");
  c.contiguous(d.loss);
  d.grad = c.out("grad", grad_, 2, d.s.dt, true);
  c.shape(d.grad, {d.N, d.V}, "[N, V]");
  c.contiguous(d.grad);
  c.no_overlap(d.loss, {&d.s, &d.t, &d.w, &d.grad});
  c.no_overlap(d.grad, {&d.s, &d.t, &d.w});
  return d;
}

void distill_fwd(py::handle s_, py::handle t_, py::handle w_, py::handle loss_, py::handle grad_,
                 double temperature, const std::string& kind, double beta, int nthreads) {
  Call c("distill_fwd", false);
  check_threads(c, nthreads);
  Distill d = distill_args(c, s_, t_, w_, loss_, grad_, temperature, kind, beta, A::kF32);
  py::gil_scoped_release nogil;
  peftcore::cpu::distill_fwd(d.s.ptr<const float>(), d.lds, d.t.ptr<const float>(), d.ldt, d.w.ptr<const float>(),
                             d.loss.ptr<float>(), d.grad.ptr<float>(), d.N, d.V, temperature, d.kind, beta,
                             nthreads);
}

void cuda_distill_fwd(py::handle s_, py::handle t_, py::handle w_, py::handle loss_, py::handle grad_,
                      double temperature, const std::string& kind, double beta, uintptr_t stream) {
  Call c("cuda_distill_fwd", true);
  Distill d = distill_args(c, s_, t_, w_, loss_, grad_, temperature, kind, beta, A::kCudaFloat);
  require_cuda(c);
  py::gil_scoped_release nogil;
  peftcore::cuda::distill_fwd(cuda_dtype(d.s.dt), d.s.ptr<const void>(), d.lds, d.t.ptr<const void>(), d.ldt,
                              d.w.ptr<const float>(), d.loss.ptr<float>(), d.grad.ptr<void>(), d.N, d.V,
                              temperature, static_cast<int>(d.kind), beta, stream);
}

// ---- lora_mixed ---------------------------------------------------------------------------------

// x [M, K] (rows), a [J, R, K] and b [J, N, R] (dense), scaling fp32 [J], y [M, N] (rows, added
// into).  Each entry point checks its own description of the batch (segments or tiles).
struct Mixed {
  Arg x, a, b, sc, y;
  int64_t M, K, N, R, J, ldx, ldy;
};

Mixed mixed_args(Call& c, py::handle x_, py::handle a_, py::handle b_, py::handle sc_, py::handle y_,
                 unsigned dts) {
  Mixed d;
  d.x = c.in("x", x_, 2, dts);
  const unsigned dt = d.x.dt;
  d.M = d.x.size(0);
  d.K = d.x.size(1);
  d.ldx = c.rows(d.x, false);
  d.a = c.in("a", a_, 3, dt);
  d.J = d.a.size(0);
  d.R = d.a.size(1);
  if (d.J < 1) c.fail("a must hold J >= 1 adapters, got shape " + d.a.shape_str());
  check_rank(c, d.R);
  c.shape(d.a, {d.J, d.R, d.K}, "[J, R, K]");
  c.contiguous(d.a);
  d.y = c.out("y", y_, 2, dt);
  d.N = d.y.size(1);
  c.shape(d.y, {d.M, d.N}, "[M, N]");
  d.ldy = c.rows(d.y, true);
  d.b = c.in("b", b_, 3, dt);
  c.shape(d.b, {d.J, d.N, d.R}, "[J, N, R]");
  c.contiguous(d.b);
  d.sc = c.in("scaling", sc_, 1, A::kF32);
  c.shape(d.sc, {d.J}, "[J]");
  c.contiguous(d.sc);
  c.no_overlap(d.y, {&d.x, &d.a, &d.b, &d.sc});
  return d;
}

void lora_mixed_fwd(py::handle x_, py::handle a_, py::handle b_, py::handle sc_, py::handle sa_, py::handle sl_,
                    py::handle y_, int nthreads) {
  Call c("lora_mixed_fwd", false);
  check_threads(c, nthreads);
  Mixed d = mixed_args(c, x_, a_, b_, sc_, y_, A::kCpuFloat);
  Arg sa = c.in("seg_adapter", sa_, 1, A::kI32);
  const int64_t S = sa.size(0);
  if (S > d.M) c.fail("seg_adapter has " + str(S) + " segments, more than M=" + str(d.M) + " rows");
  c.contiguous(sa);
  Arg sl = c.in("seg_len", sl_, 1, A::kI64);
  c.shape(sl, {S}, "[num_segs]");
  c.contiguous(sl);
  c.no_overlap(d.y, {&sa, &sl});
  // The segments are host memory: check them before the kernel indexes x, y and the stacks with them.
  const int32_t* adapter = sa.ptr<const int32_t>();
  const int64_t* len = sl.ptr<const int64_t>();
  int64_t rows = 0;
  for (int64_t g = 0; g < S; ++g) {
    if (len[g] < 1 || len[g] > d.M - rows)
      c.fail("segment " + str(g) + " has length " + str(len[g]) +
             ": lengths must be >= 1 and add up to M=" + str(d.M));
    if (adapter[g] < -1 || adapter[g] >= d.J)
      c.fail("segment " + str(g) + " has adapter " + str(adapter[g]) + ", expected [-1, J=" + str(d.J) + ")");
    rows += len[g];
  }
  if (rows != d.M) c.fail("segment lengths add up to " + str(rows) + ", expected M=" + str(d.M));
  py::gil_scoped_release nogil;
  if (d.x.dt == A::kF32)
    peftcore::cpu::lora_mixed_fwd<float>(d.x.ptr<const float>(), d.ldx, d.a.ptr<const float>(),
                                         d.b.ptr<const float>(), d.sc.ptr<const float>(), adapter, len, S,
                                         d.y.ptr<float>(), d.ldy, d.M, d.K, d.N, d.R, d.J, nthreads);
  else
    peftcore::cpu::lora_mixed_fwd<double>(d.x.ptr<const double>(), d.ldx, d.a.ptr<const double>(),
                                          d.b.ptr<const double>(), d.sc.ptr<const float>(), adapter, len, S,
                                          d.y.ptr<double>(), d.ldy, d.M, d.K, d.N, d.R, d.J, nthreads);
}

int64_t mixed_workspace(const Call& c, int64_t num_tiles, int64_t block_m, int64_t K, int64_t R) {
  if (!peftcore::cuda::lora_mixed_block_m_ok(block_m)) c.fail("block_m must be 16 or 64, got " + str(block_m));
  if (num_tiles < 0 || K < 0 || R < 1)
    c.fail("need num_tiles >= 0, K >= 0, R >= 1, got " + str(num_tiles) + ", " + str(K) + ", " + str(R));
  return peftcore::cuda::lora_mixed_workspace(num_tiles, block_m, K, R);
}

int64_t cuda_lora_mixed_workspace(int64_t num_tiles, int64_t block_m, int64_t K, int64_t R) {
  return mixed_workspace(Call("cuda_lora_mixed_workspace", true), num_tiles, block_m, K, R);
}

void cuda_lora_mixed_fwd(py::handle x_, py::handle a_, py::handle b_, py::handle sc_, py::handle tiles_,
                         int64_t block_m, py::handle y_, py::handle workspace_, uintptr_t stream) {
  Call c("cuda_lora_mixed_fwd", true);
  Mixed d = mixed_args(c, x_, a_, b_, sc_, y_, A::kCudaFloat);
  Arg tiles = c.in("tiles", tiles_, 2, A::kI32);
  const int64_t T = tiles.size(0);
  c.shape(tiles, {T, 3}, "[num_tiles, 3]");
  c.contiguous(tiles);
  if (T > d.M) c.fail("tiles has " + str(T) + " tiles, more than M=" + str(d.M) + " rows");
  const int64_t need = mixed_workspace(c, T, block_m, d.K, d.R);
  Arg ws = c.out("workspace", workspace_, 1, A::kU8, need == 0);
  if (c.bytes(ws) < need)
    c.fail("workspace holds " + str(c.bytes(ws)) + " bytes, cuda_lora_mixed_workspace(num_tiles, block_m, K, R) = " +
           str(need));
  if (ws.present && reinterpret_cast<uintptr_t>(ws.data) % 4 != 0) c.fail("workspace must be 4-byte aligned");
  c.no_overlap(d.y, {&tiles, &ws});
  c.no_overlap(ws, {&d.x, &d.a, &d.b, &d.sc, &tiles, &d.y});
  require_cuda(c);
  // The tile values (first, end, adapter) live in device memory and are not read here; the kernels
  // skip a tile outside [0, M) x [0, J) (lora_mixed_cuda.cu, tile_at), so a bad table cannot
  // reach outside x, a, b, scaling or y.
  py::gil_scoped_release nogil;
  peftcore::cuda::lora_mixed_fwd(cuda_dtype(d.x.dt), d.x.ptr<const void>(), d.ldx, d.a.ptr<const void>(),
                                 d.b.ptr<const void>(), d.sc.ptr<const float>(), tiles.ptr<const int32_t>(), T,
                                 block_m, d.y.ptr<void>(), d.ldy, d.M, d.K, d.N, d.R, d.J, ws.ptr<void>(), c.bytes(ws),
                                 stream);
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
  m.doc() = "peftcore native kernels (CPU: OpenMP + SIMD; CUDA when built with nvcc). Tensors are passed as "
            "DLPack capsules (torch.utils.dlpack.to_dlpack(t)); outputs are written in place. See "
            "peftcore/native/*.py.";
  const py::none none;
  m.def("down_fwd", &down_fwd, py::arg("x"), py::arg("a"), py::arg("xa"), py::arg("seed"), py::arg("threshold"),
        py::arg("scale"), py::arg("nthreads") = 0, py::arg("y") = none, py::arg("b") = none,
        py::arg("scaling") = 1.0,
        "xa[M,R] = scale * (keep ⊙ x[M,K]) @ a[R,K]^T on the CPU (float32/float64); with y and b also "
        "y[M,N] += scaling * xa @ b[N,R]^T in the same pass.");
  m.def("lora_bwd", &lora_bwd, py::arg("dy"), py::arg("b"), py::arg("xa"), py::arg("a"), py::arg("x"),
        py::arg("dx"), py::arg("da"), py::arg("db"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
        py::arg("scaling"), py::arg("nthreads") = 0,
        "The LoRA side of the backward in one pass, g = scaling * dy[M,N] @ b[N,R] kept per row chunk: "
        "dx[M,K] += scale * keep ⊙ (g @ a) (dx given), da[R,K] = scale * g^T @ (keep ⊙ x) (da given), "
        "db[N,R] = scaling * dy^T @ xa[M,R] (db given). CPU, float32/float64.");
  m.def("down_bwd", &down_bwd, py::arg("g"), py::arg("a"), py::arg("x"), py::arg("dx"), py::arg("da"),
        py::arg("seed"), py::arg("threshold"), py::arg("scale"), py::arg("nthreads") = 0,
        "dx[M,K] += scale * keep ⊙ (g[M,R] @ a[R,K]) (in place, skipped if dx is None); "
        "da[R,K] = scale * g^T @ (keep ⊙ x) (overwritten, skipped if da is None). CPU, float32/float64.");
  m.def("keep_mask", &keep_mask, py::arg("out"), py::arg("seed"), py::arg("threshold"), py::arg("nthreads") = 0,
        "out[M,K] (uint8, contiguous) = keep mask, for tests.");
  m.def("cuda_down_fwd", &cuda_down_fwd, py::arg("x"), py::arg("a"), py::arg("xa"), py::arg("seed"),
        py::arg("threshold"), py::arg("scale"), py::arg("stream"),
        "CUDA down_fwd (float32/float16/bfloat16, fp32 accumulation).");
  m.def("cuda_down_bwd", &cuda_down_bwd, py::arg("g"), py::arg("a"), py::arg("x"), py::arg("dx"), py::arg("da"),
        py::arg("seed"), py::arg("threshold"), py::arg("scale"), py::arg("workspace"), py::arg("stream"),
        "CUDA down_bwd; da is float32 [R,K]; workspace uint8 of cuda_down_bwd_workspace(M, K, R) bytes "
        "(None when that is 0 or da is None).");
  m.def("cuda_down_bwd_workspace", &cuda_down_bwd_workspace, py::arg("M"), py::arg("K"), py::arg("R"),
        "Bytes of device scratch cuda_down_bwd needs for dA.");
  m.def("cuda_keep_mask", &cuda_keep_mask, py::arg("out"), py::arg("seed"), py::arg("threshold"), py::arg("stream"),
        "Device keep mask, for tests.");
  m.def("distill_fwd", &distill_fwd, py::arg("s"), py::arg("t"), py::arg("row_weight"), py::arg("loss"),
        py::arg("grad"), py::arg("temperature"), py::arg("kind"), py::arg("beta") = 0.5, py::arg("nthreads") = 0,
        "Distillation loss on the CPU (float32): loss[N] = T^2 * divergence(softmax(t/T), softmax(s/T)) "
        "per row (kind 'forward' KL(p||q), 'reverse' KL(q||p), 'jsd' with weight beta on p), 0 where "
        "row_weight is 0; with grad (contiguous [N,V]) also grad = row_weight * dloss/ds.");
  m.def("cuda_distill_fwd", &cuda_distill_fwd, py::arg("s"), py::arg("t"), py::arg("row_weight"), py::arg("loss"),
        py::arg("grad"), py::arg("temperature"), py::arg("kind"), py::arg("beta"), py::arg("stream"),
        "CUDA distill_fwd (float32/float16/bfloat16 inputs, fp32 math, fp32 loss, grad in the input dtype).");
  m.def("lora_mixed_fwd", &lora_mixed_fwd, py::arg("x"), py::arg("a"), py::arg("b"), py::arg("scaling"),
        py::arg("seg_adapter"), py::arg("seg_len"), py::arg("y"), py::arg("nthreads") = 0,
        "Mixed-adapter LoRA delta on the CPU (float32/float64), in place: rows come in segments "
        "(seg_adapter int32 [S] in [-1, J), seg_len int64 [S], in order, adding up to M); "
        "for every row m of a segment with adapter j >= 0, y[m] += scaling[j] * (x[m] @ a[j]^T) @ b[j]^T "
        "with a [J,R,K], b [J,N,R] contiguous and scaling float32 [J]. The segments are validated first.");
  m.def("cuda_lora_mixed_workspace", &cuda_lora_mixed_workspace, py::arg("num_tiles"), py::arg("block_m"),
        py::arg("K"), py::arg("R"), "Bytes of device scratch cuda_lora_mixed_fwd needs.");
  m.def("cuda_lora_mixed_fwd", &cuda_lora_mixed_fwd, py::arg("x"), py::arg("a"), py::arg("b"), py::arg("scaling"),
        py::arg("tiles"), py::arg("block_m"), py::arg("y"), py::arg("workspace"), py::arg("stream"),
        "CUDA lora_mixed_fwd (float32/float16/bfloat16, fp32 accumulation). tiles int32 [T,3] lives in device "
        "memory and must come from peftcore.native.lora_mixed.plan (rows per tile <= block_m, 16 or 64).");
  bind_phm(m);
  bind_nf4(m);
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

// peftcore._C bindings of the PHM linear (phm_cpu.h, phm_cuda.h): DLPack operands checked as in
// bindings.cpp (tensor_arg.h), sizes derived from the shapes.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "phm_cpu.h"
#include "phm_cuda.h"
#include "tensor_arg.h"

namespace py = pybind11;
using peftcore::arg::Arg;
using peftcore::arg::Call;
using peftcore::arg::str;
namespace A = peftcore::arg;

namespace {

peftcore::cuda::DType cuda_dtype(unsigned dt) {
  using peftcore::cuda::DType;
  return dt == A::kF32 ? DType::kFloat32 : dt == A::kF16 ? DType::kFloat16 : DType::kBFloat16;
}

// Sizes every kernel can index with int64 offsets (and the CUDA kernels with int32 per-row ones).
void check_dims(const Call& c, int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k) {
  if (M < 0 || P < 0 || Q < 0) c.fail("sizes must be >= 0, got M=" + str(M) + " P=" + str(P) + " Q=" + str(Q));
  if (n < 1 || n > 1024) c.fail("phm_dim n must be in [1, 1024], got " + str(n));
  if (k < 1) c.fail("rank k must be >= 1, got " + str(k));
  const int64_t lim = int64_t(1) << 30, wide = std::max<int64_t>({P, Q, 1});
  if (k > lim / n || n * k > lim / wide || n * k > lim / n)
    c.fail("sizes out of range: n=" + str(n) + " k=" + str(k) + " P=" + str(P) + " Q=" + str(Q));
  if (M > (int64_t(1) << 62) / (n * std::max(wide, n * k)))
    c.fail("M=" + str(M) + " is out of range for rows of " + str(n * wide) + " elements");
}

void check_cuda(const Call& c, int64_t n, int64_t k) {
  if (peftcore::cuda::phm_tile_rows(n, k) == 0)
    c.fail("phm_dim n=" + str(n) + " with rank k=" + str(k) + " needs " +
           str(4 * peftcore::cuda::phm_base_floats(n, k, 1)) + " bytes of shared memory per row, over the " +
           str(4 * peftcore::cuda::kPhmSmemFloats) + " the CUDA kernels use: use the triton or reference backend");
}

void check_threads(const Call& c, int nthreads) {
  if (nthreads < 0) c.fail("nthreads must be >= 0 (0: the module default), got " + str(nthreads));
}

// rule [n, n, n] (dense); returns n.
int64_t rule_arg(Call& c, Arg& rule, py::handle h, unsigned dt) {
  rule = c.in("rule", h, 3, dt);
  const int64_t n = rule.size(0);
  c.shape(rule, {n, n, n}, "[n, n, n]");
  c.contiguous(rule);
  return n;
}

// Forward: x [M, n*P] (rows), rule, w_left [n, P, k] (CPU) or w_left_t [n, k, P] (CUDA), w_right
// [n, k, Q], bias [n*Q] (optional), y [M, n*Q] (rows on the CPU, dense on CUDA), t [M, n, n, k].
struct Fwd {
  Arg x, rule, wl, wr, bias, y, t;
  int64_t M, n, P, Q, k, ldx, ldy;
};

Fwd fwd_args(Call& c, py::handle x_, py::handle rule_, py::handle wl_, py::handle wr_, py::handle bias_,
             py::handle y_, py::handle t_, bool cuda) {
  Fwd d;
  d.x = c.in("x", x_, 2, cuda ? A::kCudaFloat : A::kCpuFloat);
  const unsigned dt = d.x.dt;
  d.M = d.x.size(0);
  d.ldx = c.rows(d.x, false);
  d.n = rule_arg(c, d.rule, rule_, dt);
  const char* wl_name = cuda ? "w_left_t" : "w_left";
  d.wl = c.in(wl_name, wl_, 3, dt);
  d.P = d.wl.size(cuda ? 2 : 1);
  d.k = d.wl.size(cuda ? 1 : 2);
  d.wr = c.in("w_right", wr_, 3, dt);
  d.Q = d.wr.size(2);
  check_dims(c, d.M, d.n, d.P, d.Q, d.k);
  if (cuda) check_cuda(c, d.n, d.k);
  if (cuda)
    c.shape(d.wl, {d.n, d.k, d.P}, "[n, k, P]");
  else
    c.shape(d.wl, {d.n, d.P, d.k}, "[n, P, k]");
  c.contiguous(d.wl);
  c.shape(d.wr, {d.n, d.k, d.Q}, "[n, k, Q]");
  c.contiguous(d.wr);
  c.shape(d.x, {d.M, d.n * d.P}, "[M, n*P]");
  d.bias = c.in("bias", bias_, 1, dt, true);
  c.shape(d.bias, {d.n * d.Q}, "[n*Q]");
  c.contiguous(d.bias);
  d.y = c.out("y", y_, 2, dt);
  c.shape(d.y, {d.M, d.n * d.Q}, "[M, n*Q]");
  if (cuda) c.contiguous(d.y);
  d.ldy = c.rows(d.y, true);
  d.t = c.out("t", t_, 4, dt);
  c.shape(d.t, {d.M, d.n, d.n, d.k}, "[M, n, n, k]");
  c.contiguous(d.t);
  c.no_overlap(d.y, {&d.x, &d.rule, &d.wl, &d.wr, &d.bias, &d.t});
  c.no_overlap(d.t, {&d.x, &d.rule, &d.wl, &d.wr, &d.bias});
  return d;
}

void phm_fwd(py::handle x_, py::handle rule_, py::handle wl_, py::handle wr_, py::handle bias_, py::handle y_,
             py::handle t_, int nthreads) {
  Call c("phm_fwd", false);
  check_threads(c, nthreads);
  Fwd d = fwd_args(c, x_, rule_, wl_, wr_, bias_, y_, t_, false);
  py::gil_scoped_release nogil;
  if (d.x.dt == A::kF32)
    peftcore::cpu::phm_fwd<float>(d.x.ptr<const float>(), d.ldx, d.rule.ptr<const float>(), d.wl.ptr<const float>(),
                                  d.wr.ptr<const float>(), d.bias.ptr<const float>(), d.y.ptr<float>(), d.ldy,
                                  d.t.ptr<float>(), d.M, d.n, d.P, d.Q, d.k, nthreads);
  else
    peftcore::cpu::phm_fwd<double>(d.x.ptr<const double>(), d.ldx, d.rule.ptr<const double>(),
                                   d.wl.ptr<const double>(), d.wr.ptr<const double>(), d.bias.ptr<const double>(),
                                   d.y.ptr<double>(), d.ldy, d.t.ptr<double>(), d.M, d.n, d.P, d.Q, d.k, nthreads);
}

void cuda_phm_fwd(py::handle x_, py::handle rule_, py::handle wl_, py::handle wr_, py::handle bias_, py::handle y_,
                  py::handle t_, uintptr_t stream) {
  Call c("cuda_phm_fwd", true);
  Fwd d = fwd_args(c, x_, rule_, wl_, wr_, bias_, y_, t_, true);
  if (!peftcore::cuda::compiled()) c.fail("peftcore._C was built without CUDA");
  c.current_device();
  py::gil_scoped_release nogil;
  peftcore::cuda::phm_fwd(cuda_dtype(d.x.dt), d.x.ptr<const void>(), d.ldx, d.rule.ptr<const void>(),
                          d.wl.ptr<const void>(), d.wr.ptr<const void>(), d.bias.ptr<const void>(), d.y.ptr<void>(),
                          d.t.ptr<void>(), d.M, d.n, d.P, d.Q, d.k, stream);
}

// Backward: dy [M, n*Q] (rows), x [M, n*P] (rows), t [M, n, n, k], rule, w_left (needed for dx;
// [n, P, k] on the CPU, w_left_t [n, k, P] on CUDA), w_right [n, k, Q]; optional outputs dx
// [M, n*P] (rows on the CPU, dense on CUDA), drule, dw_left [n, P, k], dw_right, dbias [n*Q].
struct Bwd {
  Arg dy, x, t, rule, wl, wr, dx, drule, dwl, dwr, dbias;
  int64_t M, n, P, Q, k, lddy, ldx, lddx;
};

Bwd bwd_args(Call& c, py::handle dy_, py::handle x_, py::handle t_, py::handle rule_, py::handle wl_,
             py::handle wr_, py::handle dx_, py::handle drule_, py::handle dwl_, py::handle dwr_, py::handle dbias_,
             bool cuda) {
  Bwd d;
  d.x = c.in("x", x_, 2, cuda ? A::kCudaFloat : A::kCpuFloat);
  const unsigned dt = d.x.dt;
  d.M = d.x.size(0);
  d.ldx = c.rows(d.x, false);
  d.n = rule_arg(c, d.rule, rule_, dt);
  if (d.n < 1 || d.x.size(1) % d.n != 0)
    c.fail("x has " + str(d.x.size(1)) + " columns, not a multiple of phm_dim n=" + str(d.n));
  d.P = d.x.size(1) / d.n;
  d.t = c.in("t", t_, 4, dt);
  d.k = d.t.size(3);
  d.wr = c.in("w_right", wr_, 3, dt);
  d.Q = d.wr.size(2);
  check_dims(c, d.M, d.n, d.P, d.Q, d.k);
  if (cuda) check_cuda(c, d.n, d.k);
  c.shape(d.t, {d.M, d.n, d.n, d.k}, "[M, n, n, k]");
  c.contiguous(d.t);
  c.shape(d.wr, {d.n, d.k, d.Q}, "[n, k, Q]");
  c.contiguous(d.wr);
  d.dy = c.in("dy", dy_, 2, dt);
  c.shape(d.dy, {d.M, d.n * d.Q}, "[M, n*Q]");
  d.lddy = c.rows(d.dy, false);
  d.dx = c.out("dx", dx_, 2, dt, true);
  d.wl = c.in(cuda ? "w_left_t" : "w_left", wl_, 3, dt, !d.dx.present);
  if (cuda)
    c.shape(d.wl, {d.n, d.k, d.P}, "[n, k, P]");
  else
    c.shape(d.wl, {d.n, d.P, d.k}, "[n, P, k]");
  c.contiguous(d.wl);
  c.shape(d.dx, {d.M, d.n * d.P}, "[M, n*P]");
  if (cuda) c.contiguous(d.dx);
  d.lddx = d.dx.present ? c.rows(d.dx, true) : d.n * d.P;
  d.drule = c.out("drule", drule_, 3, dt, true);
  c.shape(d.drule, {d.n, d.n, d.n}, "[n, n, n]");
  d.dwl = c.out("dw_left", dwl_, 3, dt, true);
  c.shape(d.dwl, {d.n, d.P, d.k}, "[n, P, k]");
  d.dwr = c.out("dw_right", dwr_, 3, dt, true);
  c.shape(d.dwr, {d.n, d.k, d.Q}, "[n, k, Q]");
  d.dbias = c.out("dbias", dbias_, 1, dt, true);
  c.shape(d.dbias, {d.n * d.Q}, "[n*Q]");
  for (const Arg* o : {&d.drule, &d.dwl, &d.dwr, &d.dbias}) c.contiguous(*o);
  for (const Arg* o : {&d.dx, &d.drule, &d.dwl, &d.dwr, &d.dbias})
    c.no_overlap(*o, {&d.dy, &d.x, &d.t, &d.rule, &d.wl, &d.wr, &d.dx, &d.drule, &d.dwl, &d.dwr, &d.dbias});
  return d;
}

void phm_bwd(py::handle dy_, py::handle x_, py::handle t_, py::handle rule_, py::handle wl_, py::handle wr_,
             py::handle dx_, py::handle drule_, py::handle dwl_, py::handle dwr_, py::handle dbias_, int nthreads) {
  Call c("phm_bwd", false);
  check_threads(c, nthreads);
  Bwd d = bwd_args(c, dy_, x_, t_, rule_, wl_, wr_, dx_, drule_, dwl_, dwr_, dbias_, false);
  py::gil_scoped_release nogil;
  if (d.x.dt == A::kF32)
    peftcore::cpu::phm_bwd<float>(d.dy.ptr<const float>(), d.lddy, d.x.ptr<const float>(), d.ldx,
                                  d.t.ptr<const float>(), d.rule.ptr<const float>(), d.wl.ptr<const float>(),
                                  d.wr.ptr<const float>(), d.dx.ptr<float>(), d.lddx, d.drule.ptr<float>(),
                                  d.dwl.ptr<float>(), d.dwr.ptr<float>(), d.dbias.ptr<float>(), d.M, d.n, d.P, d.Q,
                                  d.k, nthreads);
  else
    peftcore::cpu::phm_bwd<double>(d.dy.ptr<const double>(), d.lddy, d.x.ptr<const double>(), d.ldx,
                                   d.t.ptr<const double>(), d.rule.ptr<const double>(), d.wl.ptr<const double>(),
                                   d.wr.ptr<const double>(), d.dx.ptr<double>(), d.lddx, d.drule.ptr<double>(),
                                   d.dwl.ptr<double>(), d.dwr.ptr<double>(), d.dbias.ptr<double>(), d.M, d.n, d.P,
                                   d.Q, d.k, nthreads);
}

int64_t cuda_phm_bwd_workspace(int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k) {
  check_dims(Call("cuda_phm_bwd_workspace", true), M, n, P, Q, k);
  return peftcore::cuda::phm_bwd_workspace(M, n, P, Q, k);
}

void cuda_phm_bwd(py::handle dy_, py::handle x_, py::handle t_, py::handle rule_, py::handle wl_, py::handle wr_,
                  py::handle dx_, py::handle drule_, py::handle dwl_, py::handle dwr_, py::handle dbias_,
                  py::handle workspace_, uintptr_t stream) {
  Call c("cuda_phm_bwd", true);
  Bwd d = bwd_args(c, dy_, x_, t_, rule_, wl_, wr_, dx_, drule_, dwl_, dwr_, dbias_, true);
  const bool weights = d.drule.present || d.dwl.present || d.dwr.present || d.dbias.present;
  const int64_t need = weights ? peftcore::cuda::phm_bwd_workspace(d.M, d.n, d.P, d.Q, d.k) : 0;
  Arg ws = c.out("workspace", workspace_, 1, A::kU8, need == 0);
  if (c.bytes(ws) < need)
    c.fail("workspace holds " + str(c.bytes(ws)) + " bytes, cuda_phm_bwd_workspace(...) = " + str(need));
  if (ws.present && reinterpret_cast<uintptr_t>(ws.data) % 4 != 0) c.fail("workspace must be 4-byte aligned");
  c.no_overlap(ws, {&d.dy, &d.x, &d.t, &d.rule, &d.wl, &d.wr, &d.dx, &d.drule, &d.dwl, &d.dwr, &d.dbias});
  if (!peftcore::cuda::compiled()) c.fail("peftcore._C was built without CUDA");
  c.current_device();
  py::gil_scoped_release nogil;
  peftcore::cuda::phm_bwd(cuda_dtype(d.x.dt), d.dy.ptr<const void>(), d.lddy, d.x.ptr<const void>(), d.ldx,
                          d.t.ptr<const void>(), d.rule.ptr<const void>(), d.wl.ptr<const void>(),
                          d.wr.ptr<const void>(), d.dx.ptr<void>(), d.drule.ptr<void>(), d.dwl.ptr<void>(),
                          d.dwr.ptr<void>(), d.dbias.ptr<void>(), d.M, d.n, d.P, d.Q, d.k, ws.ptr<float>(), stream);
}

}  // namespace

void bind_phm(py::module_& m) {
  const py::none none;
  m.def("phm_fwd", &phm_fwd, py::arg("x"), py::arg("rule"), py::arg("w_left"), py::arg("w_right"), py::arg("bias"),
        py::arg("y"), py::arg("t"), py::arg("nthreads") = 0,
        "PHM linear forward on the CPU (float32/float64): y[M,n*Q] = x[M,n*P] @ H + bias (bias may be None) "
        "with H = sum_i kron(rule[i], w_left[i] @ w_right[i]) never formed; t[M,n,n,k] for the backward.");
  m.def("phm_bwd", &phm_bwd, py::arg("dy"), py::arg("x"), py::arg("t"), py::arg("rule"), py::arg("w_left"),
        py::arg("w_right"), py::arg("dx"), py::arg("drule"), py::arg("dw_left"), py::arg("dw_right"), py::arg("dbias"),
        py::arg("nthreads") = 0,
        "PHM linear backward on the CPU; each gradient may be None (not computed); w_left may be None "
        "without dx. Deterministic.");
  m.def("cuda_phm_fwd", &cuda_phm_fwd, py::arg("x"), py::arg("rule"), py::arg("w_left_t"), py::arg("w_right"),
        py::arg("bias"), py::arg("y"), py::arg("t"), py::arg("stream"),
        "CUDA phm_fwd (float32/float16/bfloat16, fp32 accumulation); w_left_t is w_left as [n, k, P].");
  m.def("cuda_phm_bwd_workspace", &cuda_phm_bwd_workspace, py::arg("M"), py::arg("n"), py::arg("P"), py::arg("Q"),
        py::arg("k"), "Bytes of device scratch cuda_phm_bwd needs for the weight gradients.");
  m.def("cuda_phm_bwd", &cuda_phm_bwd, py::arg("dy"), py::arg("x"), py::arg("t"), py::arg("rule"),
        py::arg("w_left_t"), py::arg("w_right"), py::arg("dx"), py::arg("drule"), py::arg("dw_left"),
        py::arg("dw_right"), py::arg("dbias"), py::arg("workspace"), py::arg("stream"),
        "CUDA phm_bwd; gradients in the input dtype, summed deterministically; workspace uint8 of "
        "cuda_phm_bwd_workspace(...) bytes (None when no weight gradient is asked for).");
}

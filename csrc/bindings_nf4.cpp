// peftcore._C binding of the NF4 panel dequantization (nf4_cpu.h): DLPack operands checked as in
// bindings.cpp (tensor_arg.h); every extent the kernel reads or writes is derived from the operands
// and checked against the weight's geometry before it runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "nf4_cpu.h"
#include "tensor_arg.h"

namespace py = pybind11;
using peftcore::arg::Arg;
using peftcore::arg::Call;
using peftcore::arg::str;
namespace A = peftcore::arg;

namespace {

// packed [ceil(n*K/2)] uint8, absmax [ceil(n*K/blocksize)] float32 (both dense), out [rows, K]
// float32/float64 (dense): rows [start, start + rows) of the [n, K] weight.
void nf4_dequant_rows(py::handle packed_, py::handle absmax_, py::handle out_, int64_t n, int64_t start,
                      int64_t blocksize, int nthreads) {
  Call c("nf4_dequant_rows", false);
  if (nthreads < 0) c.fail("nthreads must be >= 0 (0: the module default), got " + str(nthreads));
  if (blocksize < 2 || blocksize % 2 != 0 || blocksize > (int64_t(1) << 20))
    c.fail("blocksize must be even and in [2, 2^20], got " + str(blocksize));
  Arg packed = c.in("packed", packed_, 1, A::kU8);
  Arg absmax = c.in("absmax", absmax_, 1, A::kF32);
  Arg out = c.out("out", out_, 2, A::kCpuFloat);
  c.contiguous(packed);
  c.contiguous(absmax);
  c.contiguous(out);
  const int64_t rows = out.size(0), K = out.size(1);
  if (n < 1 || K < 1 || n > (int64_t(1) << 40) / K) c.fail("weight [n=" + str(n) + ", K=" + str(K) + "] is out of range");
  if (start < 0 || start > n - rows)
    c.fail("rows [" + str(start) + ", " + str(start + rows) + ") are outside the weight's " + str(n) + " rows");
  const int64_t numel = n * K;
  if (packed.numel != (numel + 1) / 2)
    c.fail("packed holds " + str(packed.numel) + " bytes, a [" + str(n) + ", " + str(K) + "] weight needs " +
           str((numel + 1) / 2));
  if (absmax.numel != (numel + blocksize - 1) / blocksize)
    c.fail("absmax holds " + str(absmax.numel) + " scales, a [" + str(n) + ", " + str(K) + "] weight in blocks of " +
           str(blocksize) + " needs " + str((numel + blocksize - 1) / blocksize));
  c.no_overlap(out, {&packed, &absmax});
  py::gil_scoped_release nogil;
  if (out.dt == A::kF32)
    peftcore::cpu::nf4_dequant_rows(packed.ptr<const uint8_t>(), absmax.ptr<const float>(), out.ptr<float>(), start,
                                    rows, K, blocksize, nthreads);
  else
    peftcore::cpu::nf4_dequant_rows(packed.ptr<const uint8_t>(), absmax.ptr<const float>(), out.ptr<double>(), start,
                                    rows, K, blocksize, nthreads);
}

}  // namespace

void bind_nf4(py::module_& m) {
  m.def("nf4_dequant_rows", &nf4_dequant_rows, py::arg("packed"), py::arg("absmax"), py::arg("out"), py::arg("n"),
        py::arg("start"), py::arg("blocksize"), py::arg("nthreads") = 0,
        "out[rows, K] (float32/float64) = rows [start, start+rows) of the NF4 weight [n, K] held by packed "
        "(uint8, bitsandbytes' nibble order) and absmax (float32 per block of blocksize flat elements).");
}

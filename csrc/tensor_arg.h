// Tensors as the bindings of peftcore._C take them: DLPack capsules (torch.utils.dlpack.to_dlpack),
// which carry data pointer, shape, strides, dtype and device.  Call parses each capsule and checks
// it (dtype, device, dims, shape against the other operands, strides, alignment, non-null, no
// overlap of an output with another operand) before a kernel sees a pointer; a failed check raises
// TypeError/ValueError naming the binding and the argument.
//
// The capsule is read, not consumed: the caller keeps it (and so the tensor) alive for the call.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#if defined(PEFTCORE_WITH_CUDA)
extern "C" int cudaGetDevice(int* device);  // cudart, linked statically with the CUDA kernels
#endif

namespace peftcore {
namespace dl {

// The DLPack ABI (dlpack.h, v0.x unversioned and v1.x versioned capsules), declared here so the
// module needs no header from torch.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};
constexpr int32_t kDLCPU = 1;
constexpr int32_t kDLCUDA = 2;
constexpr uint64_t kFlagReadOnly = 1;

}  // namespace dl

namespace arg {

enum Dt : unsigned { kF32 = 1, kF64 = 2, kF16 = 4, kBF16 = 8, kI32 = 16, kI64 = 32, kU8 = 64, kOther = 0 };
constexpr unsigned kCpuFloat = kF32 | kF64;
constexpr unsigned kCudaFloat = kF32 | kF16 | kBF16;
constexpr int kMaxDims = 8;

inline const char* dt_name(unsigned d) {
  switch (d) {
    case kF32: return "float32";
    case kF64: return "float64";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
    case kI32: return "int32";
    case kI64: return "int64";
    case kU8: return "uint8";
    default: return "?";
  }
}

inline std::string dt_set(unsigned set) {
  std::string s;
  for (unsigned d = 1; d <= kU8; d <<= 1)
    if (set & d) s += std::string(s.empty() ? "" : " or ") + dt_name(d);
  return s;
}

inline std::string str(int64_t v) { return std::to_string(v); }

// One parsed operand.  An absent optional operand has present == false and nothing else set.
struct Arg {
  const char* name = "";
  bool present = false;
  bool read_only = false;
  char* data = nullptr;  // data + byte_offset
  int32_t dev_type = 0, dev_id = 0;
  unsigned dt = kOther;
  int64_t esize = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t numel = 0;
  int64_t span = 0;  // bytes from data to one past the highest element reachable from shape/strides

  int64_t size(int d) const { return shape[d]; }
  template <typename T>
  T* ptr() const {
    return present ? reinterpret_cast<T*>(data) : nullptr;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + str(shape[d]);
    return s + "]";
  }
};

// The checks of one binding call.  `cuda`: every tensor must be a CUDA tensor on one device;
// otherwise every tensor must be a CPU tensor.
class Call {
 public:
  Call(const char* fn, bool cuda) : fn_(fn), cuda_(cuda) {}

  [[noreturn]] void fail(const std::string& msg) const {
    throw pybind11::value_error("peftcore._C." + fn_ + ": " + msg);
  }
  [[noreturn]] void type_fail(const std::string& msg) const {
    throw pybind11::type_error("peftcore._C." + fn_ + ": " + msg);
  }

  // An input (read only) or an output (written: refused when the capsule is flagged read-only),
  // of `ndim` dims and a dtype in `dts`.
  Arg in(const char* name, pybind11::handle h, int ndim, unsigned dts, bool optional = false) {
    return parse(name, h, ndim, dts, optional);
  }
  Arg out(const char* name, pybind11::handle h, int ndim, unsigned dts, bool optional = false) {
    Arg a = parse(name, h, ndim, dts, optional);
    if (a.present && a.read_only) fail(std::string(name) + " is an output but its capsule is flagged read-only");
    return a;
  }

  // a's shape must be `want`; `dims` names them, e.g. "[M, K]".
  void shape(const Arg& a, std::initializer_list<int64_t> want, const char* dims) const {
    if (!a.present) return;
    bool ok = static_cast<int>(want.size()) == a.ndim;
    int d = 0;
    for (int64_t w : want) ok = ok && a.shape[d++] == w;
    if (ok) return;
    std::string s = "[";
    d = 0;
    for (int64_t w : want) s += (d++ ? ", " : "") + str(w);
    fail(std::string(a.name) + " must have shape " + dims + " = " + s + "], got " + a.shape_str());
  }

  // Compact row-major strides (the stride of a dim of size 1 is not looked at).
  void contiguous(const Arg& a) const {
    if (!a.present || a.numel == 0) return;
    int64_t expect = 1;
    for (int d = a.ndim - 1; d >= 0; --d) {
      if (a.shape[d] != 1 && a.strides[d] != expect)
        fail(std::string(a.name) + " must be contiguous (the kernel indexes it densely), got shape " +
             a.shape_str() + " strides " + strides_str(a));
      expect *= a.shape[d];
    }
  }

  // A 2-D [rows, cols] operand with a unit column stride; returns the row stride the kernel gets.
  // Rows of an output must not overlap; rows of an input may repeat (stride 0) but not partly overlap.
  int64_t rows(const Arg& a, bool writable) const {
    if (!a.present) return 0;
    const int64_t m = a.shape[0], k = a.shape[1];
    if (k > 1 && a.strides[1] != 1)
      fail(std::string(a.name) + " must have a unit column stride, got strides " + strides_str(a));
    if (m <= 1 || k == 0) return k;
    const int64_t ld = a.strides[0];
    if (ld < k && (writable || ld != 0))
      fail(std::string(a.name) + " row stride " + str(ld) + " is smaller than its row length " + str(k) +
           (writable ? ": rows of an output must not overlap" : ""));
    return ld;
  }

  // Output `o` must share no byte with any of `others` (conservative: the byte ranges spanned).
  void no_overlap(const Arg& o, std::initializer_list<const Arg*> others) const {
    if (!o.present || o.span == 0) return;
    for (const Arg* p : others) {
      if (!p->present || p->span == 0 || p == &o) continue;
      const char *a0 = o.data, *a1 = o.data + o.span, *b0 = p->data, *b1 = p->data + p->span;
      if (a0 < b1 && b0 < a1)
        fail(std::string(o.name) + " overlaps " + p->name + " in memory: the kernel writes " + o.name +
             " while it reads " + p->name + "; pass a separate output tensor");
    }
  }

  // CUDA calls, last check before a launch: the operands' device must be the current device (the
  // kernels launch there).  Builds without CUDA have no runtime to ask and stop at require_cuda.
  void current_device() const {
#if defined(PEFTCORE_WITH_CUDA)
    if (!cuda_ || dev_id_ < 0) return;
    int cur = -1;
    const int err = cudaGetDevice(&cur);
    if (err != 0) fail("cannot query the current CUDA device (cudaError_t " + str(err) + ")");
    if (cur != dev_id_)
      fail("the operands are on cuda:" + str(dev_id_) + " but the current device is cuda:" + str(cur) +
           " (call inside torch.cuda.device(...))");
#endif
  }

  // Bytes of a contiguous scratch operand (0 when absent).
  int64_t bytes(const Arg& a) const { return a.present ? a.numel * a.esize : 0; }

  const std::string& fn() const { return fn_; }

 private:
  static std::string strides_str(const Arg& a) {
    std::string s = "[";
    for (int d = 0; d < a.ndim; ++d) s += (d ? ", " : "") + str(a.strides[d]);
    return s + "]";
  }

  static unsigned dt_of(const dl::DLDataType& t) {
    if (t.lanes != 1) return kOther;
    if (t.code == 2 && t.bits == 32) return kF32;
    if (t.code == 2 && t.bits == 64) return kF64;
    if (t.code == 2 && t.bits == 16) return kF16;
    if (t.code == 4 && t.bits == 16) return kBF16;
    if (t.code == 0 && t.bits == 32) return kI32;
    if (t.code == 0 && t.bits == 64) return kI64;
    if (t.code == 1 && t.bits == 8) return kU8;
    return kOther;
  }

  Arg parse(const char* name, pybind11::handle h, int ndim, unsigned dts, bool optional) {
    Arg a;
    a.name = name;
    const std::string nm(name);
    if (h.is_none()) {
      if (optional) return a;
      type_fail(nm + " is required, got None");
    }
    PyObject* o = h.ptr();
    if (!PyCapsule_CheckExact(o))
      type_fail(nm + " must be a DLPack capsule (torch.utils.dlpack.to_dlpack(t)), got " +
                std::string(Py_TYPE(o)->tp_name));
    const char* cname = PyCapsule_GetName(o);
    const std::string cn = cname ? cname : "";
    const dl::DLTensor* t = nullptr;
    if (cn == "dltensor") {
      auto* m = static_cast<dl::DLManagedTensor*>(PyCapsule_GetPointer(o, cname));
      if (m) t = &m->dl_tensor;
    } else if (cn == "dltensor_versioned") {
      auto* m = static_cast<dl::DLManagedTensorVersioned*>(PyCapsule_GetPointer(o, cname));
      if (m) {
        if (m->version.major != 1) fail(nm + ": DLPack version " + str(m->version.major) + " is not supported");
        a.read_only = (m->flags & dl::kFlagReadOnly) != 0;
        t = &m->dl_tensor;
      }
    } else if (cn == "used_dltensor" || cn == "used_dltensor_versioned") {
      fail(nm + ": the DLPack capsule was already consumed; make a fresh one per call");
    } else {
      type_fail(nm + " must be a DLPack capsule, got a capsule named '" + cn + "'");
    }
    if (t == nullptr) {
      PyErr_Clear();
      fail(nm + ": the DLPack capsule holds no tensor");
    }
    const int32_t want_dev = cuda_ ? dl::kDLCUDA : dl::kDLCPU;
    if (t->device.device_type != want_dev)
      fail(nm + " must be a " + (cuda_ ? "CUDA" : "CPU") + " tensor, got DLPack device type " +
           str(t->device.device_type) + (cuda_ ? "" : " (the cuda_* bindings take CUDA tensors)"));
    if (cuda_) {
      if (dev_id_ < 0) {
        dev_id_ = t->device.device_id;
      } else if (t->device.device_id != dev_id_) {
        fail(nm + " is on cuda:" + str(t->device.device_id) + ", the other operands on cuda:" + str(dev_id_));
      }
    }
    a.dt = dt_of(t->dtype);
    if (!(a.dt & dts))
      type_fail(nm + " must have dtype " + dt_set(dts) + ", got " +
                (a.dt ? std::string(dt_name(a.dt))
                      : "DLPack (code " + str(t->dtype.code) + ", bits " + str(t->dtype.bits) + ", lanes " +
                            str(t->dtype.lanes) + ")"));
    a.esize = t->dtype.bits / 8;
    if (t->ndim != ndim)
      fail(nm + " must be " + str(ndim) + "-D, got " + str(t->ndim) + "-D");
    if (ndim > 0 && t->shape == nullptr) fail(nm + ": the DLPack tensor has no shape");
    a.ndim = ndim;
    a.numel = 1;
    const int64_t lim = int64_t(1) << 50;
    for (int d = 0; d < ndim; ++d) {
      a.shape[d] = t->shape[d];
      if (a.shape[d] < 0) fail(nm + " has a negative size in dim " + str(d));
      if (a.shape[d] > 0 && a.numel > lim / a.shape[d]) fail(nm + " has too many elements");
      a.numel *= a.shape[d];
    }
    if (t->strides) {
      for (int d = 0; d < ndim; ++d) a.strides[d] = t->strides[d];
    } else {
      int64_t s = 1;
      for (int d = ndim - 1; d >= 0; --d) {
        a.strides[d] = s;
        s *= a.shape[d] > 0 ? a.shape[d] : 1;
      }
    }
    a.data = static_cast<char*>(t->data) + t->byte_offset;
    if (a.numel > 0) {
      if (t->data == nullptr) fail(nm + " has a null data pointer");
      if (reinterpret_cast<uintptr_t>(a.data) % static_cast<uintptr_t>(a.esize) != 0)
        fail(nm + " is not aligned to its element size " + str(a.esize));
      // The highest element offset reachable from the sizes and strides.
      int64_t reach = 0;
      for (int d = 0; d < ndim; ++d) {
        if (a.shape[d] == 1) continue;
        if (a.strides[d] < 0) fail(nm + " has a negative stride in dim " + str(d));
        if (a.strides[d] > 0 && a.shape[d] - 1 > (lim - reach) / a.strides[d])
          fail(nm + ": its strides reach past 2**50 elements");
        reach += (a.shape[d] - 1) * a.strides[d];
      }
      a.span = (reach + 1) * a.esize;
    }
    a.present = true;
    return a;
  }

  std::string fn_;
  bool cuda_;
  int32_t dev_id_ = -1;
};

inline unsigned one(unsigned dt) { return dt; }

}  // namespace arg
}  // namespace peftcore

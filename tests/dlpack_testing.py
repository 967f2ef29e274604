"""Hand-made DLPack capsules for the binding tests: a CPU tensor's memory described as living on
another device (a "CUDA" capsule, so the checks of the cuda_* bindings run on a machine without a
GPU: they refuse bad operands before any kernel or CUDA call), or with a read-only flag.

The capsules have no deleter; the tensors and the ctypes structs are kept alive in ``_KEEP``.
"""

from __future__ import annotations

import ctypes

import torch

_KEEP: list = []

_CODES = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16),
          torch.int32: (0, 32), torch.int64: (0, 64), torch.uint8: (1, 8), torch.bool: (6, 8)}


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


_new = ctypes.pythonapi.PyCapsule_New
_new.restype = ctypes.py_object
_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def capsule(t: torch.Tensor, device_type: int = 1, device_id: int = 0, *, read_only: bool | None = None,
            data: int | None = None, lanes: int = 1):
    """A DLPack capsule describing t's memory (or ``data``) as on ``device_type`` (1 CPU, 2 CUDA).

    ``read_only=None`` makes an unversioned ("dltensor") capsule, True/False a versioned one with
    that flag.
    """
    code, bits = _CODES[t.dtype]
    nd = t.dim()
    shape = (ctypes.c_int64 * max(nd, 1))(*t.shape)
    strides = (ctypes.c_int64 * max(nd, 1))(*t.stride())
    dlt = _Tensor(t.data_ptr() if data is None else data, _Device(device_type, device_id), nd,
                  _DType(code, bits, lanes), shape, strides, 0)
    if read_only is None:
        m, name = _Managed(dlt, None, None), b"dltensor"
    else:
        m, name = _ManagedVersioned(_Version(1, 0), None, None, 1 if read_only else 0, dlt), b"dltensor_versioned"
    _KEEP.append((t, shape, strides, m, name))
    return _new(ctypes.addressof(m), name, None)


def cuda(t: torch.Tensor, device_id: int = 0):
    """t's (host) memory labelled as a CUDA tensor on ``device_id``."""
    return capsule(t, 2, device_id)

"""Validation and index helpers shared by the sparse formats."""

from __future__ import annotations

import operator
from operator import is_

import torch

#: Column indices are stored in 16 bits (as int16 holding uint16 bit patterns)
#: when every index fits: half the bytes of int32, and the kernels widen them
#: for free. Wider matrices use int32.
U16_LIMIT = 1 << 16
INT32_MAX = (1 << 31) - 1
_F32_MAX = torch.finfo(torch.float32).max


def index_dtype_for(count: int) -> torch.dtype:
    """The smallest index dtype that can address ``count`` columns."""
    return torch.int16 if count <= U16_LIMIT else torch.int32


def encode_indices(indices: torch.Tensor, count: int) -> torch.Tensor:
    """Stores non-negative indices < count in the compact dtype."""
    if count > INT32_MAX + 1:  # (check_shape keeps every format below this)
        raise ValueError(f"{count} columns cannot be addressed by 32-bit indices")
    dtype = index_dtype_for(count)
    indices = indices.to(torch.int32)
    if dtype == torch.int16:
        # uint16 bit patterns in an int16 tensor (torch's uint16 lacks most ops).
        return torch.where(indices >= 1 << 15, indices - U16_LIMIT, indices).to(torch.int16).contiguous()
    return indices.contiguous()


def decode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Indices as int64, undoing the uint16-in-int16 encoding."""
    wide = indices.to(torch.int64)
    if indices.dtype == torch.int16:
        wide = wide & 0xFFFF
    return wide


def index_bits(indices: torch.Tensor) -> int:
    return 16 if indices.dtype == torch.int16 else 32


def check_shape(shape) -> tuple[int, int]:
    """Two non-negative integers that the int32 indices can address. Only true
    integers (int, numpy/torch integer scalars) pass: ``int(4.7)`` or ``int('4')``
    would silently make a different matrix."""
    try:
        rows, cols = shape
        if isinstance(rows, bool) or isinstance(cols, bool):
            raise TypeError
        rows, cols = operator.index(rows), operator.index(cols)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be two integers (rows, cols), got {shape!r}") from None
    if rows < 0 or cols < 0:
        raise ValueError(f"shape must be non-negative, got {(rows, cols)}")
    if rows > INT32_MAX or cols > INT32_MAX:
        raise ValueError(f"shape {(rows, cols)} is too large: each side must be at most {INT32_MAX} "
                         "(the indices are 32-bit)")
    return rows, cols


def as_int(v):
    """``v`` as an int when it is a true integer (int, numpy/torch integer scalar; not
    bool, float or str), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_tensor(name: str, t, *, ndim: int, kinds: str) -> torch.Tensor:
    """Checks that ``t`` is a tensor of ``ndim`` dims; kinds: 'int' or 'float'."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} must be a strided (dense) tensor, got layout {t.layout}")
    if kinds == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if kinds == "float" and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    return t


def check_row_ptr(row_ptr: torch.Tensor, segments: int, nnz: int, what: str = "row_ptr") -> torch.Tensor:
    """Validates a compressed row pointer and returns it as contiguous int32."""
    check_tensor(what, row_ptr, ndim=1, kinds="int")
    if row_ptr.numel() != segments + 1:
        raise ValueError(f"{what} must have {segments + 1} entries (one per row plus one), got {row_ptr.numel()}")
    if nnz > INT32_MAX:
        raise ValueError(f"too many stored entries ({nnz}); at most {INT32_MAX} are supported")
    rp = row_ptr.to(torch.int64)
    if rp[0].item() != 0:
        raise ValueError(f"{what}[0] must be 0, got {rp[0].item()}")
    if rp[-1].item() != nnz:
        raise ValueError(f"{what}[-1] must equal the number of stored entries ({nnz}), got {rp[-1].item()}")
    if segments > 0 and bool((rp[1:] < rp[:-1]).any()):
        bad = int(torch.nonzero(rp[1:] < rp[:-1])[0, 0])
        raise ValueError(f"{what} must be non-decreasing; {what}[{bad + 1}] < {what}[{bad}]")
    return rp.to(torch.int32).contiguous()


def check_indices(name: str, indices: torch.Tensor, count: int) -> torch.Tensor:
    """Validates indices in [0, count) and returns them in the compact dtype."""
    check_tensor(name, indices, ndim=1, kinds="int")
    if indices.numel():
        # int16 arrays hold uint16 bit patterns (sparsert's own compact layout).
        wide = decode_indices(indices)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi >= count:
            raise ValueError(f"{name} must lie in [0, {count}); found values in [{lo}, {hi}]")
    return encode_indices(decode_indices(indices), count)


def check_values(name: str, values: torch.Tensor, *, ndim: int, check_finite: bool) -> torch.Tensor:
    """Floating values of ``ndim`` dims; finite when ``check_finite``; and, whatever
    ``check_finite`` says, no finite value that float32 (what formats store)
    cannot hold: 1e300 in float64 would silently become infinity."""
    check_tensor(name, values, ndim=ndim, kinds="float")
    if check_finite and values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    if values.numel() and torch.finfo(values.dtype).max > _F32_MAX:
        too_big = torch.isfinite(values) & (values.abs() > _F32_MAX)
        if bool(too_big.any()):
            bad = values[too_big][0].item()
            raise ValueError(f"{name} holds {bad!r}, beyond float32's range (+-{_F32_MAX:.4g}): "
                             "stored as float32 it would become infinity")
    return values


def check_dense(w, what: str = "weight") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, cols), got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{what} must be floating point, got {w.dtype}")
    return w


def as_kernel_values(values: torch.Tensor) -> torch.Tensor:
    """Stored values are float32 (what the CPU kernels compute in), contiguous."""
    return values.detach().to(torch.float32).contiguous()


def check_value_dtype(dtype):
    """``None`` (keep) or a floating dtype for stored values (``format.to(device, dtype)``)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    return dtype


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class IdentityCache:
    """A value derived from some tensors (flat views, kernel arrays), made once
    and handed out on every call until one of the tensors is a different
    object: the ops remember validated arrays by tensor identity
    (sparsert/ops/backends/cpu.py), and a fresh ``reshape`` per call would be
    a new tensor each time. Never copied or pickled (rebuilt on first use),
    so a copy never hands out views of the original's storage."""

    __slots__ = ("_sources", "_value")

    def __init__(self):
        self._sources = self._value = None

    def lookup(self, sources: tuple):
        """The value stored with exactly these objects (by identity, same order), else None.
        Kept lean: layers call it on every forward."""
        s = self._sources
        if s is not None and len(s) == len(sources) and all(map(is_, s, sources)):
            return self._value
        return None

    def store(self, sources: tuple, value):
        """Remembers ``value`` for ``sources``; returns it."""
        self._sources, self._value = sources, value
        return value

    def __copy__(self):
        return IdentityCache()

    def __deepcopy__(self, memo):
        return IdentityCache()

    def __reduce__(self):
        return (IdentityCache, ())

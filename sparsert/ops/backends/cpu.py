"""The native CPU backend of the ``sparsert`` ops (kernels in ``sparsert._C``).

Three things live here: the CPU kernels registered for the ops
(``linear_bsr_cpu``, ``linear_bitmask_cpu``, ``conv2d_bsr_cpu``), the
validation of a weight's raw
arrays before a kernel reads them, and the eager fast path
(:func:`eager_cpu_call`): a plain eager CPU call runs the kernel directly,
skipping the torch.library dispatcher, whose Python layers cost several times
the kernel for small layers.

Validation, in full, once per tensor version: the kernels index x with the
column indices and walk the row pointer, so a malformed array would read out
of bounds. Checking them is O(nnz), more than a small layer's kernel, but a
layer calls with the same tensors every time: the result is remembered per
(row_ptr, col_indices, values) objects and their version counters, which
every in-place change bumps (inference tensors have none: in-place changes to
those go unnoticed). A call with the same, unchanged tensors costs a dict
lookup and a few compares.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..._ext import native
from ...formats._common import decode_indices, index_bits
from ...formats.bitmask import GROUP, VALUE_PADDING, masks_to_bits
from .. import epilogue
from .._threads import get_num_threads
from ..schema import conv2d_bsr, conv_out_size, linear_bitmask, linear_bsr

__all__ = ["linear_bsr_cpu", "linear_bitmask_cpu", "conv2d_bsr_cpu", "check_bitmask_arrays", "bitmask_kernels",
           "eager_cpu_call", "check_weight_arrays", "kernels",
           "conv_kernels", "best_isa", "available"]


def available() -> bool:
    """True when the native CPU kernels (``sparsert._C``) load."""
    from ..._ext import available as _available
    return _available()


def kernels() -> list:
    """Every native SpMM kernel of this build (name, kind, isa, block, supported, ...)."""
    return native().kernels()


def conv_kernels() -> list:
    """Every native convolution kernel of this build."""
    return native().conv_kernels()


def bitmask_kernels() -> list:
    """Every native bitmask kernel of this build (name, isa, kind, supported)."""
    return native().bitmask_kernels()


def best_isa() -> str:
    """The widest instruction set this CPU and build run ("avx512", "avx2", "scalar")."""
    return native().best_isa()


# --------------------------------------------------------------------------- eager fast path
def eager_cpu_call(*tensors: Optional[Tensor]) -> bool:
    """True when calling an op's CPU implementation directly is indistinguishable
    from calling the registered op: every tensor given is a plain CPU tensor,
    none needs autograd, and nothing traces, compiles, exports or intercepts
    (dispatch and function modes). Eager CPU calls then skip the dispatcher's
    Python layers, which cost tens of microseconds per call (more than a small
    sparse layer's kernel). ``None`` entries (e.g. no bias) are ignored."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        plain = type(t) is Tensor or type(t) is torch.nn.Parameter  # no subclass (fake, functional...)
        if not plain or not t.is_cpu:  # (is_cpu: t.device.type costs 4x as much, per call)
            return False
        if grad and t.requires_grad:
            return False
    return True


# --------------------------------------------------------------------------- weight validation
_INDEX_DTYPES = (torch.int16, torch.int32)

# id(values) -> (weakref values, weakref row_ptr, weakref col_indices, key)
_validated: dict[int, tuple] = {}


def _forget(vid: int, ref) -> None:
    entry = _validated.get(vid)
    if entry is not None and entry[0] is ref:
        del _validated[vid]


def check_weight_arrays(row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                        in_features: int, block_rows: int, block_cols: int) -> tuple:
    """Raises ValueError unless the arrays describe a valid ``out_features x
    in_features`` block-sparse matrix of ``block_rows x block_cols`` blocks in
    the layout the native kernels read (CPU, contiguous, int32 row pointer,
    int16/int32 column indices, float32 values).

    Returns the arrays as the native kernels take them: (row_ptr address,
    entries, col_indices address, entries, index bits, values address,
    entries). The addresses are part of the remembered key because
    ``t.data = other`` swaps a tensor's storage without bumping its version."""
    def check():
        _check_in_full(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols)
        return (row_ptr.data_ptr(), row_ptr.numel(), col_indices.data_ptr(), col_indices.numel(),
                index_bits(col_indices), values.data_ptr(), values.numel())

    return _remembered((row_ptr, col_indices, values), (out_features, in_features, block_rows, block_cols), check)


def _remembered(arrays: tuple, shape_key: tuple, check) -> tuple:
    """``check()`` (validates ``arrays`` = (a, b, values), returns the native arguments),
    remembered per array objects, addresses and version counters."""
    a, b, values = arrays
    pointers = (a.data_ptr(), b.data_ptr(), values.data_ptr())
    try:
        key = (*shape_key, pointers, a._version, b._version, values._version)
    except RuntimeError:
        # Inference tensors (made under torch.inference_mode) keep no version
        # counter: an in-place change to them is not noticed.
        key = (*shape_key, pointers, *(_version(t) for t in arrays))
    entry = _validated.get(id(values))
    if entry is not None and entry[0]() is values and entry[1]() is a and entry[2]() is b and entry[3] == key:
        return entry[4]
    native_arrays = check()
    vid = id(values)
    ref = weakref.ref(values, lambda r, vid=vid: _forget(vid, r))
    _validated[vid] = (ref, weakref.ref(a), weakref.ref(b), key, native_arrays)
    return native_arrays


def _version(t) -> int:
    return -1 if isinstance(t, Tensor) and t.is_inference() else t._version


def _check_in_full(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols):
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor (build weights with sparsert.formats)")
    if row_ptr.dtype != torch.int32 or col_indices.dtype not in _INDEX_DTYPES or values.dtype != torch.float32:
        raise ValueError("row_ptr must be int32, col_indices int16/int32 and values float32 "
                         "(build weights with sparsert.formats)")
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block sides must be positive, got {block_rows}x{block_cols}")
    if out_features < 0 or in_features < 0:
        raise ValueError(f"sizes must be non-negative, got {out_features}x{in_features}")
    nbr = -(-out_features // block_rows)
    nbc = -(-in_features // block_cols)
    if row_ptr.numel() != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected {nbr + 1}")
    rp = row_ptr.to(torch.int64)
    nnz = int(rp[-1])
    if int(rp[0]) != 0 or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError("row_ptr must start at 0 and be non-decreasing")
    if col_indices.numel() != nnz or values.numel() != nnz * block_rows * block_cols:
        raise ValueError("col_indices/values sizes do not match row_ptr[-1]")
    if nnz:
        cols = decode_indices(col_indices)
        if int(cols.min()) < 0 or int(cols.max()) >= nbc:
            raise ValueError(f"column indices must lie in [0, {nbc}) (block columns of a "
                             f"{out_features}x{in_features} matrix)")


def check_bitmask_arrays(masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                         in_features: int) -> tuple:
    """Raises ValueError unless the arrays are a valid ``out_features x in_features``
    bitmask matrix as the kernels read it (``Bitmask.kernel_arrays()``): int16 masks
    ``(rows, ceil(cols / 16))`` with no bits past the last column, int64 row offsets
    equal to the running popcount, float32 values plus their padding. Remembered like
    :func:`check_weight_arrays`; returns the native kernel's array arguments."""
    def check():
        for name, t, dtype in (("masks", masks, torch.int16), ("row_offsets", row_offsets, torch.int64),
                               ("values", values, torch.float32)):
            if not isinstance(t, Tensor) or t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype:
                raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor (build weights with "
                                 "sparsert.formats.bitmask.Bitmask)")
        groups = -(-in_features // GROUP)
        if tuple(masks.shape) != (out_features, groups) or row_offsets.shape != (out_features + 1,):
            raise ValueError(f"masks must have shape ({out_features}, {groups}) and row_offsets "
                             f"{out_features + 1} entries for a {out_features}x{in_features} matrix")
        bits = masks_to_bits(masks)
        tail = groups * GROUP - in_features
        if tail and out_features and bool(bits[:, -1, GROUP - tail:].any()):
            raise ValueError("masks have bits set past the last column")
        expected = torch.zeros(out_features + 1, dtype=torch.int64)
        torch.cumsum(bits.sum((1, 2)), 0, out=expected[1:])
        if not torch.equal(row_offsets, expected):
            raise ValueError("row_offsets must be the running popcount of the masks")
        if values.numel() != int(expected[-1]) + VALUE_PADDING:
            raise ValueError(f"values must hold the {int(expected[-1])} stored values plus {VALUE_PADDING} padding")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("bitmask values must be finite (the kernels multiply padding by zero)")
        return (masks.data_ptr(), masks.numel(), row_offsets.data_ptr(), row_offsets.numel(), values.data_ptr(),
                values.numel())

    return _remembered((masks, row_offsets, values), ("bitmask", out_features, in_features), check)


# --------------------------------------------------------------------------- kernels
def float32_bias(bias: Optional[Tensor], out_features: int) -> int:
    """The address of a float32, contiguous ``bias`` (0 for none), after checking its shape."""
    if bias is None:
        return 0
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return bias.data_ptr()


def linear_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                   block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int,
                   num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks).

    Kept lean: it runs once per layer per call (a small layer's kernel takes
    a few microseconds). The weight arrays are validated in full once per
    tensor version (see ``_checks``); per call only x and bias are checked.
    """
    in_features = x.shape[-1]
    arrays = check_weight_arrays(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols)
    x32 = x if x.dtype == torch.float32 else x.float()
    if x32.dim() == 2 and x32.stride(-1) == 1:
        x2 = x32  # rows may be strided (a slice): the kernel takes a row stride
    elif x32.is_contiguous():
        x2 = None  # read in place as tokens x in_features
    else:
        x2 = x32.reshape(-1, in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
    if x2 is None:
        tokens = x32.numel() // in_features if in_features else math.prod(x32.shape[:-1])
        x_address, x_stride = x32.data_ptr(), in_features
    else:
        tokens = x2.shape[0]
        x_address, x_stride = x2.data_ptr(), x2.stride(0)
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    native().spmm(out_features, in_features, block_rows, block_cols, *arrays, x_address, tokens, x_stride,
                  y.data_ptr(), out_features, float32_bias(bias, out_features), epilogue.kernel_code(activation),
                  num_threads if num_threads > 0 else get_num_threads(), kernel)
    y = epilogue.finish(y, activation)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_bitmask_cpu(x: Tensor, masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                       bias: Optional[Tensor], activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path of ``linear_bitmask``; ``kernel`` forces a bitmask registry kernel."""
    in_features = x.shape[-1]
    arrays = check_bitmask_arrays(masks, row_offsets, values, out_features, in_features)
    x32 = x if x.dtype == torch.float32 else x.float()
    x2 = x32.reshape(-1, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    native().spmm_bitmask(out_features, in_features, *arrays, x2.data_ptr(), tokens,
                          x2.stride(0) if tokens else in_features, y.data_ptr(), out_features,
                          float32_bias(bias, out_features), epilogue.kernel_code(activation),
                          num_threads if num_threads > 0 else get_num_threads(), kernel)
    y = epilogue.finish(y, activation)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def conv2d_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                   kernel_size: Sequence[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                   activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    if groups < 1 or cin % groups:
        raise ValueError(f"groups={groups} must be positive and divide the {cin} input channels")
    rp_address, _, ci_address, _, index_bits, values_address, _ = check_weight_arrays(
        row_ptr, col_indices, values, out_channels, cin // groups * kh * kw, block_rows, block_cols)
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    x32 = x if x.dtype == torch.float32 else x.float()
    x32 = x32.contiguous()  # NCHW; a channels_last input is converted here
    y = torch.empty(n, out_channels, max(oh, 0), max(ow, 0), dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    native().conv2d(out_channels, block_rows, block_cols, rp_address, ci_address, index_bits, values_address,
                    x32.data_ptr(),
                    n, cin, h, w, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
                    dilation[1], groups, y.data_ptr(), float32_bias(bias, out_channels),
                    epilogue.kernel_code(activation), num_threads if num_threads > 0 else get_num_threads(),
                    kernel)
    y = epilogue.finish(y, activation)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@linear_bsr.register_kernel("cpu")
def _linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                    activation, num_threads):
    return linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                          activation, num_threads)


@linear_bitmask.register_kernel("cpu")
def _linear_bitmask_cpu(x, masks, row_offsets, values, out_features, bias, activation, num_threads):
    return linear_bitmask_cpu(x, masks, row_offsets, values, out_features, bias, activation, num_threads)


@conv2d_bsr.register_kernel("cpu")
def _conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                    bias, stride, padding, dilation, groups, activation, num_threads):
    return conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                          block_cols, bias, stride, padding, dilation, groups, activation, num_threads)

"""CUDA implementations of ``torch.ops.sparsert.linear_bsr`` and ``conv2d_bsr`` (kernels in
``sparsert._C_cuda``; convolutions are im2col + the same SpMM).

Imported by :mod:`sparsert.ops` only when ``torch.cuda.is_available()``;
importing it never loads the CUDA module (that happens at the first call,
with an error that says how to build it).

What runs, per weight (``select_path``):

- N:M 2:4 weights (1x1 blocks whose arrays hold exactly two entries in every
  group of four columns) in fp16/bf16 whose sides are multiples of 64: torch's
  ``to_sparse_semi_structured`` (cuSPARSELt or CUTLASS sparse tensor cores),
  compressed once and cached, then ``F.linear``;
- everything else: the native kernels; ``sparsert._C_cuda`` picks CSR
  (Sputnik-style, shared-memory x stages), BSR on tensor cores (16x16,
  32x32, 64x64 blocks, fp16/bf16) or the plain reference kernel.

The kernels compute in the dtype of ``x`` (float32, float16 or bfloat16;
other dtypes compute in float32) with float32 accumulation and return
``x.dtype``. Stored values in another dtype are converted once per weight
and cached; store them in the compute dtype (``fmt.to("cuda", dtype=torch.bfloat16)``)
to avoid keeping both copies.

Per-weight preparation (validated private copies of the index arrays, which
are all the kernels read; row order for load balancing; converted values;
the 2:4 compressed weight) is
cached in a weak dictionary keyed by the values tensor (its base, when the
format hands out a view), and rebuilt when any array changes (pointer or
version counter). Inference tensors carry no version counter: modifying a
weight's indices in place under ``torch.inference_mode`` is not seen (the
kernels keep reading the validated copies, which is safe).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ...formats import dense_from_blocks
from ...formats._common import decode_indices
from .. import epilogue
from ..schema import (check_array_contents, check_conv_args, check_linear_args, conv2d_bsr, conv2d_bsr_torch,
                      conv_out_size, linear_bsr)

__all__ = ["available", "kernels", "compute_dtype", "is_2_4", "select_path",
           "linear_bsr_cuda", "conv2d_bsr_cuda", "SEMI_STRUCTURED"]

#: dtype codes of the native module
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: the name ``linear_bsr_cuda(kernel=...)`` accepts for torch's 2:4 path
SEMI_STRUCTURED = "nm2:4_semi_structured"
#: sides of a weight that torch's 2:4 kernels take (fp16/bf16 need multiples of 32 x 64)
_SEMI_MULTIPLE = 64


@functools.cache
def native_cuda():
    """The compiled ``sparsert._C_cuda`` module."""
    try:
        from sparsert import _C_cuda
    except ImportError as err:
        raise ImportError(
            "sparsert's CUDA kernels (sparsert._C_cuda) are not built or failed to load: "
            f"{err}. Build them with `bash scripts/build_cuda.sh` from the repository "
            "(needs nvcc, cmake, ninja and pybind11; no GPU needed to build)."
        ) from err
    return _C_cuda


def available() -> bool:
    """True when ``sparsert._C_cuda`` loads (it may still see no GPU)."""
    try:
        native_cuda()
    except ImportError:
        return False
    return True


def kernels() -> list:
    """Every native CUDA kernel of this build (name, kind, dtype, block, token_tile)."""
    return native_cuda().kernels()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for inputs of ``dtype``."""
    return dtype if dtype in DTYPE_CODES else torch.float32


def is_2_4(row_ptr: Tensor, col_indices: Tensor, rows: int, cols: int) -> bool:
    """True when 1x1-block arrays are 2:4 sparse in the layout of ``NM(n=2, m=4)``:
    every row holds ``cols // 2`` entries and entries ``2g, 2g + 1`` of a row
    lie in column group ``g`` (so no group holds more than two nonzeros, in any
    slot order). Works on any device (syncs once)."""
    if rows == 0 or cols == 0 or cols % 4 or col_indices.numel() != rows * (cols // 2):
        return False
    width = cols // 2
    expected = torch.arange(rows + 1, device=row_ptr.device, dtype=torch.int64) * width
    if not torch.equal(row_ptr.to(torch.int64), expected):
        return False
    col = decode_indices(col_indices).reshape(rows, width // 2, 2)
    group = torch.arange(width // 2, device=col.device)[None, :, None]
    return bool(((col // 4) == group).all())


def select_path(block_rows: int, block_cols: int, rows: int, cols: int, dtype: torch.dtype,
                two_four: bool) -> str:
    """``SEMI_STRUCTURED`` when torch's 2:4 kernels take this weight, else ``"native"``."""
    if (block_rows, block_cols) == (1, 1) and two_four and dtype in (torch.float16, torch.bfloat16) \
            and rows % _SEMI_MULTIPLE == 0 and cols % _SEMI_MULTIPLE == 0 and rows > 0:
        return SEMI_STRUCTURED
    return "native"


class _Prepared:
    """What one weight needs besides its arrays. Holds no reference to the
    arrays themselves (only converted copies), so the weak cache can drop it."""

    __slots__ = ("key", "nnz", "row_ptr", "col_indices", "values", "row_order", "semi", "two_four", "bias")

    def __init__(self, key):
        self.key = key
        self.nnz = 0
        self.row_ptr: Optional[Tensor] = None     # private, validated device copy (kernels read only these)
        self.col_indices: Optional[Tensor] = None  # private, validated, 16-byte aligned copy
        self.values: Optional[Tensor] = None      # converted to the compute dtype, when needed
        self.row_order: Optional[Tensor] = None   # int32 row permutation, longest rows first
        self.semi = None                          # torch SparseSemiStructuredTensor
        self.two_four = False
        self.bias: tuple = (None, None)           # (key of the bias it came from, converted bias)


_CACHE = WeakIdKeyDictionary()


def _root(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return -1


def _aligned16(t: Tensor) -> Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _prepare(row_ptr, col_indices, values, rows, cols, r, c, dtype, device) -> _Prepared:
    key = (values.data_ptr(), _version(values), tuple(values.shape), values.dtype,
           col_indices.data_ptr(), _version(col_indices), row_ptr.data_ptr(), _version(row_ptr),
           row_ptr.device, rows, cols, r, c, dtype)
    anchor = _root(values)
    entry = _CACHE.get(anchor)
    if entry is not None and entry.key == key:
        return entry
    entry = _Prepared(key)
    # Private index copies, validated once: the kernels read these and never the
    # caller's arrays, which writes torch does not version (``.data``, numpy,
    # inference tensors) could change after validation.
    rp = entry.row_ptr = row_ptr.to(device, copy=True)
    entry.col_indices = col_indices.clone()  # (a fresh allocation: 16-byte aligned)
    check_array_contents(rp, entry.col_indices, values, rows, cols, r, c)
    entry.nnz = int(rp[-1]) if rp.numel() else 0
    if values.dtype != dtype:
        entry.values = _aligned16(values.to(dtype).contiguous())
    elif values.data_ptr() % 16:
        entry.values = values.clone()
    if (r, c) == (1, 1) and rows > 1:
        lengths = rp[1:] - rp[:-1]
        if bool((lengths != lengths[0]).any()):
            entry.row_order = torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
        entry.two_four = is_2_4(rp, entry.col_indices, rows, cols)
        if select_path(r, c, rows, cols, dtype, entry.two_four) == SEMI_STRUCTURED:
            entry.semi = _semi_structured(rp, entry.col_indices, entry.values if entry.values is not None else values,
                                          rows, cols, dtype)
    _CACHE[anchor] = entry
    return entry


def _semi_structured(row_ptr, col_indices, values, rows, cols, dtype):
    """The weight compressed by torch for its 2:4 kernels, or None where torch
    cannot (no cuSPARSELt/CUTLASS support on this GPU or build)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured
    dense = dense_from_blocks(row_ptr, col_indices, values, rows, cols, 1, 1).to(dtype).contiguous()
    # cuSPARSELt first (torch's default), then CUTLASS; torch warns that the
    # subclass API is a prototype: known, and not the user's concern here.
    for build in (to_sparse_semi_structured, SparseSemiStructuredTensorCUTLASS.from_dense):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return build(dense)
        except (RuntimeError, NotImplementedError, AssertionError, ValueError):
            continue
    return None


def _check(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias):
    """O(1) checks (no device sync) that keep the kernels inside their buffers;
    index contents are validated once per weight (:func:`_prepare`)."""
    dev = x.device
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block dimensions must be positive, got {block_rows}x{block_cols}")
    if row_ptr.dtype != torch.int32 or not row_ptr.is_contiguous() or row_ptr.dim() != 1:
        raise ValueError("row_ptr must be a contiguous 1-D int32 tensor (build weights with sparsert.formats)")
    if col_indices.dtype not in (torch.int16, torch.int32) or not col_indices.is_contiguous():
        raise ValueError("col_indices must be a contiguous int16 or int32 tensor")
    if not values.dtype.is_floating_point or not values.is_contiguous():
        raise ValueError("values must be a contiguous floating-point tensor")
    if col_indices.device != dev or values.device != dev:
        raise ValueError(f"the weight's col_indices ({col_indices.device}) and values ({values.device}) must be "
                         f"on the device of x ({dev}): move the format with fmt.to(device)")
    nbr = -(-out_features // block_rows)
    if row_ptr.numel() != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected {nbr + 1}")
    if values.numel() != col_indices.numel() * block_rows * block_cols:
        raise ValueError("values must hold block_rows * block_cols entries per column index")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.device != dev):
        raise ValueError(f"bias must have shape ({out_features},) on {dev}, got {tuple(bias.shape)} on {bias.device}")


def _kernel_input(x2: Tensor) -> Tensor:
    """x as the kernels take it: unit column stride, 16-byte aligned rows."""
    tokens, cols = x2.shape
    if x2.stride(-1) == 1 and (tokens <= 1 or x2.stride(0) % 8 == 0) and x2.data_ptr() % 16 == 0:
        return x2
    padded = x2.new_empty(tokens, -(-cols // 8) * 8)
    padded[:, :cols] = x2
    return padded[:, :cols]


def _converted_bias(prep: _Prepared, bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``bias`` as a contiguous ``dtype`` tensor; conversions are kept with the
    weight's preparation (one per weight and bias, not one per call)."""
    if bias is None:
        return None
    if bias.dtype == dtype and bias.is_contiguous():
        return bias.detach()
    key = (bias.data_ptr(), _version(bias), bias.dtype, tuple(bias.stride()), dtype)
    if prep.bias[0] != key:
        prep.bias = (key, bias.detach().to(dtype).contiguous())
    return prep.bias[1]


def _launch_context(x: Tensor) -> tuple:
    """(device index, torch's current stream handle) for a kernel on x's device."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(x.device).cuda_stream


def linear_bsr_cuda(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                    block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int,
                    num_threads: int = 0, kernel: str = "") -> Tensor:
    """The CUDA path of ``sparsert::linear_bsr``. ``kernel`` forces a native
    kernel by name (see :func:`kernels`) or ``SEMI_STRUCTURED``; "" chooses.
    ``num_threads`` is a CPU setting and is ignored here."""
    del num_threads
    _check(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias)
    in_features = x.shape[-1]
    lead = x.shape[:-1]
    dtype = compute_dtype(x.dtype)
    prep = _prepare(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols, dtype,
                    x.device)
    x2 = x.reshape(-1, in_features).to(dtype)
    tokens = x2.shape[0]

    if kernel == SEMI_STRUCTURED and prep.semi is None:
        raise ValueError("this weight cannot take torch's 2:4 path (needs 1x1 blocks in the 2:4 pattern, "
                         "fp16/bf16, sides multiples of 64, and a GPU with sparse tensor cores)")
    if prep.semi is not None and kernel in ("", SEMI_STRUCTURED) and tokens > 0:
        b = _converted_bias(prep, bias, dtype)
        y = epilogue.reference(F.linear(x2.contiguous(), prep.semi, b), activation)
        # torch's 2:4 product may return a transposed view; the fake impl promises contiguous.
        return y.reshape(*lead, out_features).to(x.dtype).contiguous()

    xk = _kernel_input(x2)
    y = torch.empty(tokens, out_features, dtype=dtype, device=x.device)
    rp, col = prep.row_ptr, prep.col_indices  # the validated private copies, never the caller's arrays
    vals = prep.values if prep.values is not None else values
    b32 = _converted_bias(prep, bias, torch.float32)
    if tokens > 0 and out_features > 0:
        device_index, stream = _launch_context(x)
        native_cuda().spmm(
            out_features, in_features, block_rows, block_cols, rp.data_ptr(), col.data_ptr(),
            16 if col.dtype == torch.int16 else 32, vals.data_ptr(),
            0 if prep.row_order is None else prep.row_order.data_ptr(), xk.data_ptr(), tokens,
            xk.stride(0) if tokens > 1 else -(-max(in_features, 1) // 8) * 8,  # one row: stride unused
            y.data_ptr(), out_features, 0 if b32 is None else b32.data_ptr(), epilogue.kernel_code(activation),
            DTYPE_CODES[dtype], device_index, stream, kernel)
    y = epilogue.finish(y, activation)
    return y.reshape(*lead, out_features).to(x.dtype)


@linear_bsr.register_kernel("cuda")
def _linear_bsr_cuda(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                     activation, num_threads):
    check_linear_args(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation,
                      num_threads)
    return linear_bsr_cuda(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                           activation, num_threads)


def conv2d_bsr_cuda(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                    kernel_size, block_rows: int, block_cols: int, bias: Optional[Tensor], stride, padding,
                    dilation, groups: int, activation: int, num_threads: int = 0, kernel: str = "") -> Tensor:
    """The CUDA path of ``sparsert::conv2d_bsr``: im2col (``F.unfold``) then the
    SpMM of :func:`linear_bsr_cuda`, one token per output pixel. Grouped
    convolutions and empty outputs take the pure-torch path."""
    del num_threads
    kh, kw = kernel_size
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, cin, h, w = x.shape
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    if groups != 1 or oh <= 0 or ow <= 0 or n == 0:
        return conv2d_bsr_torch(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                                block_cols, bias, stride, padding, dilation, groups, activation)
    patches = F.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    tokens = patches.transpose(1, 2).reshape(n * oh * ow, cin * kh * kw)  # columns ordered (c, i, j) like W
    # the same epilogue code: the SpMM fuses what its kernel can and finishes the rest
    y = linear_bsr_cuda(tokens, row_ptr, col_indices, values, out_channels, block_rows, block_cols, bias,
                        activation, 0, kernel)
    return y.reshape(n, oh * ow, out_channels).transpose(1, 2).reshape(n, out_channels, oh, ow)


@conv2d_bsr.register_kernel("cuda")
def _conv2d_bsr_cuda(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                     bias, stride, padding, dilation, groups, activation, num_threads):
    check_conv_args(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias,
                    stride, padding, dilation, groups, activation, num_threads)
    return conv2d_bsr_cuda(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                           block_cols, bias, stride, padding, dilation, groups, activation, num_threads)

"""The ``torch.ops.sparsert`` ops: schemas, fake (meta) implementations and
pure-torch defaults, in one place.

One op per layer type serves every block-sparse format (CSR and N:M are
1x1-block BSR to the kernels); the bitmask format has its own Linear op
(``linear_bitmask``: its kernels read masks, not indices). The fakes let ``torch.compile`` and ``torch.export`` trace
through the ops; the pure-torch default (densify, then ``F.linear`` /
``F.conv2d``) runs on every device without a native backend. The native
backends register their kernels on top: CPU in
:mod:`sparsert.ops.backends.cpu`, CUDA in :mod:`sparsert.ops.backends.cuda`.
``activation`` is an epilogue code of :mod:`sparsert.ops.epilogue`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import dense_from_blocks
from ..formats.bitmask import dense_from_bitmask
from . import epilogue

__all__ = ["linear_bsr", "conv2d_bsr", "linear_bitmask", "linear_bsr_torch", "conv2d_bsr_torch",
           "linear_bitmask_torch", "conv_out_size"]


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output side of a convolution (as ``F.conv2d`` computes it)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# --------------------------------------------------------------------------- linear
def linear_bsr_torch(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                     block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int) -> Tensor:
    """Pure-torch act(x @ W.T + bias): the op's default on devices without a native kernel."""
    w = dense_from_blocks(row_ptr, col_indices, values, out_features, x.shape[-1], block_rows, block_cols)
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return epilogue.reference(y, activation)


@torch.library.custom_op("sparsert::linear_bsr", mutates_args=())
def linear_bsr(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
               block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int,
               num_threads: int) -> Tensor:
    """act(x @ W.T + bias) for W given as BSR arrays (CSR and N:M are 1x1 blocks)."""
    return linear_bsr_torch(x, row_ptr, col_indices, values, out_features, block_rows, block_cols,
                            bias, activation)


@linear_bsr.register_fake
def _linear_bsr_fake(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                     activation, num_threads):
    epilogue.name_of(activation)  # unknown codes fail while tracing, as they do when run
    return x.new_empty((*x.shape[:-1], out_features))


def linear_bitmask_torch(x: Tensor, masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                         bias: Optional[Tensor], activation: int) -> Tensor:
    """Pure-torch act(x @ W.T + bias) for a bitmask W: the op's default off the CPU kernel."""
    w = dense_from_bitmask(masks, values, out_features, x.shape[-1])
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return epilogue.reference(y, activation)


@torch.library.custom_op("sparsert::linear_bitmask", mutates_args=())
def linear_bitmask(x: Tensor, masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                   bias: Optional[Tensor], activation: int, num_threads: int) -> Tensor:
    """act(x @ W.T + bias) for W given as bitmask arrays (``Bitmask.kernel_arrays()``: int16
    masks per 16 columns, int64 row offsets, the values followed by their padding)."""
    return linear_bitmask_torch(x, masks, row_offsets, values, out_features, bias, activation)


@linear_bitmask.register_fake
def _linear_bitmask_fake(x, masks, row_offsets, values, out_features, bias, activation, num_threads):
    epilogue.name_of(activation)
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------- conv2d
def conv2d_bsr_torch(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                     kernel_size: Sequence[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                     activation: int) -> Tensor:
    """The pure-torch path (any device): densify W and call F.conv2d."""
    kh, kw = kernel_size
    cols = x.shape[1] // groups * kh * kw
    w = dense_from_blocks(row_ptr, col_indices, values, out_channels, cols, block_rows, block_cols)
    w = w.reshape(out_channels, cols // (kh * kw), kh, kw).to(x.dtype)
    y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    return epilogue.reference(y, activation)


@torch.library.custom_op("sparsert::conv2d_bsr", mutates_args=())
def conv2d_bsr(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
               kernel_size: List[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
               stride: List[int], padding: List[int], dilation: List[int], groups: int,
               activation: int, num_threads: int) -> Tensor:
    """act(conv2d(x, W) + bias) for NCHW ``x`` and W given as BSR arrays over the
    flattened weight. activation: an epilogue code. num_threads: 0 = sparsert's default."""
    return conv2d_bsr_torch(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                            block_cols, bias, stride, padding, dilation, groups, activation)


@conv2d_bsr.register_fake
def _conv2d_bsr_fake(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                     bias, stride, padding, dilation, groups, activation, num_threads):
    epilogue.name_of(activation)
    oh = conv_out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], out_channels, oh, ow))

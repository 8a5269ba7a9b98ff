"""The ``torch.ops.sparsert`` ops: schemas, fake (meta) implementations and
pure-torch defaults, in one place.

One op per layer type serves every format (CSR and N:M are 1x1-block BSR to
the kernels). The fakes let ``torch.compile`` and ``torch.export`` trace
through the ops; the pure-torch default (densify, then ``F.linear`` /
``F.conv2d``) runs on every device without a native backend. The native
backends register their kernels on top: CPU in
:mod:`sparsert.ops.backends.cpu`, CUDA in :mod:`sparsert.ops.backends.cuda`.
``activation`` is an epilogue code of :mod:`sparsert.ops.epilogue`.

Autograd: both ops have a formula for the gradient of ``x`` (and of ``bias``),
so training-mode calls, eager or under ``torch.compile``, run and backpropagate
through sparse layers to the layers before them. The packed weight is frozen:
no gradient for its arrays (``values`` that require grad are refused). The
gradient of ``x`` is the transposed product ``dy . W``, computed on the densified
weight (as a dense layer's backward costs, not less).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import dense_from_blocks
from . import epilogue

__all__ = ["linear_bsr", "conv2d_bsr", "linear_bsr_torch", "conv2d_bsr_torch", "conv_out_size"]

_LINEAR_ARGS = 10  # the ops' argument counts (one gradient slot each)
_CONV_ARGS = 15


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


# --------------------------------------------------------------------------- autograd
def _frozen_weight(values: Tensor) -> None:
    if values.requires_grad:
        raise ValueError("sparsert's sparse ops keep the packed weight frozen: its values get no gradient "
                         "(values.requires_grad is True). Train the dense layer (with sparsert.prune's masks) "
                         "and pack it again, or detach the values.")


def _linear_setup_context(ctx, inputs, output):
    x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation, num_threads = inputs
    _frozen_weight(values)
    ctx.save_for_backward(x, row_ptr, col_indices, values, bias, output)
    ctx.arguments = (out_features, block_rows, block_cols, activation, num_threads)


def _linear_backward(ctx, grad_y):
    x, row_ptr, col_indices, values, bias, y = ctx.saved_tensors
    out_features, block_rows, block_cols, activation, num_threads = ctx.arguments
    grad = epilogue.grad_before(activation, grad_y, y, lambda: linear_bsr(
        x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, 0, num_threads))
    grads = [None] * _LINEAR_ARGS
    if ctx.needs_input_grad[0]:
        w = dense_from_blocks(row_ptr, col_indices, values, out_features, x.shape[-1], block_rows, block_cols)
        grads[0] = grad @ w.to(grad.dtype)  # (..., out) @ (out, in)
    if bias is not None and ctx.needs_input_grad[7]:
        grads[7] = grad.reshape(-1, out_features).sum(0).to(bias.dtype)
    return tuple(grads)


def _conv2d_setup_context(ctx, inputs, output):
    (x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias, stride, padding,
     dilation, groups, activation, num_threads) = inputs
    _frozen_weight(values)
    ctx.save_for_backward(x, row_ptr, col_indices, values, bias, output)
    ctx.arguments = (out_channels, list(kernel_size), block_rows, block_cols, list(stride), list(padding),
                     list(dilation), groups, activation, num_threads)


def _conv2d_backward(ctx, grad_y):
    x, row_ptr, col_indices, values, bias, y = ctx.saved_tensors
    (out_channels, kernel_size, block_rows, block_cols, stride, padding, dilation, groups, activation,
     num_threads) = ctx.arguments
    grad = epilogue.grad_before(activation, grad_y, y, lambda: conv2d_bsr(
        x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias, stride,
        padding, dilation, groups, 0, num_threads))
    grads = [None] * _CONV_ARGS
    want_x = ctx.needs_input_grad[0]
    want_bias = bias is not None and ctx.needs_input_grad[8]
    if want_x or want_bias:
        kh, kw = kernel_size
        cols = x.shape[1] // groups * kh * kw
        w = dense_from_blocks(row_ptr, col_indices, values, out_channels, cols, block_rows, block_cols)
        w = w.reshape(out_channels, cols // (kh * kw), kh, kw).to(grad.dtype)
        # torch's own convolution backward (a transposed convolution), for x and bias only
        grad_x, _, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, w, [out_channels], stride, padding, dilation, False, [0, 0], groups,
            [want_x, False, want_bias])
        grads[0] = grad_x
        if want_bias:
            grads[8] = grad_bias.to(bias.dtype)
    return tuple(grads)


linear_bsr.register_autograd(_linear_backward, setup_context=_linear_setup_context)
conv2d_bsr.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)

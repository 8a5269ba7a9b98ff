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
from ..formats._common import decode_indices
from ..formats.bitmask import dense_from_bitmask
from ..formats.rowgroup import dense_from_rowgroup
from . import epilogue

__all__ = ["linear_bsr", "conv2d_bsr", "linear_bitmask", "linear_bsr_torch", "conv2d_bsr_torch",
           "linear_bitmask_torch", "linear_rowgroup", "linear_rowgroup_torch", "conv_out_size", "check_linear_args", "check_conv_args", "check_array_contents"]

_INT32_MAX = (1 << 31) - 1

_LINEAR_ARGS = 10  # the ops' argument counts (one gradient slot each)
_CONV_ARGS = 15


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output side of a convolution (as ``F.conv2d`` computes it)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# --------------------------------------------------------------------------- argument checks
# Every backend (and the fakes) runs these on the op's scalar arguments, so a
# raw ``torch.ops.sparsert.*`` call with a bad one is a one-line ValueError or
# TypeError naming the argument, never a KeyError, a ZeroDivisionError or a
# pybind overload message from deep inside.
def _int(op: str, name: str, v, lo: int, hi: int = _INT32_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{op}: {name} must lie in [{lo}, {hi}], got {v}")
    return v


def _pair(op: str, name: str, v, lo: int) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{op}: {name} must be a list of two ints, got {v!r}")
    return _int(op, f"{name}[0]", v[0], lo), _int(op, f"{name}[1]", v[1], lo)


def _tensor(op: str, name: str, t, min_dim: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def _activation(op: str, activation) -> None:
    if isinstance(activation, bool) or not isinstance(activation, int):
        raise TypeError(f"{op}: activation must be an int epilogue code, got {type(activation).__name__}")
    try:
        epilogue.name_of(activation)
    except ValueError as e:
        raise ValueError(f"{op}: activation: {e}") from None


def check_linear_args(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation,
                      num_threads) -> None:
    """The scalar and tensor-kind arguments of ``linear_bsr`` (O(1); contents: :func:`check_array_contents`)."""
    op = "sparsert::linear_bsr"
    _tensor(op, "x", x, 1)
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        _tensor(op, name, t)
    if bias is not None:
        _tensor(op, "bias", bias)
    _int(op, "out_features", out_features, 0)
    _int(op, "block_rows", block_rows, 1)
    _int(op, "block_cols", block_cols, 1)
    _activation(op, activation)
    _int(op, "num_threads", num_threads, 0)


def check_conv_args(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias,
                    stride, padding, dilation, groups, activation, num_threads) -> None:
    """The scalar and tensor-kind arguments of ``conv2d_bsr``, and that the output size
    is computable (stride >= 1) and addressable (32-bit sides)."""
    op = "sparsert::conv2d_bsr"
    _tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        _tensor(op, name, t)
    if bias is not None:
        _tensor(op, "bias", bias)
    _int(op, "out_channels", out_channels, 0)
    ks = _pair(op, "kernel_size", kernel_size, 1)
    _int(op, "block_rows", block_rows, 1)
    _int(op, "block_cols", block_cols, 1)
    st = _pair(op, "stride", stride, 1)
    pad = _pair(op, "padding", padding, 0)
    dil = _pair(op, "dilation", dilation, 1)
    groups = _int(op, "groups", groups, 1)
    _activation(op, activation)
    _int(op, "num_threads", num_threads, 0)
    if not isinstance(x.shape[1], int):
        return  # symbolic shapes (tracing): the sizes are checked when the op runs
    if x.shape[1] % groups:
        raise ValueError(f"{op}: groups={groups} does not divide the {x.shape[1]} input channels")
    for side, k, s_, p, d in zip(x.shape[2:], ks, st, pad, dil):
        if side + 2 * p > _INT32_MAX or d * (k - 1) + 1 > _INT32_MAX:
            raise ValueError(f"{op}: padding {list(pad)} / dilation {list(dil)} make the padded input or "
                             f"the dilated kernel larger than {_INT32_MAX}")
        if conv_out_size(side, k, s_, p, d) < 0:
            raise ValueError(f"{op}: input {tuple(x.shape[2:])} is smaller than the dilated kernel {ks}")


def check_array_contents(row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                         in_features: int, block_rows: int, block_cols: int) -> None:
    """The O(nnz) check that keeps a kernel inside x and the weight (any device):
    ``row_ptr`` has one entry per block row plus one, starts at 0 and never
    decreases, its last entry matches ``col_indices`` and ``values``, and every
    column index names a block column of the ``out_features x in_features``
    matrix. Backends run it once per weight, on the private copies their
    kernels read."""
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
    check_linear_args(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation,
                      num_threads)
    if not values.is_floating_point():
        raise ValueError(f"sparsert::linear_bsr: values must be floating point, got {values.dtype}")
    check_array_contents(row_ptr, col_indices, values, out_features, x.shape[-1], block_rows, block_cols)
    return linear_bsr_torch(x, row_ptr, col_indices, values, out_features, block_rows, block_cols,
                            bias, activation)


@linear_bsr.register_fake
def _linear_bsr_fake(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                     activation, num_threads):
    # bad arguments fail while tracing, as they do when run
    check_linear_args(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation,
                      num_threads)
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


def linear_rowgroup_torch(x: Tensor, seg_ptr: Tensor, columns: Tensor, values: Tensor, out_features: int,
                          bias: Optional[Tensor], activation: int) -> Tensor:
    """Pure-torch act(x @ W.T + bias) for a row-group W: the op's default off the CPU kernel."""
    w = dense_from_rowgroup(seg_ptr, columns, values, out_features, x.shape[-1])
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return epilogue.reference(y, activation)


@torch.library.custom_op("sparsert::linear_rowgroup", mutates_args=())
def linear_rowgroup(x: Tensor, seg_ptr: Tensor, columns: Tensor, values: Tensor, out_features: int,
                    bias: Optional[Tensor], activation: int, num_threads: int) -> Tensor:
    """act(x @ W.T + bias) for W given as row-group arrays (``RowGroup.kernel_arrays()``: int32
    segment offsets per 4-row group and pattern, int32 columns, float32 values)."""
    return linear_rowgroup_torch(x, seg_ptr, columns, values, out_features, bias, activation)


@linear_rowgroup.register_fake
def _linear_rowgroup_fake(x, seg_ptr, columns, values, out_features, bias, activation, num_threads):
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
    check_conv_args(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias,
                    stride, padding, dilation, groups, activation, num_threads)
    if not values.is_floating_point():
        raise ValueError(f"sparsert::conv2d_bsr: values must be floating point, got {values.dtype}")
    check_array_contents(row_ptr, col_indices, values, out_channels,
                         x.shape[1] // groups * kernel_size[0] * kernel_size[1], block_rows, block_cols)
    return conv2d_bsr_torch(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                            block_cols, bias, stride, padding, dilation, groups, activation)


@conv2d_bsr.register_fake
def _conv2d_bsr_fake(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                     bias, stride, padding, dilation, groups, activation, num_threads):
    check_conv_args(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias,
                    stride, padding, dilation, groups, activation, num_threads)
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

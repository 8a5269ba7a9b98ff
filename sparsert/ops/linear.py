"""``sparsert::linear_bsr``: the torch.library op behind :func:`sparsert.ops.linear`.

One op serves every format: CSR and N:M are 1x1-block BSR to the kernels.
It has a fake (meta) implementation so ``torch.compile`` and
``torch.export`` trace through it, a native CPU implementation, and a
pure-torch default for every other device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import native
from ._checks import check_weight_arrays
from ._threads import get_num_threads

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "gelu": 2}
_KERNEL_ACTIVATION = {0: 0, 1: 1, 2: 0}  # gelu is applied after the kernel


def activation_code(activation) -> int:
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of None, 'relu', 'gelu'; got {activation!r}") from None


def _apply_activation(y: Tensor, activation: int) -> Tensor:
    if activation == 1:
        return torch.relu(y)
    if activation == 2:
        return F.gelu(y)
    return y


def _dense_weight(row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                  in_features: int, block_rows: int, block_cols: int) -> Tensor:
    from ..formats._common import decode_indices
    r, c = block_rows, block_cols
    nbr, nbc = -(-out_features // r), -(-in_features // c)
    grid = values.new_zeros(nbr, nbc, r, c)
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    block_row = torch.repeat_interleave(torch.arange(nbr, device=row_ptr.device), counts)
    grid.index_put_((block_row, decode_indices(col_indices)), values.reshape(-1, r, c), accumulate=True)
    return grid.permute(0, 2, 1, 3).reshape(nbr * r, nbc * c)[:out_features, :in_features]


def linear_bsr_torch(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                     block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int) -> Tensor:
    """Pure-torch act(x @ W.T + bias): the op's default on devices without a native kernel."""
    w = _dense_weight(row_ptr, col_indices, values, out_features, x.shape[-1], block_rows, block_cols)
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return _apply_activation(y, activation)


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
    return x.new_empty((*x.shape[:-1], out_features))


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
                  y.data_ptr(), out_features, float32_bias(bias, out_features), _KERNEL_ACTIVATION[activation],
                  num_threads if num_threads > 0 else get_num_threads(), kernel)
    if activation == 2:
        y = F.gelu(y)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@linear_bsr.register_kernel("cpu")
def _linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                    activation, num_threads):
    return linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                          activation, num_threads)

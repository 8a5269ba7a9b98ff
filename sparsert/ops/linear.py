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


_INDEX_BITS = {torch.int16: 16, torch.int32: 32}


def _check_arrays(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias):
    """O(1) checks that keep a kernel inside its buffers. Index *contents* were
    validated when the format was built (sparsert.formats); ops trust them."""
    if row_ptr.dtype != torch.int32 or not row_ptr.is_contiguous():
        raise ValueError("row_ptr must be a contiguous int32 tensor (build weights with sparsert.formats)")
    if col_indices.dtype not in _INDEX_BITS or not col_indices.is_contiguous():
        raise ValueError("col_indices must be a contiguous int16 or int32 tensor")
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("values must be a contiguous float32 tensor")
    nbr = -(-out_features // block_rows)
    if row_ptr.numel() != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected {nbr + 1}")
    nnz = int(row_ptr[-1])
    if col_indices.numel() != nnz or values.numel() != nnz * block_rows * block_cols:
        raise ValueError("col_indices/values sizes do not match row_ptr[-1]")
    if bias is not None and (bias.shape != (out_features,)):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def linear_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                   block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int,
                   num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks).

    Kept lean: it runs once per layer per call. Dtypes and layouts are
    checked here, sizes and row pointers in C++; index contents were
    validated when the format was built.
    """
    if row_ptr.dtype != torch.int32 or values.dtype != torch.float32 or col_indices.dtype not in _INDEX_BITS:
        raise ValueError("row_ptr must be int32, col_indices int16/int32 and values float32 "
                         "(build weights with sparsert.formats)")
    if not (row_ptr.is_contiguous() and col_indices.is_contiguous() and values.is_contiguous()):
        raise ValueError("row_ptr, col_indices and values must be contiguous")
    in_features = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), in_features)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    bias_address = 0
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != torch.float32 or not bias.is_contiguous():
            bias = bias.detach().to(torch.float32).contiguous()
        bias_address = bias.data_ptr()
    native().spmm(out_features, in_features, block_rows, block_cols, row_ptr.data_ptr(), row_ptr.numel(),
                  col_indices.data_ptr(), col_indices.numel(), _INDEX_BITS[col_indices.dtype],
                  values.data_ptr(), values.numel(), x2.data_ptr(), tokens, x2.stride(0), y.data_ptr(),
                  out_features, bias_address, _KERNEL_ACTIVATION[activation],
                  num_threads if num_threads > 0 else get_num_threads(), kernel)
    if activation == 2:
        y = F.gelu(y)
    y = y.view(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@linear_bsr.register_kernel("cpu")
def _linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                    activation, num_threads):
    return linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                          activation, num_threads)

"""The native CPU path for a :class:`~sparsert.formats.bitmask.Bitmask` weight:
``act(x @ W.T + bias)``. The format validated its arrays when it was built;
here only x and bias are checked, per call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._ext import native
from .._threads import get_num_threads

_ACTIVATIONS = {None: 0, "none": 0, "relu": 1}


def linear_bitmask(x: Tensor, weight, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                   *, kernel: str = "", num_threads: int = 0) -> Tensor:
    """``act(x @ W.T + bias)`` with the bitmask kernels; ``kernel`` forces a
    registry entry (tests, benchmarks), ``""`` lets sparsert choose."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'none' or 'relu'; got {activation!r}")
    rows, cols = weight.shape
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {cols}")
    x2 = x.detach().to(torch.float32).reshape(-1, cols)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < cols):
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    if bias is not None:
        if bias.shape != (rows,):
            raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
        bias = bias.detach().to(torch.float32).contiguous()
    masks, row_offsets, values = weight.kernel_arrays()
    y = torch.empty(tokens, rows, dtype=torch.float32)
    native().spmm_bitmask(rows, cols, masks.data_ptr(), masks.numel(), row_offsets.data_ptr(),
                          row_offsets.numel(), values.data_ptr(), values.numel(), x2.data_ptr(), tokens,
                          x2.stride(0) if tokens else cols, y.data_ptr(), rows,
                          0 if bias is None else bias.data_ptr(), _ACTIVATIONS[activation],
                          num_threads if num_threads > 0 else get_num_threads(), kernel)
    y = y.reshape(*x.shape[:-1], rows) if x.dim() != 2 else y
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def bitmask_kernels() -> list[dict]:
    """Every bitmask kernel of this build (name, isa, kind, supported)."""
    return native().bitmask_kernels()

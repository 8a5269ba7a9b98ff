""":func:`linear`: ``act(F.linear(x, W, bias))`` for a packed sparse ``W``.

The public functions only: the op's schema, fake and pure-torch default are
in :mod:`sparsert.ops.schema`, the native kernels in :mod:`sparsert.ops.backends`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import SparseFormat
from . import epilogue
from .backends.cpu import eager_cpu_call, linear_bitmask_cpu, linear_bsr_cpu, linear_rowgroup_cpu

__all__ = ["linear", "linear_arrays", "linear_bitmask_arrays", "linear_rowgroup_arrays", "check_num_threads"]

_LINEAR_OP = torch.ops.sparsert.linear_bsr.default
_BITMASK_OP = torch.ops.sparsert.linear_bitmask.default
_ROWGROUP_OP = torch.ops.sparsert.linear_rowgroup.default


def check_num_threads(num_threads) -> int:
    """``None`` -> 0 (sparsert's default); a positive int as is; ValueError otherwise."""
    if num_threads is None:
        return 0
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    return num_threads


def linear(x: Tensor, w, bias: Optional[Tensor] = None, activation: Optional[str] = None,
           *, num_threads: Optional[int] = None) -> Tensor:
    """``act(F.linear(x, w, bias))`` for ``w`` a sparse format (CSR, BSR, N:M, bitmask16) or a dense tensor.

    ``x`` has shape ``(..., in_features)``; ``activation`` is an epilogue name
    (None, "relu", "gelu", "relu6": :mod:`sparsert.ops.epilogue`); ``num_threads``
    defaults to :func:`sparsert.ops.get_num_threads`.
    """
    code = epilogue.code_of(activation)
    threads = check_num_threads(num_threads)
    if isinstance(w, Tensor):
        return epilogue.reference(F.linear(x, w, bias), code)
    if not isinstance(w, SparseFormat):
        raise TypeError(f"w must be a torch.Tensor or a sparsert format (CSR, BSR, NM), got {type(w).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rows, cols = w.shape
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={cols}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    if w.LINEAR_OP == "bitmask":
        masks, row_offsets, values, _, _ = w.kernel_arrays()
        return linear_bitmask_arrays(x, masks, row_offsets, values, rows, bias, code, threads)
    if w.LINEAR_OP == "rowgroup":
        seg_ptr, columns, values, _, _ = w.kernel_arrays()
        return linear_rowgroup_arrays(x, seg_ptr, columns, values, rows, bias, code, threads)
    row_ptr, col_indices, values, r, c = w.kernel_arrays()
    return linear_arrays(x, row_ptr, col_indices, values, rows, r, c, bias, code, threads)


def linear_arrays(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                  block_rows: int, block_cols: int, bias: Optional[Tensor], code: int,
                  num_threads: int = 0) -> Tensor:
    """:func:`linear` over a weight's kernel arrays (``fmt.kernel_arrays()``) and an
    epilogue code, with no per-call argument checks: what layers that prepared
    their arrays once call (``sparsert.nn``). A plain eager CPU call runs the
    kernel directly; anything else (autograd, tracing, other devices) calls the op."""
    if eager_cpu_call(x, bias, values):
        return linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                              code, num_threads)
    return _LINEAR_OP(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, code,
                      num_threads)


def linear_bitmask_arrays(x: Tensor, masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                          bias: Optional[Tensor], code: int, num_threads: int = 0) -> Tensor:
    """:func:`linear_arrays` for a bitmask weight (``Bitmask.kernel_arrays()[:3]``)."""
    if eager_cpu_call(x, bias, values):
        return linear_bitmask_cpu(x, masks, row_offsets, values, out_features, bias, code, num_threads)
    return _BITMASK_OP(x, masks, row_offsets, values, out_features, bias, code, num_threads)


def linear_rowgroup_arrays(x: Tensor, seg_ptr: Tensor, columns: Tensor, values: Tensor, out_features: int,
                           bias: Optional[Tensor], code: int, num_threads: int = 0) -> Tensor:
    """:func:`linear_arrays` for a row-group weight (``RowGroup.kernel_arrays()[:3]``)."""
    if eager_cpu_call(x, bias, values):
        return linear_rowgroup_cpu(x, seg_ptr, columns, values, out_features, bias, code, num_threads)
    return _ROWGROUP_OP(x, seg_ptr, columns, values, out_features, bias, code, num_threads)

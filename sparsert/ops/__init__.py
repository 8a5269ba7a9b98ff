"""Sparse ops as torch.library custom ops (``torch.ops.sparsert.*``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import SparseFormat
from ._eager import eager_cpu_call
from ._threads import get_num_threads, num_threads, set_num_threads, set_threading_backend, threading_backend
from .linear import ACTIVATIONS, _apply_activation, activation_code, linear_bsr, linear_bsr_cpu
if torch.cuda.is_available():  # CUDA kernels for the same ops; sparsert._C_cuda loads at the first call
    from . import cuda as _cuda  # noqa: F401
from .conv import ConvWeight, conv2d

__all__ = [
    "linear", "conv2d", "ConvWeight", "get_num_threads", "set_num_threads", "num_threads",
    "threading_backend", "set_threading_backend",
]


def linear(x: Tensor, w, bias: Optional[Tensor] = None, activation: Optional[str] = None,
           *, num_threads: Optional[int] = None) -> Tensor:
    """``act(F.linear(x, w, bias))`` for ``w`` a sparse format (CSR, BSR, N:M) or a dense tensor.

    ``x`` has shape ``(..., in_features)``; ``activation`` is None, "relu" or
    "gelu"; ``num_threads`` defaults to :func:`get_num_threads`.
    """
    code = activation_code(activation)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    if isinstance(w, Tensor):
        return _apply_activation(F.linear(x, w, bias), code)
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
    row_ptr, col_indices, values, r, c = w.kernel_arrays()
    if eager_cpu_call(x, bias, values):
        # Plain eager call on CPU: skip the torch.library dispatcher, whose
        # Python layers cost several times the kernel for small layers.
        return linear_bsr_cpu(x, row_ptr, col_indices, values, rows, r, c, bias, code, num_threads or 0)
    return linear_bsr(x, row_ptr, col_indices, values, rows, r, c, bias, code, num_threads or 0)


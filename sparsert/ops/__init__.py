"""Sparse ops as torch.library custom ops (``torch.ops.sparsert.*``).

* :mod:`~sparsert.ops.epilogue` — the fused epilogues (activation name -> op code);
* :mod:`~sparsert.ops.schema` — the op schemas, fakes and pure-torch defaults;
* :mod:`~sparsert.ops.backends` — the native kernels: ``cpu`` (always), ``cuda``
  (registered when torch sees a GPU; ``sparsert._C_cuda`` loads at the first call);
* :mod:`~sparsert.ops.linear`, :mod:`~sparsert.ops.conv` — the public functions;
* :mod:`~sparsert.ops.attention` — an encoder layer's multi-head attention (``sparsert.streamline``).
"""

from __future__ import annotations

import torch

from . import epilogue, schema  # noqa: F401  (registers torch.ops.sparsert.*)
from .backends import cpu as _cpu  # noqa: F401  (registers the CPU kernels)
from ._threads import get_num_threads, num_threads, set_num_threads, set_threading_backend, threading_backend
from .linear import linear, linear_arrays, linear_bitmask_arrays, linear_rowgroup_arrays
from .conv import ConvWeight, conv2d, conv2d_arrays
from .quantized import linear_q8_arrays  # (registers torch.ops.sparsert.linear_q8bsr)
from .attention import attention  # (registers torch.ops.sparsert.attention)

if torch.cuda.is_available():
    from .backends import cuda as _cuda  # noqa: F401  (registers the CUDA kernels)

__all__ = [
    "linear", "conv2d", "attention", "ConvWeight", "linear_arrays", "linear_bitmask_arrays", "linear_rowgroup_arrays", "linear_q8_arrays", "conv2d_arrays", "get_num_threads", "set_num_threads",
    "num_threads", "threading_backend", "set_threading_backend", "cpu_available", "cpu_kernels", "cpu_conv_kernels",
    "cpu_isa",
]


def cpu_available() -> bool:
    """True when the native CPU kernels (``sparsert._C``) are built and load."""
    return _cpu.available()


def cpu_kernels() -> list:
    """Every native CPU SpMM kernel of this build (dicts: name, kind, isa, block, supported, ...)."""
    return _cpu.kernels()


def cpu_conv_kernels() -> list:
    """Every native CPU convolution kernel of this build."""
    return _cpu.conv_kernels()


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here ("avx512", "avx2", "scalar")."""
    return _cpu.best_isa()

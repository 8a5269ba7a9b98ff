"""Inference modules that hold a packed sparse weight and call :mod:`sparsert.ops`.

``SparseLinear`` and ``SparseConv2d`` are drop-in replacements for
``nn.Linear`` / ``nn.Conv2d`` whose weight is a sparsert format (CSR, BSR,
N:M, bitmask16) or a dense tensor. Build them with ``from_dense`` and go back
with ``to_dense``; :func:`sparsert.sparsify` swaps them into whole models.
``DenseLinear`` is an ``nn.Linear`` run through the best dense path (oneDNN
prepacked), for the layers ``sparsify`` leaves dense; ``Int8DenseLinear`` the same for
``precision="int8"`` (torch's dynamic int8 Linear).
"""

from .modules import DenseLinear, Int8DenseLinear, SparseConv2d, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "DenseLinear", "Int8DenseLinear"]

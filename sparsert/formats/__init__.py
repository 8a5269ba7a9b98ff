"""Packed sparse weight formats: CSR, BSR (R x C blocks) and N:M.

All are built from a dense (pruned) weight with ``from_dense`` or, for CSR
and BSR, from raw arrays with ``from_arrays`` (every invariant validated).
"""

from .base import SparseFormat
from .bsr import BSR, CSR
from .nm import NM

__all__ = ["SparseFormat", "CSR", "BSR", "NM"]

"""Compressed sparse rows (CSR), kind ``"csr"``: to the kernels, BSR of 1x1 blocks."""

from __future__ import annotations

import torch

from . import _common as c
from .base import INDEX, ROW_PTR, VALUES, SparseFormat


class CSR(SparseFormat):
    """Compressed sparse rows: ``row_ptr`` (int32, rows + 1), ``col_indices``
    (int16 holding uint16 when cols <= 65536, else int32) and ``values``
    (float32), the layout of ``torch.Tensor.to_sparse_csr``."""

    kind = "csr"
    family = "csr"
    KIND_PATTERN = "csr"
    KIND_HELP = "'csr'"
    ARRAYS = {"row_ptr": ROW_PTR, "col_indices": INDEX, "values": VALUES}

    def __init__(self, row_ptr, col_indices, values, shape, *, check_finite=True, _validated=False):
        super().__init__(c.check_shape(shape))
        if not _validated:
            rows, cols = self.shape
            c.check_values("values", values, ndim=1, check_finite=check_finite)
            c.check_tensor("col_indices", col_indices, ndim=1, kinds="int")
            if col_indices.numel() != values.numel():
                raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {values.numel()}")
            row_ptr = c.check_row_ptr(row_ptr, rows, values.numel())
            col_indices = c.check_indices("col_indices", col_indices, cols)
            values = c.as_kernel_values(values)
        self.row_ptr, self.col_indices, self.values = row_ptr, col_indices, values

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "CSR":
        """Packs the nonzeros of ``w``."""
        w = c.check_dense(w).detach()
        rows, cols = w.shape
        keep = w != 0
        row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
        if rows:
            torch.cumsum(keep.sum(1, dtype=torch.int64), 0, out=row_ptr[1:])
        _, col = torch.nonzero(keep, as_tuple=True)
        return cls(row_ptr, c.encode_indices(col, cols), c.as_kernel_values(w[keep]), (rows, cols),
                   _validated=True)

    @classmethod
    def from_arrays(cls, row_ptr, col_indices, values, shape, *, check_finite=True) -> "CSR":
        """Builds from raw arrays, validating every invariant (ValueError if broken)."""
        return cls(row_ptr, col_indices, values, shape, check_finite=check_finite)

    @classmethod
    def kind_name(cls) -> str:
        return "csr"

    @classmethod
    def pack(cls, w, params=()) -> "CSR":
        return cls.from_dense(w)

    @classmethod
    def from_saved(cls, arrays, shape, params=()) -> "CSR":
        return cls.from_arrays(arrays["row_ptr"], arrays["col_indices"], arrays["values"], shape,
                               check_finite=False)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def tensors(self):
        return {"row_ptr": self.row_ptr, "col_indices": self.col_indices, "values": self.values}

    def kernel_arrays(self):
        return self.row_ptr, self.col_indices, self.values, 1, 1

    def to(self, device, dtype=None) -> "CSR":
        """Moves the arrays to ``device``; ``dtype`` (e.g. torch.bfloat16 for the GPU
        kernels) converts the values, indices are kept."""
        dtype = c.check_value_dtype(dtype)
        return CSR(self.row_ptr.to(device), self.col_indices.to(device), self.values.to(device, dtype=dtype),
                   self.shape, _validated=True)

"""N:M semi-structured sparsity (kinds ``"nmN:M"``): at most N nonzeros in every M consecutive inputs."""

from __future__ import annotations

import torch

from . import _common as c
from .base import INDEX, VALUES, SparseFormat


class NM(SparseFormat):
    """Every row keeps exactly ``n`` slots per group of ``m`` columns.

    Arrays: ``values`` (float32, ``(rows, groups * n)``) and ``col_indices``
    (absolute column of each slot, same shape, int16-as-uint16 or int32).
    Groups with fewer than ``n`` nonzeros hold explicit zeros. Because every
    row has the same length, the kernels see it as CSR with a regular row
    pointer (perfect load balance across threads).
    """

    family = "nm"
    KIND_PATTERN = r"nm(\d+):(\d+)"
    KIND_HELP = "'nmN:M' (e.g. 'nm2:4')"
    ARRAYS = {"values": VALUES, "col_indices": INDEX}

    def __init__(self, values, col_indices, shape, n, m):
        super().__init__(c.check_shape(shape))
        self.n, self.m = int(n), int(m)
        self.values, self.col_indices = values, col_indices
        rows, width = values.shape
        self._row_ptr = (torch.arange(rows + 1, dtype=torch.int64, device=values.device) * width).to(torch.int32)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.kind_name(self.n, self.m)

    @classmethod
    def kind_name(cls, n, m) -> str:
        return f"nm{int(n)}:{int(m)}"

    @classmethod
    def pack(cls, w, params) -> "NM":
        return cls.from_dense(w, *params)

    @classmethod
    def from_saved(cls, arrays, shape, params) -> "NM":
        return cls.from_arrays(arrays["values"], arrays["col_indices"], shape, *params, check_finite=False)

    @classmethod
    def saved_params(cls, params) -> dict:
        return {"n": int(params[0]), "m": int(params[1])}

    def derived_tensors(self) -> dict:
        # the regular row pointer the kernels take (every row holds groups * n slots)
        return {"kernel_row_ptr": self._row_ptr}

    def set_tensors(self, tensors: dict) -> None:
        self.values, self.col_indices = tensors["values"], tensors["col_indices"]
        self._row_ptr = tensors["kernel_row_ptr"]

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int = 2, m: int = 4) -> "NM":
        """Packs ``w``, which must already satisfy the N:M pattern (ValueError if not)."""
        w = c.check_dense(w).detach()
        n, m = int(n), int(m)
        if not 0 < n <= m:
            raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
        rows, cols = w.shape
        groups = -(-cols // m)
        padded = torch.nn.functional.pad(w, (0, groups * m - cols)).reshape(rows, groups, m)
        nonzero = padded != 0
        per_group = nonzero.sum(-1)
        if rows and groups and int(per_group.max()) > n:
            r, g = (int(v) for v in torch.nonzero(per_group > n)[0])
            raise ValueError(
                f"weight is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} hold "
                f"{int(per_group[r, g])} nonzeros (prune it to the {n}:{m} pattern first)")
        # Keep nonzeros first, in column order: sort key = (is zero, position).
        key = (~nonzero).to(torch.int64) * m + torch.arange(m)
        slot = torch.sort(key, dim=-1).indices[..., :n]                       # (rows, groups, n)
        values = torch.gather(padded, -1, slot)
        col = slot + (torch.arange(groups) * m)[None, :, None]
        # Padding slots past the last column hold zero; point them at a real
        # column so kernels never read outside x.
        col = torch.clamp(col, max=max(cols - 1, 0))
        return cls(c.as_kernel_values(values.reshape(rows, groups * n)),
                   c.encode_indices(col.reshape(rows, groups * n), cols).reshape(rows, groups * n),
                   (rows, cols), n, m)

    @classmethod
    def from_arrays(cls, values, col_indices, shape, n, m, *, check_finite=True) -> "NM":
        """Builds from raw arrays, validating every invariant (ValueError if broken).

        ``values`` and ``col_indices`` are ``(rows, groups * n)`` with
        ``groups = ceil(cols / m)``; slot ``k`` of a row belongs to group
        ``k // n`` and its column must lie in that group's columns
        ``[g*m, min(g*m + m, cols))``.
        """
        rows, cols = c.check_shape(shape)
        n_, m_ = c.as_int(n), c.as_int(m)
        if n_ is None or m_ is None:
            raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
        n, m = n_, m_
        if not 0 < n <= m <= c.INT32_MAX:
            raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
        c.check_values("values", values, ndim=2, check_finite=check_finite)
        c.check_tensor("col_indices", col_indices, ndim=2, kinds="int")
        groups = -(-cols // m)
        if tuple(values.shape) != (rows, groups * n):
            raise ValueError(f"values must have shape ({rows}, {groups * n}) for a {rows}x{cols} "
                             f"{n}:{m} matrix, got {tuple(values.shape)}")
        if tuple(col_indices.shape) != tuple(values.shape):
            raise ValueError(f"col_indices must have the shape of values {tuple(values.shape)}, "
                             f"got {tuple(col_indices.shape)}")
        if col_indices.numel():
            col = c.decode_indices(col_indices)                              # int16 holds uint16
            lo = (torch.arange(groups * n) // n) * m                         # first column of each slot's group
            hi = torch.clamp(lo + m, max=cols)
            bad = (col < lo) | (col >= hi)
            if bool(bad.any()):
                r, k = (int(v) for v in torch.nonzero(bad)[0])
                raise ValueError(f"col_indices[{r}, {k}] = {int(col[r, k])} lies outside its group's "
                                 f"columns [{int(lo[k])}, {int(hi[k])})")
        return cls(c.as_kernel_values(values),
                   c.encode_indices(c.decode_indices(col_indices).reshape(-1), cols).reshape(rows, groups * n),
                   (rows, cols), n, m)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def tensors(self):
        return {"values": self.values, "col_indices": self.col_indices}

    def kernel_arrays(self):
        cache = self.__dict__.get("_flat_views")
        if cache is None:
            cache = self.__dict__["_flat_views"] = c.IdentityCache()
        sources = (self.col_indices, self.values)
        flat = cache.lookup(sources) or cache.store(sources, tuple(t.reshape(-1) for t in sources))
        return self._row_ptr, flat[0], flat[1], 1, 1

    def to(self, device, dtype=None) -> "NM":
        """Moves the arrays to ``device``; ``dtype`` (e.g. torch.bfloat16 for the GPU
        kernels) converts the values, indices are kept."""
        dtype = c.check_value_dtype(dtype)
        return NM(self.values.to(device, dtype=dtype), self.col_indices.to(device), self.shape, self.n, self.m)

"""int8 block-sparse rows of 1x4 blocks (kind ``"q8bsr1x4"``): a pruned weight quantised
to symmetric int8 per output channel, for the int8 kernels (``precision="int8"``).

One block is 4 consecutive int8 weights of a row, one 32-bit lane of an int8 dot
product (AVX2 ``vpmaddubsw``/``vpmaddwd``, VNNI ``vpdpbusd``). The scale of row ``n``
is ``max |W[n, :]| / 127``; weights are ``round(W / scale)`` in ``[-127, 127]``
(no zero point). Activations are quantised by the kernels, per token (see
``csrc/spmm_int8/spmm_int8.h``).
"""

from __future__ import annotations

import torch

from . import _common as c
from .base import INDEX, ROW_PTR, VALUES, SparseFormat, dense_from_blocks

#: weights per block (columns); mirrors kInt8BlockCols in csrc/spmm_int8/spmm_int8.h
BLOCK_COLS = 4
#: the largest in_features whose int32 sums cannot overflow (kInt8MaxCols)
MAX_COLS = 132000
QMAX = 127


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 per-row scales) of a float weight: symmetric, round half to even.
    A row of zeros gets scale 0."""
    w = w.detach().to(torch.float32)
    amax = w.abs().amax(1) if w.shape[1] else torch.zeros(w.shape[0])
    scales = amax / QMAX
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
    q = torch.round(w * inv[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales.contiguous()


class Q8BSR(SparseFormat):
    """``rows x cols`` int8 weights in 1x4 blocks with per-row float32 scales.

    Arrays: ``row_ptr`` (int32, ``rows + 1``), ``col_indices`` (block-column index per
    block, int16 holding uint16 or int32), ``qblocks`` (int8, ``(nblocks, 4)``, values in
    ``[-127, 127]``, zero past the last column), ``scales`` (float32, ``rows``, finite,
    >= 0). The weight is ``qblocks * scales[row]``.
    """

    kind = "q8bsr1x4"
    family = "q8bsr"
    KIND_PATTERN = r"q8bsr1x4"
    KIND_HELP = "'q8bsr1x4' (int8, 1x4 blocks)"
    ARRAYS = {"row_ptr": ROW_PTR, "col_indices": INDEX, "qblocks": (torch.int8,), "scales": VALUES}
    LINEAR_OP = "q8bsr"

    def __init__(self, row_ptr, col_indices, qblocks, scales, shape, *, _validated=False):
        super().__init__(c.check_shape(shape))
        if not _validated:
            row_ptr, col_indices, qblocks, scales = self._validate(row_ptr, col_indices, qblocks, scales)
        self.row_ptr, self.col_indices, self.qblocks, self.scales = row_ptr, col_indices, qblocks, scales

    # -- building ------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Q8BSR":
        """Quantises ``w`` per row and stores every 1x4 block that holds a nonzero of ``w``
        (a kept block whose weights round to 0 stays stored)."""
        w = c.check_dense(w).detach().to(torch.float32)
        if w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains NaN or infinity")
        rows, cols = w.shape
        if cols > MAX_COLS:
            raise ValueError(f"in_features {cols} is too wide for int32 accumulation (at most {MAX_COLS})")
        q, scales = quantize_weight(w)
        nbc = -(-cols // BLOCK_COLS)
        grid = torch.nn.functional.pad(w, (0, nbc * BLOCK_COLS - cols)).reshape(rows, nbc, BLOCK_COLS)
        qgrid = torch.nn.functional.pad(q, (0, nbc * BLOCK_COLS - cols)).reshape(rows, nbc, BLOCK_COLS)
        keep = (grid != 0).any(-1)
        row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
        if rows:
            torch.cumsum(keep.sum(1, dtype=torch.int64), 0, out=row_ptr[1:])
        _, bcol = torch.nonzero(keep, as_tuple=True)
        return cls(row_ptr, c.encode_indices(bcol, nbc), qgrid[keep].contiguous(), scales, (rows, cols),
                   _validated=True)

    @classmethod
    def from_arrays(cls, row_ptr, col_indices, qblocks, scales, shape) -> "Q8BSR":
        """Builds from raw arrays, validating every invariant (ValueError if broken)."""
        return cls(row_ptr, col_indices, qblocks, scales, shape)

    def _validate(self, row_ptr, col_indices, qblocks, scales):
        rows, cols = self.shape
        if cols > MAX_COLS:
            raise ValueError(f"in_features {cols} is too wide for int32 accumulation (at most {MAX_COLS})")
        nbc = -(-cols // BLOCK_COLS)
        c.check_tensor("qblocks", qblocks, ndim=2, kinds="int")
        if qblocks.dtype != torch.int8 or qblocks.shape[1] != BLOCK_COLS:
            raise ValueError(f"qblocks must be int8 of shape (nblocks, {BLOCK_COLS}), got {qblocks.dtype} "
                             f"{tuple(qblocks.shape)}")
        if qblocks.numel() and int(qblocks.min()) < -QMAX:
            raise ValueError(f"qblocks must lie in [-{QMAX}, {QMAX}] (symmetric int8), found -128")
        nblocks = qblocks.shape[0]
        c.check_tensor("col_indices", col_indices, ndim=1, kinds="int")
        if col_indices.numel() != nblocks:
            raise ValueError(f"col_indices has {col_indices.numel()} entries but qblocks has {nblocks}")
        row_ptr = c.check_row_ptr(row_ptr, rows, nblocks)
        col_indices = c.check_indices("col_indices", col_indices, nbc)
        if cols % BLOCK_COLS and nblocks:
            last = c.decode_indices(col_indices) == nbc - 1
            if bool((qblocks[last][:, cols % BLOCK_COLS:] != 0).any()):
                raise ValueError("qblocks hold nonzeros past the last column (in the padding of edge blocks)")
        c.check_values("scales", scales, ndim=1, check_finite=True)
        if scales.numel() != rows:
            raise ValueError(f"scales must have one entry per row ({rows}), got {scales.numel()}")
        if scales.numel() and bool((scales < 0).any()):
            raise ValueError("scales must be non-negative")
        return row_ptr, col_indices, qblocks.contiguous(), scales.detach().to(torch.float32).contiguous()

    # -- the registry interface -----------------------------------------------
    @classmethod
    def kind_name(cls) -> str:
        return "q8bsr1x4"

    @classmethod
    def pack(cls, w, params=()) -> "Q8BSR":
        return cls.from_dense(w)

    @classmethod
    def from_saved(cls, arrays, shape, params=()) -> "Q8BSR":
        return cls.from_arrays(arrays["row_ptr"], arrays["col_indices"], arrays["qblocks"], arrays["scales"], shape)

    # -- the format interface -------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.qblocks.numel()

    @property
    def precision(self) -> str:
        return "int8"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"row_ptr": self.row_ptr, "col_indices": self.col_indices, "qblocks": self.qblocks,
                "scales": self.scales}

    def kernel_arrays(self):
        """(row_ptr, col_indices, int8 qblocks, 1, 4); the scales are :attr:`scales`
        (:attr:`LINEAR_OP` ``"q8bsr"``: the int8 op takes both)."""
        return self.row_ptr, self.col_indices, self.qblocks, 1, BLOCK_COLS

    def to_dense(self) -> torch.Tensor:
        """The dequantised float32 weight ``qblocks * scales[row]``."""
        rows, cols = self.shape
        q = dense_from_blocks(self.row_ptr, self.col_indices, self.qblocks.to(torch.float32), rows, cols, 1,
                              BLOCK_COLS)
        return q * self.scales[:, None]

    def to(self, device, dtype=None) -> "Q8BSR":
        """Moves the arrays to ``device`` (weights stay int8, scales float32)."""
        return Q8BSR(self.row_ptr.to(device), self.col_indices.to(device), self.qblocks.to(device),
                     self.scales.to(device), self.shape, _validated=True)

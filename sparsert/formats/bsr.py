"""Block sparse row (BSR): R x C dense blocks on a grid (kinds ``"bsrRxC"``)."""

from __future__ import annotations

import torch

from . import _common as c
from .base import INDEX, ROW_PTR, VALUES, SparseFormat


def _parse_block(block) -> tuple[int, int]:
    if isinstance(block, str):
        try:
            r, col = (int(v) for v in block.lower().split("x"))
        except ValueError:
            raise ValueError(f"block must look like '4x1', got {block!r}") from None
    else:
        try:
            r, col = (c.as_int(v) for v in block)
        except (TypeError, ValueError):
            raise ValueError(f"block must be (rows, cols), got {block!r}") from None
        if r is None or col is None:
            raise ValueError(f"block must be two integers (rows, cols), got {block!r}")
    if r < 1 or col < 1 or r > c.INT32_MAX or col > c.INT32_MAX:
        raise ValueError(f"block dimensions must be positive 32-bit integers, got {(r, col)}")
    return r, col


def _blocks_of(w: torch.Tensor, r: int, col: int) -> torch.Tensor:
    """(block_rows, block_cols, r, col) view of w zero-padded to whole blocks."""
    rows, cols = w.shape
    nbr, nbc = -(-rows // r), -(-cols // col)
    padded = torch.nn.functional.pad(w, (0, nbc * col - cols, 0, nbr * r - rows))
    return padded.reshape(nbr, r, nbc, col).permute(0, 2, 1, 3)


class BSR(SparseFormat):
    """Block sparse rows of ``R x C`` blocks.

    Arrays (the layout of ``torch.Tensor.to_sparse_bsr``):
    ``row_ptr`` (int32, ``ceil(rows/R) + 1``), ``col_indices`` (block-column
    index per block: int16 holding uint16, or int32 for very wide matrices),
    ``blocks`` (float32, ``(nblocks, R, C)``). Matrices whose sides are not
    multiples of the block are padded with zeros inside the edge blocks.
    """

    family = "bsr"
    KIND_PATTERN = r"bsr(\d+)x(\d+)"
    KIND_HELP = "'bsrRxC' (e.g. 'bsr4x1')"
    ARRAYS = {"row_ptr": ROW_PTR, "col_indices": INDEX, "blocks": VALUES}

    def __init__(self, row_ptr, col_indices, blocks, shape, block, *, check_finite=True, _validated=False):
        super().__init__(c.check_shape(shape))
        self.block = _parse_block(block)
        if not _validated:
            row_ptr, col_indices, blocks = self._validate(row_ptr, col_indices, blocks, check_finite)
        self.row_ptr, self.col_indices, self.blocks = row_ptr, col_indices, blocks

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.kind_name(*self.block)

    @classmethod
    def kind_name(cls, r, col) -> str:
        return f"bsr{int(r)}x{int(col)}"

    @classmethod
    def pack(cls, w, params) -> "BSR":
        return cls.from_dense(w, params)

    @classmethod
    def from_saved(cls, arrays, shape, params) -> "BSR":
        return cls.from_arrays(arrays["row_ptr"], arrays["col_indices"], arrays["blocks"], shape, params,
                               check_finite=False)

    @classmethod
    def saved_params(cls, params) -> dict:
        return {"block": [int(params[0]), int(params[1])]}

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor, block=(4, 1)) -> "BSR":
        """Packs every block of ``w`` that holds a nonzero."""
        w = c.check_dense(w).detach()
        r, col = _parse_block(block)
        rows, cols = w.shape
        grid = _blocks_of(w, r, col)
        keep = (grid != 0).flatten(2).any(-1)  # (block_rows, block_cols)
        counts = keep.sum(1, dtype=torch.int64)
        row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int32)
        torch.cumsum(counts, 0, out=row_ptr[1:]) if keep.shape[0] else None
        _, bcol = torch.nonzero(keep, as_tuple=True)
        blocks = c.as_kernel_values(grid[keep])
        col_indices = c.encode_indices(bcol, keep.shape[1])
        return cls(row_ptr, col_indices, blocks, (rows, cols), (r, col), _validated=True)

    @classmethod
    def from_arrays(cls, row_ptr, col_indices, blocks, shape, block, *, check_finite=True) -> "BSR":
        """Builds from raw arrays, validating every invariant (ValueError if broken)."""
        return cls(row_ptr, col_indices, blocks, shape, block, check_finite=check_finite)

    def _validate(self, row_ptr, col_indices, blocks, check_finite):
        rows, cols = self.shape
        r, col = self.block
        nbr, nbc = -(-rows // r), -(-cols // col)
        c.check_values("blocks", blocks, ndim=3, check_finite=check_finite)
        if tuple(blocks.shape[1:]) != (r, col):
            raise ValueError(f"blocks must have shape (nblocks, {r}, {col}), got {tuple(blocks.shape)}")
        nblocks = blocks.shape[0]
        c.check_tensor("col_indices", col_indices, ndim=1, kinds="int")
        if col_indices.numel() != nblocks:
            raise ValueError(f"col_indices has {col_indices.numel()} entries but blocks has {nblocks}")
        row_ptr = c.check_row_ptr(row_ptr, nbr, nblocks)
        col_indices = c.check_indices("col_indices", col_indices, nbc)
        blocks = c.as_kernel_values(blocks)
        self._check_padding_zero(blocks, row_ptr, col_indices)
        return row_ptr, col_indices, blocks

    def _check_padding_zero(self, blocks, row_ptr, col_indices):
        """Entries of edge blocks that fall outside the matrix must be zero."""
        rows, cols = self.shape
        r, col = self.block
        if blocks.numel() == 0 or (rows % r == 0 and cols % col == 0):
            return
        counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
        block_row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        row_of = block_row[:, None] * r + torch.arange(r)[None, :]          # (nblocks, r)
        col_of = c.decode_indices(col_indices)[:, None] * col + torch.arange(col)[None, :]
        outside = (row_of >= rows)[:, :, None] | (col_of >= cols)[:, None, :]
        if bool((blocks[outside] != 0).any()):
            raise ValueError("blocks hold nonzeros outside the matrix (in the padding of edge blocks)")

    # -- interface ----------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.blocks.numel()

    @property
    def nblocks(self) -> int:
        return self.blocks.shape[0]

    def tensors(self):
        return {"row_ptr": self.row_ptr, "col_indices": self.col_indices, "blocks": self.blocks}

    def kernel_arrays(self):
        return self.row_ptr, self.col_indices, self.blocks, self.block[0], self.block[1]

    def to(self, device, dtype=None) -> "BSR":
        """Moves the arrays to ``device``; ``dtype`` (e.g. torch.bfloat16 for the GPU
        kernels) converts the blocks, indices are kept."""
        dtype = c.check_value_dtype(dtype)
        return BSR(self.row_ptr.to(device), self.col_indices.to(device), self.blocks.to(device, dtype=dtype),
                   self.shape, self.block, _validated=True)

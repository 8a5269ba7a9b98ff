"""Row-group format: groups of 4 rows whose columns are sorted by which rows they feed.

Built for many tokens at moderate sparsity (30-80% zeros). Each column with a
nonzero in any of a group's 4 rows has a *pattern* (bit ``r``: row ``4g + r``
is nonzero there); the group's columns are stored sorted by pattern, each
followed by the values of its pattern's rows. The kernel runs one branch-free
loop per pattern in which every x vector it loads feeds each row of the
pattern: at 50% density about 0.97 vector loads per multiply-add against CSR's
1.125-1.5, where every nonzero loads its own x. It pays from a few tokens up;
for 1-2 tokens its kernel is scalar (use csr or bitmask16 there).

``"rowgroup4k384"`` (:data:`KBLOCK`) stores the same segments per block of 384
columns: at many tokens (~64+) the kernel then reads x from L1 instead of L2
(5-40% faster on 768+ columns, measured on Zen 3); at 16 tokens and fewer
columns the unblocked ``"rowgroup4"`` is as fast or faster (longer segments).
"""

from __future__ import annotations

import torch

from . import _common as c
from .base import ROW_PTR, VALUES, SparseFormat

#: rows per group (mirrors kRowGroup in csrc/spmm_rowgroup/spmm_rowgroup.h)
GROUP_ROWS = 4
#: nonempty row patterns per group: segment ``g * 15 + pattern - 1``
PATTERNS = (1 << GROUP_ROWS) - 1
#: ``from_dense`` pads every segment of a pattern with this many rows to a multiple of
#: this many columns (zero values): the AVX2 kernel's accumulator sets for the pattern
#: (1 row: 4 sets, 2-3 rows: 2, 4 rows: 1; segment_sets in spmm_rowgroup.h), so its
#: unrolled loop never takes the remainder
SEGMENT_MULTIPLES = {1: 4, 2: 2, 3: 2, 4: 1}
#: ``from_dense``'s widest column block (K-block): a 16-token panel of x over this many
#: columns is 24 KB, in a 32 KB L1 (measured on Zen 3 at 128-512 tokens: 384 ~ 512 >= 256,
#: all 5-40% faster than one block on 768+ columns; 192 loses to short segments)
KBLOCK = 384

_ROW_BITS = 1 << torch.arange(GROUP_ROWS, dtype=torch.int64)


def pattern_counts() -> torch.Tensor:
    """Rows in each pattern 1..15 (popcount), int64 ``(15,)``."""
    return ((torch.arange(1, PATTERNS + 1)[:, None] & _ROW_BITS) != 0).sum(1)


def value_offsets(seg_ptr: torch.Tensor, rows: int) -> torch.Tensor:
    """The values stored before each unit (a group in one column block), int64
    ``(kblocks * ceil(rows / 4) + 1,)`` from 0: what the kernels would otherwise derive
    from ``seg_ptr`` on every call (``seg_ptr`` must be a valid layout's)."""
    counts = (seg_ptr[1:] - seg_ptr[:-1]).to(torch.int64).reshape(-1, PATTERNS)
    out = torch.zeros(counts.shape[0] + 1, dtype=torch.int64)
    torch.cumsum((counts * pattern_counts()).sum(1), 0, out=out[1:])
    return out


def kblock_count(seg_ptr_numel: int, rows: int) -> int:
    """Column blocks of a ``rows``-row layout whose ``seg_ptr`` has ``seg_ptr_numel`` entries
    (``kblocks * ceil(rows / 4) * 15 + 1``), or 0 when no count fits."""
    per_block = -(-rows // GROUP_ROWS) * PATTERNS
    if per_block == 0:
        return 1 if seg_ptr_numel == 1 else 0
    blocks, rest = divmod(seg_ptr_numel - 1, per_block)
    return blocks if blocks >= 1 and rest == 0 else 0


def segment_multiples() -> torch.Tensor:
    """The padding multiple of each pattern 1..15 (:data:`SEGMENT_MULTIPLES`), int64 ``(15,)``."""
    return torch.tensor([SEGMENT_MULTIPLES[int(n)] for n in pattern_counts()], dtype=torch.int64)


def segment_entries(seg_ptr: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, pattern) of every stored column, in storage order (segment
    ``(kb * groups + g) * 15 + pattern - 1``)."""
    groups = max(1, -(-rows // GROUP_ROWS))
    counts = (seg_ptr[1:] - seg_ptr[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                  output_size=int(seg_ptr[-1]) if seg_ptr.numel() else 0)
    return seg // PATTERNS % groups, seg % PATTERNS + 1


def dense_from_rowgroup(seg_ptr: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, rows: int,
                        cols: int) -> torch.Tensor:
    """The dense ``rows x cols`` matrix of row-group arrays: the format's and the pure-torch op's expansion."""
    groups = -(-rows // GROUP_ROWS)
    out = values.new_zeros(groups * GROUP_ROWS, cols)
    if columns.numel():
        group, pattern = segment_entries(seg_ptr.to(columns.device), rows)
        bits = (pattern[:, None] & _ROW_BITS.to(pattern.device)) != 0  # (entries, 4), rows of each column
        row = (group[:, None] * GROUP_ROWS + torch.arange(GROUP_ROWS, device=group.device))[bits]
        col = columns.to(torch.int64)[:, None].expand(-1, GROUP_ROWS)[bits]
        out.index_put_((row.to(values.device), col.to(values.device)), values[:row.numel()], accumulate=True)
    return out[:rows].contiguous()


class RowGroup(SparseFormat):
    """``rows x cols`` weights as 4-row groups with their columns sorted by row pattern.

    Arrays:

    - ``seg_ptr``: int32, ``kblocks * ceil(rows / 4) * 15 + 1`` non-decreasing offsets from 0:
      segment ``s = (kb * groups + g) * 15 + pattern - 1`` holds the columns of group ``g``
      in column block ``kb``, ``[seg_ptr[s], seg_ptr[s + 1])`` (kind ``"rowgroup4"``: one
      block; ``"rowgroup4k<N>"``: ``ceil(cols / N)`` equal blocks of at most N columns, so a
      kernel keeps one block's x rows in L1 while every group goes by).
    - ``columns``: int32 column indices (a column stored twice in a group adds up;
      ``from_dense`` pads each segment to a multiple of 4 columns with zero values).
    - ``values``: float32; per stored column, in order, the values of its pattern's
      rows (lowest row first).
    """

    family = "rowgroup"
    KIND_PATTERN = r"rowgroup4(?:k([1-9][0-9]*))?"
    KIND_HELP = "'rowgroup4' or 'rowgroup4k<columns>' (column blocks, e.g. 'rowgroup4k384')"
    ARRAYS = {"seg_ptr": ROW_PTR, "columns": (torch.int32,), "values": VALUES}
    LINEAR_OP = "rowgroup"

    def __init__(self, seg_ptr: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape,
                 kblock: int = 0):
        super().__init__(c.check_shape(shape))
        self.seg_ptr, self.columns, self.values = seg_ptr, columns, values
        #: the column-block width it was packed with (0: one block), what its kind names
        self.kblock = int(kblock)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.kind_name(*((self.kblock,) if self.kblock else ()))

    @property
    def kblocks(self) -> int:
        """Column blocks of the stored layout (1 when unblocked)."""
        return kblock_count(self.seg_ptr.numel(), self.shape[0])

    # -- building ------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor, kblock: int | None = None) -> "RowGroup":
        """Stores every nonzero of ``w`` (any sparsity; zeros are dropped), plus the zero
        padding of each segment, in ``ceil(cols / kblock)`` equal column blocks of at most
        ``kblock`` columns (0, the default: one block, kind ``"rowgroup4"``; many tokens
        run faster with :data:`KBLOCK`, kind ``"rowgroup4k384"``)."""
        kblock = 0 if kblock is None else int(kblock)
        if kblock < 0:
            raise ValueError(f"kblock must be >= 0, got {kblock}")
        w = c.check_dense(w).detach().to(torch.float32)
        if w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains NaN or infinity")
        rows, cols = w.shape
        groups = -(-rows // GROUP_ROWS)
        kblocks = max(1, -(-cols // kblock)) if kblock else 1
        width = -(-cols // kblocks) if cols else 1  # equal blocks: no short last block
        grouped = torch.nn.functional.pad(w, (0, 0, 0, groups * GROUP_ROWS - rows)).reshape(groups, GROUP_ROWS, cols)
        pattern = ((grouped != 0).to(torch.int64) * _ROW_BITS[:, None]).sum(1)  # (groups, cols)
        group, col = torch.nonzero(pattern, as_tuple=True)
        pat = pattern[group, col]
        units = kblocks * groups
        seg = ((col // width) * groups + group) * PATTERNS + pat - 1
        wvals = grouped[group, :, col]  # (entries, 4)
        # Each segment is padded to a multiple of its SEGMENT_MULTIPLES entries with zero values
        # at its last column: the kernel's unrolled loop then never takes its remainder
        # (an unpredictable branch per segment otherwise).
        counts = torch.bincount(seg, minlength=units * PATTERNS)
        pad = (-counts) % segment_multiples().repeat(units)
        pad_seg = torch.repeat_interleave(torch.arange(units * PATTERNS), pad)
        last_col = torch.zeros(units * PATTERNS, dtype=torch.int64)
        last_col.scatter_reduce_(0, seg, col, reduce="amax")
        seg = torch.cat([seg, pad_seg])
        col = torch.cat([col, last_col[pad_seg]])
        wvals = torch.cat([wvals, wvals.new_zeros(pad_seg.numel(), GROUP_ROWS)])
        order = torch.argsort(seg * max(cols, 1) + col, stable=True)
        seg, col, wvals = seg[order], col[order], wvals[order]
        seg_ptr = torch.zeros(units * PATTERNS + 1, dtype=torch.int64)
        torch.cumsum(counts + pad, 0, out=seg_ptr[1:])
        if int(seg_ptr[-1]) > c.INT32_MAX:
            raise ValueError(f"too many stored columns ({int(seg_ptr[-1])}); at most {c.INT32_MAX} are supported")
        bits = ((seg % PATTERNS + 1)[:, None] & _ROW_BITS) != 0
        return cls(seg_ptr.to(torch.int32), col.to(torch.int32).contiguous(), wvals[bits].contiguous(), (rows, cols),
                   kblock)

    @classmethod
    def from_arrays(cls, seg_ptr, columns, values, shape, *, kblock: int = 0,
                    check_finite: bool = True) -> "RowGroup":
        """Builds from raw arrays, validating every invariant (ValueError if broken).
        ``kblock`` only names the kind: the kernels take any number of column blocks
        (``seg_ptr``'s length says how many) and any columns in each."""
        rows, cols = c.check_shape(shape)
        c.check_tensor("seg_ptr", seg_ptr, ndim=1, kinds="int")
        c.check_tensor("columns", columns, ndim=1, kinds="int")
        c.check_values("values", values, ndim=1, check_finite=check_finite)
        check_rowgroup_layout(seg_ptr, columns, values.numel(), rows, cols)
        return cls(seg_ptr.to(torch.int32).contiguous(), columns.to(torch.int32).contiguous(),
                   c.as_kernel_values(values), (rows, cols), kblock)

    # -- the registry interface -----------------------------------------------
    @classmethod
    def parse_params(cls, kind: str):
        """``"rowgroup4"`` -> ``()`` (one column block); ``"rowgroup4k384"`` -> ``(384,)``."""
        match = cls._kind_re.fullmatch(kind)
        if match is None:
            return None
        return () if match.group(1) is None else (int(match.group(1)),)

    @classmethod
    def kind_name(cls, kblock: int = 0) -> str:
        return f"rowgroup4k{int(kblock)}" if kblock else "rowgroup4"

    @classmethod
    def pack(cls, w, params=()) -> "RowGroup":
        return cls.from_dense(w, kblock=params[0] if params else 0)

    @classmethod
    def from_saved(cls, arrays, shape, params=()) -> "RowGroup":
        """Also checks that the arrays hold the column blocks the kind names (files saved
        before column blocks are ``"rowgroup4"``: one block)."""
        kblock = params[0] if params else 0
        rows, cols = c.check_shape(shape)
        want = max(1, -(-cols // kblock)) if kblock else 1
        have = kblock_count(arrays["seg_ptr"].numel(), rows)
        if have and have != want:
            raise ValueError(f"seg_ptr holds {have} column block(s), but kind {cls.kind_name(kblock)!r} "
                             f"of {cols} columns means {want}")
        return cls.from_arrays(arrays["seg_ptr"], arrays["columns"], arrays["values"], shape, kblock=kblock,
                               check_finite=False)

    # -- the format interface -------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.values.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"seg_ptr": self.seg_ptr, "columns": self.columns, "values": self.values}

    def kernel_arrays(self):
        """(seg_ptr int32, columns int32, values float32, 4, 1) for the row-group kernels
        (:attr:`LINEAR_OP` ``"rowgroup"``: not block-sparse arrays)."""
        return self.seg_ptr, self.columns, self.values, GROUP_ROWS, 1

    def to(self, device, dtype=None) -> "RowGroup":
        """Moves the arrays to ``device``. Values stay float32 (the only dtype the kernels take)."""
        return RowGroup(self.seg_ptr.to(device), self.columns.to(device), self.values.to(device), self.shape,
                        self.kblock)

    def to_dense(self) -> torch.Tensor:
        return dense_from_rowgroup(self.seg_ptr, self.columns, self.values, *self.shape)


def check_rowgroup_layout(seg_ptr: torch.Tensor, columns: torch.Tensor, values_numel: int, rows: int,
                          cols: int) -> None:
    """ValueError unless (seg_ptr, columns) describe a valid ``rows x cols`` row-group
    matrix holding ``values_numel`` values (the format's and the kernels' one check)."""
    groups = -(-rows // GROUP_ROWS)
    if not kblock_count(seg_ptr.numel(), rows):
        raise ValueError(f"seg_ptr must have kblocks * {groups * PATTERNS} + 1 entries (kblocks >= 1 column "
                         f"blocks of ceil(rows / 4) * 15 segments) for {rows} rows, got {seg_ptr.numel()}")
    sp = seg_ptr.to(torch.int64)
    if int(sp[0]) != 0 or int(sp[-1]) != columns.numel():
        raise ValueError(f"seg_ptr must start at 0 and end at the number of columns ({columns.numel()})")
    counts = sp[1:] - sp[:-1]
    if bool((counts < 0).any()):
        raise ValueError("seg_ptr must be non-decreasing")
    if columns.numel():
        col = columns.to(torch.int64)
        if int(col.min()) < 0 or int(col.max()) >= cols:
            raise ValueError(f"columns must lie in [0, {cols})")
        group, pattern = segment_entries(sp, rows)
        tail = groups * GROUP_ROWS - rows
        if tail:
            past = (pattern[group == groups - 1] >> (GROUP_ROWS - tail)) != 0
            if bool(past.any()):
                raise ValueError(f"the last row group stores values for rows past the last row ({rows - 1})")
    expected = int(value_offsets(sp, rows)[-1])
    if values_numel != expected:
        raise ValueError(f"values must hold one entry per stored row and column ({expected}), got {values_numel}")

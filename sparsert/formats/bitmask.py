"""Bitmask format: a 16-bit mask per 16 columns of a row plus the packed nonzeros.

Built for moderate sparsity (30-80% zeros), where CSR spends more bytes on
column indices than on values: CSR reads 4 + 2 bytes per nonzero, the bitmask
4 per nonzero plus 2 per 16 weights (at 50%: 3 vs 2.125 bytes per weight), and
its kernels find columns from the mask bits instead of an index array.
"""

from __future__ import annotations

import torch

from . import _common as c
from .base import VALUES, SparseFormat

#: Columns per mask.
GROUP = 16
#: Floats kept readable after the last stored value: the AVX2 kernels load
#: whole 8-float vectors and discard the lanes past a group (mirrors
#: kBitmaskValuePadding in csrc/spmm/spmm_bitmask.h).
VALUE_PADDING = 16

_BITS = 1 << torch.arange(GROUP, dtype=torch.int32)


def masks_to_bits(masks: torch.Tensor) -> torch.Tensor:
    """(rows, groups) masks -> (rows, groups, 16) bool, bit j = column g*16 + j."""
    wide = masks.to(torch.int32) & 0xFFFF  # int16 holds uint16 bit patterns
    return (wide[..., None] & _BITS.to(wide.device)) != 0


def dense_from_bitmask(masks: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense ``rows x cols`` matrix of bitmask arrays (``values``: the stored ones, in
    order; extra padding after them is ignored): the format's and the pure-torch op's expansion."""
    groups = masks.shape[1] if masks.dim() == 2 else 0
    out = values.new_zeros(rows, groups, GROUP)
    if rows and groups:
        bits = masks_to_bits(masks.to(values.device))
        out[bits] = values[:int(bits.sum())]
    return out.reshape(rows, groups * GROUP)[:, :cols].contiguous()


class Bitmask(SparseFormat):
    """``rows x cols`` weights as per-row 16-column masks and packed values.

    Arrays:

    - ``masks``: ``(rows, ceil(cols / 16))`` int16 holding uint16 bit
      patterns; bit ``j`` of ``masks[n, g]`` says column ``g * 16 + j`` of row
      ``n`` is stored. Bits past the last column are zero.
    - ``values``: the stored values, float32, row by row and within a row in
      column order (``popcount(masks)`` of them).

    Values must be finite: the many-token kernel pads its loop with the
    value after a row's end times a zero, which only a finite value keeps
    zero (``from_arrays(check_finite=False)`` skips the check at that risk).

    Derived for the kernels: ``row_offsets`` (int64, ``rows + 1``: where each
    row's values start) and a copy of the values followed by
    ``VALUE_PADDING`` zeros.
    """

    kind = "bitmask16"
    family = "bitmask"
    KIND_PATTERN = "bitmask16"
    KIND_HELP = "'bitmask16'"
    ARRAYS = {"masks": (torch.int16,), "values": VALUES}
    LINEAR_OP = "bitmask"

    def __init__(self, masks: torch.Tensor, values: torch.Tensor, shape):
        super().__init__(c.check_shape(shape))
        rows, _ = self.shape
        self.masks = masks
        padded = torch.zeros(values.numel() + VALUE_PADDING, dtype=torch.float32, device=values.device)
        padded[:values.numel()] = values
        self._padded_values = padded
        self.values = padded[:values.numel()]
        counts = masks_to_bits(masks).sum((1, 2)) if rows else torch.zeros(0, dtype=torch.int64)
        self.row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]).contiguous()

    # -- building ------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Bitmask":
        """Stores every nonzero of ``w`` (any sparsity; zeros are dropped)."""
        w = c.check_dense(w).detach().to(torch.float32)
        if w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains NaN or infinity")  # the kernels need finite values
        rows, cols = w.shape
        groups = -(-cols // GROUP)
        padded = torch.nn.functional.pad(w, (0, groups * GROUP - cols)).reshape(rows, groups, GROUP)
        nonzero = padded != 0
        bits = (nonzero.to(torch.int32) * _BITS).sum(-1)
        masks = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).contiguous()
        return cls(masks, padded[nonzero].contiguous(), (rows, cols))

    @classmethod
    def from_arrays(cls, masks, values, shape, *, check_finite: bool = True) -> "Bitmask":
        """Builds from raw arrays, validating every invariant (ValueError if broken)."""
        rows, cols = c.check_shape(shape)
        c.check_tensor("masks", masks, ndim=2, kinds="int")
        c.check_values("values", values, ndim=1, check_finite=check_finite)
        groups = -(-cols // GROUP)
        if tuple(masks.shape) != (rows, groups):
            raise ValueError(f"masks must have shape ({rows}, {groups}) for a {rows}x{cols} matrix "
                             f"(one mask per {GROUP} columns), got {tuple(masks.shape)}")
        wide = masks.to(torch.int64)
        if masks.dtype != torch.int16 and masks.numel() and (int(wide.min()) < 0 or int(wide.max()) > 0xFFFF):
            raise ValueError("masks must hold 16-bit patterns (values in [0, 65535], or int16)")
        bits = masks_to_bits(masks)
        tail = groups * GROUP - cols
        if tail and rows and bool(bits[:, -1, GROUP - tail:].any()):
            r = int(torch.nonzero(bits[:, -1, GROUP - tail:].any(-1))[0, 0])
            raise ValueError(f"masks[{r}, {groups - 1}] has bits set past the last column ({cols - 1})")
        stored = int(bits.sum())
        if values.numel() != stored:
            raise ValueError(f"values must hold one entry per set mask bit ({stored}), got {values.numel()}")
        if stored > c.INT32_MAX:
            raise ValueError(f"too many stored entries ({stored}); at most {c.INT32_MAX} are supported")
        encoded = torch.where(wide >= 1 << 15, wide - (1 << 16), wide).to(torch.int16).contiguous()
        return cls(encoded, c.as_kernel_values(values), (rows, cols))

    # -- the registry interface -----------------------------------------------
    @classmethod
    def kind_name(cls) -> str:
        return "bitmask16"

    @classmethod
    def pack(cls, w, params=()) -> "Bitmask":
        return cls.from_dense(w)

    @classmethod
    def from_saved(cls, arrays, shape, params=()) -> "Bitmask":
        return cls.from_arrays(arrays["masks"], arrays["values"], shape, check_finite=False)

    # -- the format interface -------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.values.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"masks": self.masks, "values": self.values}

    def derived_tensors(self):
        return {"row_offsets": self.row_offsets, "padded_values": self._padded_values}

    def set_tensors(self, tensors: dict) -> None:
        self.masks, self.row_offsets = tensors["masks"], tensors["row_offsets"]
        self._padded_values = tensors["padded_values"]
        self.values = tensors["values"]

    def kernel_arrays(self):
        """(masks int16, row_offsets int64, values float32 with padding, 1, 16) for the
        bitmask kernels (:attr:`LINEAR_OP` ``"bitmask"``: not block-sparse arrays)."""
        return self.masks, self.row_offsets, self._padded_values, 1, GROUP

    def to(self, device, dtype=None) -> "Bitmask":
        """Moves the arrays to ``device``. Values stay float32 (the only dtype the bitmask
        kernels take; ``dtype`` is accepted for the formats' common signature)."""
        return Bitmask(self.masks.to(device), self.values.to(device), self.shape)

    def to_dense(self) -> torch.Tensor:
        return dense_from_bitmask(self.masks, self.values, *self.shape)

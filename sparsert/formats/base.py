"""What every packed weight format has in common, and the registry of formats.

A format is one file in this package: a :class:`SparseFormat` subclass that
sets ``family`` registers itself (``__init_subclass__``) with its kind
grammar, its stored arrays and how it is packed, expanded and saved. Packing,
``parse_kind``, files and the CLI ask the registry (``sparsert.formats``), so
adding a format touches its own file (and its kernel) only.
"""

from __future__ import annotations

import re
from typing import ClassVar, Optional

import torch

#: what a stored array holds, for files: every format names its arrays with these
ROW_PTR = (torch.int32,)
INDEX = (torch.int16, torch.int32)   # int16 holds uint16 bit patterns
VALUES = (torch.float32, torch.float16, torch.bfloat16)  # loaded as float32

#: family -> format class, in registration order
REGISTRY: dict[str, type] = {}


class SparseFormat:
    """A packed ``rows x cols`` weight matrix.

    Subclasses store their arrays as plain torch tensors and expose the
    block-sparse view the kernels take (:meth:`kernel_arrays`): every format
    sparsert packs is a grid of ``R x C`` blocks (CSR and N:M being 1x1).
    """

    #: short name used in reports ("csr", "bsr4x1", "nm2:4")
    kind: str = ""

    # -- what a format registers (class attributes) -------------------------
    #: the registry key and the start of every kind name: "csr", "bsr", "nm"
    family: ClassVar[str] = ""
    #: the kind grammar: a regex over the whole lower-case kind, one group per parameter
    KIND_PATTERN: ClassVar[str] = ""
    #: a sentence for errors: how kinds of this family are written
    KIND_HELP: ClassVar[str] = ""
    #: the arrays a file stores, name -> allowed dtypes (ROW_PTR, INDEX, VALUES)
    ARRAYS: ClassVar[dict] = {}
    #: which op family runs the format: "bsr" (block-sparse arrays, every op) or a format's
    #: own Linear op ("bitmask": ``kernel_arrays`` returns that op's arrays)
    LINEAR_OP: ClassVar[str] = "bsr"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            if cls.family in REGISTRY:
                raise ValueError(f"two sparse formats registered as {cls.family!r}")
            cls._kind_re = re.compile(cls.KIND_PATTERN)
            REGISTRY[cls.family] = cls

    @classmethod
    def parse_params(cls, kind: str) -> Optional[tuple]:
        """The kind's parameters (``"bsr4x1"`` -> ``(4, 1)``), or None when it is not of this family."""
        match = cls._kind_re.fullmatch(kind)
        return None if match is None else tuple(int(g) for g in match.groups())

    @classmethod
    def kind_name(cls, *params) -> str:  # pragma: no cover - abstract
        """The inverse of :meth:`parse_params`: ``BSR.kind_name(4, 1)`` -> ``"bsr4x1"``."""
        raise NotImplementedError

    @classmethod
    def pack(cls, w: torch.Tensor, params: tuple) -> "SparseFormat":  # pragma: no cover - abstract
        """``from_dense`` with the kind's parameters."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, arrays: dict, shape, params: tuple) -> "SparseFormat":  # pragma: no cover - abstract
        """Builds from a file's arrays (dtypes checked, values float32 and finite), validating
        every invariant (ValueError if broken)."""
        raise NotImplementedError

    @classmethod
    def saved_params(cls, params: tuple) -> dict:
        """Metadata a file records next to the kind (e.g. ``{"block": [4, 1]}``); a file
        whose fields disagree with its kind is rejected."""
        return {}

    def derived_tensors(self) -> dict:
        """Arrays the kernels need but files do not store (rebuilt from the shape)."""
        return {}

    def set_tensors(self, tensors: dict) -> None:
        """Points this format at new arrays of the same layout (a module's buffers after
        ``.to()`` or ``load_state_dict``): every name of :meth:`tensors` and of
        :meth:`derived_tensors`. Nothing is validated or copied."""
        for name in self.tensors():
            setattr(self, name, tensors[name])

    def __init__(self, shape: tuple[int, int]):
        self._shape = (int(shape[0]), int(shape[1]))

    # -- the interface ------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Every stored array by name (what ``nbytes`` counts and files hold)."""
        raise NotImplementedError

    def kernel_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """(row_ptr int32, block-column indices int16|int32, values float32, R, C)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def to_dense(self) -> torch.Tensor:
        """The dense ``rows x cols`` matrix (in the values' dtype)."""
        row_ptr, col_indices, values, r, c = self.kernel_arrays()
        return dense_from_blocks(row_ptr, col_indices, values, self.shape[0], self.shape[1], r, c)

    @property
    def nnz(self) -> int:  # pragma: no cover - abstract
        """Stored entries (explicit zeros inside kept blocks/groups included)."""
        raise NotImplementedError

    # -- derived ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def density(self) -> float:
        total = self._shape[0] * self._shape[1]
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, kind={self.kind}, nnz={self.nnz}, "
                f"density={self.density:.3f}, nbytes={self.nbytes})")


def dense_from_blocks(row_ptr: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, rows: int,
                      cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """The dense ``rows x cols`` matrix of block-sparse arrays (CSR and N:M being 1x1
    blocks): the one dense expansion, used by every format and the pure-torch ops."""
    from ._common import decode_indices
    r, c = block_rows, block_cols
    nbr, nbc = -(-rows // r), -(-cols // c)
    grid = values.new_zeros(nbr, nbc, r, c)
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    # output_size: the result's length is known without reading counts, so this traces (backward under compile)
    block_row = torch.repeat_interleave(torch.arange(nbr, device=counts.device), counts,
                                        output_size=col_indices.numel()).to(values.device)
    grid.index_put_((block_row, decode_indices(col_indices).to(values.device)), values.reshape(-1, r, c),
                    accumulate=True)
    return grid.permute(0, 2, 1, 3).reshape(nbr * r, nbc * c)[:rows, :cols].contiguous()

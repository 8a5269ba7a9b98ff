"""What every packed weight format has in common."""

from __future__ import annotations

import torch


class SparseFormat:
    """A packed ``rows x cols`` weight matrix.

    Subclasses store their arrays as plain torch tensors and expose the
    block-sparse view the kernels take (:meth:`kernel_arrays`): every format
    sparsert packs is a grid of ``R x C`` blocks (CSR and N:M being 1x1).
    """

    #: short name used in reports ("csr", "bsr4x1", "nm2:4")
    kind: str = ""

    def __init__(self, shape: tuple[int, int]):
        self._shape = (int(shape[0]), int(shape[1]))

    # -- the interface ------------------------------------------------------
    def to_dense(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Every stored array by name (what ``nbytes`` counts and files hold)."""
        raise NotImplementedError

    def kernel_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """(row_ptr int32, block-column indices int16|int32, values float32, R, C)."""
        raise NotImplementedError  # pragma: no cover - abstract

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

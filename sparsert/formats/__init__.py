"""Packed sparse weight formats: CSR, BSR (R x C blocks) and N:M.

All are built from a dense (pruned) weight with ``from_dense`` or, for CSR
and BSR, from raw arrays with ``from_arrays`` (every invariant validated).
Formats are named by a short *kind* string everywhere in sparsert (plans,
reports, files, the CLI): ``"dense"``, ``"csr"``, ``"bsr4x1"``, ``"nm2:4"``.
"""

from __future__ import annotations

import re

import torch

from .base import SparseFormat
from .bsr import BSR, CSR
from .nm import NM

__all__ = ["SparseFormat", "CSR", "BSR", "NM", "pack", "parse_kind"]

_KIND = re.compile(r"^(?:(dense)|(csr)|bsr(\d+)x(\d+)|nm(\d+):(\d+))$")


def parse_kind(kind: str) -> tuple:
    """``"bsr4x1"`` -> ``("bsr", 4, 1)``; ``"nm2:4"`` -> ``("nm", 2, 4)``; ``"csr"`` -> ``("csr",)``."""
    match = _KIND.match(kind.lower()) if isinstance(kind, str) else None
    if not match:
        raise ValueError(f"unknown format {kind!r}; expected 'dense', 'csr', 'bsrRxC' (e.g. 'bsr4x1') or 'nmN:M' (e.g. 'nm2:4')")
    dense, csr, r, c, n, m = match.groups()
    if dense:
        return ("dense",)
    if csr:
        return ("csr",)
    if r:
        return ("bsr", int(r), int(c))
    return ("nm", int(n), int(m))


def pack(weight: torch.Tensor, kind: str):
    """Packs a 2-D (pruned) weight into the format named ``kind``.

    ``"dense"`` returns the weight itself (detached, contiguous float32).
    """
    parsed = parse_kind(kind)
    if parsed[0] == "dense":
        return weight.detach().to(torch.float32).contiguous()
    if parsed[0] == "csr":
        return CSR.from_dense(weight)
    if parsed[0] == "bsr":
        return BSR.from_dense(weight, parsed[1:])
    return NM.from_dense(weight, *parsed[1:])

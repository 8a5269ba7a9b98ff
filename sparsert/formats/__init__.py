"""Packed sparse weight formats (CSR, BSR of R x C blocks, N:M) and their registry.

All are built from a dense (pruned) weight with ``from_dense`` or from raw
arrays with ``from_arrays`` (every invariant validated). Formats are named by
a short *kind* string everywhere in sparsert (plans, reports, files, the
CLI): ``"dense"``, ``"csr"``, ``"bsr4x1"``, ``"nm2:4"``.

Each format lives in one file of this package and registers itself (see
:mod:`sparsert.formats.base`): its kind grammar, its stored arrays, how it is
packed, expanded and saved. :func:`pack`, :func:`parse_kind` and
:func:`format_class` answer from that registry; a new file here is found
without further edits.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from .base import INDEX, REGISTRY, ROW_PTR, VALUES, SparseFormat, dense_from_blocks
from .csr import CSR  # (import order = registry order = the order errors list kinds in)
from .bsr import BSR  # noqa: I001
from .nm import NM

__all__ = ["SparseFormat", "CSR", "BSR", "NM", "pack", "parse_kind", "format_class", "kind_name", "formats",
           "dense_from_blocks"]

# Formats added as new files register themselves when imported.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def formats() -> dict:
    """family -> format class, for every registered format ("csr", "bsr", "nm", ...)."""
    return dict(REGISTRY)


def _grammar() -> str:
    return ", ".join(["'dense'"] + [cls.KIND_HELP for cls in REGISTRY.values()])


def parse_kind(kind: str) -> tuple:
    """``"bsr4x1"`` -> ``("bsr", 4, 1)``; ``"nm2:4"`` -> ``("nm", 2, 4)``; ``"csr"`` -> ``("csr",)``."""
    if isinstance(kind, str):
        lowered = kind.lower()
        if lowered == "dense":
            return ("dense",)
        for family, cls in REGISTRY.items():
            params = cls.parse_params(lowered)
            if params is not None:
                return (family, *params)
    raise ValueError(f"unknown format {kind!r}; expected {_grammar()}")


def format_class(kind: str):
    """(format class, parameters) of a sparse kind: ``"bsr4x1"`` -> ``(BSR, (4, 1))``.
    ValueError for unknown kinds and for ``"dense"`` (no format class)."""
    family, *params = parse_kind(kind)
    if family == "dense":
        raise ValueError("'dense' is not a sparse format")
    return REGISTRY[family], tuple(params)


def kind_name(family: str, *params) -> str:
    """The kind string of a family and its parameters: ``kind_name("bsr", 4, 1)`` -> ``"bsr4x1"``."""
    if family == "dense":
        return "dense"
    try:
        cls = REGISTRY[family]
    except KeyError:
        raise ValueError(f"unknown format family {family!r}; known: {', '.join(REGISTRY)}") from None
    return cls.kind_name(*params)


def pack(weight: torch.Tensor, kind: str):
    """Packs a 2-D (pruned) weight into the format named ``kind``.

    ``"dense"`` returns the weight itself (detached, contiguous float32).
    """
    family, *params = parse_kind(kind)
    if family == "dense":
        return weight.detach().to(torch.float32).contiguous()
    return REGISTRY[family].pack(weight, tuple(params))

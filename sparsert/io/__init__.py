"""Sparse model files: ``save``, ``load``, ``read``, ``summary``, ``export``.

:mod:`~sparsert.io.schema` says what a file holds and validates it;
:mod:`~sparsert.io.save`, :mod:`~sparsert.io.load` and
:mod:`~sparsert.io.export` write, read and export.
"""

from __future__ import annotations

from .export import export, sparse_op_count
from .load import file_sha256, load, read, summary
from .save import save
from .schema import FORMAT, FORMAT_VERSION, LayerRecord, SparseFile, SparsertFileError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SparsertFileError",
    "SparseFile",
    "LayerRecord",
    "save",
    "load",
    "read",
    "export",
    "summary",
    "file_sha256",
    "sparse_op_count",
]

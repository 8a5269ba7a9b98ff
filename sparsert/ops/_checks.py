"""Validation of a weight's raw arrays before a native kernel reads them: in
full, once per tensor version.

The kernels index x with the column indices and walk the row pointer, so a
malformed array would read out of bounds. Checking them is O(nnz), more
than a small layer's kernel, but a layer calls with the same tensors every
time: the result is remembered per (row_ptr, col_indices, values) objects
and their version counters, which every in-place change bumps (inference
tensors have none: in-place changes to those go unnoticed). A call with the
same, unchanged tensors costs a dict lookup and a few compares.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..formats._common import decode_indices, index_bits

_INDEX_DTYPES = (torch.int16, torch.int32)

# id(values) -> (weakref values, weakref row_ptr, weakref col_indices, key)
_validated: dict[int, tuple] = {}


def _forget(vid: int, ref) -> None:
    entry = _validated.get(vid)
    if entry is not None and entry[0] is ref:
        del _validated[vid]


def check_weight_arrays(row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                        in_features: int, block_rows: int, block_cols: int) -> tuple:
    """Raises ValueError unless the arrays describe a valid ``out_features x
    in_features`` block-sparse matrix of ``block_rows x block_cols`` blocks in
    the layout the native kernels read (CPU, contiguous, int32 row pointer,
    int16/int32 column indices, float32 values).

    Returns the arrays as the native kernels take them: (row_ptr address,
    entries, col_indices address, entries, index bits, values address,
    entries). The addresses are part of the remembered key because
    ``t.data = other`` swaps a tensor's storage without bumping its version."""
    pointers = (row_ptr.data_ptr(), col_indices.data_ptr(), values.data_ptr())
    try:
        key = (out_features, in_features, block_rows, block_cols, pointers, row_ptr._version,
               col_indices._version, values._version)
    except RuntimeError:
        # Inference tensors (made under torch.inference_mode) keep no version
        # counter: an in-place change to them is not noticed.
        key = (out_features, in_features, block_rows, block_cols, pointers,
               *(_version(t) for t in (row_ptr, col_indices, values)))
    entry = _validated.get(id(values))
    if (entry is not None and entry[0]() is values and entry[1]() is row_ptr and entry[2]() is col_indices
            and entry[3] == key):
        return entry[4]
    _check_in_full(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols)
    native_arrays = (pointers[0], row_ptr.numel(), pointers[1], col_indices.numel(),
                     index_bits(col_indices), pointers[2], values.numel())
    vid = id(values)
    ref = weakref.ref(values, lambda r, vid=vid: _forget(vid, r))
    _validated[vid] = (ref, weakref.ref(row_ptr), weakref.ref(col_indices), key, native_arrays)
    return native_arrays


def _version(t) -> int:
    return -1 if isinstance(t, Tensor) and t.is_inference() else t._version


def _check_in_full(row_ptr, col_indices, values, out_features, in_features, block_rows, block_cols):
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor (build weights with sparsert.formats)")
    if row_ptr.dtype != torch.int32 or col_indices.dtype not in _INDEX_DTYPES or values.dtype != torch.float32:
        raise ValueError("row_ptr must be int32, col_indices int16/int32 and values float32 "
                         "(build weights with sparsert.formats)")
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block sides must be positive, got {block_rows}x{block_cols}")
    if out_features < 0 or in_features < 0:
        raise ValueError(f"sizes must be non-negative, got {out_features}x{in_features}")
    nbr = -(-out_features // block_rows)
    nbc = -(-in_features // block_cols)
    if row_ptr.numel() != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected {nbr + 1}")
    rp = row_ptr.to(torch.int64)
    nnz = int(rp[-1])
    if int(rp[0]) != 0 or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError("row_ptr must start at 0 and be non-decreasing")
    if col_indices.numel() != nnz or values.numel() != nnz * block_rows * block_cols:
        raise ValueError("col_indices/values sizes do not match row_ptr[-1]")
    if nnz:
        cols = decode_indices(col_indices)
        if int(cols.min()) < 0 or int(cols.max()) >= nbc:
            raise ValueError(f"column indices must lie in [0, {nbc}) (block columns of a "
                             f"{out_features}x{in_features} matrix)")

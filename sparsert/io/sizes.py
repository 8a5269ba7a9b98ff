"""Why a sparsert file has the size it has: where its bytes go, and a one-line
explanation when it is not much smaller than the dense model.

A pruned model's file shrinks only by what its packed layers save, minus what
their indices cost: weights that are not pruned (embeddings, norms, layers left
out) are stored as they are, and a 16-bit column index per kept 32-bit value
at density 0.5 costs as much as half of what dropping the zeros saved.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..formats import VALUES, format_class
from .load import read

__all__ = ["size_breakdown", "size_note"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_breakdown(path: "str | os.PathLike", model: Optional[nn.Module] = None) -> dict:
    """Where the bytes of the file at ``path`` go (every number read from the file).

    ``model`` (the model that was saved) tells which stored dense weights are
    embeddings. Keys: ``file_bytes``; ``dense_equivalent_bytes`` (the same
    model as a dense float32 state_dict); for the packed (pruned) layers
    ``packed_layers``, ``packed_dense_bytes`` (their weights dense),
    ``values_bytes``, ``index_bytes`` (column indices and row pointers),
    ``index_bits`` and ``density`` (kept / all weights, over those layers);
    for everything stored dense ``embedding_bytes`` and ``other_dense_bytes``
    (norms, biases, layers that were not pruned).
    """
    f = read(path)
    packed_dense = values = index = kept = total = 0
    dense_in_layers = 0
    bits = set()
    for rec in f.layers.values():
        rows, cols = rec.shape
        if rec.bias is not None:
            dense_in_layers += _nbytes(rec.bias)
        if isinstance(rec.packed, torch.Tensor):  # stored dense inside a layer record
            dense_in_layers += _nbytes(rec.packed)
            continue
        cls, _ = format_class(rec.kind)
        packed_dense += 4 * rows * cols
        kept += rec.packed.nnz
        total += rows * cols
        for name, t in rec.packed.tensors().items():
            if cls.ARRAYS.get(name) is VALUES:
                values += _nbytes(t)
            else:
                index += _nbytes(t)
                if name == "col_indices":
                    bits.add(8 * t.element_size())
    embedding_keys = set()
    if model is not None:
        embedding_keys = {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                          if isinstance(m, nn.Embedding)}
    embeddings = sum(_nbytes(t) for k, t in f.dense.items() if k in embedding_keys)
    other = sum(_nbytes(t) for k, t in f.dense.items() if k not in embedding_keys) + dense_in_layers
    dense_equivalent = (packed_dense + dense_in_layers
                        + sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in f.dense.values()))
    return {"file_bytes": f.file_bytes, "dense_equivalent_bytes": dense_equivalent,
            "packed_layers": sum(1 for r in f.layers.values() if not isinstance(r.packed, torch.Tensor)),
            "packed_dense_bytes": packed_dense, "values_bytes": values, "index_bytes": index,
            "index_bits": sorted(bits), "density": kept / total if total else 0.0,
            "embedding_bytes": embeddings, "other_dense_bytes": other}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def size_note(b: dict) -> str:
    """One line on where the file's bytes went (from :func:`size_breakdown`): what is
    stored dense and how much of the pruned layers' saving their indices took."""
    file_bytes = max(b["file_bytes"], 1)
    parts = []
    if b["embedding_bytes"]:
        parts.append(f"embeddings are not pruned: {_mb(b['embedding_bytes'])} "
                     f"({b['embedding_bytes'] / file_bytes:.0%} of the file)")
    if b["other_dense_bytes"] >= 0.05 * file_bytes:
        parts.append(f"other weights stored dense (not pruned): {_mb(b['other_dense_bytes'])} "
                     f"({b['other_dense_bytes'] / file_bytes:.0%})")
    saved = b["packed_dense_bytes"] - b["values_bytes"]
    if b["packed_layers"] and saved > 0:
        bits = "/".join(map(str, b["index_bits"])) or "?"
        parts.append(f"the {b['packed_layers']} pruned layers (density {b['density']:.2f}) dropped "
                     f"{_mb(saved)} of zeros but their {bits}-bit indices cost {_mb(b['index_bytes'])} "
                     f"({b['index_bytes'] / saved:.0%} of that saving)")
    ratio = b["dense_equivalent_bytes"] / file_bytes
    head = f"{ratio:.2f}x smaller than dense"
    return head + (": " + "; ".join(parts) if parts else "")

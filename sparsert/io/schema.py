"""What a sparsert file holds, and the rules a file must follow.

A sparsert file is a `safetensors <https://github.com/huggingface/safetensors>`_
file (no pickle anywhere) holding

* every sparse layer's packed arrays exactly as the kernels use them, named
  ``"<module.path>::<array>"`` (``row_ptr``/``col_indices``/``values`` for
  CSR, ``row_ptr``/``col_indices``/``blocks`` for BSR, ``values``/``col_indices``
  for N:M, ``weight`` for layers kept dense, ``bias``). Column indices are
  16-bit whenever the matrix is at most 65,536 columns wide;
* every other entry of the model's ``state_dict`` (embeddings, norms, ...)
  under its own name (tensors that share storage are stored once);
* JSON metadata in the safetensors header: ``format`` (``"sparsert"``),
  ``format_version``, ``sparsert_version``, ``sparsert`` (per-layer module
  path, layer type, format kind, shape, block / N:M, density, nnz, conv
  hyper-parameters, fused activation; the dense entry names; how to rebuild
  the architecture) and ``sha256`` (a digest of the metadata and of every
  tensor's name, dtype, shape and bytes).

Loading validates everything before a kernel sees it: the digest (flipped or
truncated bytes), the format version, every metadata field, every tensor's
dtype and shape against the metadata, and every index array through the
formats' validating constructors (``CSR/BSR/NM.from_arrays``). Any problem
is a :class:`SparsertFileError` (a ``ValueError``) whose message names the
file and what is wrong. Loading is O(file size): the chosen formats are
stored, nothing is re-packed or re-tuned.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..formats import VALUES, format_class, formats, parse_kind
from ..ops.conv import PADDING_MODES, pair
from ..ops.epilogue import EPILOGUES

__all__ = ["FORMAT", "FORMAT_VERSION", "SEP", "SparsertFileError", "LayerRecord", "SparseFile", "layer_meta",
           "read_layer", "kind_params", "digest"]

FORMAT = "sparsert"
FORMAT_VERSION = 1
SEP = "::"

PATH_RE = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")
#: the arrays of a layer stored dense (sparse formats name theirs: ``formats()[family].ARRAYS``)
DENSE_ARRAYS = {"weight": VALUES}
#: the epilogue names a layer may record (``sparsert.ops.epilogue``)
ACTIVATIONS = tuple(e.name for e in EPILOGUES)
MAX_DIM = 1 << 31  # any larger size in metadata is a lie (or not a model we can run)


class SparsertFileError(ValueError):
    """A file that is not a valid sparsert file (or does not fit the given model)."""


# ---------------------------------------------------------------------------
# What a file holds


@dataclass
class LayerRecord:
    """One sparse layer of a file: where it goes, its packed weight, its bias."""

    path: str
    type: str  # "linear" | "conv2d"
    packed: Any  # a sparsert format, or a float32 tensor for kind "dense"
    bias: torch.Tensor | None
    meta: dict

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.meta["shape"])

    @property
    def density(self) -> float:
        return self.meta["density"]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (packed weight + bias)."""
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        if isinstance(self.packed, torch.Tensor):
            return b + self.packed.numel() * self.packed.element_size()
        return b + self.packed.nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same layer takes as a dense float32 weight + bias."""
        rows, cols = self.shape
        return 4 * rows * cols + (0 if self.bias is None else 4 * self.bias.numel())


@dataclass
class SparseFile:
    """Everything :func:`read` found in a file, validated."""

    path: str
    layers: dict[str, LayerRecord]
    dense: dict[str, torch.Tensor]
    model: dict | None
    sparsert_version: str
    format_version: int
    file_bytes: int
    extra: dict = field(default_factory=dict)


def kind_params(packed) -> dict:
    """The metadata that names a packed weight's format: its kind and what the format records."""
    if isinstance(packed, torch.Tensor):
        return {"kind": "dense"}
    cls, params = format_class(packed.kind)
    return {"kind": packed.kind, **cls.saved_params(params)}


def _packed_arrays(packed) -> dict[str, torch.Tensor]:
    if isinstance(packed, torch.Tensor):
        return {"weight": packed}
    return dict(packed.tensors())


def layer_meta(module, packed) -> dict:
    from ..nn import SparseConv2d, SparseLinear

    if isinstance(packed, torch.Tensor):
        shape = [int(s) for s in packed.shape]
        nnz = int(shape[0] * shape[1])
        density = 1.0
    else:
        shape = [int(s) for s in packed.shape]
        nnz, density = int(packed.nnz), float(packed.density)
    meta: dict[str, Any] = {**kind_params(packed), "shape": shape, "nnz": nnz, "density": density,
                            "bias": module.bias is not None}
    activation = getattr(module, "activation", None)
    meta["activation"] = activation if isinstance(activation, str) else None
    meta["runtime"] = "sparse" if isinstance(module, (SparseLinear, SparseConv2d)) else "dense"
    if isinstance(module, (SparseConv2d, nn.Conv2d)):
        meta["type"] = "conv2d"
        meta["conv"] = {
            "in_channels": int(module.in_channels),
            "out_channels": int(module.out_channels),
            "kernel_size": list(pair(module.kernel_size, "kernel_size")),
            "stride": list(pair(module.stride, "stride")),
            "padding": module.padding if isinstance(module.padding, str) else list(pair(module.padding, "padding")),
            "dilation": list(pair(module.dilation, "dilation")),
            "groups": int(module.groups),
            "padding_mode": str(getattr(module, "padding_mode", "zeros")),
        }
    elif isinstance(module, (SparseLinear, nn.Linear)):
        meta["type"] = "linear"
        meta["in_features"], meta["out_features"] = int(module.in_features), int(module.out_features)
    else:  # pragma: no cover - guarded by the caller
        raise TypeError(type(module).__name__)
    return meta


def digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer, no copy
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Validating what a file says


def fail(path, msg: str) -> SparsertFileError:
    return SparsertFileError(f"{path}: {msg}")


class _Meta:
    """Typed accessors for untrusted JSON (every failure is a clear error)."""

    def __init__(self, path):
        self.path = path

    def err(self, where: str, msg: str) -> SparsertFileError:
        return fail(self.path, f"metadata {where}: {msg}")

    def obj(self, d, key, where) -> dict:
        v = d.get(key) if isinstance(d, dict) else None
        if not isinstance(v, dict):
            raise self.err(where, f"{key!r} must be an object")
        return v

    def int(self, d, key, where, lo=0, hi=MAX_DIM) -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.err(where, f"{key!r} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    def ints(self, d, key, where, n, lo=0, hi=MAX_DIM) -> list[int]:
        v = d.get(key)
        if not isinstance(v, list) or len(v) != n or any(
                isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi for x in v):
            raise self.err(where, f"{key!r} must be a list of {n} integers in [{lo}, {hi}], got {v!r}")
        return v

    def bool(self, d, key, where) -> bool:
        v = d.get(key)
        if not isinstance(v, bool):
            raise self.err(where, f"{key!r} must be true or false, got {v!r}")
        return v

    def num(self, d, key, where) -> float:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(where, f"{key!r} must be a finite number, got {v!r}")
        return float(v)


def _all_finite(t: torch.Tensor) -> bool:
    # numpy's single pass is several times faster than torch.isfinite(t).all() on a busy machine
    return bool(np.isfinite(t.reshape(-1).numpy()).all()) if t.numel() else True


def check_float(path, name, t: torch.Tensor, shape) -> torch.Tensor:
    """dtype, finiteness and (when given) shape of a float tensor; returns it as float32."""
    if t.dtype not in VALUES:
        raise fail(path, f"tensor {name!r} must be float32/float16/bfloat16, got {t.dtype}")
    if shape is not None and list(t.shape) != list(shape):
        raise fail(path, f"tensor {name!r} has shape {list(t.shape)} but the metadata says {list(shape)}")
    t = t.to(torch.float32)
    if not _all_finite(t):
        raise fail(path, f"tensor {name!r} contains NaN or infinity")
    return t


def check_index_dtype(path, name, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise fail(path, f"tensor {name!r} must be {' or '.join(str(a) for a in allowed)}, got {t.dtype}")


def read_layer(path, m: _Meta, lpath: str, d: dict, tensors: dict) -> tuple[LayerRecord, set]:
    where = f"layer {lpath!r}"
    if not PATH_RE.match(lpath):
        raise m.err(where, "is not a valid module path")
    ltype = d.get("type")
    if ltype not in ("linear", "conv2d"):
        raise m.err(where, f"'type' must be 'linear' or 'conv2d', got {ltype!r}")
    kind = d.get("kind")
    try:
        parsed = parse_kind(kind)
    except ValueError:
        raise m.err(where, f"unknown format kind {kind!r}") from None
    rows, cols = m.ints(d, "shape", where, 2)
    has_bias = m.bool(d, "bias", where)
    nnz_meta = m.int(d, "nnz", where, 0, 1 << 62)
    density_meta = m.num(d, "density", where)
    activation = d.get("activation")
    if activation not in ACTIVATIONS:
        names = ", ".join("null" if a is None else repr(a) for a in ACTIVATIONS)
        raise m.err(where, f"'activation' must be one of {names}, got {activation!r}")
    runtime = d.get("runtime")
    if runtime not in ("sparse", "dense"):
        raise m.err(where, f"'runtime' must be 'sparse' or 'dense', got {runtime!r}")
    if runtime == "dense" and (activation is not None or parsed[0] == "dense"):
        raise m.err(where, "a layer that runs dense is stored in a sparse format and has no activation")
    if ltype == "linear":
        fin, fout = m.int(d, "in_features", where), m.int(d, "out_features", where)
        if (rows, cols) != (fout, fin):
            raise m.err(where, f"shape {[rows, cols]} does not match out_features x in_features {[fout, fin]}")
    else:
        conv = m.obj(d, "conv", where)
        cin, cout = m.int(conv, "in_channels", where, 1), m.int(conv, "out_channels", where, 1)
        groups = m.int(conv, "groups", where, 1)
        kh, kw = m.ints(conv, "kernel_size", where, 2, 1, 1 << 16)
        m.ints(conv, "stride", where, 2, 1, 1 << 16)
        if conv.get("padding") not in ("same", "valid"):
            m.ints(conv, "padding", where, 2, 0, 1 << 16)
        if conv.get("padding_mode") not in PADDING_MODES:
            raise m.err(where, f"'padding_mode' must be zeros/reflect/replicate/circular, got {conv.get('padding_mode')!r}")
        m.ints(conv, "dilation", where, 2, 1, 1 << 16)
        if cin % groups or cout % groups:
            raise m.err(where, f"channels ({cin}, {cout}) are not divisible by groups={groups}")
        if (rows, cols) != (cout, cin // groups * kh * kw):
            raise m.err(where, f"shape {[rows, cols]} does not match the convolution "
                               f"({cout} x {cin // groups}*{kh}*{kw})")
    cls = None if parsed[0] == "dense" else formats()[parsed[0]]
    expected_arrays = DENSE_ARRAYS if cls is None else cls.ARRAYS
    for key, expected in ({} if cls is None else cls.saved_params(parsed[1:])).items():
        # compared as JSON: true is not 1, 2.0 is not 2
        if json.dumps(d.get(key)) != json.dumps(expected):
            raise m.err(where, f"{key!r} {d.get(key)!r} does not match kind {kind!r}")
    names = {a: f"{lpath}{SEP}{a}" for a in expected_arrays}
    if has_bias:
        names["bias"] = f"{lpath}{SEP}bias"
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise fail(path, f"{where}: tensor(s) {missing} are missing")
    t = {a: tensors[n] for a, n in names.items()}
    try:
        if cls is None:
            packed = check_float(path, names["weight"], t["weight"], [rows, cols]).contiguous()
        else:
            arrays = {}
            for a, dtypes in expected_arrays.items():
                if dtypes == VALUES:
                    arrays[a] = check_float(path, names[a], t[a], None)  # float32, finite
                else:
                    check_index_dtype(path, names[a], t[a], dtypes)
                    arrays[a] = t[a]
            packed = cls.from_saved(arrays, (rows, cols), tuple(parsed[1:]))
    except SparsertFileError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise fail(path, f"{where} ({kind}): {e}") from None
    if not isinstance(packed, torch.Tensor):
        if packed.nnz != nnz_meta:
            raise m.err(where, f"'nnz' says {nnz_meta} but the arrays hold {packed.nnz}")
        if abs(packed.density - density_meta) > 1e-9:
            raise m.err(where, f"'density' says {density_meta} but the arrays hold {packed.density}")
    elif nnz_meta != rows * cols or density_meta != 1.0:
        raise m.err(where, "a dense layer must have nnz = rows*cols and density 1")
    bias = None
    if has_bias:
        bias = check_float(path, names["bias"], t["bias"], [rows]).contiguous()
    meta = dict(d)
    meta["kind"] = kind.lower()
    return LayerRecord(lpath, ltype, packed, bias, meta), set(names.values())



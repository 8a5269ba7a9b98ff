"""Sparse model files: ``save``, ``load``, ``read``, ``export``.

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
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .ops._threads import torch_single_thread

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
]

FORMAT = "sparsert"
FORMAT_VERSION = 1
SEP = "::"

_PATH_RE = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")
_ARRAYS = {
    "csr": ("row_ptr", "col_indices", "values"),
    "bsr": ("row_ptr", "col_indices", "blocks"),
    "nm": ("values", "col_indices"),
    "dense": ("weight",),
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_DIM = 1 << 31  # any larger size in metadata is a lie (or not a model we can run)
_MAX_HEADER = 100 << 20


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


# ---------------------------------------------------------------------------
# Saving


def _sparse_types() -> tuple[type, type]:
    from .nn import SparseConv2d, SparseLinear

    return SparseLinear, SparseConv2d


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    return [int(x) for x in v]


def _kind_params(packed) -> dict:
    from .formats import BSR, CSR, NM

    if isinstance(packed, torch.Tensor):
        return {"kind": "dense"}
    if isinstance(packed, CSR):
        return {"kind": "csr"}
    if isinstance(packed, BSR):
        return {"kind": packed.kind, "block": list(packed.block)}
    if isinstance(packed, NM):
        return {"kind": packed.kind, "n": packed.n, "m": packed.m}
    raise TypeError(f"cannot save a packed weight of type {type(packed).__name__}")


def _packed_arrays(packed) -> dict[str, torch.Tensor]:
    if isinstance(packed, torch.Tensor):
        return {"weight": packed}
    return dict(packed.tensors())


def _layer_meta(module, packed) -> dict:
    SparseLinear, SparseConv2d = _sparse_types()
    if isinstance(packed, torch.Tensor):
        shape = [int(s) for s in packed.shape]
        nnz = int(shape[0] * shape[1])
        density = 1.0
    else:
        shape = [int(s) for s in packed.shape]
        nnz, density = int(packed.nnz), float(packed.density)
    meta: dict[str, Any] = {**_kind_params(packed), "shape": shape, "nnz": nnz, "density": density,
                            "bias": module.bias is not None}
    activation = getattr(module, "activation", None)
    meta["activation"] = activation if isinstance(activation, str) else None
    meta["runtime"] = "sparse" if isinstance(module, (SparseLinear, SparseConv2d)) else "dense"
    if isinstance(module, (SparseConv2d, nn.Conv2d)):
        meta["type"] = "conv2d"
        meta["conv"] = {
            "in_channels": int(module.in_channels),
            "out_channels": int(module.out_channels),
            "kernel_size": _pair(module.kernel_size),
            "stride": _pair(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else _pair(module.padding),
            "dilation": _pair(module.dilation),
            "groups": int(module.groups),
            "padding_mode": str(getattr(module, "padding_mode", "zeros")),
        }
    elif isinstance(module, (SparseLinear, nn.Linear)):
        meta["type"] = "linear"
        meta["in_features"], meta["out_features"] = int(module.in_features), int(module.out_features)
    else:  # pragma: no cover - guarded by the caller
        raise TypeError(type(module).__name__)
    return meta


def _model_ref(model: nn.Module) -> dict | None:
    """How to rebuild the architecture without model code from the user."""
    example = getattr(model, "sparsert_example", None)
    if isinstance(example, str):
        return {"example": example}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string") and type(model).__module__.startswith("transformers."):
        return {"hf_class": type(model).__name__, "hf_config": json.loads(config.to_json_string(use_diff=False))}
    return None


def _digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer, no copy
    return h.hexdigest()


def _ident(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
        if t.numel() else None


def _compressed_storage(module: nn.Module, shared: set):
    """CSR of a pruned plain nn.Linear/nn.Conv2d that runs dense (sparsify found dense faster),
    when that is much smaller on disk; ``None`` otherwise. Loading unpacks it back to the dense weight."""
    from .formats import CSR

    if type(module) not in (nn.Linear, nn.Conv2d):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or w.is_meta or _ident(w) in shared:
        return None
    w2 = w.detach().to("cpu").reshape(w.shape[0], -1)
    zeros = int((w2 == 0).sum())
    if zeros * 4 < w2.numel():  # under 25% zeros: CSR cannot win enough to be worth it
        return None
    csr = CSR.from_dense(w2)
    return csr if csr.nbytes < 0.75 * w2.numel() * 4 else None


def _collect(sparse_model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(tensors, layer metadata, dense entry names, aliases) of a model."""
    SparseLinear, SparseConv2d = _sparse_types()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    sparse_paths = []
    state = sparse_model.state_dict()
    counts: dict = {}
    for t in state.values():
        if isinstance(t, torch.Tensor):
            counts[_ident(t)] = counts.get(_ident(t), 0) + 1
    shared = {k for k, n in counts.items() if n > 1}
    for path, module in sparse_model.named_modules():
        if not isinstance(module, (SparseLinear, SparseConv2d)):
            packed = _compressed_storage(module, shared) if path and _PATH_RE.match(path) else None
            if packed is None or any(path.startswith(p + ".") for p in sparse_paths):
                continue
            layers[path] = _layer_meta(module, packed)
            for name, t in _packed_arrays(packed).items():
                tensors[f"{path}{SEP}{name}"] = t
            if module.bias is not None:
                tensors[f"{path}{SEP}bias"] = module.bias.detach().to("cpu", torch.float32).contiguous()
            sparse_paths.append(path)
            continue
        if any(path.startswith(p + ".") for p in sparse_paths):
            continue  # pragma: no cover - sparse layers do not nest
        if not _PATH_RE.match(path):
            raise ValueError(f"cannot save a sparse layer at module path {path!r}")
        packed = module.packed
        if not isinstance(packed, torch.Tensor):
            packed = packed.to("cpu")
        layers[path] = _layer_meta(module, packed)
        for name, t in _packed_arrays(packed).items():
            tensors[f"{path}{SEP}{name}"] = t.detach().to("cpu").contiguous()
        if module.bias is not None:
            tensors[f"{path}{SEP}bias"] = module.bias.detach().to("cpu", torch.float32).contiguous()
        sparse_paths.append(path)
    dense: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        if any(key.startswith(p + ".") for p in sparse_paths):
            continue
        if SEP in key:
            raise ValueError(f"state_dict key {key!r} contains {SEP!r}; cannot save it")
        if not isinstance(t, torch.Tensor):  # pragma: no cover - extra state
            raise ValueError(f"state_dict entry {key!r} is not a tensor; cannot save it")
        t = t.detach()
        ident = _ident(t)
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.to("cpu").contiguous()
        dense.append(key)
    return tensors, layers, dense, aliases


def save(sparse_model: nn.Module, path: "str | os.PathLike") -> dict:
    """Writes ``sparse_model`` (the output of :func:`sparsert.sparsify`) to ``path``.

    Returns a small summary: ``{"path", "file_bytes", "layers", "dense_entries"}``.
    The file records how to rebuild the architecture when it can (built-in
    examples, Hugging Face models), so :func:`load` then needs no skeleton.
    """
    from safetensors.torch import save as st_save

    from . import __version__

    if not isinstance(sparse_model, nn.Module):
        raise TypeError(f"sparse_model must be an nn.Module, got {type(sparse_model).__name__}")
    tensors, layers, dense, aliases = _collect(sparse_model)
    # BatchNorms folded into the conv before them by sparsify() became nn.Identity: a
    # fresh skeleton still has them, so the file says which to drop.
    identities = sorted(p for p, m in sparse_model.named_modules() if p and type(m) is nn.Identity)
    body = {"layers": layers, "dense": dense, "aliases": aliases, "identities": identities,
            "model": _model_ref(sparse_model)}
    meta_json = json.dumps(body, sort_keys=True, separators=(",", ":"))
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sparsert_version": __version__,
        "sparsert": meta_json,
        "sha256": _digest(meta_json, tensors),
    }
    data = st_save(tensors, metadata=metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"path": str(path), "file_bytes": len(data), "layers": len(layers), "dense_entries": len(dense)}


# ---------------------------------------------------------------------------
# Reading and validating


def _fail(path, msg: str) -> SparsertFileError:
    return SparsertFileError(f"{path}: {msg}")


class _Meta:
    """Typed accessors for untrusted JSON (every failure is a clear error)."""

    def __init__(self, path):
        self.path = path

    def err(self, where: str, msg: str) -> SparsertFileError:
        return _fail(self.path, f"metadata {where}: {msg}")

    def obj(self, d, key, where) -> dict:
        v = d.get(key) if isinstance(d, dict) else None
        if not isinstance(v, dict):
            raise self.err(where, f"{key!r} must be an object")
        return v

    def int(self, d, key, where, lo=0, hi=_MAX_DIM) -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.err(where, f"{key!r} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    def ints(self, d, key, where, n, lo=0, hi=_MAX_DIM) -> list[int]:
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


def _read_header(path, data: bytes) -> dict:
    if len(data) < 8:
        raise _fail(path, f"not a safetensors file (only {len(data)} bytes; truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise _fail(path, f"not a safetensors file or truncated: header claims {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "not a sparsert file (a safetensors file without sparsert metadata; "
                          "a plain state_dict? load it with safetensors and run sparsert.sparsify)")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise _fail(path, f"file format version {version!r} is not supported: this sparsert reads version "
                          f"{FORMAT_VERSION} (the file was written by sparsert {meta.get('sparsert_version')!r}; "
                          "re-save it with a matching sparsert)")
    return meta


def _all_finite(t: torch.Tensor) -> bool:
    # numpy's single pass is several times faster than torch.isfinite(t).all() on a busy machine
    return bool(np.isfinite(t.reshape(-1).numpy()).all()) if t.numel() else True


def _check_float(path, name, t: torch.Tensor, shape) -> torch.Tensor:
    """dtype, finiteness and (when given) shape of a float tensor; returns it as float32."""
    if t.dtype not in _FLOAT_DTYPES:
        raise _fail(path, f"tensor {name!r} must be float32/float16/bfloat16, got {t.dtype}")
    if shape is not None and list(t.shape) != list(shape):
        raise _fail(path, f"tensor {name!r} has shape {list(t.shape)} but the metadata says {list(shape)}")
    t = t.to(torch.float32)
    if not _all_finite(t):
        raise _fail(path, f"tensor {name!r} contains NaN or infinity")
    return t


def _check_index_dtype(path, name, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise _fail(path, f"tensor {name!r} must be {' or '.join(str(a) for a in allowed)}, got {t.dtype}")


def _read_layer(path, m: _Meta, lpath: str, d: dict, tensors: dict) -> tuple[LayerRecord, set]:
    from .formats import BSR, CSR, NM, parse_kind
    from .formats._common import decode_indices

    where = f"layer {lpath!r}"
    if not _PATH_RE.match(lpath):
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
    if activation not in (None, "relu", "gelu"):
        raise m.err(where, f"'activation' must be null, 'relu' or 'gelu', got {activation!r}")
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
        if conv.get("padding_mode") not in ("zeros", "reflect", "replicate", "circular"):
            raise m.err(where, f"'padding_mode' must be zeros/reflect/replicate/circular, got {conv.get('padding_mode')!r}")
        m.ints(conv, "dilation", where, 2, 1, 1 << 16)
        if cin % groups or cout % groups:
            raise m.err(where, f"channels ({cin}, {cout}) are not divisible by groups={groups}")
        if (rows, cols) != (cout, cin // groups * kh * kw):
            raise m.err(where, f"shape {[rows, cols]} does not match the convolution "
                               f"({cout} x {cin // groups}*{kh}*{kw})")
    expected_arrays = _ARRAYS[parsed[0]]
    if parsed[0] == "bsr":
        if m.ints(d, "block", where, 2, 1, 1 << 16) != list(parsed[1:]):
            raise m.err(where, f"'block' {d['block']} does not match kind {kind!r}")
    if parsed[0] == "nm" and (m.int(d, "n", where, 1), m.int(d, "m", where, 1)) != parsed[1:]:
        raise m.err(where, f"'n'/'m' ({d['n']}, {d['m']}) do not match kind {kind!r}")
    names = {a: f"{lpath}{SEP}{a}" for a in expected_arrays}
    if has_bias:
        names["bias"] = f"{lpath}{SEP}bias"
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise _fail(path, f"{where}: tensor(s) {missing} are missing")
    t = {a: tensors[n] for a, n in names.items()}
    try:
        if parsed[0] == "dense":
            packed = _check_float(path, names["weight"], t["weight"], [rows, cols]).contiguous()
        elif parsed[0] == "csr":
            _check_index_dtype(path, names["row_ptr"], t["row_ptr"], (torch.int32,))
            _check_index_dtype(path, names["col_indices"], t["col_indices"], (torch.int16, torch.int32))
            values = _check_float(path, names["values"], t["values"], None)
            packed = CSR.from_arrays(t["row_ptr"], decode_indices(t["col_indices"]), values, (rows, cols),
                                     check_finite=False)  # checked above
        elif parsed[0] == "bsr":
            _check_index_dtype(path, names["row_ptr"], t["row_ptr"], (torch.int32,))
            _check_index_dtype(path, names["col_indices"], t["col_indices"], (torch.int16, torch.int32))
            blocks = _check_float(path, names["blocks"], t["blocks"], None)
            packed = BSR.from_arrays(t["row_ptr"], decode_indices(t["col_indices"]), blocks, (rows, cols),
                                     tuple(parsed[1:]), check_finite=False)  # checked above
        else:
            _check_index_dtype(path, names["col_indices"], t["col_indices"], (torch.int16, torch.int32))
            values = _check_float(path, names["values"], t["values"], None)
            packed = NM.from_arrays(values, t["col_indices"], (rows, cols), *parsed[1:], check_finite=False)
    except SparsertFileError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise _fail(path, f"{where} ({kind}): {e}") from None
    if not isinstance(packed, torch.Tensor):
        if packed.nnz != nnz_meta:
            raise m.err(where, f"'nnz' says {nnz_meta} but the arrays hold {packed.nnz}")
        if abs(packed.density - density_meta) > 1e-9:
            raise m.err(where, f"'density' says {density_meta} but the arrays hold {packed.density}")
    elif nnz_meta != rows * cols or density_meta != 1.0:
        raise m.err(where, "a dense layer must have nnz = rows*cols and density 1")
    bias = None
    if has_bias:
        bias = _check_float(path, names["bias"], t["bias"], [rows]).contiguous()
    meta = dict(d)
    meta["kind"] = kind.lower()
    return LayerRecord(lpath, ltype, packed, bias, meta), set(names.values())


def read(path: "str | os.PathLike") -> SparseFile:
    """Reads and fully validates a sparsert file (no model needed)."""
    # Validation is a few memory-bound passes: on a busy 2-core machine, 2 torch
    # threads were measured 1000x slower than 1 (spin-wait contention).
    with torch_single_thread():
        return _read(path)


def _read(path) -> SparseFile:
    from safetensors.torch import load as st_load

    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a sparsert file") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    meta = _read_header(path, data)
    meta_json, digest = meta.get("sparsert"), meta.get("sha256")
    if not isinstance(meta_json, str) or not isinstance(digest, str):
        raise _fail(path, "metadata lacks the 'sparsert' description or its 'sha256' digest")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on malformed files
        raise _fail(path, f"corrupt or truncated safetensors data ({type(e).__name__}: {e})") from None
    if _digest(meta_json, tensors) != digest:
        raise _fail(path, "checksum mismatch: the file is corrupt (flipped or altered bytes)")
    m = _Meta(path)
    try:
        body = json.loads(meta_json)
    except json.JSONDecodeError as e:  # pragma: no cover - the digest covers the JSON
        raise _fail(path, f"corrupt metadata JSON ({e})") from None
    if not isinstance(body, dict):
        raise m.err("", "must be a JSON object")
    layers_meta = m.obj(body, "layers", "")
    dense_names = body.get("dense")
    aliases = body.get("aliases")
    if not isinstance(dense_names, list) or not all(isinstance(n, str) for n in dense_names):
        raise m.err("", "'dense' must be a list of names")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise m.err("", "'aliases' must map names to names")
    identities = body.get("identities", [])
    if not isinstance(identities, list) or not all(isinstance(p, str) and _PATH_RE.match(p) for p in identities):
        raise m.err("", "'identities' must be a list of module paths")
    model = body.get("model")
    if model is not None and not isinstance(model, dict):
        raise m.err("", "'model' must be an object or null")
    paths = sorted(layers_meta)
    for a, b in zip(paths, paths[1:]):
        if b.startswith(a + "."):
            raise m.err(f"layer {b!r}", f"is nested inside layer {a!r}")
    layers: dict[str, LayerRecord] = {}
    used: set[str] = set()
    for lpath in paths:
        d = layers_meta[lpath]
        if not isinstance(d, dict):
            raise m.err(f"layer {lpath!r}", "must be an object")
        rec, names = _read_layer(path, m, lpath, d, tensors)
        layers[lpath] = rec
        used |= names
    dense: dict[str, torch.Tensor] = {}
    for name in dense_names:
        if name not in tensors or SEP in name or name in dense:
            raise m.err("'dense'", f"entry {name!r} is missing, duplicated or not a state_dict name")
        if any(name.startswith(p + ".") for p in layers):
            raise m.err("'dense'", f"entry {name!r} lies inside a sparse layer")
        dense[name] = tensors[name]
        used.add(name)
    for alias, target in aliases.items():
        if target not in dense or alias in dense or alias in tensors or SEP in alias:
            raise m.err("'aliases'", f"{alias!r} -> {target!r} does not name a stored dense entry")
        dense[alias] = dense[target]
    extra = sorted(set(tensors) - used)
    if extra:
        raise _fail(path, f"tensors not described by the metadata: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    try:
        fv = int(meta["format_version"])
    except ValueError:  # pragma: no cover - checked in _read_header
        fv = -1
    return SparseFile(path, layers, dense, model, str(meta.get("sparsert_version")), fv, len(data),
                      extra={"identities": identities})


# ---------------------------------------------------------------------------
# Loading into a model


def _build_module(rec: LayerRecord) -> nn.Module:
    """A SparseLinear / SparseConv2d holding ``rec``'s packed weight (no re-packing)."""
    from .nn import SparseConv2d, SparseLinear

    activation = rec.meta.get("activation")
    if rec.type == "linear":
        return SparseLinear(rec.packed, rec.bias, activation=activation)
    conv = rec.meta["conv"]
    padding = conv["padding"]
    return SparseConv2d(rec.packed, rec.bias, in_channels=conv["in_channels"],
                        kernel_size=tuple(conv["kernel_size"]), stride=tuple(conv["stride"]),
                        padding=padding if isinstance(padding, str) else tuple(padding),
                        dilation=tuple(conv["dilation"]), groups=conv["groups"],
                        padding_mode=conv["padding_mode"], activation=activation)


def _check_target(path, rec: LayerRecord, target: nn.Module) -> None:
    SparseLinear, SparseConv2d = _sparse_types()
    where = f"layer {rec.path!r}"
    if rec.meta["runtime"] == "dense" and type(target) not in (nn.Linear, nn.Conv2d):
        raise _fail(path, f"{where} runs dense and needs an nn.Linear/nn.Conv2d in the model, "
                          f"got {type(target).__name__}")
    if rec.type == "linear":
        if not isinstance(target, (nn.Linear, SparseLinear)):
            raise _fail(path, f"{where} is a linear layer in the file but the model has a {type(target).__name__} there")
        want = (rec.meta["in_features"], rec.meta["out_features"])
        got = (int(target.in_features), int(target.out_features))
    else:
        if not isinstance(target, (nn.Conv2d, SparseConv2d)):
            raise _fail(path, f"{where} is a conv2d layer in the file but the model has a {type(target).__name__} there")
        conv = rec.meta["conv"]
        want = (conv["in_channels"], conv["out_channels"], conv["kernel_size"], conv["stride"], conv["padding"],
                conv["dilation"], conv["groups"], conv["padding_mode"])
        got = (int(target.in_channels), int(target.out_channels), _pair(target.kernel_size), _pair(target.stride),
               _pair(target.padding) if not isinstance(target.padding, str) else target.padding,
               _pair(target.dilation), int(target.groups), str(target.padding_mode))
    if want != got:
        raise _fail(path, f"{where}: the file's layer {want} does not fit the model's {got}")


def _skeleton(path, ref: dict | None) -> nn.Module:
    if ref is None:
        raise _fail(path, "the file does not say how to build the model: pass a model skeleton, "
                          "sparsert.load(path, model)")
    if "example" in ref:
        from . import examples

        name = ref["example"]
        if name not in examples.EXAMPLES:
            raise _fail(path, f"unknown built-in example {name!r}; pass a model skeleton")
        return examples.skeleton(name)
    cls_name, config = ref.get("hf_class"), ref.get("hf_config")
    if isinstance(cls_name, str) and isinstance(config, dict) and isinstance(config.get("model_type"), str):
        try:
            import transformers
        except ImportError:
            raise _fail(path, "the file holds a Hugging Face model: pip install transformers") from None
        cls = getattr(transformers, cls_name, None) if cls_name.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise _fail(path, f"unknown Hugging Face model class {cls_name!r}")
        try:
            cfg = transformers.AutoConfig.for_model(**config)
            return cls(cfg)
        except Exception as e:  # config errors come in many types
            raise _fail(path, f"cannot build {cls_name} from the stored config ({type(e).__name__}: {e})") from None
    raise _fail(path, "unrecognised 'model' description; pass a model skeleton")


def _swap(model: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    parent_path, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def load(path: "str | os.PathLike", model: nn.Module | None = None) -> nn.Module:
    """Loads a sparsert file into ``model`` (a skeleton: e.g. ``BertModel(config)``).

    The file's sparse layers replace the skeleton's layers at the same module
    paths (their kind and size must match) and every other ``state_dict``
    entry is loaded strictly. Without ``model``, the architecture the file
    records (built-in example or Hugging Face config) is built. Returns the
    model in eval mode. Raises :class:`SparsertFileError` on any problem.
    """
    f = read(path)
    path = f.path
    with torch_single_thread():  # see read()
        return _load_into(f, path, model)


def _load_into(f: SparseFile, path: str, model: nn.Module | None) -> nn.Module:
    if model is None:
        model = _skeleton(path, f.model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
    for lpath, rec in f.layers.items():
        try:
            target = model.get_submodule(lpath)
        except AttributeError:
            raise _fail(path, f"layer {lpath!r} of the file does not exist in the given model") from None
        _check_target(path, rec, target)
    for ipath in f.extra["identities"]:
        try:
            target = model.get_submodule(ipath)
        except AttributeError:
            raise _fail(path, f"module {ipath!r} (folded away in the file) does not exist in the given model") from None
        if not isinstance(target, (nn.Identity, nn.modules.batchnorm._BatchNorm)):
            raise _fail(path, f"module {ipath!r} is folded away in the file but is a {type(target).__name__} "
                              "(not a BatchNorm) in the model")
        _swap(model, ipath, nn.Identity())
    for lpath, rec in f.layers.items():
        if rec.meta["runtime"] == "dense":
            target = model.get_submodule(lpath)
            if (target.bias is None) != (rec.bias is None):
                raise _fail(path, f"layer {lpath!r}: bias in the file and in the model do not match")
            with torch.no_grad():
                target.weight.copy_(rec.packed.to_dense().reshape(target.weight.shape))
                if rec.bias is not None:
                    target.bias.copy_(rec.bias)
            continue
        new = _build_module(rec)
        old = _swap(model, lpath, new)
        ref = next(iter(old.parameters()), None)
        if ref is not None and ref.device.type != "cpu":
            _swap(model, lpath, new.to(ref.device))
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in f.layers)}
    missing, unexpected = sorted(expected - set(f.dense)), sorted(set(f.dense) - expected)
    if missing or unexpected:
        raise _fail(path, f"the file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = model.state_dict()
    for k, v in f.dense.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise _fail(path, f"entry {k!r} has shape {list(v.shape)} in the file but {list(state[k].shape)} in the model")
        if v.dtype != state[k].dtype and not (v.dtype.is_floating_point and state[k].dtype.is_floating_point):
            raise _fail(path, f"entry {k!r} is {v.dtype} in the file but {state[k].dtype} in the model")
    model.load_state_dict(f.dense, strict=False)
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Inspection


def summary(path: "str | os.PathLike") -> dict:
    """Per-layer format, density and bytes, and the file's total compression.

    ``runtime`` is ``"sparse"`` for layers that run sparse kernels and
    ``"dense"`` for pruned layers that run dense (sparsify found dense
    faster) but are stored compressed.

    ``dense_equivalent_bytes`` is what the same model takes as a float32
    safetensors ``state_dict`` (dense weights and everything else).
    """
    f = read(path)
    layers = []
    for p, rec in f.layers.items():
        layers.append({"layer": p, "type": rec.type, "kind": rec.kind, "runtime": rec.meta["runtime"],
                       "shape": list(rec.shape),
                       "density": rec.density, "nnz": rec.meta["nnz"], "bytes": rec.nbytes,
                       "dense_bytes": rec.dense_nbytes, "activation": rec.meta.get("activation")})
    stored = {id(t): t for t in f.dense.values()}
    other = sum(t.numel() * t.element_size() for t in stored.values())
    other_f32 = sum(t.numel() * 4 if t.dtype.is_floating_point else t.numel() * t.element_size()
                    for t in stored.values())
    sparse_bytes = sum(r["bytes"] for r in layers)
    dense_layer_bytes = sum(r["dense_bytes"] for r in layers)
    dense_equiv = dense_layer_bytes + other_f32
    return {
        "file": f.path,
        "file_bytes": f.file_bytes,
        "format_version": f.format_version,
        "sparsert_version": f.sparsert_version,
        "model": None if f.model is None else (f.model.get("example") or f.model.get("hf_class")),
        "layers": layers,
        "sparse_layer_bytes": sparse_bytes,
        "sparse_layer_dense_bytes": dense_layer_bytes,
        "other_bytes": other,
        "dense_equivalent_bytes": dense_equiv,
        "layer_compression": dense_layer_bytes / sparse_bytes if sparse_bytes else float("inf"),
        "compression": dense_equiv / f.file_bytes if f.file_bytes else float("inf"),
    }


# ---------------------------------------------------------------------------
# torch.export


def _plain(out):
    """Model outputs as built-in containers: a fresh process without the model's code
    (e.g. transformers' ``ModelOutput`` classes) can still rebuild them."""
    if isinstance(out, Mapping):
        return {str(k): _plain(v) for k, v in out.items() if v is not None}
    if isinstance(out, (tuple, list)):
        return tuple(_plain(v) for v in out)
    return out


class _PlainOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return _plain(self.model(*args, **kwargs))


def export(sparse_model: nn.Module, example_inputs, path: "str | os.PathLike"):
    """Exports ``sparse_model`` with ``torch.export`` to a ``.pt2`` file.

    The graph calls ``torch.ops.sparsert.*`` for every sparse layer, with the
    packed arrays as constants of the program. In a fresh process,
    ``import sparsert`` (registers the ops) then ``torch.export.load(path)``
    runs it without any model code. ``example_inputs`` is a tensor, a tuple of
    positional inputs, or a dict of keyword inputs. Outputs become built-in
    containers (a ``ModelOutput`` becomes a dict of its tensors), so loading
    needs no model classes. Returns the ExportedProgram.
    """
    if not isinstance(sparse_model, nn.Module):
        raise TypeError(f"sparse_model must be an nn.Module, got {type(sparse_model).__name__}")
    import sparsert.ops  # noqa: F401  (registers the ops the graph calls)

    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs")
    was = sparse_model.training
    sparse_model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(_PlainOutputs(sparse_model), args, kwargs)
    finally:
        sparse_model.train(was)
    torch.export.save(program, str(path))
    return program


def sparse_op_count(program) -> int:
    """How many nodes of an ExportedProgram's graph call sparsert ops."""
    return sum(1 for n in program.graph.nodes
               if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "sparsert")

"""``save``: a sparse model to a sparsert file (see :mod:`sparsert.io.schema`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .schema import FORMAT, FORMAT_VERSION, PATH_RE, SEP, _packed_arrays, digest, layer_meta

__all__ = ["save"]


def _model_ref(model: nn.Module) -> dict | None:
    """How to rebuild the architecture without model code from the user."""
    example = getattr(model, "sparsert_example", None)
    if isinstance(example, str):
        return {"example": example}
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    from ..convert.streamline import StreamlinedDecoder, StreamlinedEncoder

    if isinstance(model, (StreamlinedEncoder, StreamlinedDecoder)):  # the HF class, streamlined again on load
        return {"hf_class": model.hf_class, "hf_config": json.loads(config.to_json_string(use_diff=False)),
                "streamline": model.recipe()}
    if type(model).__module__.startswith("transformers."):
        return {"hf_class": type(model).__name__, "hf_config": json.loads(config.to_json_string(use_diff=False))}
    return None


def _ident(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
        if t.numel() else None


def _compressed_storage(module: nn.Module, shared: set):
    """CSR of a pruned plain nn.Linear/nn.Conv2d that runs dense (sparsify found dense faster),
    when that is much smaller on disk; ``None`` otherwise. Loading unpacks it back to the dense weight."""
    from ..formats import CSR

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
    from ..nn import SparseConv2d, SparseLinear

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
            packed = _compressed_storage(module, shared) if path and PATH_RE.match(path) else None
            if packed is None or any(path.startswith(p + ".") for p in sparse_paths):
                continue
            layers[path] = layer_meta(module, packed)
            for name, t in _packed_arrays(packed).items():
                tensors[f"{path}{SEP}{name}"] = t
            if module.bias is not None:
                tensors[f"{path}{SEP}bias"] = module.bias.detach().to("cpu", torch.float32).contiguous()
            sparse_paths.append(path)
            continue
        if any(path.startswith(p + ".") for p in sparse_paths):
            continue  # pragma: no cover - sparse layers do not nest
        if not PATH_RE.match(path):
            raise ValueError(f"cannot save a sparse layer at module path {path!r}")
        packed = module.packed
        if not isinstance(packed, torch.Tensor):
            packed = packed.to("cpu")
        layers[path] = layer_meta(module, packed)
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

    from .. import __version__

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
        "sha256": digest(meta_json, tensors),
    }
    data = st_save(tensors, metadata=metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"path": str(path), "file_bytes": len(data), "layers": len(layers), "dense_entries": len(dense)}



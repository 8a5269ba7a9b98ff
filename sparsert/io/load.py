"""``read``, ``load`` and ``summary``: a sparsert file back into a model, every
byte validated first (see :mod:`sparsert.io.schema`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from pathlib import Path

import torch
from torch import nn

from ..nn.surgery import swap
from ..ops._threads import torch_single_thread
from ..ops.conv import pair
from .schema import (FORMAT, FORMAT_VERSION, PATH_RE, SEP, LayerRecord, SparseFile, _Meta,
                     digest, fail, read_layer)

__all__ = ["read", "load", "summary", "file_sha256"]

_MAX_HEADER = 100 << 20
_MAX_FILE = 1 << 40  # 1 TiB: larger is no model file (and would not fit in memory anyway)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _read_header(path, data: bytes) -> dict:
    if len(data) < 8:
        raise fail(path, f"not a safetensors file (only {len(data)} bytes; truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise fail(path, f"not a safetensors file or truncated: header claims {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(path, f"corrupt safetensors header ({e})") from None
    except RecursionError:
        raise fail(path, "corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise fail(path, "corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise fail(path, "not a sparsert file (a safetensors file without sparsert metadata; "
                          "a plain state_dict? load it with safetensors and run sparsert.sparsify)")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise fail(path, f"file format version {version!r} is not supported: this sparsert reads version "
                          f"{FORMAT_VERSION} (the file was written by sparsert {meta.get('sparsert_version')!r}; "
                          "re-save it with a matching sparsert)")
    return meta


def file_sha256(path: "str | os.PathLike") -> str:
    """The SHA-256 of a whole file (hex): what ``allowed_sha256`` lists."""
    path = str(path)
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _allow_list(allowed_sha256) -> frozenset:
    if isinstance(allowed_sha256, str):
        allowed_sha256 = (allowed_sha256,)
    try:
        hashes = frozenset(h.lower() for h in allowed_sha256)
    except (TypeError, AttributeError):
        raise TypeError("allowed_sha256 must be a hex SHA-256 string or a collection of them") from None
    bad = [h for h in hashes if not _SHA256_RE.fullmatch(h)]
    if bad or not hashes:
        raise ValueError(f"allowed_sha256 must hold 64-digit hex SHA-256 strings, got {sorted(bad)[:3] or 'none'}")
    return hashes


def read(path: "str | os.PathLike", *, allowed_sha256=None) -> SparseFile:
    """Reads and fully validates a sparsert file (no model needed).

    ``allowed_sha256``: a hex SHA-256 or a collection of them (see
    :func:`file_sha256`); when given, a file whose whole-file hash is not
    listed is refused before any of it is parsed. The checksum inside a file
    detects corruption, not authorship (whoever crafts a file can recompute
    it): an allow-list is how a server loads only the files it approved."""
    allowed = None if allowed_sha256 is None else _allow_list(allowed_sha256)
    # Validation is a few memory-bound passes: on a busy 2-core machine, 2 torch
    # threads were measured 1000x slower than 1 (spin-wait contention).
    with torch_single_thread():
        return _read(path, allowed)


def _read_bytes(path: str) -> bytes:
    """The whole file; only regular files, at most ``_MAX_FILE`` bytes (``/dev/zero``
    would otherwise be read until memory runs out)."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(info.st_mode):
                raise fail(path, "is not a regular file (a device, pipe or socket), not a sparsert file")
            if info.st_size > _MAX_FILE:
                raise fail(path, f"is {info.st_size} bytes, more than the {_MAX_FILE}-byte limit of a sparsert file")
            return fh.read()
    except FileNotFoundError:
        raise fail(path, "no such file") from None
    except IsADirectoryError:
        raise fail(path, "is a directory, not a sparsert file") from None
    except MemoryError:
        raise fail(path, "not enough memory to read the file") from None
    except OSError as e:
        raise fail(path, f"cannot read ({e.strerror or e})") from None


def _read(path, allowed=None) -> SparseFile:
    from safetensors.torch import load as st_load

    path = str(path)
    data = _read_bytes(path)
    if allowed is not None and hashlib.sha256(data).hexdigest() not in allowed:
        raise fail(path, "refused: its SHA-256 is not in allowed_sha256 (the file is not one you approved)")
    meta = _read_header(path, data)
    meta_json, stored_digest = meta.get("sparsert"), meta.get("sha256")
    if not isinstance(meta_json, str) or not isinstance(stored_digest, str):
        raise fail(path, "metadata lacks the 'sparsert' description or its 'sha256' digest")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on malformed files
        raise fail(path, f"corrupt or truncated safetensors data ({type(e).__name__}: {e})") from None
    if digest(meta_json, tensors) != stored_digest:
        raise fail(path, "checksum mismatch: the file is corrupt (flipped or altered bytes)")
    m = _Meta(path)
    try:
        body = json.loads(meta_json)
    except json.JSONDecodeError as e:  # pragma: no cover - the digest covers the JSON
        raise fail(path, f"corrupt metadata JSON ({e})") from None
    except RecursionError:  # (a crafted file whose digest was recomputed)
        raise fail(path, "corrupt metadata JSON (nested too deeply)") from None
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
    if not isinstance(identities, list) or not all(isinstance(p, str) and PATH_RE.match(p) for p in identities):
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
        rec, names = read_layer(path, m, lpath, d, tensors)
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
        raise fail(path, f"tensors not described by the metadata: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
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
    from ..nn import SparseConv2d, SparseLinear

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
    from ..nn import SparseConv2d, SparseLinear

    where = f"layer {rec.path!r}"
    if rec.meta["runtime"] == "dense" and type(target) not in (nn.Linear, nn.Conv2d):
        raise fail(path, f"{where} runs dense and needs an nn.Linear/nn.Conv2d in the model, "
                          f"got {type(target).__name__}")
    if rec.type == "linear":
        if not isinstance(target, (nn.Linear, SparseLinear)):
            raise fail(path, f"{where} is a linear layer in the file but the model has a {type(target).__name__} there")
        want = (rec.meta["in_features"], rec.meta["out_features"])
        got = (int(target.in_features), int(target.out_features))
    else:
        if not isinstance(target, (nn.Conv2d, SparseConv2d)):
            raise fail(path, f"{where} is a conv2d layer in the file but the model has a {type(target).__name__} there")
        conv = rec.meta["conv"]
        want = (conv["in_channels"], conv["out_channels"], conv["kernel_size"], conv["stride"], conv["padding"],
                conv["dilation"], conv["groups"], conv["padding_mode"])
        got = (int(target.in_channels), int(target.out_channels), list(pair(target.kernel_size, "kernel_size")),
               list(pair(target.stride, "stride")),
               list(pair(target.padding, "padding")) if not isinstance(target.padding, str) else target.padding,
               list(pair(target.dilation, "dilation")), int(target.groups), str(target.padding_mode))
    if want != got:
        raise fail(path, f"{where}: the file's layer {want} does not fit the model's {got}")


def _config_ints(v):
    """Every int inside a JSON value."""
    if isinstance(v, bool):
        return
    if isinstance(v, int):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _config_ints(x)
    elif isinstance(v, list):
        for x in v:
            yield from _config_ints(x)


def _check_config_bounds(path, config: dict, f: SparseFile) -> None:
    """A stored config may not declare sizes the stored arrays cannot back.

    Every size of a model (layers, hidden width, vocabulary, positions) is at
    most its number of stored parameters, all of which the file must hold; a
    config that names more is a lie, refused before anything is built (a 38 KB
    file naming a 2048-wide, 8-layer BERT would otherwise allocate 2.2 GB first)."""
    stored = sum(t.numel() for t in {id(t): t for t in f.dense.values()}.values())
    for rec in f.layers.values():
        stored += rec.shape[0] * rec.shape[1] + (0 if rec.bias is None else rec.bias.numel())
    for v in _config_ints(config):
        if v > stored:
            raise fail(path, f"the stored model config names a size of {v}, more than the {stored} parameters "
                              "the file holds: refused before building the model")


def _skeleton(path, ref: dict | None, f: SparseFile | None = None) -> nn.Module:
    """The architecture the file records, built on the meta device (no memory):
    :func:`load` fits the file to it before building it for real."""
    if ref is None:
        raise fail(path, "the file does not say how to build the model: pass a model skeleton, "
                          "sparsert.load(path, model)")
    if "example" in ref:
        from .. import models

        name = ref["example"]
        if name not in models.EXAMPLES:
            raise fail(path, f"unknown built-in example {name!r}; pass a model skeleton")
        with torch.device("meta"):
            return models.skeleton(name)
    cls_name, config = ref.get("hf_class"), ref.get("hf_config")
    if isinstance(cls_name, str) and isinstance(config, dict) and isinstance(config.get("model_type"), str):
        try:
            import transformers
        except ImportError:
            raise fail(path, "the file holds a Hugging Face model: pip install transformers") from None
        cls = getattr(transformers, cls_name, None) if cls_name.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise fail(path, f"unknown Hugging Face model class {cls_name!r}")
        if f is not None:
            _check_config_bounds(path, config, f)
        try:
            cfg = transformers.AutoConfig.for_model(**config)
            with torch.device("meta"):
                model = cls(cfg)
        except Exception as e:  # config errors come in many types
            raise fail(path, f"cannot build {cls_name} from the stored config ({type(e).__name__}: {e})") from None
        with torch.device("meta"):
            return _streamlined(path, model, ref)
    raise fail(path, "unrecognised 'model' description; pass a model skeleton")


def load(path: "str | os.PathLike", model: nn.Module | None = None, *, allowed_sha256=None) -> nn.Module:
    """Loads a sparsert file into ``model`` (a skeleton: e.g. ``BertModel(config)``).

    The file's sparse layers replace the skeleton's layers at the same module
    paths (their kind and size must match) and every other ``state_dict``
    entry is loaded strictly. Without ``model``, the architecture the file
    records (built-in example or Hugging Face config) is built: first on the
    meta device (no memory), where every layer and entry of the file must fit,
    then for real. Returns the model in eval mode. ``allowed_sha256``: see
    :func:`read` (files not on the list are refused before parsing). Raises
    :class:`SparsertFileError` on any problem.
    """
    f = read(path, allowed_sha256=allowed_sha256)
    path = f.path
    with torch_single_thread():  # see read()
        if model is None:
            # The whole fit, on a skeleton that allocates nothing: a file whose
            # config lies about its size is refused before the real build.
            _load_into(f, path, _skeleton(path, f.model, f), check_only=True)
            model = _materialize(path, f.model)
        return _load_into(f, path, model)


def _materialize(path, ref: dict) -> nn.Module:
    """The recorded architecture on the CPU (after the file fit it on the meta device)."""
    with torch.device("cpu"):
        if "example" in ref:
            from .. import models
            return models.skeleton(ref["example"])
        import transformers
        model = getattr(transformers, ref["hf_class"])(transformers.AutoConfig.for_model(**ref["hf_config"]))
        return _streamlined(path, model, ref)


def _streamlined(path, model: nn.Module, ref: dict) -> nn.Module:
    """``model`` streamlined as the file records (``sparsert.streamline``), or as is."""
    if "streamline" not in ref:
        return model
    from ..convert.streamline import rebuild

    try:
        return rebuild(model, ref["streamline"])
    except (TypeError, ValueError) as e:
        raise fail(path, f"cannot streamline the stored model as recorded: {e}") from None


def _load_into(f: SparseFile, path: str, model: nn.Module, check_only: bool = False) -> nn.Module:
    """Fits ``f`` into ``model`` and loads it; ``check_only``: every check, no copy
    (``model`` may be on the meta device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
    for lpath, rec in f.layers.items():
        try:
            target = model.get_submodule(lpath)
        except AttributeError:
            raise fail(path, f"layer {lpath!r} of the file does not exist in the given model") from None
        _check_target(path, rec, target)
    for ipath in f.extra["identities"]:
        try:
            target = model.get_submodule(ipath)
        except AttributeError:
            raise fail(path, f"module {ipath!r} (folded away in the file) does not exist in the given model") from None
        if not isinstance(target, (nn.Identity, nn.modules.batchnorm._BatchNorm)):
            raise fail(path, f"module {ipath!r} is folded away in the file but is a {type(target).__name__} "
                              "(not a BatchNorm) in the model")
        swap(model, ipath, nn.Identity())
    for lpath, rec in f.layers.items():
        if rec.meta["runtime"] == "dense":
            target = model.get_submodule(lpath)
            if (target.bias is None) != (rec.bias is None):
                raise fail(path, f"layer {lpath!r}: bias in the file and in the model do not match")
            if check_only:
                continue
            with torch.no_grad():
                target.weight.copy_(rec.packed.to_dense().reshape(target.weight.shape))
                if rec.bias is not None:
                    target.bias.copy_(rec.bias)
            continue
        try:
            new = _build_module(rec)
        except (ValueError, TypeError) as e:
            raise fail(path, f"layer {lpath!r}: {e}") from None
        if check_only:
            continue
        old = swap(model, lpath, new)
        ref = next(iter(old.parameters()), None)
        if ref is not None and ref.device.type != "cpu":
            swap(model, lpath, new.to(ref.device))
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in f.layers)}
    missing, unexpected = sorted(expected - set(f.dense)), sorted(set(f.dense) - expected)
    if missing or unexpected:
        raise fail(path, f"the file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = model.state_dict()
    for k, v in f.dense.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise fail(path, f"entry {k!r} has shape {list(v.shape)} in the file but {list(state[k].shape)} in the model")
        if v.dtype != state[k].dtype and not (v.dtype.is_floating_point and state[k].dtype.is_floating_point):
            raise fail(path, f"entry {k!r} is {v.dtype} in the file but {state[k].dtype} in the model")
    if check_only:
        return model
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
                       "precision": getattr(rec.packed, "precision", "fp32"), "shape": list(rec.shape),
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



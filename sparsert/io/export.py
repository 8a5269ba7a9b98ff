"""``export``: a sparse model to a ``torch.export`` program (``.pt2``) that calls
``torch.ops.sparsert.*``."""

from __future__ import annotations

import contextlib
import os
from typing import Mapping

import torch
from torch import nn

__all__ = ["export", "sparse_op_count", "load_program", "PickleRefused"]


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


class PickleRefused(ValueError):
    """A ``.pt2`` archive holds a part that only ``pickle`` can read (and pickle runs code)."""


@contextlib.contextmanager
def _without_pickle(path: str):
    """Everything ``torch.export.load`` could unpickle, refused for the duration:
    ``torch.load`` only in ``weights_only`` mode (torch's restricted unpickler,
    which builds tensors and containers and calls nothing else), and torch's
    other unpicklers (TorchScript objects, plain ``pickle.loads`` of opaque
    constants) not at all. ``torch.export.load`` falls back to full pickle for
    example inputs that weights_only cannot read, and uses it outright for
    weights and constants saved with ``use_pickle``: a crafted archive runs
    code there."""
    import pickle as _pickle
    import types

    from torch.export.pt2_archive import _package

    def refuse(*_args, **_kwargs):
        raise PickleRefused(f"{path}: refused: the archive holds a pickled part, and unpickling can run code "
                            "(load it with trust_pickle=True / --trust-pickle only if you trust the file)")

    real_load = torch.load

    def weights_only_load(f, *args, weights_only=None, **kwargs):
        if weights_only is False:
            refuse()
        return real_load(f, *args, weights_only=True, **kwargs)

    stub_pickle = types.SimpleNamespace(**{k: getattr(_pickle, k) for k in dir(_pickle) if not k.startswith("__")})
    stub_pickle.loads = stub_pickle.load = refuse
    saved = (torch.load, torch._C._pickle_load_obj, _package.pickle)
    torch.load, torch._C._pickle_load_obj, _package.pickle = weights_only_load, refuse, stub_pickle
    try:
        yield
    finally:
        torch.load, torch._C._pickle_load_obj, _package.pickle = saved


def load_program(path: "str | os.PathLike", *, trust_pickle: bool = False):
    """``torch.export.load(path)`` that never unpickles unless ``trust_pickle``:
    an archive with a part only pickle can read (example inputs, weights or
    constants saved with pickle, custom objects) raises :class:`PickleRefused`.
    Archives written by :func:`export` need no pickle. ``import sparsert`` has
    registered the ops the program calls."""
    path = str(path)
    if trust_pickle:
        return torch.export.load(path)
    with _without_pickle(path):
        return torch.export.load(path)

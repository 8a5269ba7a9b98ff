"""``export``: a sparse model to a ``torch.export`` program (``.pt2``) that calls
``torch.ops.sparsert.*``."""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

__all__ = ["export", "sparse_op_count"]


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

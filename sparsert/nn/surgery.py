"""Module surgery: replacing a submodule by its dotted name, undoably.

The one place that swaps layers in a model (``sparsify``, BatchNorm folding,
``load``)."""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["parent_and_attr", "swap", "rollback"]


def parent_and_attr(model: nn.Module, name: str) -> tuple:
    """(parent module, attribute name) of the submodule ``name`` ("encoder.layer.0.fc")."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap(model: nn.Module, name: str, new: nn.Module, undo: Optional[list] = None) -> nn.Module:
    """Puts ``new`` at ``name``; returns the module it replaced. With ``undo`` (a
    list), records the swap so :func:`rollback` can revert it."""
    parent, attr = parent_and_attr(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    if undo is not None:
        undo.append((parent, attr, old))
    return old


def rollback(undo: list) -> None:
    """Reverts the swaps recorded in ``undo`` (latest first) and empties it."""
    for parent, attr, old in reversed(undo):
        setattr(parent, attr, old)
    undo.clear()

"""Batch handling shared by criteria and fine-tuning.

A batch may be:

* a Tensor — the model input, no target;
* a tuple/list ``(x,)`` or ``(x, y, ...)`` — input and (optional) target;
* a Mapping — keyword arguments for the model (Hugging Face style); a
  ``"labels"`` entry, if present, is passed to the model unchanged and is not
  treated as a separate target.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show progress bars only when stderr is a terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """Return ``(args, kwargs, target)`` for one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        return (), dict(batch), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("empty batch")
        target = batch[1] if len(batch) >= 2 else None
        return (batch[0],), {}, target
    raise TypeError(
        f"unsupported batch type {type(batch).__name__}: expected a Tensor, "
        "a (input, target) tuple or a dict of model keyword arguments"
    )


def run(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """Forward one batch; return ``(raw_output, target)``."""
    batch = _to(batch, model_device(model))
    args, kwargs, target = split_batch(batch)
    return model(*args, **kwargs), target


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a loss is computed on: logits / last hidden state / first output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            if key in out and out[key] is not None:
                return out[key]
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def objective(
    out: Any,
    target: Any,
    loss_fn: Callable | None,
    default: str = "sum",
) -> torch.Tensor:
    """Scalar objective for gradient-based criteria and fine-tuning.

    ``loss_fn(output, target)`` (or ``loss_fn(output)`` when the batch has no
    target) when given, where ``output`` is :func:`output_tensor` of the model
    output. Otherwise: cross-entropy for integer targets, MSE for float
    targets, and without targets the model output itself — ``y.sum()``
    (``default="sum"``, the seed's ∂y/∂θ) or ``0.5·‖y‖²`` (``default="sq"``).
    """
    y = output_tensor(out)
    if loss_fn is not None:
        return loss_fn(y, target) if target is not None else loss_fn(y)
    if target is not None:
        if torch.is_floating_point(target):
            return F.mse_loss(y, target)
        return F.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))
    if default == "sq":
        return 0.5 * y.float().pow(2).sum()
    return y.sum()
